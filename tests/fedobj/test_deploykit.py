"""fedobj.deploykit and ``fedobj deploy keys``: the CA, the SuperLink certificate and
the SuperNode keys are what Flower 1.41 accepts, and bad input fails clearly."""

from __future__ import annotations

import contextlib
import ipaddress
import ssl
import stat
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID
from typer.testing import CliRunner

from fedobj.cli import app
from fedobj.deploykit import (
    DeployKitError,
    make_ca,
    make_server_cert,
    subject_alt_names,
    write_atomic,
    write_deploy_keys,
)


def _cert(path: Path) -> x509.Certificate:
    return x509.load_pem_x509_certificate(path.read_bytes())


def _mode(path: Path) -> int:
    return stat.S_IMODE(path.stat().st_mode)


def test_ca_signs_the_superlink_certificate_for_loopback_and_extra_hosts(
    tmp_path: Path,
) -> None:
    files = write_deploy_keys(tmp_path / "k", 1, hosts=["fl.example.org", "10.1.2.3"])
    ca, server = _cert(files.ca_cert), _cert(files.server_cert)

    server.verify_directly_issued_by(ca)  # raises if the CA did not sign it
    assert server.issuer == ca.subject
    assert ca.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    assert not server.extensions.get_extension_for_class(x509.BasicConstraints).value.ca
    eku = server.extensions.get_extension_for_class(x509.ExtendedKeyUsage).value
    assert ExtendedKeyUsageOID.SERVER_AUTH in eku
    san = server.extensions.get_extension_for_class(x509.SubjectAlternativeName).value
    assert san.get_values_for_type(x509.IPAddress) == [
        ipaddress.ip_address("127.0.0.1"),
        ipaddress.ip_address("10.1.2.3"),
    ]
    assert san.get_values_for_type(x509.DNSName) == ["localhost", "fl.example.org"]
    # the key file matches the certificate and is what uvicorn/ssl loads
    key = serialization.load_pem_private_key(files.server_key.read_bytes(), None)
    assert key.public_key() == server.public_key()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(files.server_cert, files.server_key)


def test_python_tls_client_trusts_the_chain_for_127_0_0_1(tmp_path: Path) -> None:
    """The exact check a SuperNode's HTTPS client makes: chain to ca.crt and a SAN
    matching the dialled address, over a real TLS handshake in memory."""
    files = write_deploy_keys(tmp_path, 1)
    server_ctx = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
    server_ctx.load_cert_chain(files.server_cert, files.server_key)
    client_ctx = ssl.create_default_context(cafile=str(files.ca_cert))

    def handshake(host: str) -> None:
        c_in, c_out, s_in, s_out = (ssl.MemoryBIO() for _ in range(4))
        client = client_ctx.wrap_bio(c_in, c_out, server_hostname=host)
        server = server_ctx.wrap_bio(s_in, s_out, server_side=True)
        for _ in range(10):
            for side, src, dst in ((client, c_out, s_in), (server, s_out, c_in)):
                with contextlib.suppress(ssl.SSLWantReadError):
                    side.do_handshake()
                dst.write(src.read())
            if client.version() and server.version():
                return
        raise AssertionError("handshake did not finish")

    handshake("127.0.0.1")
    handshake("localhost")
    with pytest.raises(ssl.SSLCertVerificationError):
        handshake("10.9.9.9")  # not in the SAN list


def test_node_keys_are_openssh_ec_on_a_nist_curve_as_flower_reads_them(
    tmp_path: Path,
) -> None:
    from flwr.cli.supernode.register import try_load_public_key
    from flwr.supercore.primitives.asymmetric import public_key_to_bytes

    files = write_deploy_keys(tmp_path, 3)
    assert len(files.nodes) == 3
    publics = set()
    for node in files.nodes:
        private_text = node.private_key.read_bytes()
        assert private_text.startswith(b"-----BEGIN OPENSSH PRIVATE KEY-----")
        private = serialization.load_ssh_private_key(private_text, None)
        public = serialization.load_ssh_public_key(node.public_key.read_bytes())
        assert isinstance(private, ec.EllipticCurvePrivateKey)
        assert isinstance(public, ec.EllipticCurvePublicKey)
        assert isinstance(public.curve, ec.SECP384R1)
        assert private.public_key() == public
        assert node.public_key.read_text().startswith("ecdsa-sha2-nistp384 ")
        # what `flwr supernode register` sends is the same key, byte for byte
        assert try_load_public_key(node.public_key) == public_key_to_bytes(public)
        publics.add(node.public_key.read_text().split()[1])
    assert len(publics) == 3, "every SuperNode has its own key"


def test_private_files_are_0600_and_public_ones_0644(tmp_path: Path) -> None:
    files = write_deploy_keys(tmp_path, 2)
    private = [files.ca_key, files.server_key] + [n.private_key for n in files.nodes]
    public = [files.ca_cert, files.server_cert] + [n.public_key for n in files.nodes]
    assert {_mode(p) for p in private} == {0o600}
    assert {_mode(p) for p in public} == {0o644}
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        p.name for p in files.all_files()
    ), "no temporary files are left behind"


