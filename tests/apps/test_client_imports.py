"""What a ClientApp process imports: Flower starts one for every message on a
SuperNode, so every module on this path is paid by every device every round."""

from __future__ import annotations

import json
import subprocess
import sys

from tests.conftest import ROOT

# never needed on a node: the registry's filesystem layer (pyarrow, ~0.05 s),
# torch.optim's torch._dynamo (1.4-1.8 s, fedobj/train/sgd.py), the catalog's
# database stack, the admin plane, DP-SGD's Opacus (loaded only when dp=true),
# the server's aggregation
SERVER_ONLY = (
    "pyarrow",
    "torch._dynamo",
    "opacus",
    "piccolo",
    "litestar",
    "fedobj.catalog",
    "admin_api",
    "scipy",  # the server's streaming mean (BLAS saxpy); not the node's
)


def test_the_client_app_imports_nothing_server_only() -> None:
    code = (
        "import json, sys, apps.client_app\n"
        f"print(json.dumps([m for m in {SERVER_ONLY!r} if m in sys.modules]))\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=True,
    )
    assert json.loads(out.stdout) == [], out.stderr
