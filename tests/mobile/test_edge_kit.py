"""The edge kit in mobile/: a torch-free predictor script and the SuperNode launcher.

The scripts run as a device would run them, in fresh interpreters; torch is made
unimportable there, so a stray import fails the test instead of passing silently.
The deployment test starts a real SuperLink and two launcher-started SuperNodes.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
import subprocess
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
import pytest
from PIL import Image

from fedobj.data.categories import fashion_mnist_class_map
from fedobj.data.fashion_mnist import load_fashion_mnist
from fedobj.inference import Predictor
from tests.conftest import ROOT, write_image_folder

MOBILE = ROOT / "mobile"


def _load(name: str) -> ModuleType:
    spec = importlib.util.spec_from_file_location(name, MOBILE / f"{name}.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def models(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    import torch

    from fedobj.data.fashion_mnist import load_fashion_mnist
    from fedobj.export import calibration_images, export_artifact
    from fedobj.model import Checkpoint, ModelArgs, build_model
    from fedobj.train import LabelledTensors, TrainConfig, train

    torch.manual_seed(0)
    args = ModelArgs("cnn", num_classes=10)
    model = build_model(args)
    # lightly trained, as INT8 parity is meant for: an untrained net's top-2
    # logits are so close that INT8 rounding on an AVX2-only CPU (no VNNI)
    # flipped 2.7% of them, against the 2% the export allows
    data = load_fashion_mnist("train")
    train(
        model,
        LabelledTensors(
            torch.as_tensor(data.images[:2000]),
            torch.as_tensor(data.labels[:2000].astype(np.int64)),
        ),
        TrainConfig(epochs=1, seed=0),
    )
    ckpt = Checkpoint(args, fashion_mnist_class_map(), model.state_dict())
    folder = tmp_path_factory.mktemp("edge-models")
    result = export_artifact(
        ckpt, "ort", version_name="v5", calibration=calibration_images(28, 1)
    )
    (folder / "model.ort").write_bytes(result.data)
    fp32 = export_artifact(ckpt, "onnx", version_name="v5", calibration=None)
    (folder / "model.onnx").write_bytes(fp32.data)
    # A "torch" that refuses to load, first on the path of the script's process.
    poison = folder / "poison" / "torch"
    poison.mkdir(parents=True)
    (poison / "__init__.py").write_text("raise ImportError('torch must not load')\n")
    return {"ort": folder / "model.ort", "onnx": folder / "model.onnx"}


def _predict(models: dict[str, Path], *args: str) -> subprocess.CompletedProcess[str]:
    poison = models["ort"].parent / "poison"
    return subprocess.run(
        [sys.executable, str(MOBILE / "edge_predict.py"), *args],
        env={"PYTHONPATH": f"{poison}:{ROOT}", "PATH": "/usr/bin:/bin"},
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_edge_predict_answers_like_detect_without_torch(
    models: dict[str, Path], tmp_path: Path
) -> None:
    test = load_fashion_mnist("test")
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"{i}.jpg")
        Image.fromarray(test.images[i, 0]).convert("RGB").save(paths[-1])
    for fmt in ("ort", "onnx"):
        done = _predict(models, str(models[fmt]), *map(str, paths), "--top-k", "3")
        assert done.returncode == 0, done.stderr
        lines = [json.loads(line) for line in done.stdout.splitlines()]
        assert len(lines) == 2
        for line in lines:
            assert set(line) == {
                "predictions",
                "detected",
                "inference_time_ms",
                "model_version",
            }
            assert line["model_version"] == "v5" and len(line["predictions"]) == 3
        # The same answer the library gives (the API's /detect runs this code).
        expected = Predictor.from_bytes(models[fmt].read_bytes()).predict_bytes(
            [paths[0].read_bytes()], top_k=3
        )[0]
        assert [p["class_index"] for p in lines[0]["predictions"]] == [
            p.class_index for p in expected.predictions
        ]


def test_edge_predict_refuses_bad_models_and_images(
    models: dict[str, Path], tmp_path: Path
) -> None:
    good = tmp_path / "ok.png"
    Image.fromarray(np.full((30, 30), 200, np.uint8)).save(good)
    digest = hashlib.sha256(models["ort"].read_bytes()).hexdigest()
    done = _predict(models, str(models["ort"]), str(good), "--sha256", digest)
    assert done.returncode == 0, done.stderr
    done = _predict(models, str(models["ort"]), str(good), "--sha256", "0" * 64)
    assert done.returncode == 2 and "corrupted" in done.stderr
    garbage = tmp_path / "model.ort"
    garbage.write_bytes(models["ort"].read_bytes()[:500])
    done = _predict(models, str(garbage), str(good))
    assert done.returncode == 2 and "not a loadable" in done.stderr
    tiny = tmp_path / "tiny.png"
    Image.new("L", (4, 4)).save(tiny)
    done = _predict(models, str(models["ort"]), str(tiny), str(good))
    assert done.returncode == 1 and "at least 8x8" in done.stderr
    assert len(done.stdout.splitlines()) == 1  # the good image still answered
    for result in (done,):
        assert "Traceback" not in result.stderr


# ------------------------------------------------------------------ launcher


def test_launcher_builds_the_supernode_command(tmp_path: Path) -> None:
    launcher = _load("run_supernode")
    data = write_image_folder(tmp_path / "photos", per_class=2, classes=3)
    args = launcher.parse_args(
        [
            "--superlink",
            "link.example:9092",
            "--data-dir",
            str(data),
            "--insecure",
            "--device-id",
            "board-7",
            "--cache-dir",
            str(tmp_path / "cache"),
            "--port",
            "9555",
        ]
    )
    cmd = launcher.build_command(args)
    assert Path(cmd[0]).name == "flower-supernode"
    assert cmd[1:6] == [
        "--insecure",
        "--superlink",
        "link.example:9092",
        "--port",
        "9555",
    ]
    assert cmd[6] == "--node-config"
    assert cmd[7] == (
        f"data-dir='{data.resolve()}' cache-dir='{(tmp_path / 'cache').resolve()}' "
        "device-id='board-7'"
    )
    ca = tmp_path / "ca.pem"
    ca.write_text("-----BEGIN CERTIFICATE-----\n")
    args.insecure, args.root_certificates = False, str(ca)
    assert launcher.build_command(args)[1:3] == ["--root-certificates", str(ca)]
    key = tmp_path / "supernode-1.key"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    args.auth_key = str(key)
    assert launcher.build_command(args)[3:5] == [
        "--auth-supernode-private-key",
        str(key.resolve()),
    ]
    report = launcher.check_folder(data)
    assert report.total == 6 and len(report.counts) == 3


def _launch(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(MOBILE / "run_supernode.py"), *args],
        capture_output=True,
        text=True,
        timeout=120,
    )


def test_launcher_refuses_bad_folders_and_flags(tmp_path: Path) -> None:
    empty = tmp_path / "empty"
    (empty / "bag").mkdir(parents=True)
    (empty / "bag" / "notes.txt").write_text("no images here")
    common = ["--superlink", "127.0.0.1:9092", "--insecure", "--dry-run"]
    for folder, message in (
        (empty, "0 usable images"),
        (tmp_path / "absent", "does not exist"),
    ):
        done = _launch(*common, "--data-dir", str(folder))
        assert done.returncode == 2 and message in done.stderr, done.stderr
        assert "Traceback" not in done.stderr
    data = write_image_folder(tmp_path / "ok", per_class=1, classes=2)
    done = _launch("--superlink", "127.0.0.1:9092", "--data-dir", str(data))
    assert done.returncode == 2 and "exactly one of" in done.stderr
    key = tmp_path / "supernode-1.key"
    key.write_text("-----BEGIN OPENSSH PRIVATE KEY-----\n")
    done = _launch(*common, "--data-dir", str(data), "--auth-key", str(key))
    assert done.returncode == 2 and "--auth-key needs TLS" in done.stderr
    done = _launch(*common, "--data-dir", str(data), "--superlink", "no-port")
    assert done.returncode == 2 and "HOST:PORT" in done.stderr
    quoted = tmp_path / "it's"
    write_image_folder(quoted, per_class=1, classes=1)
    done = _launch(*common, "--data-dir", str(quoted))
    assert done.returncode == 2 and "quote" in done.stderr
    done = _launch(*common, "--data-dir", str(data))
    assert done.returncode == 0 and "--node-config" in done.stdout


def test_launcher_prepares_the_cache_the_client_app_reads(tmp_path: Path) -> None:
    from fedobj.data.node_data import load_node_data

    launcher = _load("run_supernode")
    data = write_image_folder(tmp_path / "photos", per_class=3, classes=2)
    cache = tmp_path / "cache"
    launcher._prepare("1x28", data, cache)
    (cached,) = cache.glob("imagefolder-*.json")
    before = cached.stat().st_mtime_ns
    node = load_node_data(
        {"data-dir": str(data), "cache-dir": str(cache), "device-id": "b"},
        partitioner="iid",
        alpha=0.5,
        classes_per_node=2,
        eval_fraction=0.2,
        seed=0,
        dataset_dir="",
        channels=1,
        size=28,
    )
    assert len(node.train) + len(node.eval) == 6
    assert [p.stat().st_mtime_ns for p in cache.glob("*.json")] == [before]


# ------------------------------------------------------------------ deployment


@pytest.mark.deployment
def test_launcher_supernodes_train_with_a_real_superlink(tmp_path: Path) -> None:
    """The deployment test's shape, with SuperNodes started by the launcher."""
    from tests.apps.test_deployment import (
        _env,
        _start,
        _stop_all,
        deploy_run,
        start_superlink,
        wait_healthy,
    )
    from tests.conftest import free_port

    home, outputs = tmp_path / "flwr", tmp_path / "outputs"
    home.mkdir()
    env = _env(home, outputs)
    port, control = free_port(), free_port()
    (home / "config.toml").write_text(
        '[superlink]\ndefault = "deploy"\n\n'
        f'[superlink.deploy]\naddress = "127.0.0.1:{port}"\ninsecure = true\n'
    )
    procs = [start_superlink(home, port, control, env, tmp_path / "superlink.log")]
    try:
        wait_healthy(port, tmp_path / "superlink.log")
        for i in range(2):
            root = write_image_folder(
                tmp_path / f"board{i}", per_class=30, offset=30 * i
            )
            procs.append(
                _start(
                    [
                        sys.executable,
                        str(MOBILE / "run_supernode.py"),
                        "--superlink",
                        f"127.0.0.1:{port}",
                        "--insecure",
                        "--data-dir",
                        str(root),
                        "--cache-dir",
                        str(tmp_path / f"cache{i}"),
                        "--device-id",
                        f"board-{i}",
                        "--port",
                        str(free_port()),
                        "--prepare",
                        "1x28",
                    ],
                    env,
                    tmp_path / f"supernode{i}.log",
                )
            )
        run = deploy_run(env, "num-server-rounds=1 min-nodes=2 fraction-evaluate=1.0")
        log = run.stdout + run.stderr
        assert run.returncode == 0, log[-4000:]
        assert "round 1/1: 2/2 nodes replied" in log, log[-4000:]
        # --prepare filled the cache the ClientApp then read: still one entry each
        for i in range(2):
            assert len(list((tmp_path / f"cache{i}").glob("*.json"))) == 1
        launcher_log = (tmp_path / "supernode0.log").read_text()
        assert "--node-config" in launcher_log and "board-0" in launcher_log
    finally:
        left = _stop_all(procs)
    assert not left, f"processes left running: {left}"
