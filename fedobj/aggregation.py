"""Aggregation maths, numpy only: update validation, PerfFedAvg weights, and a
streaming weighted mean.

Flower's ``aggregate_arrayrecords`` checks no shapes (a size-1 dimension broadcasts
silently; other mismatches crash the run) and holds every reply until the end. Here a
reply is validated against the broadcast model (DESIGN.md contract 5: names and
shapes as it arrives, values as it is folded), folded into running sums and
dropped, so memory does not grow with the number of nodes.
"""

from __future__ import annotations

import functools
import io
import math
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from typing import Any

import numpy as np

_saxpy: Callable[..., np.ndarray] | None
try:  # scipy's BLAS binding (a dependency): one fused pass per update and chunk
    from scipy.linalg import blas as _blas

    _saxpy = _blas.saxpy
except ImportError:  # pragma: no cover - numpy's two passes instead
    _saxpy = None


def _saxpy_in_place() -> bool:
    """Whether this scipy's ``saxpy`` adds into a contiguous float32 ``y`` in
    place (f2py's intent(in,out)); the fold's fast loop relies on it."""
    if _saxpy is None:  # pragma: no cover - no scipy
        return False
    y = np.zeros(3, np.float32)
    return _saxpy(np.ones(3, np.float32), y, 3, 2.0) is y and bool((y == 2).all())


_SAXPY_IN_PLACE = _saxpy_in_place()

Shapes = Mapping[str, tuple[int, ...]]


def shapes_of(arrays: Mapping[str, np.ndarray]) -> dict[str, tuple[int, ...]]:
    return {k: tuple(v.shape) for k, v in arrays.items()}


def validate_update(
    arrays: Mapping[str, np.ndarray], reference: Shapes, num_examples: float
) -> str | None:
    """Why this update must not be aggregated, or ``None`` if it may.

    Checks: a positive, finite example count; exactly the broadcast model's array
    names; each shape equal to the broadcast one (no broadcasting); finite values.
    """
    if not (isinstance(num_examples, (int, float)) and math.isfinite(num_examples)):
        return f"num-examples is not a finite number ({num_examples!r})"
    if num_examples <= 0:
        return f"num-examples must be > 0, got {num_examples}"
    missing = set(reference) - set(arrays)
    extra = set(arrays) - set(reference)
    if missing or extra:
        return (
            f"array names differ from the broadcast model (missing "
            f"{sorted(missing)[:3]}, unexpected {sorted(extra)[:3]})"
        )
    for key, shape in reference.items():
        got = tuple(arrays[key].shape)
        if got != tuple(shape):
            return f"{key} has shape {got}, the broadcast model has {tuple(shape)}"
    for key, arr in arrays.items():
        if not all_finite(arr):
            return f"{key} contains NaN or infinite values"
    return None


def all_finite(arr: np.ndarray) -> bool:
    """Whether every value of ``arr`` is finite (integers always are).

    For float32/64 a dot product with itself first: BLAS reads the array once,
    with no boolean temporary, and the sum of squares is finite unless some
    value is NaN or infinite (or so large, > 1e19 in float32, that the squares
    overflow: then the exact, slower test decides).
    """
    if arr.dtype.kind != "f":
        return True
    if arr.dtype in (np.float32, np.float64) and arr.flags.c_contiguous:
        flat = arr.reshape(-1)
        with np.errstate(over="ignore", invalid="ignore"):
            square_sum = float(np.dot(flat, flat))
        if math.isfinite(square_sum):
            return True
    return bool(np.isfinite(arr).all())


