"""``/detect``: predictions from the current version, masking, bad images, limits,
history and metrics."""

from __future__ import annotations

import hashlib
import io
import zlib

import numpy as np
import pytest
from PIL import Image

from tests.admin_api.conftest import ApiEnv, png_bytes, register_trained_version

V1 = "/api/v1"


def _detect(api: ApiEnv, data: bytes, query: str = "", name: str = "x.png"):  # type: ignore[no-untyped-def]
    return api.client.post(
        f"{V1}/detect{query}",
        files={"image": (name, data, "application/octet-stream")},
        headers=api.auth("device"),
    )


def test_detect_answers_with_the_documented_shape(
    api: ApiEnv, test_images: tuple[list[bytes], np.ndarray]
) -> None:
    images, labels = test_images
    right = 0
    for data, label in zip(images, labels, strict=True):
        resp = _detect(api, data, "?top_k=3&threshold=0.2")
        assert resp.status_code == 200, resp.text
        body = resp.json()
        assert set(body) == {
            "predictions",
            "detected",
            "inference_time_ms",
            "model_version",
        }
        assert body["model_version"] == api.version.name
        preds = body["predictions"]
        assert len(preds) == 3
        assert set(preds[0]) == {"object_name", "confidence", "class_index"}
        confs = [p["confidence"] for p in preds]
        assert confs == sorted(confs, reverse=True) and 0 < confs[0] <= 1
        assert body["detected"] == (confs[0] >= 0.2)
        names = api.version.class_map.names_by_index()
        assert all(names[p["class_index"]] == p["object_name"] for p in preds)
        right += preds[0]["class_index"] == int(label)
    assert right >= 6  # a briefly trained model: most of ten clear images


def test_inactive_category_is_never_predicted(
    api: ApiEnv, test_images: tuple[list[bytes], np.ndarray]
) -> None:
    images, _ = test_images
    trouser = images[1]
    first = _detect(api, trouser, "?top_k=10").json()["predictions"]
    assert 1 in [p["class_index"] for p in first]
    api.catalog.deactivate_category("trouser")
    after = _detect(api, trouser, "?top_k=10").json()["predictions"]
    assert 1 not in [p["class_index"] for p in after]
    assert len(after) == 9
    assert sum(p["confidence"] for p in after) == pytest.approx(1.0, abs=1e-5)


def test_new_current_version_is_used_by_the_next_request(
    api: ApiEnv,
    trained_state,
    test_images,  # type: ignore[no-untyped-def]
) -> None:
    assert _detect(api, test_images[0][0]).json()["model_version"] == "v0001"
    newer = register_trained_version(
        api.catalog, api.store, trained_state, api.catalog.snapshot(), round=2
    )
    assert _detect(api, test_images[0][0]).json()["model_version"] == newer.name
    api.catalog.set_current(api.version.name)
    assert _detect(api, test_images[0][0]).json()["model_version"] == "v0001"


def _truncated_png() -> bytes:
    return png_bytes(np.zeros((64, 64), dtype=np.uint8))[:60]


def _bomb_png() -> bytes:
    """A valid PNG header claiming 30000 x 30000 pixels (900 MP): over Pillow's
    guard, so it must be refused before any pixel is decoded."""
    import struct

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data))
            + kind
            + data
            + struct.pack(">I", zlib.crc32(kind + data) & 0xFFFFFFFF)
        )

    ihdr = struct.pack(">IIBBBBB", 30000, 30000, 8, 0, 0, 0, 0)
    idat = zlib.compress(b"\x00" * 1024)
    return (
        b"\x89PNG\r\n\x1a\n"
        + chunk(b"IHDR", ihdr)
        + chunk(b"IDAT", idat)
        + chunk(b"IEND", b"")
    )


@pytest.mark.parametrize(
    "data, words",
    [
        (b"this is not an image at all", "image"),
        (b"", "image"),
        (_truncated_png(), "truncated"),
        (png_bytes(np.zeros((4, 4), dtype=np.uint8)), "at least 8x8"),
        (_bomb_png(), "pixels"),
    ],
    ids=["text", "empty", "truncated", "tiny", "bomb"],
)
def test_bad_images_are_400_and_the_server_keeps_answering(
    api: ApiEnv,
    data: bytes,
    words: str,
    test_images,  # type: ignore[no-untyped-def]
) -> None:
    resp = _detect(api, data)
    assert resp.status_code == 400, resp.text
    assert resp.headers["content-type"].startswith("application/problem+json")
    assert words in resp.json()["detail"].lower()
    assert _detect(api, test_images[0][0]).status_code == 200


