"""Sparse deltas: the whole of a SHiRA adapter is a list of (flat index, value) pairs per weight."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any

import torch

from .errors import (
    AdapterFormatError,
    IndexOrderError,
    IndexRangeError,
    LengthMismatchError,
    NonFiniteValueError,
    UnsupportedDtypeError,
)

# The value dtypes every tensor operation here supports; float8 and the like have no isfinite or index_add_.
VALUE_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def check_value_dtype(dtype: torch.dtype, where: str) -> None:
    """Raises UnsupportedDtypeError unless `dtype` is one of VALUE_DTYPES; `where` names layer and adapter."""
    if dtype not in VALUE_DTYPES:
        accepted = ", ".join(str(d).removeprefix("torch.") for d in VALUE_DTYPES)
        raise UnsupportedDtypeError(
            f"values are {str(dtype).removeprefix('torch.')} {where}; accepted value dtypes are {accepted} "
            "(convert the values, e.g. to bfloat16, before saving)"
        )


def index_dtype_for(numel: int) -> torch.dtype:
    """Returns the smallest signed int dtype that holds every flat index of a tensor with `numel` elements."""
    if numel <= 2**15:
        return torch.int16
    if numel <= 2**31:
        return torch.int32
    return torch.int64


def _is_int(dtype: torch.dtype) -> bool:
    return not dtype.is_floating_point and not dtype.is_complex and dtype != torch.bool


@dataclass
class SparseDelta:
    """The change to one weight tensor: W[indices] += values (flat, row-major indices).

    Args:
        name: parameter name in the base model, e.g. ``model.layers.0.mlp.up_proj.weight``.
        shape: the full shape of that parameter.
        indices: 1-D, sorted, unique flat indices, stored in the smallest int dtype that fits.
        values: 1-D deltas, one per index. Kept as deltas so alpha scaling and fusion are exact sums.
    """

    name: str
    shape: tuple[int, ...]
    indices: torch.Tensor
    values: torch.Tensor

    def __post_init__(self) -> None:
        self.shape = tuple(int(s) for s in self.shape)
        self.indices = self.indices.reshape(-1)
        self.values = self.values.reshape(-1)
        narrow = index_dtype_for(self.numel)
        if not _is_int(self.indices.dtype):
            return  # float indices would be truncated by .to(int); validate() reports them
        if self.indices.dtype != narrow and self._indices_in_range():
            self.indices = self.indices.to(narrow)  # out-of-range ones stay wide so validate() reports them

    def _indices_in_range(self) -> bool:
        if self.indices.numel() == 0:
            return True
        return int(self.indices.min()) >= 0 and int(self.indices.max()) < self.numel

    @property
    def numel(self) -> int:
        return math.prod(self.shape)

    @property
    def nnz(self) -> int:
        return int(self.indices.numel())

    @property
    def density(self) -> float:
        return self.nnz / max(self.numel, 1)

    @property
    def nbytes(self) -> int:
        return self.indices.numel() * self.indices.element_size() + self.values.numel() * self.values.element_size()

    def validate(self, adapter: str = "adapter") -> None:
        """Checks lengths, order, range and finiteness; raises a ShiraError that names the layer."""
        where = f"for layer {self.name} of adapter {adapter!r}"
        if self.indices.numel() != self.values.numel():
            raise LengthMismatchError(
                f"indices and values differ: {self.indices.numel():,} vs {self.values.numel():,} {where}"
            )
        if not _is_int(self.indices.dtype):
            raise AdapterFormatError(f"indices must be integers, got {self.indices.dtype} {where}")
        if self.values.dtype.is_complex or not self.values.dtype.is_floating_point:
            raise AdapterFormatError(f"values must be floating point, got {self.values.dtype} {where}")
        check_value_dtype(self.values.dtype, where)
        if self.nnz == 0:
            return
        idx = self.indices.to(torch.int64)
        lo, hi = int(idx.min()), int(idx.max())
        if lo < 0 or hi >= self.numel:
            raise IndexRangeError(
                f"index out of range: [{lo:,}, {hi:,}] but the weight of shape {list(self.shape)} "
                f"has {self.numel:,} elements {where}"
            )
        if self.nnz > 1:
            steps = idx[1:] - idx[:-1]
            if not bool((steps > 0).all()):
                bad = int(torch.nonzero(steps <= 0)[0])
                raise IndexOrderError(
                    f"indices must be sorted and unique: position {bad + 1:,} holds {int(idx[bad + 1]):,} "
                    f"after {int(idx[bad]):,} {where}"
                )
        finite = torch.isfinite(self.values)
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise NonFiniteValueError(f"{bad:,} values are NaN or infinite {where}")

    def to_dense(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        dense = torch.zeros(self.numel, dtype=dtype, device=self.values.device)
        dense[self.indices.long()] = self.values.to(dtype)
        return dense.view(self.shape)

    @classmethod
    def from_dense(cls, name: str, delta: torch.Tensor, mask: torch.Tensor | None = None) -> SparseDelta:
        """Builds a delta from a dense tensor, keeping the entries of `mask` (or the non-zero ones)."""
        flat = delta.reshape(-1)
        keep = (flat != 0) if mask is None else mask.reshape(-1).bool()
        idx = torch.nonzero(keep).reshape(-1)
        return cls(name, tuple(delta.shape), idx, flat[idx].detach().clone())


@dataclass
class SparseAdapter:
    """A named set of sparse deltas plus metadata, the unit that is stored, uploaded and switched.

    Args:
        name: adapter name.
        deltas: one SparseDelta per adapted weight, keyed by parameter name.
        mask: the mask kind that chose the indices (struct, rand, wm, grad, snip, peft, fused, ...).
        base_fingerprint: BaseFingerprint.to_dict() of the model it was built on, or None if unknown.
        description: free text.
        extra: further string metadata carried through save and load.
    """

    name: str
    deltas: dict[str, SparseDelta]
    mask: str = "unknown"
    base_fingerprint: dict[str, Any] | None = None
    description: str = ""
    extra: dict[str, str] = field(default_factory=dict)

    def __iter__(self) -> Iterator[SparseDelta]:
        return iter(self.deltas.values())

    def __len__(self) -> int:
        return len(self.deltas)

    @property
    def nnz(self) -> int:
        return sum(d.nnz for d in self)

    @property
    def numel(self) -> int:
        return sum(d.numel for d in self)

    @property
    def density(self) -> float:
        return self.nnz / max(self.numel, 1)

    @property
    def nbytes(self) -> int:
        return sum(d.nbytes for d in self)

    def validate(self) -> None:
        """Runs every intrinsic check on every layer. Whether it fits a base model is BaseFingerprint.check."""
        for delta in self:
            delta.validate(self.name)

    def scaled(self, alpha: float, name: str | None = None) -> SparseAdapter:
        deltas = {k: SparseDelta(d.name, d.shape, d.indices, d.values * alpha) for k, d in self.deltas.items()}
        return SparseAdapter(
            name or self.name, deltas, self.mask, self.base_fingerprint, self.description, dict(self.extra)
        )

    def to(self, device: torch.device | str) -> SparseAdapter:
        deltas = {
            k: SparseDelta(d.name, d.shape, d.indices.to(device), d.values.to(device)) for k, d in self.deltas.items()
        }
        return SparseAdapter(self.name, deltas, self.mask, self.base_fingerprint, self.description, dict(self.extra))

    def summary(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "mask": self.mask,
            "layers": len(self),
            "nnz": self.nnz,
            "density": self.density,
            "bytes": self.nbytes,
            "description": self.description,
        }


def adapter_from_dense(
    name: str, deltas: Mapping[str, torch.Tensor], masks: Mapping[str, torch.Tensor], mask_kind: str = "unknown"
) -> SparseAdapter:
    """Keeps the masked entries of each dense delta (zeros included, so the index set is the mask)."""
    sparse = {k: SparseDelta.from_dense(k, deltas[k], masks[k]) for k in masks}
    return SparseAdapter(name, sparse, mask_kind)