def perf_fedavg_weights(
    num_examples: Sequence[float],
    accuracies: Sequence[float | None],
    alpha: float,
) -> np.ndarray:
    """PerfFedAvg: eta_k = alpha * n_k / sum(n) + (1 - alpha) * acc_k / sum(acc).

    With ``alpha = 1`` this is FedAvg. When no node reports an accuracy (or all
    report 0) the weights fall back to FedAvg's; a node that reports none while
    others do is given the mean of the reported accuracies, so a missing metric
    neither rewards nor punishes it.
    """
    if not 0.0 <= alpha <= 1.0:
        raise ValueError(f"perf-alpha must be in [0, 1], got {alpha}")
    n = np.asarray(num_examples, dtype=np.float64)
    if len(n) == 0:
        return n
    if (n <= 0).any():
        raise ValueError("every num-examples must be > 0")
    data_w = n / n.sum()
    reported = [a for a in accuracies if a is not None]
    if not reported or sum(reported) < 1e-30:  # subnormal sums divide badly
        return np.asarray(data_w)
    mean_acc = float(np.mean(reported))
    acc = np.asarray([mean_acc if a is None else a for a in accuracies], np.float64)
    return np.asarray(alpha * data_w + (1.0 - alpha) * acc / acc.sum())


NPY_MAGIC = b"\x93NUMPY"
_C_ORDER = b"'fortran_order': False"


@functools.lru_cache(maxsize=4096)
def _layout(dtype: str, shape: tuple[int, ...]) -> tuple[np.dtype[Any], int, int]:
    """(numpy dtype, element count, data bytes) of an Array's ``dtype`` and ``shape``.

    Cached: a model's arrays repeat the same few (dtype, shape) pairs in every
    reply, and parsing them was a third of the time it took to view an update.
    """
    dt = np.dtype(dtype)
    count = math.prod(int(d) for d in shape)
    return dt, count, count * dt.itemsize


def array_view(array: Any) -> np.ndarray:
    """A read-only numpy view of a Flower ``Array``'s bytes, without a copy.

    ``Array.numpy()`` runs ``np.load`` on the bytes: a full copy of every update.
    An ``Array`` made from a numpy array holds ``np.save`` output, a small header
    then the raw buffer, so the data starts ``nbytes`` before the end; the header
    is checked for the magic and for C order, else this falls back to ``numpy()``.
    """
    shape = tuple(array.shape)
    dtype, _, nbytes = _layout(array.dtype, shape)
    data = array.data
    offset = len(data) - nbytes
    if (
        array.stype == "numpy.ndarray"
        and offset > len(NPY_MAGIC)
        and dtype.kind in "fiub"
        and data.startswith(NPY_MAGIC)
        and data.find(_C_ORDER, 0, offset) != -1
    ):
        # one constructor call (0.6 us) where frombuffer + reshape take 1.4
        return np.ndarray(shape, dtype, data, offset)
    return np.asarray(array.numpy())


def _axpy(x: np.ndarray, p: np.ndarray, scratch: np.ndarray, w: float) -> None:
    """``p += w * x`` in float32, in place.

    BLAS ``saxpy`` does it in one pass (``x`` read once, ``p`` in cache), about
    1.7x faster than numpy's multiply-then-add, which goes over the chunk twice;
    numpy stays as the fallback for views BLAS will not take in place.
    """
    if _saxpy is not None and x.flags.c_contiguous and p.flags.c_contiguous:
        out = _saxpy(x, p, a=w)
        if out is p or np.shares_memory(out, p):
            return
        p[...] = out  # pragma: no cover - BLAS copied instead of updating
        return
    np.multiply(x, np.float32(w), out=scratch)
    np.add(p, scratch, out=p)


