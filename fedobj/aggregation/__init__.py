"""Aggregation maths, numpy only: update validation, PerfFedAvg weights, and a
streaming weighted mean.

Flower's ``aggregate_arrayrecords`` checks no shapes (a size-1 dimension broadcasts
silently; other mismatches crash the run) and holds every reply until the end. Here a
reply is validated against the broadcast model (DESIGN.md contract 5: names and
shapes as it arrives, values as it is folded), folded into running sums and
dropped, so memory does not grow with the number of nodes.

One module per job: :mod:`~fedobj.aggregation.validation`,
:mod:`~fedobj.aggregation.perffedavg` (PerfFedAvg's weights),
:mod:`~fedobj.aggregation.views` (Flower ``Array`` bytes as numpy, without a copy),
:mod:`~fedobj.aggregation.fold` (summing a group chunk by chunk) and
:mod:`~fedobj.aggregation.streaming` (the mean that decides what is folded).
This package re-exports their public names, which is how the strategies and the
tests import them.
"""

from fedobj.aggregation.perffedavg import perf_fedavg_weights
from fedobj.aggregation.streaming import (
    FINGERPRINT_VALUES,
    GROUP_BYTES,
    PACK_BELOW,
    StreamingMean,
    weighted_mean,
)
from fedobj.aggregation.validation import (
    Shapes,
    all_finite,
    shapes_of,
    validate_update,
)
from fedobj.aggregation.views import NPY_MAGIC, array_view

__all__ = [
    "FINGERPRINT_VALUES",
    "GROUP_BYTES",
    "NPY_MAGIC",
    "PACK_BELOW",
    "Shapes",
    "StreamingMean",
    "all_finite",
    "array_view",
    "perf_fedavg_weights",
    "shapes_of",
    "validate_update",
    "weighted_mean",
]
