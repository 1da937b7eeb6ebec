"""Routes on a real catalog (SQLite and PostgreSQL) and a real registry."""

from __future__ import annotations

import hashlib

import pytest

from tests.admin_api.conftest import ApiEnv, register_trained_version

V1 = "/api/v1"
PROBLEM = "application/problem+json"


def _problem(resp, status: int) -> dict:  # type: ignore[no-untyped-def]
    assert resp.status_code == status, resp.text
    assert resp.headers["content-type"].startswith(PROBLEM)
    body = resp.json()
    assert body["status"] == status and body["detail"]
    return body


# ---------------------------------------------------------------- categories


def test_category_lifecycle_and_audit(api: ApiEnv) -> None:
    admin, c = api.auth("admin"), api.client
    made = c.post(
        f"{V1}/categories",
        json={"name": " Sun hat ", "description": "d"},
        headers=admin,
    )
    assert made.status_code == 201, made.text
    body = made.json()
    assert (body["name"], body["slug"], body["class_index"]) == (
        "Sun hat",
        "sun-hat",
        10,
    )

    got = c.get(f"{V1}/categories/{body['id']}", headers=admin).json()
    assert got == body
    by_slug = c.get(f"{V1}/categories/sun-hat", headers=admin).json()
    assert by_slug["id"] == body["id"]

    renamed = c.patch(
        f"{V1}/categories/{body['id']}", json={"name": "Sun hats"}, headers=admin
    ).json()
    assert (renamed["name"], renamed["slug"], renamed["class_index"]) == (
        "Sun hats",
        "sun-hat",
        10,
    )
    gone = c.delete(f"{V1}/categories/{body['id']}", headers=admin)
    assert gone.status_code == 200 and gone.json()["is_active"] is False

    audit = c.get(f"{V1}/audit", headers=admin).json()["items"]
    admin_id = api.keys["admin"].split("_")[1]
    mine = [a for a in audit if a["actor"] == f"key:{admin_id}"]
    assert [a["action"] for a in mine] == [
        "category.update",
        "category.update",
        "category.create",
    ]
    assert mine[1]["detail"] == {"name": "Sun hats"}
    assert all(a["target"] == body["id"] for a in mine)


def test_duplicate_name_is_409_case_insensitive(api: ApiEnv) -> None:
    body = _problem(
        api.client.post(
            f"{V1}/categories", json={"name": "sneaker"}, headers=api.auth("admin")
        ),
        409,
    )
    assert "Sneaker" in body["detail"]


@pytest.mark.parametrize(
    "payload, field",
    [
        ({"name": ""}, "name"),
        ({"name": "x" * 256}, "name"),
        ({"name": 5}, "name"),
        ({}, "name"),
        ({"name": "ok", "colour": "red"}, "colour"),
    ],
)
def test_invalid_category_fields_name_the_field(
    api: ApiEnv, payload: dict, field: str
) -> None:
    body = _problem(
        api.client.post(f"{V1}/categories", json=payload, headers=api.auth("admin")),
        400,
    )
    assert field in body["detail"] or field in str(body.get("errors"))


def test_name_that_cannot_become_a_slug_is_422(api: ApiEnv) -> None:
    body = _problem(
        api.client.post(
            f"{V1}/categories", json={"name": "???"}, headers=api.auth("admin")
        ),
        422,
    )
    assert "slug" in body["detail"] or "name" in body["detail"]


def test_unknown_category_is_404(api: ApiEnv) -> None:
    for path in (
        f"{V1}/categories/00000000-0000-0000-0000-000000000000",
        f"{V1}/categories/no-such-slug/stats",
    ):
        _problem(api.client.get(path, headers=api.auth("viewer")), 404)


def test_list_filters_search_and_paginates(api: ApiEnv) -> None:
    c, viewer = api.client, api.auth("viewer")
    api.catalog.deactivate_category("bag")
    page = c.get(f"{V1}/categories?limit=3&offset=2", headers=viewer).json()
    assert [x["class_index"] for x in page["items"]] == [2, 3, 4]
    assert (page["total"], page["limit"], page["offset"]) == (10, 3, 2)
    inactive = c.get(f"{V1}/categories?active=false", headers=viewer).json()
    assert [x["slug"] for x in inactive["items"]] == ["bag"]
    found = c.get(f"{V1}/categories?q=SHIRT", headers=viewer).json()
    assert sorted(x["slug"] for x in found["items"]) == ["shirt", "t-shirt-top"]
    for bad in ("limit=0", "limit=201", "offset=-1", "limit=abc"):
        _problem(c.get(f"{V1}/categories?{bad}", headers=viewer), 400)