_NDARRAY = "numpy.ndarray"

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
        # scratch for _axpy's numpy fallback, one per worker
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
        self._pack_plan = [(where[k], *_npy_header(reference[k])) for k in self._packed]
        self._view_plan = [
            (where[k], k, *_npy_header(v), v.dtype, tuple(v.shape))
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
                    data = _saved_bytes(values[i], header, size)
                    if data is None:
                        return None
                    end = pos + size - len(header)
                    raw[pos:end] = memoryview(data)[len(header) :]
                    pos = end
                out[_PACKED] = buf
            for i, key, header, size, dtype, shape in self._view_plan:
                data = _saved_bytes(values[i], header, size)
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

    def _scan_keys(
        self,
        pending: list[tuple[Mapping[str, np.ndarray], float]],
        keys: list[str],
        worker: int,
    ) -> dict[tuple[str, int], np.ndarray] | None:
        """Sum ``keys`` of the group into the float32 staging buffers, chunk by
        chunk, checking each chunk finite. None as soon as one is not, because
        of a non-finite value; chunks whose finite values overflowed float32
        are summed in float64 and returned, by (key, start), for the commit."""
        term = self._scratch[worker]
        wide: dict[tuple[str, int], np.ndarray] = {}
        for key in keys:
            terms = [(np.asarray(a[key]).reshape(-1), w) for a, w in pending]
            if key not in self._stage:  # integer or float64: checked only here
                if not all(all_finite(x) for x, _ in terms):
                    return None
                continue
            stage = self._stage[key]
            direct = _SAXPY_IN_PLACE and all(x.flags.c_contiguous for x, _ in terms)
            for start in range(0, stage.size, self.chunk):
                stop = min(start + self.chunk, stage.size)
                p = stage[start:stop]
                p.fill(0)
                if direct and _saxpy is not None:  # _axpy less its checks
                    for x, w in terms:
                        _saxpy(x[start:stop], p, stop - start, w)
                else:
                    for x, w in terms:
                        _axpy(x[start:stop], p, term[: stop - start], w)
                if not all_finite(p):
                    if not all(all_finite(x[start:stop]) for x, _ in terms):
                        return None
                    wide[(key, start)] = sum(
                        (x[start:stop].astype(np.float64) * w for x, w in terms),
                        np.zeros(stop - start),
                    )
        return wide

    def _commit_keys(
        self,
        pending: list[tuple[Mapping[str, np.ndarray], float]],
        keys: list[str],
        worker: int,
        *,
        wide: dict[tuple[str, int], np.ndarray],
    ) -> None:
        """Add the scanned group's sums of ``keys`` to the float64 sums."""
        for key in keys:
            flat = self.sums[key].reshape(-1)
            if key not in self._stage:
                for a, w in pending:
                    flat += np.multiply(
                        np.asarray(a[key]).reshape(-1), w, dtype=np.float64
                    )
                continue
            stage = self._stage[key]
            for start in range(0, flat.size, self.chunk):
                stop = min(start + self.chunk, flat.size)
                exact = wide.get((key, start))
                flat[start:stop] += stage[start:stop] if exact is None else exact

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


def _saved_bytes(array: Any, header: bytes, size: int) -> bytes | None:
    """``array``'s bytes if they are ``np.save`` output with exactly ``header``
    (so this dtype, shape and C order) and ``size`` bytes long, else None."""
    data = array.data
    if len(data) != size or array.stype != _NDARRAY or not data.startswith(header):
        return None
    return data  # type: ignore[no-any-return]


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


def _npy_header(ref: np.ndarray) -> tuple[bytes, int]:
    """(header ``np.save`` writes for ``ref``'s dtype and shape, its file size)."""
    buf = io.BytesIO()
    fields = {
        "descr": np.lib.format.dtype_to_descr(ref.dtype),
        "fortran_order": False,
        "shape": tuple(ref.shape),
    }
    np.lib.format.write_array_header_1_0(buf, fields)
    header = buf.getvalue()
    return header, len(header) + ref.nbytes


def weighted_mean(
    updates: Iterable[tuple[Mapping[str, np.ndarray], float]],
    reference: Mapping[str, np.ndarray],
) -> dict[str, np.ndarray]:
    """Convenience: fold every ``(arrays, weight)`` into a :class:`StreamingMean`."""
    mean = StreamingMean(reference)
    for arrays, weight in updates:
        mean.add(arrays, weight)
    return mean.result()
