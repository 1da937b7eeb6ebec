"""A compressed update that must not be folded is refused, and says why:
indices out of range, duplicated or unordered, NaN/inf/negative/huge scales,
wrong lengths or dtypes, arrays that do not belong; and a device's link state
survives head growth (old rows kept, new rows zero)."""

from __future__ import annotations

import numpy as np
import pytest

from fedobj.compression import CodecError, Layout, encode_int8, read_update
from fedobj.compression.codec import encode_topk_feedback
from fedobj.compression.device_state import (
    DeviceStateError,
    load_held,
    load_residual,
    save_held,
    save_residual,
)
from fedobj.compression.sparse import BLOCK

LAYOUT = Layout.of({"w": np.zeros((40, 30), np.float32), "b": np.zeros(40, np.float32)})
RNG = np.random.default_rng(0)


def _topk() -> dict[str, np.ndarray]:
    delta = RNG.normal(size=LAYOUT.size).astype(np.float32)
    arrays, _ = encode_topk_feedback(delta, np.zeros_like(delta), LAYOUT, 0.1, RNG)
    return {k: v.copy() for k, v in arrays.items()}


def _int8() -> dict[str, np.ndarray]:
    delta = RNG.normal(size=LAYOUT.size).astype(np.float32)
    return {k: v.copy() for k, v in encode_int8(delta, LAYOUT, RNG).items()}


def test_good_updates_are_read() -> None:
    assert read_update(_int8(), "int8", LAYOUT).idx is None
    assert read_update(_topk(), "topk", LAYOUT).idx.size == 124  # 120 + 4


def test_an_index_past_the_vector_is_refused() -> None:
    arrays = _topk()
    last_block = arrays["counts"].size - 1
    arrays["counts"][last_block] += 1  # one more value in the last block...
    arrays["counts"][0] -= 1
    tail = LAYOUT.size - last_block * BLOCK  # ...at an offset past the vector
    start = int(arrays["counts"][0])
    arrays["offsets"] = np.concatenate(
        [arrays["offsets"][1:], np.array([tail], np.uint8)]
    )
    del start
    with pytest.raises(CodecError, match="out of range"):
        read_update(arrays, "topk", LAYOUT)


def test_an_offset_past_its_block_is_refused() -> None:
    arrays = _topk()
    arrays["offsets"][0] = 255
    with pytest.raises(CodecError, match="past its block"):
        read_update(arrays, "topk", LAYOUT)


def test_duplicate_indices_are_refused() -> None:
    arrays = _topk()
    first_block_count = int(arrays["counts"][0])
    assert first_block_count >= 2
    arrays["offsets"][1] = arrays["offsets"][0]
    with pytest.raises(CodecError, match="duplicate index"):
        read_update(arrays, "topk", LAYOUT)


def test_unordered_indices_are_refused() -> None:
    arrays = _topk()
    arrays["offsets"][[0, 1]] = arrays["offsets"][[1, 0]]
    with pytest.raises(CodecError, match="ascending"):
        read_update(arrays, "topk", LAYOUT)


def test_counts_that_do_not_add_up_are_refused() -> None:
    arrays = _topk()
    arrays["counts"][0] += 1
    with pytest.raises(CodecError, match="add up"):
        read_update(arrays, "topk", LAYOUT)


@pytest.mark.parametrize(
    "value,why",
    [
        (np.nan, "finite"),
        (np.inf, "finite"),
        (-1.0, ">= 0"),
        (3e36, "overflow"),
    ],
)
@pytest.mark.parametrize("codec", ["int8", "topk"])
def test_bad_scales_are_refused(codec: str, value: float, why: str) -> None:
    arrays = _int8() if codec == "int8" else _topk()
    arrays["scale"][0] = value
    with pytest.raises(CodecError, match=why):
        read_update(arrays, codec, LAYOUT)


@pytest.mark.parametrize(
    "edit,why",
    [
        (lambda a: a.update(q=a["q"][:-1]), "values"),
        (lambda a: a.update(scale=a["scale"][:-1]), "scales for"),
        (lambda a: a.update(q=a["q"].astype(np.int16)), "int8"),
        (lambda a: a.update(q=a["q"].reshape(1, -1)), "1-D"),
        (lambda a: a.pop("scale"), "no array 'scale'"),
        (lambda a: a.update(extra=np.zeros(1, np.int8)), "unexpected"),
    ],
)
def test_malformed_int8_updates_are_refused(edit, why: str) -> None:
    arrays = _int8()
    edit(arrays)
    with pytest.raises(CodecError, match=why):
        read_update(arrays, "int8", LAYOUT)


def test_an_unknown_codec_is_refused() -> None:
    with pytest.raises(CodecError, match="unknown codec"):
        read_update(_int8(), "zip", LAYOUT)


def test_residual_survives_head_growth_and_scopes_are_apart(tmp_path) -> None:
    small = Layout.of(
        {"w": np.zeros((3, 4), np.float32), "h": np.zeros((3, 2), np.float32)}
    )
    grown = Layout.of(
        {"w": np.zeros((3, 4), np.float32), "h": np.zeros((5, 2), np.float32)}
    )
    flat = np.arange(1, small.size + 1, dtype=np.float32)
    save_residual(tmp_path, "dev", "run-1", small, flat)
    back = grown.unflatten(load_residual(tmp_path, "dev", "run-1", grown))
    np.testing.assert_array_equal(back["w"], flat[:12].reshape(3, 4))
    np.testing.assert_array_equal(back["h"][:3], flat[12:].reshape(3, 2))
    assert (back["h"][3:] == 0).all()
    # another simulated federation, or a real device, starts from nothing
    assert not load_residual(tmp_path, "dev", "run-2", grown).any()
    assert not load_residual(tmp_path, "dev", None, grown).any()
    # a tensor that no longer fits at all is dropped, not misread
    other = Layout.of({"w": np.zeros((4, 3), np.float32)})
    assert not load_residual(tmp_path, "dev", "run-1", other).any()


def test_held_model_round_trips_and_a_corrupt_file_is_an_error(tmp_path) -> None:
    arrays = {"w": np.ones((2, 2), np.float32), "n": np.array(4, np.int64)}
    assert load_held(tmp_path, "dev", None) is None
    save_held(tmp_path, "dev", None, "r1t.1", arrays)
    model_id, back = load_held(tmp_path, "dev", None)
    assert model_id == "r1t.1" and list(back) == ["w", "n"]
    np.testing.assert_array_equal(back["w"], arrays["w"])
    path = next(tmp_path.rglob("dev.held.npz"))
    path.write_bytes(b"not a zip")
    with pytest.raises(DeviceStateError, match="unreadable"):
        load_held(tmp_path, "dev", None)
