"""The real server process (``fedobj admin serve``) over HTTP on 127.0.0.1, and
schemathesis against its own OpenAPI schema: no request may get a 5xx.

One server per database kind for the module; it is stopped (SIGTERM, then
SIGKILL after a grace period) and checked gone at the end.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
import schemathesis
import torch
from hypothesis import HealthCheck, given, settings

from fedobj.catalog import SyncCatalog
from fedobj.registry import ArtifactStore
from tests.admin_api.conftest import make_keys, png_bytes, register_trained_version
from tests.admin_api.server import Served, serve
from tests.fedobj.catalog.conftest import KINDS, _empty_database


@pytest.fixture(scope="module", params=KINDS)
def served(
    request: pytest.FixtureRequest,
    tmp_path_factory: pytest.TempPathFactory,
    trained_state: dict[str, torch.Tensor],
) -> Iterator[Served]:
    outputs = tmp_path_factory.mktemp(f"served-{request.param}")
    with _empty_database(request.param, request) as url:
        catalog = SyncCatalog(url)
        catalog.migrate()
        catalog.seed_categories()
        register_trained_version(
            catalog, ArtifactStore(outputs), trained_state, catalog.snapshot()
        )
        keys = make_keys(catalog, outputs / "api-secret")
        with serve(outputs, url, keys) as served:
            yield served


def test_real_server_over_http(served: Served) -> None:
    with httpx.Client(base_url=served.base_url, timeout=30) as http:
        assert http.get("/health").json()["status"] == "ok"
        assert http.get("/api/v1/categories").status_code == 401
        listed = http.get("/api/v1/categories", headers=served.auth("viewer")).json()
        assert listed["total"] >= 10
        made = http.post(
            "/api/v1/categories",
            json={"name": f"Umbrella {time.time_ns()}"},
            headers=served.auth("admin"),
        )
        assert made.status_code == 201, made.text
        image = png_bytes(__import__("numpy").full((28, 28), 200, dtype="uint8"))
        det = http.post(
            "/api/v1/detect",
            files={"image": ("a.png", image, "image/png")},
            headers=served.auth("device"),
        )
        assert det.status_code == 200, det.text
        assert det.json()["model_version"] == "v0001"
        too_big = http.post(
            "/api/v1/detect",
            files={"image": ("a.png", b"\x00" * (11 * 1024 * 1024), "image/png")},
            headers=served.auth("device"),
        )
        assert too_big.status_code == 413
        assert http.get("/health").status_code == 200  # still up


def test_no_server_errors_for_generated_requests(served: Served) -> None:
    """Any request the schema allows, valid or not, gets a non-5xx answer.

    Drives schemathesis' per-operation Hypothesis strategies directly (its pytest
    plugin does not run under pytest 9), 25 derandomised examples per operation,
    as an admin so every route is reachable.
    """
    schema = schemathesis.openapi.from_url(f"{served.base_url}/schema/openapi.json")
    failures: list[str] = []
    operations = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        operations += 1

        @given(case=operation.as_strategy())
        @settings(
            max_examples=25,
            deadline=None,
            suppress_health_check=list(HealthCheck),
            derandomize=True,
            database=None,
        )
        def check(case: schemathesis.Case) -> None:
            response = case.call(
                base_url=served.base_url, headers=served.auth("admin"), timeout=60
            )
            if response.status_code >= 500:
                failures.append(
                    f"{case.method} {case.formatted_path} -> "
                    f"{response.status_code}: {response.text[:300]}"
                )

        check()
    assert operations >= 15
    assert not failures, (
        "\n".join(failures[:10]) + "\n" + served.log.read_text()[-3000:]
    )


def _self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 and its key (what a deployment's CA would sign)."""
    import datetime
    import ipaddress

    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec
    from cryptography.x509.oid import NameOID

    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "127.0.0.1")])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(
            x509.SubjectAlternativeName(
                [x509.IPAddress(ipaddress.ip_address("127.0.0.1"))]
            ),
            critical=False,
        )
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "api.crt", folder / "api.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


def test_serves_https_with_a_certificate(tmp_path: Path) -> None:
    import ssl

    cert, key = _self_signed(tmp_path)
    url = f"sqlite:///{tmp_path / 'catalog.db'}"
    catalog = SyncCatalog(url)
    catalog.migrate()
    keys = make_keys(catalog, tmp_path / "api-secret")
    with serve(
        tmp_path,
        url,
        keys,
        extra=("--ssl-certfile", str(cert), "--ssl-keyfile", str(key)),
        tls_ca=cert,
    ) as served:
        assert served.base_url.startswith("https://")
        ctx = ssl.create_default_context(cafile=str(cert))
        resp = httpx.get(
            f"{served.base_url}/api/v1/categories",
            headers=served.auth("viewer"),
            verify=ctx,
        )
        assert resp.status_code == 200
        with pytest.raises(httpx.ConnectError):  # no certificate trust, no talk
            httpx.get(f"{served.base_url}/health")