def test_refuses_to_overwrite_unless_forced(tmp_path: Path) -> None:
    first = write_deploy_keys(tmp_path, 2)
    before = {p: p.read_bytes() for p in first.all_files()}
    with pytest.raises(DeployKitError, match="refusing to overwrite.*--force"):
        write_deploy_keys(tmp_path, 2)
    with pytest.raises(DeployKitError, match="supernode-1.key"):
        write_deploy_keys(tmp_path, 3)  # one clash is enough; nothing written
    assert {p: p.read_bytes() for p in first.all_files()} == before
    assert not (tmp_path / "supernode-3.key").exists()

    again = write_deploy_keys(tmp_path, 2, force=True)
    assert again.nodes[0].private_key.read_bytes() != before[first.nodes[0].private_key]


def test_an_interrupted_write_keeps_the_old_file_and_leaves_no_temp(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    target = tmp_path / "supernode-1.key"
    write_atomic(target, b"old key", 0o600)

    def fail(*_: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("fedobj.deploykit.os.replace", fail)
    with pytest.raises(OSError, match="No space"):
        write_atomic(target, b"new key", 0o600)
    assert target.read_bytes() == b"old key"
    assert [p.name for p in tmp_path.iterdir()] == ["supernode-1.key"]


def test_bad_input_is_a_clear_error(tmp_path: Path) -> None:
    with pytest.raises(DeployKitError, match="at least 1 SuperNode"):
        write_deploy_keys(tmp_path / "k", 0)
    blocker = tmp_path / "a-file"
    blocker.write_text("not a folder")
    with pytest.raises(DeployKitError, match="cannot create"):
        write_deploy_keys(blocker / "keys", 1)
    with pytest.raises(DeployKitError, match="not a folder"):
        write_deploy_keys(blocker, 1)
    with pytest.raises(DeployKitError, match="neither an IP address nor a DNS name"):
        write_deploy_keys(tmp_path / "k", 1, hosts=["bad host!"])
    with pytest.raises(DeployKitError, match="curve must be one of"):
        write_deploy_keys(tmp_path / "k", 1, curve="P-521x")
    assert not (tmp_path / "k").exists(), "a refused request writes nothing"


def test_hosts_are_deduplicated_and_typed() -> None:
    names = subject_alt_names(["LOCALHOST", "127.0.0.1", "[::1]", "node.lan"])
    assert names == [
        x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
        x509.DNSName("localhost"),
        x509.IPAddress(ipaddress.ip_address("::1")),
        x509.DNSName("node.lan"),
    ]


def test_p256_and_validity_are_honoured() -> None:
    ca_key, ca = make_ca(curve="P-256", days=30)
    _, server = make_server_cert(ca_key, ca, curve="P-256", days=10)
    key = server.public_key()
    assert isinstance(key, ec.EllipticCurvePublicKey)
    assert isinstance(key.curve, ec.SECP256R1)
    span = server.not_valid_after_utc - server.not_valid_before_utc
    assert 10 <= span.days <= 11
    assert server.not_valid_after_utc <= ca.not_valid_after_utc
    with pytest.raises(DeployKitError, match="at least 1 day"):
        make_ca(days=0)


# ------------------------------------------------------------------ CLI

runner = CliRunner()


def test_cli_writes_the_set_and_refuses_a_second_time(tmp_path: Path) -> None:
    out = tmp_path / "keys"
    done = runner.invoke(
        app, ["deploy", "keys", "--out", str(out), "--nodes", "2", "--host", "fl.lan"]
    )
    assert done.exit_code == 0, done.output
    assert (out / "supernode-2.pub").is_file() and "supernode-2" in done.output
    san = _cert(out / "superlink.crt").extensions.get_extension_for_class(
        x509.SubjectAlternativeName
    )
    assert "fl.lan" in san.value.get_values_for_type(x509.DNSName)

    again = runner.invoke(app, ["deploy", "keys", "--out", str(out), "--nodes", "2"])
    assert again.exit_code == 2
    assert "refusing to overwrite" in again.output
    forced = runner.invoke(
        app, ["deploy", "keys", "--out", str(out), "--nodes", "2", "--force"]
    )
    assert forced.exit_code == 0, forced.output


def test_cli_bad_input_exits_2_with_the_reason(tmp_path: Path) -> None:
    done = runner.invoke(
        app, ["deploy", "keys", "--out", str(tmp_path / "k"), "--nodes", "0"]
    )
    assert done.exit_code == 2
    assert "need at least 1 SuperNode" in done.output
    (tmp_path / "f").write_text("x")
    done = runner.invoke(app, ["deploy", "keys", "--out", str(tmp_path / "f" / "k")])
    assert done.exit_code == 2
    assert "cannot create" in done.output
