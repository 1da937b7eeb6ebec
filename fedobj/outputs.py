"""What every run leaves behind in ``outputs/<run-id>/``.

- ``run.json``: the resolved run config, seed, code revision, package versions, paths;
- ``round-NNN.pt``: a checkpoint per round (model args + class map + weights);
- ``metrics.parquet``: one row per round (``kind="round"``) and one per node and round
  (``kind="node-train"`` / ``"node-evaluate"``), rewritten after every round so a
  crashed run still leaves what it measured;
- ``summary.json`` and ``accuracy.png`` at the end.
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import tempfile
import time
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

PACKAGES = ("fedobj", "flwr", "torch", "torchvision", "numpy", "pyarrow")
# metrics.parquet: one schema, one row per round and per node-round
METRICS_SCHEMA = pa.schema(
    [
        ("run_id", pa.string()),
        ("round", pa.int64()),
        ("kind", pa.string()),  # round | node-train | node-evaluate
        ("node_id", pa.string()),
        ("num_examples", pa.int64()),
        ("loss", pa.float64()),
        ("accuracy", pa.float64()),
        ("central_loss", pa.float64()),
        ("central_accuracy", pa.float64()),
        ("nodes_sampled", pa.int64()),
        ("nodes_replied", pa.int64()),
        ("nodes_failed", pa.int64()),
        ("lr", pa.float64()),
        ("seconds", pa.float64()),
        ("ignored_examples", pa.int64()),
        # train exchange, as Flower counts a message: reply (up), message (down)
        ("up_bytes", pa.int64()),
        ("down_bytes", pa.int64()),
        ("time", pa.float64()),
    ]
)
METRIC_COLUMNS = tuple(METRICS_SCHEMA.names)


def code_revision(start: Path | None = None) -> str:
    """Git revision of the code, or ``FEDOBJ_CODE_REVISION``, or ``"unknown"``.

    The ServerApp runs from the app bundle Flower installed (no ``.git``), so the
    revision is searched from this package's installed location (an editable install
    points into the checkout) and can be passed by the environment.
    """
    if os.environ.get("FEDOBJ_CODE_REVISION"):
        return os.environ["FEDOBJ_CODE_REVISION"]
    for where in (start, Path(__file__).resolve().parent):
        if where is None:
            continue
        try:
            out = subprocess.run(
                ["git", "-C", str(where), "rev-parse", "HEAD"],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            )
        except (OSError, subprocess.SubprocessError):
            continue
        if out.returncode == 0:
            dirty = subprocess.run(
                [
                    "git",
                    "-C",
                    str(where),
                    "status",
                    "--porcelain",
                    "--untracked-files=no",
                ],
                capture_output=True,
                text=True,
                timeout=5,
                check=False,
            ).stdout.strip()
            return out.stdout.strip() + ("-dirty" if dirty else "")
    return "unknown"


def package_versions() -> dict[str, str]:
    found = {}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "not installed"
    found["python"] = platform.python_version()
    return found


def write_json_atomic(path: Path, payload: Any) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(payload, fh, indent=2, sort_keys=True, default=str)
    os.replace(tmp, path)


@dataclass
class RunOutputs:
    """The output folder of one run and the metric rows collected so far."""

    root: Path
    run_id: str
    rows: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def create(cls, outputs_dir: Path, run_id: str) -> RunOutputs:
        root = outputs_dir / run_id
        root.mkdir(parents=True, exist_ok=True)
        latest = outputs_dir / "latest"
        try:
            if latest.is_symlink() or latest.exists():
                latest.unlink()
            latest.symlink_to(root.name)
        except OSError:
            pass  # a read-only or symlink-less filesystem only loses the shortcut
        return cls(root, run_id)

    def write_run_info(self, info: dict[str, Any]) -> None:
        write_json_atomic(self.root / "run.json", info)

    def add_row(self, **values: Any) -> None:
        row: dict[str, Any] = {c: None for c in METRIC_COLUMNS}
        row.update(run_id=self.run_id, time=time.time())
        unknown = set(values) - set(METRIC_COLUMNS)
        if unknown:
            raise KeyError(f"unknown metric columns {sorted(unknown)}")
        row.update(values)
        self.rows.append(row)

    def flush(self) -> Path:
        """Rewrite ``metrics.parquet`` with every row so far (atomic replace)."""
        table = pa.Table.from_pylist(self.rows, schema=METRICS_SCHEMA)
        path = self.root / "metrics.parquet"
        tmp = path.with_suffix(".parquet.tmp")
        pq.write_table(table, tmp)
        os.replace(tmp, path)
        return path

    def round_rows(self) -> list[dict[str, Any]]:
        return [r for r in self.rows if r["kind"] == "round"]

    def plot(self) -> Path:
        """Accuracy and loss per round (centralised and federated) as a PNG."""
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt

        rounds = self.round_rows()
        xs = [r["round"] for r in rounds]
        fig, (ax_acc, ax_loss) = plt.subplots(1, 2, figsize=(10, 4))
        for key, label in (
            ("central_accuracy", "centralised (test split)"),
            ("accuracy", "federated (nodes' held-out)"),
        ):
            pts = [(x, r[key]) for x, r in zip(xs, rounds) if r[key] is not None]
            if pts:
                ax_acc.plot(*zip(*pts), marker="o", label=label)
        for key, label in (("central_loss", "centralised"), ("loss", "federated")):
            pts = [(x, r[key]) for x, r in zip(xs, rounds) if r[key] is not None]
            if pts:
                ax_loss.plot(*zip(*pts), marker="o", label=label)
        ax_acc.set(title="Accuracy per round", xlabel="round", ylabel="accuracy")
        ax_loss.set(title="Loss per round", xlabel="round", ylabel="cross-entropy")
        from matplotlib.ticker import MaxNLocator

        for ax in (ax_acc, ax_loss):
            ax.xaxis.set_major_locator(MaxNLocator(integer=True))
            ax.grid(alpha=0.3)
            ax.legend()
        fig.suptitle(f"fedobj run {self.run_id}")
        fig.tight_layout()
        path = self.root / "accuracy.png"
        fig.savefig(path, dpi=100)
        plt.close(fig)
        return path