def test_an_image_in_another_form_field_is_400(
    api: ApiEnv,
    test_images,  # type: ignore[no-untyped-def]
) -> None:
    resp = api.client.post(
        f"{V1}/detect",
        files={"photo": ("a.png", test_images[0][0], "image/png")},
        headers=api.auth("device"),
    )
    assert resp.status_code == 400, resp.text
    assert "`image`" in resp.json()["detail"]
    assert api.catalog.count_detections() == 0


def test_colour_and_large_images_are_adapted(api: ApiEnv) -> None:
    img = Image.new("RGBA", (640, 480), (200, 30, 30, 255))
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    resp = _detect(api, buf.getvalue())
    assert resp.status_code == 200, resp.text
    jpeg = io.BytesIO()
    Image.new("CMYK", (100, 60)).save(jpeg, format="JPEG")
    assert _detect(api, jpeg.getvalue()).status_code == 200


def test_oversized_image_is_413(api: ApiEnv) -> None:
    big = b"\x00" * (10 * 1024 * 1024 + 1)
    resp = _detect(api, big)
    assert resp.status_code == 413, resp.text[:200]
    assert resp.headers["content-type"].startswith("application/problem+json")


def test_batch_in_order_and_limited(
    api: ApiEnv, test_images: tuple[list[bytes], np.ndarray]
) -> None:
    images, _ = test_images
    files = [("images", (f"{i}.png", d, "image/png")) for i, d in enumerate(images[:4])]
    resp = api.client.post(
        f"{V1}/detect/batch?top_k=1", files=files, headers=api.auth("device")
    )
    assert resp.status_code == 200, resp.text
    body = resp.json()
    assert body["model_version"] == api.version.name
    singles = [
        _detect(api, d, "?top_k=1").json()["predictions"][0]["class_index"]
        for d in images[:4]
    ]
    assert [r["predictions"][0]["class_index"] for r in body["results"]] == singles

    five = files + [("images", ("4.png", images[4], "image/png"))]  # limit is 4 here
    over = api.client.post(f"{V1}/detect/batch", files=five, headers=api.auth("device"))
    assert over.status_code == 413 and "at most 4" in over.json()["detail"]

    bad = files[:1] + [("images", ("bad.png", b"nope", "image/png"))]
    refused = api.client.post(
        f"{V1}/detect/batch", files=bad, headers=api.auth("device")
    )
    assert refused.status_code == 400 and "batch" in refused.json()["detail"]


def test_history_keeps_hashes_not_images_and_metrics_count(
    api: ApiEnv, test_images: tuple[list[bytes], np.ndarray]
) -> None:
    data = test_images[0][2]
    _detect(api, data, "?threshold=0")
    history = api.client.get(f"{V1}/detections", headers=api.auth("viewer")).json()
    assert history["total"] == 1
    row = history["items"][0]
    assert row["image_sha256"] == hashlib.sha256(data).hexdigest()
    assert row["model_version"] == api.version.name and row["detected"] is True
    assert row["actor"].startswith("key:")
    assert data.hex()[:64] not in str(row)
    metrics = api.client.get("/metrics", headers=api.auth("viewer")).text
    assert 'fedobj_detections_total{detected="true"}' in metrics


def test_no_version_yet_is_409(api: ApiEnv, test_images) -> None:  # type: ignore[no-untyped-def]
    # a catalog without versions: a fresh app over an empty database
    from litestar.testing import TestClient

    from admin_api import ApiSettings, create_app
    from fedobj.catalog import SyncCatalog
    from tests.admin_api.conftest import make_keys

    empty = api.outputs / "empty"
    catalog = SyncCatalog(f"sqlite://{empty / 'catalog.db'}")
    catalog.migrate()
    keys = make_keys(catalog, empty / "api-secret")
    settings = ApiSettings(outputs_dir=empty, rate_limit_per_second=0)
    with TestClient(create_app(settings)) as client:
        resp = client.post(
            f"{V1}/detect",
            files={"image": ("a.png", test_images[0][0], "image/png")},
            headers={"Authorization": f"Bearer {keys['device']}"},
        )
        assert resp.status_code == 409 and "no model version" in resp.json()["detail"]
        current = client.get(
            f"{V1}/versions/current",
            headers={"Authorization": f"Bearer {keys['viewer']}"},
        )
        assert current.status_code == 409
