"""The edge link: compressed updates (int8, top-k with error feedback) and an
int8 downlink, all in numpy (no torch, no Flower).

Flower glue (records, mods, the server's reading of replies) is in
``apps/link.py`` and ``apps/link_node.py``; this package holds the maths and
what a device keeps on disk.
"""

from fedobj.compression.codec import (
    CODECS,
    CodecError,
    Update,
    encode_int8,
    encode_topk,
    read_update,
)
from fedobj.compression.layout import CHUNK, Layout
from fedobj.compression.mean import CompressedMean
from fedobj.compression.quantize import dequantize, quantize

__all__ = [
    "CHUNK",
    "CODECS",
    "CodecError",
    "CompressedMean",
    "Layout",
    "Update",
    "dequantize",
    "encode_int8",
    "encode_topk",
    "quantize",
    "read_update",
]
