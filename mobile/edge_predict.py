#!/usr/bin/env python3
"""Classify images with a downloaded fedobj model, torch-free (the edge kit).

    python mobile/edge_predict.py MODEL IMAGE... [--top-k 5] [--threshold 0.7]
                                  [--sha256 HEX] [--threads 1]

MODEL is a ``.onnx`` (fp32 or INT8) or ``.ort`` (the mobile artifact) file from
``GET /api/v1/versions/{id}/download?format=…`` or ``fedobj export V --out FILE``;
its class map and preprocessing travel inside it. Prints one JSON line per image,
exactly the shape of the admin API's ``POST /detect`` response. Imports only
``fedobj.inference`` (onnxruntime, numpy, Pillow): never torch.

Exit codes: 0 all images answered; 1 some image refused (named on stderr, the
others still answered); 2 the model is refused (unreadable, not a fedobj export,
or its SHA-256 differs from ``--sha256``, e.g. the ``X-Content-SHA256`` header).
"""

from __future__ import annotations

import argparse
import hashlib
import json
import sys
from pathlib import Path

try:
    import fedobj.inference  # noqa: F401  (installed: pip install --no-deps .)
except ImportError:  # run from a checkout without installing
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from fedobj.inference import ImageInputError, InferenceError, Predictor


def load_model(path: Path, sha256: str | None, threads: int = 1) -> Predictor:
    """The predictor of ``path``, refused unless it hashes to ``sha256`` (if given)."""
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise InferenceError(f"cannot read model {path}: {exc}") from exc
    if sha256 is not None:
        actual = hashlib.sha256(data).hexdigest()
        if actual != sha256.strip().lower():
            raise InferenceError(
                f"model {path} is corrupted or not the one published: sha256 "
                f"{actual[:12]}… != expected {sha256[:12]}…; refusing to load it"
            )
    return Predictor.from_bytes(data, threads=threads)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("model", type=Path, help=".onnx or .ort file")
    parser.add_argument("images", type=Path, nargs="+", help="image files")
    parser.add_argument("--top-k", type=int, default=5)
    parser.add_argument("--threshold", type=float, default=0.7)
    parser.add_argument("--sha256", help="expected SHA-256 of the model file")
    parser.add_argument("--threads", type=int, default=1, help="intra-op threads")
    args = parser.parse_args(argv)
    try:
        predictor = load_model(args.model, args.sha256, args.threads)
    except InferenceError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    refused = 0
    for path in args.images:
        try:
            (detection,) = predictor.predict_bytes(
                [path.read_bytes()], top_k=args.top_k, threshold=args.threshold
            )
        except (OSError, InferenceError) as exc:
            # ImageInputError is an InferenceError: unusable image, bad top-k...
            kind = "image" if isinstance(exc, ImageInputError | OSError) else "request"
            print(f"refused {kind} {path}: {exc}", file=sys.stderr)
            refused += 1
            continue
        print(json.dumps(detection.to_dict()), flush=True)
    return 1 if refused else 0


if __name__ == "__main__":
    sys.exit(main())
