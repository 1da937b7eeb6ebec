"""A streaming weighted mean of updates, folded a few at a time.

Flower's ``aggregate_arrayrecords`` holds every reply until the end. Here a reply is
validated (:mod:`fedobj.aggregation.validation`), folded into running sums and
dropped, so memory does not grow with the number of nodes.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable, Iterable, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

from fedobj.aggregation.fold import Pending, Wide, commit_keys, scan_keys
from fedobj.aggregation.validation import all_finite, validate_update
from fedobj.aggregation.views import array_view, npy_header, saved_bytes

_PACKED = "\0packed"
"""Key of the buffer the small float32 arrays of an update are packed into."""

GROUP_BYTES = 768 * 2**20
"""Updates held before a fold: at most this much (and 2 to 32 updates). The
float64 sums are read and written once per group, so fewer, larger groups are
faster: 32 MobileNetV3 updates (672 MB) folded 0.251 s per 100 against 0.307 s
for 12 (256 MB)."""

PACK_BELOW = 4096
"""Float32 arrays with fewer values than this are packed into one buffer per
update. Packing copies the bytes once more, single-threaded: worth it only where
per-array call overhead outweighs the copy. Packing MobileNetV3's arrays of up to
64K values cost 0.233 s per 100 updates against 0.213 s with 4096."""


FINGERPRINT_VALUES = 64


def _fingerprint(arrays: Mapping[str, np.ndarray]) -> bytes:
    """The first values of every array of an update: an order key that tells
    two different updates apart (trained weights share no leading bits by
    chance) at a cost that does not grow with the model."""
    return b"".join(
        np.asarray(arrays[k]).reshape(-1)[:FINGERPRINT_VALUES].tobytes()
        for k in sorted(arrays)
    )


class StreamingMean:
    """Weighted mean of array dicts, folded a few updates at a time.

    Updates are held in a small group (``group``; default: as many as fit in
    :data:`GROUP_BYTES`, 2 to 32) and folded together
    in cache-sized chunks (``chunk`` values; 1 MB of float32 was fastest on the
    AMD EPYC this was measured on, with OpenBLAS's two threads each adding half
    of it): a chunk of the running sum stays in cache while every
    update of the group is added to it, so the float64 sums are read and written
    once per group instead of once per update, and memory never holds more than
    ``group`` updates, however many nodes reply. Within a chunk the group's
    weighted sum is formed in float32 (at most ``group`` terms), then added to the
    float64 sums, so the error does not grow with the number of updates: at
    most ``group`` float32 roundings per value and group (1.7e-7 relative for
    100 MobileNetV3 updates in groups of 32, against 4.6e-7 for Flower's
    float32 pass).
    Float32 arrays smaller than :data:`PACK_BELOW` (226 of MobileNetV3's 266,
    2% of its values) are packed into one buffer per update as it is added, so
    the fold makes one call per chunk for them rather than one per array:
    per-call overhead, not memory, was most of their cost.
    With ``threads`` > 1 the arrays are split into equal shares folded in
    parallel (numpy releases the GIL inside each operation).
    ``result()`` returns arrays of the reference's dtypes (ints rounded).
    """

    def __init__(
        self,
        reference: Mapping[str, np.ndarray],
        *,
        group: int | None = None,
        chunk: int = 1 << 18,
        threads: int = 1,
    ) -> None:
        if (group is not None and group < 1) or chunk < 1 or threads < 1:
            raise ValueError("group, chunk and threads must be >= 1")
        self.dtypes = {k: v.dtype for k, v in reference.items()}
        self.shapes = {k: tuple(v.shape) for k, v in reference.items()}
        self._packed = [
            k
            for k, v in reference.items()
            if v.dtype == np.float32 and 0 < v.size < min(chunk, PACK_BELOW)
        ]
        packed = set(self._packed)
        self.sums: dict[str, np.ndarray] = {
            k: np.zeros(v.shape, dtype=np.float64)
            for k, v in reference.items()
            if k not in packed
        }
        self._pack_buffers: list[np.ndarray] = []
        if len(self._packed) > 1:
            size = sum(int(reference[k].size) for k in self._packed)
            self.sums[_PACKED] = np.zeros(size, dtype=np.float64)
        else:
            self.sums.update(
                {k: np.zeros(self.shapes[k], dtype=np.float64) for k in self._packed}
            )
            self._packed = []
        update_bytes = sum(v.nbytes for v in reference.values())
        self.group = group or max(2, min(32, GROUP_BYTES // max(update_bytes, 1)))
        self.chunk = chunk
        self.total_weight = 0.0
        self.count = 0
        self._pending: list[tuple[Mapping[str, np.ndarray], float]] = []
        # keys split into `threads` shares of about equal size (largest first)
        shares: list[list[str]] = [[] for _ in range(threads)]
        loads = [0] * threads
        for key in sorted(self.sums, key=lambda k: -self.sums[k].size):
            i = loads.index(min(loads))
            shares[i].append(key)
            loads[i] += self.sums[key].size
        self._keys = shares
        # scratch for axpy's numpy fallback, one per worker
        self._scratch = [np.empty(chunk, dtype=np.float32) for _ in range(threads)]
        # a group's float32 sums, checked whole before they reach self.sums
        self._stage = {
            k: np.empty(v.size, np.float32)
            for k, v in self.sums.items()
            if k == _PACKED or self.dtypes.get(k) == np.float32
        }
        self._pool = ThreadPoolExecutor(threads) if threads > 1 else None
        self.general_path = 0  # records add_record could not take byte for byte
        self._tags: list[Any] = []  # of the pending updates
        self._refused: list[tuple[Any, str]] = []  # not yet returned by flush
        # what each array of a reply must look like, byte for byte, to take the
        # fast path of add_record: this numpy's np.save header, then the data;
        # entries are (position among the reference's keys, header, file size, ...)
        self._order = list(reference)
        where = {k: i for i, k in enumerate(self._order)}
        self._pack_plan = [(where[k], *npy_header(reference[k])) for k in self._packed]
        self._view_plan = [
            (where[k], k, *npy_header(v), v.dtype, tuple(v.shape))
            for k, v in reference.items()
            if k not in self._packed
        ]

    def add_record(
        self, record: Mapping[str, Any], weight: float, tag: Any = None
    ) -> str | None:
        """Validate a reply's Flower ``Array``s and fold them in with ``weight``.

        Returns why the update was refused (then nothing is folded), else None:
        the checks of :func:`validate_update` on the arrays (names, shapes; the
        example count is the caller's). An array whose bytes start with exactly
        the header ``np.save`` writes for the reference's dtype and shape is
        taken without a numpy object per array: the small ones' bytes are copied
        straight into this update's pack buffer, the large ones viewed in place;
        the header comparison is the shape and dtype check. Anything else (a
        header of another numpy, another dtype) goes through :func:`array_view`
        and :func:`validate_update`, which say why, or fold it.

        Finite values are checked as the update is folded, not here: reading 21
        MB once more per update to check it was a third of the aggregation's
        time. An update found to hold NaN or infinity then is taken back out and
        listed, with ``tag``, in what :meth:`flush` returns.
        """
        _check_weight(weight)
        arrays = self._unpack(record)
        if arrays is None:
            self.general_path += 1
            views = {k: array_view(v) for k, v in record.items()}
            reason = validate_update(views, self.shapes, weight)
            if reason is None:
                self.add(views, weight, tag)
            return reason
        self._append(arrays, weight, tag)
        return None

    def _unpack(self, record: Mapping[str, Any]) -> dict[str, np.ndarray] | None:
        """The fast path of :meth:`add_record`, or None where it does not apply.

        A reply whose keys come in the reference's order (every client that
        sends its state dict) is read with one ``values()`` call: looking each
        of MobileNetV3's 266 arrays up by name through Flower's Python-level
        ``__getitem__`` was a tenth of the aggregation's time.
        """
        if len(record) != len(self._order):
            return None
        try:
            if list(record.keys()) == self._order:
                values = list(record.values())
            else:
                values = [record[k] for k in self._order]
            out: dict[str, np.ndarray] = {}
            if self._packed:
                buf = self._pack_buffer(len(self._pending))
                raw = memoryview(buf.data).cast("B")
                pos = 0
                for i, header, size in self._pack_plan:
                    data = saved_bytes(values[i], header, size)
                    if data is None:
                        return None
                    end = pos + size - len(header)
                    raw[pos:end] = memoryview(data)[len(header) :]
                    pos = end
                out[_PACKED] = buf
            for i, key, header, size, dtype, shape in self._view_plan:
                data = saved_bytes(values[i], header, size)
                if data is None:
                    return None
                out[key] = np.ndarray(shape, dtype, data, len(header))
        except (KeyError, AttributeError, TypeError):
            return None
        return out

    def _culprit(self, key: str, arr: np.ndarray) -> str:
        """The array name behind a non-finite ``key`` (the packed buffer's part)."""
        if key != _PACKED:
            return key
        start = 0
        for name in self._packed:
            size = math.prod(self.shapes[name])
            if not all_finite(arr[start : start + size]):
                return name
            start += size
        return key  # pragma: no cover - the whole buffer was not finite

    def _pack_buffer(self, slot: int) -> np.ndarray:
        # one per pending update, reused: a fresh 2 MB array per update costs its
        # page faults (and the kernel zeroing them) every time
        if slot == len(self._pack_buffers):
            self._pack_buffers.append(np.empty_like(self.sums[_PACKED], np.float32))
        return self._pack_buffers[slot]

    def add(
        self, arrays: Mapping[str, np.ndarray], weight: float, tag: Any = None
    ) -> None:
        """Fold ``arrays`` in with ``weight`` (kept until its group is folded;
        one found then to hold NaN or infinity is refused: see :meth:`flush`)."""
        _check_weight(weight)
        # one dtype per key in the fold: the reference's where it is float32
        with np.errstate(over="ignore"):  # a value beyond float32: refused as inf
            arrays = {
                k: np.asarray(v, np.float32)
                if self.dtypes.get(k) == np.float32 and k not in self._packed
                else v
                for k, v in arrays.items()
            }
        if self._packed:
            arrays[_PACKED] = np.concatenate(
                [
                    np.asarray(arrays.pop(k), np.float32).reshape(-1)
                    for k in self._packed
                ],
                out=self._pack_buffer(len(self._pending)),
            )
        self._append(arrays, weight, tag)

    def _append(
        self, arrays: Mapping[str, np.ndarray], weight: float, tag: Any
    ) -> None:
        self._pending.append((arrays, float(weight)))
        self._tags.append(tag)
        self.count += 1  # the weight counts once its group is found clean
        if len(self._pending) >= self.group:
            self._fold()

    def flush(self) -> list[tuple[Any, str]]:
        """Fold what is pending; the ``(tag, reason)`` of every update refused
        since the last call (NaN or infinite values found while folding)."""
        self._fold()
        refused, self._refused = self._refused, []
        return refused

    def _fold(self) -> None:
        """Fold the pending group (see :meth:`_fold_group`)."""
        pending, self._pending = self._pending, []
        tags, self._tags = self._tags, []
        refused, weight = self._fold_group(pending, tags)
        self._refused.extend(refused)
        self.count -= len(refused)
        self.total_weight += weight

    def _fold_group(
        self, pending: list[tuple[Mapping[str, np.ndarray], float]], tags: list[Any]
    ) -> tuple[list[tuple[Any, str]], float]:
        """Fold a group: sum it into the staging buffers while checking that
        every chunk is finite, and only then add it to the float64 sums.
        Returns the refused updates' ``(tag, reason)`` and the weight folded.

        A chunk that is not finite names its culprits (updates with NaN or
        infinite values); they are refused and the group is summed again
        without them, so a refused update never touches the sums (its huge
        finite values would otherwise have swamped the others' in float32).

        The group is summed in a canonical order (by weight, then by the
        updates' leading values), not in arrival order: float32 addition is
        not associative, so a group that arrived in another order would
        otherwise sum to other bits, and two runs of one seed would part ways.
        """
        order = sorted(
            range(len(pending)),
            key=lambda i: (pending[i][1], _fingerprint(pending[i][0])),
        )
        pending = [pending[i] for i in order]
        tags = [tags[i] for i in order]
        refused: list[tuple[Any, str]] = []
        while pending:
            results = self._run(self._scan_keys, pending)
            if all(r is not None for r in results):
                break
            bad = {
                i
                for i, (arrays, _) in enumerate(pending)
                if any(not all_finite(v) for v in arrays.values())
            }
            for i in sorted(bad):
                arrays, weight = pending[i]
                name = next(k for k, v in arrays.items() if not all_finite(v))
                where = self._culprit(name, arrays[name])
                refused.append((tags[i], f"{where} contains NaN or infinite values"))
            pending = [u for i, u in enumerate(pending) if i not in bad]
            tags = [t for i, t in enumerate(tags) if i not in bad]
        else:
            return refused, 0.0
        wide = {k: v for r in results if r is not None for k, v in r.items()}
        self._run(functools.partial(self._commit_keys, wide=wide), pending)
        return refused, sum(w for _, w in pending)

    def _run(self, job: Callable[..., Any], pending: list[Any]) -> list[Any]:
        """``job(pending, keys, worker)`` for each worker's share of the keys."""
        if self._pool is None:
            return [job(pending, self._keys[0], 0)]
        futures = [
            self._pool.submit(job, pending, keys, i)
            for i, keys in enumerate(self._keys)
        ]
        return [f.result() for f in futures]

    def _scan_keys(self, pending: Pending, keys: list[str], worker: int) -> Wide | None:
        """:func:`~fedobj.aggregation.fold.scan_keys` into this mean's staging
        buffers, with ``worker``'s scratch."""
        return scan_keys(pending, keys, self._stage, self.chunk, self._scratch[worker])

    def _commit_keys(
        self, pending: Pending, keys: list[str], worker: int, *, wide: Wide
    ) -> None:
        """:func:`~fedobj.aggregation.fold.commit_keys` into the float64 sums."""
        commit_keys(pending, keys, self.sums, self._stage, self.chunk, wide)

    def result(self) -> dict[str, np.ndarray]:
        """The weighted mean so far (folds what is still pending)."""
        self._fold()
        if self._refused:  # a caller that never asked would count them as folded
            tag, reason = self._refused[0]
            raise ValueError(
                f"{len(self._refused)} update(s) refused while folding, not yet "
                f"taken by flush() (first: {tag!r}, {reason})"
            )
        if self.count == 0:
            raise ValueError("no update was added (or every one was refused)")
        if self._pool is not None:
            self._pool.shutdown(wait=False)
            self._pool = None
            self._keys = [[k for share in self._keys for k in share]]
        sums = dict(self.sums)
        if self._packed:
            flat, start = sums.pop(_PACKED), 0
            for key in self._packed:
                size = math.prod(self.shapes[key])
                sums[key] = flat[start : start + size].reshape(self.shapes[key])
                start += size
        out = {}
        for key in self.dtypes:
            dtype = self.dtypes[key]
            if dtype.kind != "f":  # integers rounded; bools, complex: numpy's cast
                mean = sums[key] / self.total_weight
                out[key] = (np.rint(mean) if dtype.kind in "iu" else mean).astype(dtype)
                continue
            # straight into the output dtype: no float64 temporary of the model
            out[key] = np.divide(
                sums[key],
                self.total_weight,
                out=np.empty(sums[key].shape, dtype),
                casting="same_kind",
            )
        return out


def _check_weight(weight: float) -> None:
    """A weight must be positive, finite and a normal float32 number: one that
    float32 rounds to 0 would make BLAS skip its term, NaNs included."""
    if not (math.isfinite(weight) and weight >= float(np.finfo(np.float32).tiny)):
        raise ValueError(
            f"weight must be a finite number >= {np.finfo(np.float32).tiny:.3g}, "
            f"got {weight}"
        )
    if weight > float(np.finfo(np.float32).max):
        raise ValueError(f"weight must fit float32, got {weight}")


def weighted_mean(
    updates: Iterable[tuple[Mapping[str, np.ndarray], float]],
    reference: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Convenience: fold every ``(arrays, weight)`` into a :class:`StreamingMean`."""
    mean = StreamingMean(reference)
    for arrays, weight in updates:
        mean.add(arrays, weight)
    return mean.result()
