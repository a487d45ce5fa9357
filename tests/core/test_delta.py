"""SparseDelta and SparseAdapter: narrow index dtypes that never wrap, validation, dense round trips."""

from __future__ import annotations

import pytest
import torch

from shira_core import (
    AdapterFormatError,
    IndexOrderError,
    IndexRangeError,
    LengthMismatchError,
    NonFiniteValueError,
    SparseAdapter,
    SparseDelta,
)
from shira_core.delta import adapter_from_dense, index_dtype_for


@pytest.mark.parametrize(
    ("numel", "dtype"),
    [(1, torch.int16), (2**15, torch.int16), (2**15 + 1, torch.int32), (2**31, torch.int32), (2**31 + 1, torch.int64)],
)
def test_index_dtype_holds_the_last_index(numel, dtype):
    assert index_dtype_for(numel) == dtype
    assert numel - 1 <= torch.iinfo(dtype).max


def test_indices_narrowed_but_never_wrapped():
    d = SparseDelta("w", (8, 8), torch.tensor([1, 63], dtype=torch.int64), torch.ones(2))
    assert d.indices.dtype == torch.int16
    wide = SparseDelta("w", (8, 8), torch.tensor([1, 65536 + 3], dtype=torch.int64), torch.ones(2))
    assert wide.indices.dtype == torch.int64 and wide.indices.tolist() == [1, 65539]  # int16 would say [1, 3]
    with pytest.raises(IndexRangeError, match=r"\[1, 65,539\] but the weight of shape \[8, 8\] has 64 elements"):
        wide.validate("a")


def test_float_indices_are_refused_not_truncated():
    d = SparseDelta("w", (8, 8), torch.tensor([1.0, 2.7]), torch.ones(2))
    assert d.indices.dtype == torch.float32
    with pytest.raises(AdapterFormatError, match=r"indices must be integers, got torch\.float32 for layer w"):
        d.validate("a")


@pytest.mark.parametrize(
    ("indices", "values", "error", "message"),
    [
        ([1, 2, 3], [1.0, 2.0], LengthMismatchError, r"3 vs 2 for layer w of adapter 'ad'"),
        ([3, 1], [1.0, 2.0], IndexOrderError, r"position 1 holds 1 after 3 for layer w"),
        ([2, 2], [1.0, 2.0], IndexOrderError, r"holds 2 after 2"),
        ([-1, 2], [1.0, 2.0], IndexRangeError, r"\[-1, 2\]"),
        ([0, 64], [1.0, 2.0], IndexRangeError, r"\[0, 64\] .* 64 elements"),
        ([0, 1], [float("nan"), 1.0], NonFiniteValueError, r"1 values are NaN or infinite for layer w"),
        ([0, 1], [1, 2], AdapterFormatError, r"values must be floating point, got torch\.int64"),
    ],
)
def test_validate(indices, values, error, message):
    d = SparseDelta("w", (8, 8), torch.tensor(indices), torch.tensor(values))
    with pytest.raises(error, match=message):
        d.validate("ad")


def test_dense_round_trip_and_mask_keeps_zeros():
    dense = torch.zeros(4, 5)
    dense[0, 1], dense[3, 4], dense[2, 0] = 1.5, -2.0, 0.25
    d = SparseDelta.from_dense("w", dense)
    assert d.indices.tolist() == [1, 10, 19] and d.indices.dtype == torch.int16
    assert torch.equal(d.to_dense(), dense)
    mask = torch.zeros(4, 5, dtype=torch.bool)
    mask[0, :2] = True
    masked = SparseDelta.from_dense("w", dense, mask)
    assert masked.indices.tolist() == [0, 1] and masked.values.tolist() == [0.0, 1.5]
    assert masked.nnz == 2 and masked.density == pytest.approx(0.1)
    assert masked.nbytes == 2 * 2 + 2 * 4


def test_adapter_properties_and_scaling():
    a = SparseDelta("a", (4, 4), torch.tensor([0, 5]), torch.tensor([1.0, -2.0]))
    b = SparseDelta("b", (2, 8), torch.tensor([7]), torch.tensor([4.0], dtype=torch.bfloat16))
    adapter = SparseAdapter("x", {"a": a, "b": b}, "rand", {"id": "f"}, "d", {"k": "v"})
    assert (len(adapter), adapter.nnz, adapter.numel) == (2, 3, 32)
    assert adapter.density == pytest.approx(3 / 32)
    assert adapter.nbytes == (2 * 2 + 2 * 4) + (1 * 2 + 1 * 2)
    half = adapter.scaled(0.5, name="half")
    assert half.name == "half" and half.deltas["a"].values.tolist() == [0.5, -1.0]
    assert half.deltas["b"].values.dtype == torch.bfloat16
    assert adapter.deltas["a"].values.tolist() == [1.0, -2.0]  # the original is untouched
    assert half.extra == adapter.extra and half.extra is not adapter.extra
    assert adapter.summary() == {
        "name": "x", "mask": "rand", "layers": 2, "nnz": 3, "density": 3 / 32, "bytes": 16, "description": "d",
    }
    adapter.validate()


def test_adapter_from_dense_uses_the_mask_as_index_set():
    deltas = {"w": torch.arange(6.0).reshape(2, 3)}
    masks = {"w": torch.tensor([[True, False, True], [False, False, True]])}
    adapter = adapter_from_dense("x", deltas, masks, "wm")
    assert adapter.mask == "wm"
    assert adapter.deltas["w"].indices.tolist() == [0, 2, 5]
    assert adapter.deltas["w"].values.tolist() == [0.0, 2.0, 5.0]