def test_hard_delete_only_for_never_trained_category(api: ApiEnv) -> None:
    c, admin = api.client, api.auth("admin")
    trained = c.get(f"{V1}/categories/sneaker", headers=admin).json()
    body = _problem(
        c.delete(f"{V1}/categories/{trained['id']}?hard=true", headers=admin), 409
    )
    assert "deactivate" in body["detail"]
    fresh = c.post(f"{V1}/categories", json={"name": "Scarf"}, headers=admin).json()
    assert (
        c.delete(f"{V1}/categories/{fresh['id']}?hard=true", headers=admin).status_code
        == 200
    )
    _problem(c.get(f"{V1}/categories/{fresh['id']}", headers=admin), 404)
    again = c.post(f"{V1}/categories", json={"name": "Scarf"}, headers=admin).json()
    assert again["class_index"] == fresh["class_index"] + 1  # never reused


def test_category_stats(api: ApiEnv) -> None:
    api.catalog.add_sample_counts({"t-shirt-top": 120})
    stats = api.client.get(
        f"{V1}/categories/t-shirt-top/stats", headers=api.auth("viewer")
    ).json()
    assert stats["samples_reported"] == 120
    assert stats["current_version"] == api.version.name
    assert stats["current_accuracy"] == pytest.approx(0.75)
    assert stats["versions_including"] == 1
    assert stats["version_names"] == [api.version.name]


# ---------------------------------------------------------------- versions


def test_versions_list_current_get_and_rollback(api: ApiEnv, trained_state) -> None:  # type: ignore[no-untyped-def]
    c, admin = api.client, api.auth("admin")
    second = register_trained_version(
        api.catalog, api.store, trained_state, api.catalog.snapshot(), round=2
    )
    listed = c.get(f"{V1}/versions", headers=admin).json()
    assert [v["name"] for v in listed["items"]] == [second.name, api.version.name]
    assert c.get(f"{V1}/versions/current", headers=admin).json()["name"] == second.name
    one = c.get(f"{V1}/versions/{api.version.id}", headers=admin).json()
    assert one["num_classes"] == 10 and len(one["class_map"]) == 10
    assert "uri" not in str(one["formats"])  # server paths never leak

    moved = c.post(f"{V1}/versions/{api.version.name}/rollback", headers=admin)
    assert moved.status_code == 200 and moved.json()["is_current"] is True
    assert api.catalog.current_version().name == api.version.name  # type: ignore[union-attr]
    actions = [a.action for a in api.catalog.list_audit()]
    assert actions[0] == "version.set_current"
    _problem(c.post(f"{V1}/versions/v9999/rollback", headers=admin), 404)


def test_download_checkpoint_and_onnx_with_hash(api: ApiEnv) -> None:
    c, viewer = api.client, api.auth("viewer")
    ckpt = c.get(f"{V1}/versions/{api.version.name}/download", headers=viewer)
    assert ckpt.status_code == 200
    assert hashlib.sha256(ckpt.content).hexdigest() == ckpt.headers["x-content-sha256"]
    assert ckpt.headers["x-content-sha256"] == api.version.checkpoint_sha256

    onnx = c.get(
        f"{V1}/versions/{api.version.name}/download?format=onnx", headers=viewer
    )
    assert onnx.status_code == 200
    assert hashlib.sha256(onnx.content).hexdigest() == onnx.headers["x-content-sha256"]
    recorded = api.catalog.get_version(api.version.id)
    assert (
        recorded.onnx_uri
        and recorded.artifacts["onnx"]["sha256"] == onnx.headers["x-content-sha256"]
    )
    assert recorded.artifacts["onnx"]["parity"]["top1_agreement"] >= 0.995
    _problem(
        c.get(
            f"{V1}/versions/{api.version.name}/download?format=tflite", headers=viewer
        ),
        400,
    )


def test_corrupted_artifact_is_refused(api: ApiEnv) -> None:
    path = api.version.checkpoint_uri
    with open(path, "r+b") as fh:
        fh.seek(100)
        fh.write(b"\x00\x01\x02\x03")
    body = _problem(
        api.client.get(
            f"{V1}/versions/{api.version.name}/download", headers=api.auth("viewer")
        ),
        500,
    )
    assert "hash" in body["detail"].lower() or "sha256" in body["detail"].lower()


# ---------------------------------------------------------------- runs, nodes


