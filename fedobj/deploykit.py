"""Keys and certificates for a TLS deployment with authenticated SuperNodes.

Flower's SuperLink serves its Fleet, Control and Runtime APIs over TLS with one
certificate (``--ssl-ca-certfile --ssl-certfile --ssl-keyfile``), and with
``--enable-supernode-auth`` it only lets in SuperNodes whose public key an operator
registered (``flwr supernode register KEY.pub``). Flower reads those SuperNode keys
as OpenSSH-format EC keys on a NIST curve and refuses anything else. This module
makes the whole set with the ``cryptography`` package (a Flower dependency), so a
deployment needs neither ``openssl`` nor ``ssh-keygen`` on the machine.

Layout of the output folder::

    ca.crt  ca.key               the CA; only ca.crt travels (SuperNodes, flwr CLI)
    superlink.crt  superlink.key the SuperLink's server certificate, signed by the CA
    supernode-<i>.key            OpenSSH private key of SuperNode i (stays on it)
    supernode-<i>.pub            its public key, to ``flwr supernode register``

Every private key is written 0600. Files are written atomically (temporary file,
``fsync``, rename) so an interrupted run never leaves half a key, and existing
files are never replaced unless ``force`` says so: silently re-keying would lock
out every registered SuperNode.
"""

from __future__ import annotations

import datetime
import ipaddress
import os
import re
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from fedobj.errors import FedObjError

CURVES: dict[str, type[ec.EllipticCurve]] = {
    "P-256": ec.SECP256R1,
    "P-384": ec.SECP384R1,  # what Flower's docs use for SuperNode keys
}
# Always in the SuperLink certificate: the deployment recipe and tests dial these.
DEFAULT_HOSTS = ("127.0.0.1", "localhost")
# RFC 1123 host names (letters, digits, hyphens; dot-separated), optional "*." prefix.
_DNS_LABEL = r"(?!-)[A-Za-z0-9-]{1,63}(?<!-)"
_DNS_NAME = re.compile(rf"^(\*\.)?{_DNS_LABEL}(\.{_DNS_LABEL})*\.?$")
# Clocks on boards drift: a certificate valid from a few minutes ago still works.
_CLOCK_SKEW = datetime.timedelta(minutes=5)


class DeployKitError(FedObjError):
    """Keys or certificates cannot be made as asked; the message says why."""


@dataclass(frozen=True)
class NodeKeyFiles:
    """One SuperNode's key pair on disk."""

    private_key: Path
    public_key: Path


@dataclass(frozen=True)
class DeployKeyFiles:
    """Everything :func:`write_deploy_keys` wrote, by role."""

    ca_cert: Path
    ca_key: Path
    server_cert: Path
    server_key: Path
    nodes: tuple[NodeKeyFiles, ...]

    def all_files(self) -> list[Path]:
        """Every file of the set, CA first."""
        files = [self.ca_cert, self.ca_key, self.server_cert, self.server_key]
        for node in self.nodes:
            files += [node.private_key, node.public_key]
        return files


def _curve(curve: str) -> ec.EllipticCurve:
    try:
        return CURVES[curve]()
    except KeyError:
        raise DeployKitError(
            f"curve must be one of {', '.join(CURVES)}, got {curve!r}"
        ) from None


def _now() -> datetime.datetime:
    return datetime.datetime.now(datetime.UTC)


def _check_days(days: int) -> None:
    if days < 1:
        raise DeployKitError(f"validity must be at least 1 day, got {days}")


def make_ca(
    common_name: str = "fedobj deployment CA", curve: str = "P-384", days: int = 3650
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """A self-signed CA that may sign server certificates only (path length 0).

    The CA certificate is what SuperNodes and the ``flwr`` CLI trust
    (``--root-certificates``, ``root-certificates = ...``); its key signs the
    SuperLink's certificate and should then be kept offline.
    """
    _check_days(days)
    key = ec.generate_private_key(_curve(curve))
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, common_name)])
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(now + datetime.timedelta(days=days))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=False,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=False,
                key_cert_sign=True,
                crl_sign=True,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .sign(key, hashes.SHA384())
    )
    return key, cert


def subject_alt_names(hosts: Sequence[str] = ()) -> list[x509.GeneralName]:
    """SAN entries for ``127.0.0.1``, ``localhost`` and ``hosts`` (deduplicated).

    An IP literal becomes an ``IP:`` entry, anything else must be a valid DNS name:
    TLS clients match the address they dial against these, never against the CN.
    """
    names: list[x509.GeneralName] = []
    seen: set[str] = set()
    for raw in (*DEFAULT_HOSTS, *hosts):
        host = raw.strip()
        if host.startswith("[") and host.endswith("]"):  # [::1] as written in URLs
            host = host[1:-1]
        try:
            ip = ipaddress.ip_address(host)
        except ValueError:
            if not _DNS_NAME.match(host) or len(host) > 253:
                raise DeployKitError(
                    f"host {raw!r} is neither an IP address nor a DNS name"
                ) from None
            key = f"DNS:{host.lower()}"
            entry: x509.GeneralName = x509.DNSName(host.lower())
        else:
            key = f"IP:{ip}"
            entry = x509.IPAddress(ip)
        if key not in seen:
            seen.add(key)
            names.append(entry)
    return names


def make_server_cert(
    ca_key: ec.EllipticCurvePrivateKey,
    ca_cert: x509.Certificate,
    hosts: Sequence[str] = (),
    curve: str = "P-384",
    days: int = 365,
) -> tuple[ec.EllipticCurvePrivateKey, x509.Certificate]:
    """The SuperLink's TLS server certificate, signed by ``ca_key``.

    SANs: ``IP:127.0.0.1``, ``DNS:localhost`` and every extra host. The SuperLink
    also hands its CA file to the ServerApp's SuperExec, which dials 127.0.0.1, so
    the loopback entry is needed even when SuperNodes use a public name.
    """
    _check_days(days)
    key = ec.generate_private_key(_curve(curve))
    sans = subject_alt_names(hosts)
    first = sans[0].value
    subject = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, str(first))])
    ca_ski = ca_cert.extensions.get_extension_for_class(x509.SubjectKeyIdentifier)
    now = _now()
    cert = (
        x509.CertificateBuilder()
        .subject_name(subject)
        .issuer_name(ca_cert.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - _CLOCK_SKEW)
        .not_valid_after(min(now + datetime.timedelta(days=days), _not_after(ca_cert)))
        .add_extension(x509.SubjectAlternativeName(sans), critical=False)
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(
            x509.KeyUsage(
                digital_signature=True,
                content_commitment=False,
                key_encipherment=False,
                data_encipherment=False,
                key_agreement=True,
                key_cert_sign=False,
                crl_sign=False,
                encipher_only=False,
                decipher_only=False,
            ),
            critical=True,
        )
        .add_extension(
            x509.ExtendedKeyUsage([ExtendedKeyUsageOID.SERVER_AUTH]), critical=False
        )
        .add_extension(
            x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False
        )
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_subject_key_identifier(
                ca_ski.value
            ),
            critical=False,
        )
        .sign(ca_key, hashes.SHA384())
    )
    return key, cert


def _not_after(cert: x509.Certificate) -> datetime.datetime:
    return cert.not_valid_after_utc


def make_node_key(curve: str = "P-384") -> ec.EllipticCurvePrivateKey:
    """A SuperNode's authentication key (EC on a NIST curve, as Flower demands)."""
    return ec.generate_private_key(_curve(curve))


def openssh_private_bytes(key: ec.EllipticCurvePrivateKey) -> bytes:
    """``-----BEGIN OPENSSH PRIVATE KEY-----``, unencrypted: ``flower-supernode``
    reads it with ``load_ssh_private_key(data, None)``, so it takes no passphrase."""
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.OpenSSH,
        serialization.NoEncryption(),
    )