def test_runs_rounds_and_round_detail(api: ApiEnv) -> None:
    cat = api.catalog
    cat.start_round("run-a", 1, sampled=3)
    cat.record_node_round(
        "run-a", 1, 11, "train", num_examples=50, loss=0.5, accuracy=0.8
    )
    cat.record_node_round("run-a", 1, 12, "train", error="reply rejected: shape")
    cat.finish_round("run-a", 1, replied=2, rejected=1, accuracy=0.7, loss=0.9)
    c, viewer = api.client, api.auth("viewer")
    runs = c.get(f"{V1}/runs", headers=viewer).json()
    assert "run-a" in [r["run_id"] for r in runs]
    rounds = c.get(f"{V1}/runs/run-a/rounds", headers=viewer).json()
    assert rounds[0]["status"] == "completed" and rounds[0]["nodes_rejected"] == 1
    detail = c.get(f"{V1}/runs/run-a/rounds/1", headers=viewer).json()
    assert detail["round"]["central_accuracy"] == pytest.approx(0.7)
    assert {(n["node_id"], n["error"]) for n in detail["node_results"]} == {
        ("11", None),
        ("12", "reply rejected: shape"),
    }
    _problem(c.get(f"{V1}/runs/nope/rounds", headers=viewer), 404)
    _problem(c.get(f"{V1}/runs/run-a/rounds/7", headers=viewer), 404)


def test_forget_node_erases_rows_keeps_versions(api: ApiEnv) -> None:
    cat = api.catalog
    cat.upsert_node(42, samples=300, label_names=["bag"])
    cat.record_node_round("run-a", 1, 42, "train", num_examples=300, loss=0.1)
    c, admin = api.client, api.auth("admin")
    assert [n["node_id"] for n in c.get(f"{V1}/nodes", headers=admin).json()] == ["42"]
    assert c.delete(f"{V1}/nodes/42", headers=admin).status_code == 204
    assert c.get(f"{V1}/nodes", headers=admin).json() == []
    assert cat.node_rounds("run-a") == []
    assert cat.get_version(api.version.id).name == api.version.name
    _problem(c.delete(f"{V1}/nodes/42", headers=admin), 404)
    forgets = cat.list_audit(action="node.forget")
    assert len(forgets) == 1 and forgets[0].target == "42"


# ---------------------------------------------------------------- system


def test_health_is_public_and_docs_served(api: ApiEnv) -> None:
    health = api.client.get("/health").json()
    assert health == {
        "status": "ok",
        "database": "postgres" if api.catalog.aio.is_postgres else "sqlite",
        "current_version": api.version.name,
    }
    schema = api.client.get("/schema/openapi.json")
    assert schema.status_code == 200
    assert "/api/v1/detect" in schema.json()["paths"]
    assert api.client.get("/schema/swagger").status_code == 200


def test_metrics_prometheus_text(api: ApiEnv) -> None:
    api.client.get(f"{V1}/categories", headers=api.auth("viewer"))
    text = api.client.get("/metrics", headers=api.auth("viewer")).text
    assert "fedobj_http_requests_total" in text
    assert "fedobj_http_request_duration_seconds_bucket" in text
    assert f'fedobj_current_version_info{{version="{api.version.name}"}} 1.0' in text


def _app_with(api: ApiEnv, **overrides: object):  # type: ignore[no-untyped-def]
    from litestar.testing import TestClient

    from admin_api import ApiSettings, create_app

    settings = ApiSettings(
        outputs_dir=api.outputs,
        database_url=api.catalog.aio.spec.target,
        **overrides,  # type: ignore[arg-type]
    )
    return TestClient(create_app(settings))


def test_rate_limit_answers_429_problem(api: ApiEnv) -> None:
    """Requests until the limiter answers (bounded): a 429 problem document,
    after at least the 3 allowed in a window. The window is wall-clock seconds,
    so the test asks for no timing (a loaded CI machine once let a request
    through after the first 429: the next second had begun)."""
    with _app_with(api, rate_limit_per_second=3) as client:
        answered = 0
        for _ in range(200):
            resp = client.get(f"{V1}/categories", headers=api.auth("viewer"))
            if resp.status_code != 200:
                break
            answered += 1
        _problem(resp, 429)
        assert answered >= 3
        assert client.get("/health").status_code == 200  # not limited


def test_cors_off_by_default_and_on_when_configured(api: ApiEnv) -> None:
    origin = {"Origin": "https://admin.example.org"}
    plain = api.client.get("/health", headers=origin)
    assert "access-control-allow-origin" not in plain.headers
    with _app_with(
        api, rate_limit_per_second=0, cors_origins=("https://admin.example.org",)
    ) as client:
        allowed = client.get("/health", headers=origin)
        assert (
            allowed.headers["access-control-allow-origin"]
            == "https://admin.example.org"
        )