def openssh_public_bytes(key: ec.EllipticCurvePublicKey, comment: str = "") -> bytes:
    """One ``ecdsa-sha2-nistp384 AAAA... comment`` line, as ``ssh-keygen`` writes."""
    line = key.public_bytes(
        serialization.Encoding.OpenSSH, serialization.PublicFormat.OpenSSH
    )
    if comment:
        if any(c.isspace() for c in comment):
            raise DeployKitError(f"key comment may not contain spaces: {comment!r}")
        line += b" " + comment.encode()
    return line + b"\n"


def _pem_private(key: ec.EllipticCurvePrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _pem_cert(cert: x509.Certificate) -> bytes:
    return cert.public_bytes(serialization.Encoding.PEM)


def write_atomic(path: Path, data: bytes, mode: int) -> None:
    """Write ``data`` to ``path`` with permissions ``mode``, all or nothing.

    The temporary file is created 0600 in the same folder (so the rename is atomic
    and the secret is never readable by others, not even briefly), then chmod-ed.
    """
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(data)
            fh.flush()
            os.fsync(fh.fileno())
        os.chmod(tmp, mode)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def planned_files(out: Path, nodes: int) -> DeployKeyFiles:
    """Where :func:`write_deploy_keys` puts each file for ``nodes`` SuperNodes."""
    return DeployKeyFiles(
        ca_cert=out / "ca.crt",
        ca_key=out / "ca.key",
        server_cert=out / "superlink.crt",
        server_key=out / "superlink.key",
        nodes=tuple(
            NodeKeyFiles(out / f"supernode-{i}.key", out / f"supernode-{i}.pub")
            for i in range(1, nodes + 1)
        ),
    )


def _prepare_dir(out: Path) -> None:
    if out.exists() and not out.is_dir():
        raise DeployKitError(f"{out} exists and is not a folder")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise DeployKitError(f"cannot create {out}: {exc.strerror}") from exc
    if not os.access(out, os.W_OK | os.X_OK):
        raise DeployKitError(f"{out} is not writable")


def write_deploy_keys(
    out: str | Path,
    nodes: int,
    hosts: Sequence[str] = (),
    force: bool = False,
    curve: str = "P-384",
    days: int = 365,
) -> DeployKeyFiles:
    """Make a CA, a SuperLink certificate and ``nodes`` SuperNode key pairs in ``out``.

    Refuses (before writing anything) when any of the files exists, unless
    ``force``: replacing keys of a live federation locks its SuperNodes out.
    Everything is generated in memory first, so a bad host name or curve leaves
    the folder untouched too.
    """
    if nodes < 1:
        raise DeployKitError(f"need at least 1 SuperNode, got {nodes}")
    out = Path(out).expanduser().resolve()
    files = planned_files(out, nodes)
    ca_key, ca_cert = make_ca(curve=curve, days=max(days, 3650))
    server_key, server_cert = make_server_cert(
        ca_key, ca_cert, hosts, curve=curve, days=days
    )
    node_keys = [make_node_key(curve) for _ in files.nodes]
    contents: list[tuple[Path, bytes, int]] = [
        (files.ca_cert, _pem_cert(ca_cert), 0o644),
        (files.ca_key, _pem_private(ca_key), 0o600),
        (files.server_cert, _pem_cert(server_cert), 0o644),
        (files.server_key, _pem_private(server_key), 0o600),
    ]
    for i, (node, key) in enumerate(zip(files.nodes, node_keys), start=1):
        contents.append((node.private_key, openssh_private_bytes(key), 0o600))
        public = openssh_public_bytes(key.public_key(), f"fedobj-supernode-{i}")
        contents.append((node.public_key, public, 0o644))

    _prepare_dir(out)
    existing = [p.name for p, _, _ in contents if p.exists() or p.is_symlink()]
    if existing and not force:
        raise DeployKitError(
            f"{out} already holds {', '.join(existing)}; refusing to overwrite keys "
            "(registered SuperNodes would be locked out): use --force to replace them"
        )
    for path, data, mode in contents:
        try:
            write_atomic(path, data, mode)
        except OSError as exc:
            raise DeployKitError(f"cannot write {path}: {exc.strerror}") from exc
    return files
