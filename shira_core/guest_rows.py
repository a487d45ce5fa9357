"""Guest rows: rows of other adapter sets sharing the forward passes of a batch whose weights hold one set.

The Switcher writes one set H (the host, or nothing: the base) into the weights, so every Linear computes
W_H x. A row of another set G (a guest) needs W_G x, so a wrapped forward adds (W_G - W_H) x to its output rows.
With d_S = W_S - W0 (sparse: S's indices), that is d_G plus the negated d_H, both built once per set straight
from the SwitchPlans (adapted - original values; every plan saves the same W0 originals).

Decode (one token per row) runs one sparse matrix-vector product per layer for many rows at once: the rows'
deltas sit on the diagonal of a block-diagonal CSR matrix, applied to the flattened inputs. Inside a real
decode step a CSR product costs ~20 us per call on a 2-core CPU (5 us in a hot loop) and a layer's delta has
only 1-9 thousand entries, so one call per layer instead of one per guest row and layer is what keeps small
models fast; the entries then cost ~0.7 ns each (cold in cache after the dense weights stream through: about
the memory-bandwidth floor).

A decode plan is a list of segments, each the block-diagonal matrices of a run of consecutive rows. Rows that
join a running batch either get a segment of their own, lined up after the running ones, or, when that extra
segment's products over the batch's remaining steps would cost more than copying the running rows' deltas
again, one segment for the whole batch, built at their prefill (which runs on their part of it). Rows that stay
when others leave keep a part of a cached segment: the values are views, the column indices a shifted copy (a
third of a build's bytes). A second segment costs one more product per layer and two slices (0.5-4 ms per step
over 210 layers on a 2-core CPU, depending on the day), a build 20-40 ms for 8 rows; past MAX_SEGMENTS
segments a plan is built as one. Prefill (many tokens per row) of a single run of rows with the same delta is
one sparse matrix-matrix product.

On the CPU, decode steps run on the native kernel (shira_core.guest_kernel) where it builds: its plan lists each
distinct delta (its arrays' addresses per layer) and the rows carrying it, so it copies nothing, and
each delta's entries are read once per step for all its rows; prefills run on it too, eight tokens to a vector.
"""

from __future__ import annotations

import contextlib
import time
import types
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch
from torch import nn
from torch.nn import functional as F

from . import guest_cost, guest_kernel
from .errors import ShiraError
from .switcher import Switcher, SwitchPlan

# A decode plan of more segments than this is built as one instead. Each extra segment costs one more sparse
# product per layer, 0.5-4 ms per step (SmolLM2-135M, 2-core CPU); rebuilding 8 rows costs 20-40 ms once, so past
# a few segments the rebuild pays back within a request's remaining steps.
MAX_SEGMENTS = 4
# What one more segment costs per corrected layer and decode step: a sparse product and two slices (2.5-20 us on a
# 2-core CPU, depending on the day; a kernel launch or more on a GPU).
SEGMENT_PRODUCT_SECONDS = 10e-6


class GuestSetError(ShiraError):
    """A set cannot ride as a guest: it changes a weight that is not (only) an nn.Linear weight."""


@dataclass
class _LayerDelta:
    """One layer's entries in the one form its GuestRows' plans read: CSR for PyTorch's products, or the native
    kernel's blocks (the other form's fields are None, so a delta is not held twice)."""

    crow: torch.Tensor | None = None  # int32 [out + 1]
    col: torch.Tensor | None = None  # int32 [nnz]
    values: torch.Tensor | None = None  # GuestRows.dtype [nnz]: adapted - original
    matrix: torch.Tensor | None = None  # the same three as a sparse CSR tensor [out, in], for prefill products
    counts: torch.Tensor | None = None  # int32 [out]: entries per row (crow's differences), for decode plans
    # For the native kernel: the entries block by block of output rows, by column within a block (start
    # int32 [blocks + 1], the row within the block uint8, the column as uint16 bits in int16, the value).
    blocked: tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor] | None = None

    def tensors(self) -> list[torch.Tensor]:
        """Every array it holds (`matrix` shares the CSR three's storage)."""
        return [t for t in (self.crow, self.col, self.values, self.counts, *(self.blocked or ())) if t is not None]


@dataclass(eq=False)
class SetDelta:
    """One adapter set's weights minus the base weights, per adapted Linear layer (layer id -> its entries)."""

    label: str
    layers: dict[int, _LayerDelta]
    nnz: int
    addresses: torch.Tensor | None = None  # int64 [layers, 4] for the native kernel, built at its first plan

    @property
    def nbytes(self) -> int:
        return sum(_nbytes(t) for d in self.layers.values() for t in d.tensors())

    @property
    def entry_bytes(self) -> int:
        """Bytes of the column indices and values that a decode plan copies once per row carrying this delta (0
        for the native kernel's, which its plans point into)."""
        return sum(_nbytes(d.col) + _nbytes(d.values) for d in self.layers.values() if d.col is not None)

    @property
    def pointer_bytes(self) -> int:
        """Bytes of the row pointers (one block's worth in a decode plan; 0 for the native kernel's)."""
        return sum(_nbytes(d.crow) for d in self.layers.values() if d.crow is not None)

    @property
    def value_bytes(self) -> int:
        """Bytes of the values alone: what a negated copy holds of its own."""
        values = [v for d in self.layers.values() for v in (d.values, d.blocked[3] if d.blocked else None)]
        return sum(_nbytes(v) for v in values if v is not None)

    def negated(self) -> SetDelta:
        """-delta: new values, the same index arrays (shared, not copied)."""
        layers = {}
        for lid, d in self.layers.items():
            neg = _LayerDelta(blocked=(*d.blocked[:3], d.blocked[3].neg()) if d.blocked is not None else None)
            if d.values is not None:
                neg.crow, neg.col, neg.counts, neg.values = d.crow, d.col, d.counts, d.values.neg()
                neg.matrix = _csr(d.crow, d.col, neg.values, d.matrix.shape)
            layers[lid] = neg
        return SetDelta(f"-{self.label}", layers, self.nnz)


@dataclass
class _Layer:
    name: str
    out_features: int
    in_features: int


@dataclass(eq=False)
class _Segment:
    rows: int
    depth: int  # deltas per row, at most: the matrices have depth * rows block rows
    matrices: list[torch.Tensor | None]  # per layer: block-diagonal CSR [depth * rows * out, rows * in], or None
    nbytes: int = 0  # of the matrices' index and value arrays


@dataclass
class _DecodePlan:
    rows: int
    segments: tuple[tuple[int, _Segment], ...]  # (first row, segment); rows outside every segment: no correction

    @property
    def nbytes(self) -> int:
        return sum(seg.nbytes for _, seg in self.segments)


@dataclass
class _NativePlan:
    """A decode plan for the native kernel: each distinct delta's arrays, per layer, and the rows it applies to.
    It points into the deltas' own arrays, copies nothing, and holds the deltas so those arrays outlive it."""

    rows: int
    terms: torch.Tensor  # int64 [deltas, layers, 4]: the addresses of a delta's blocked arrays (0: none there)
    row_table: torch.Tensor  # int64: deltas + 1 offsets into the rest, then each delta's rows
    used: list[bool]  # per layer: whether any delta has entries there
    deltas: tuple[SetDelta, ...]
    nbytes: int = 0  # it holds no copy of any delta


@dataclass
class _PrefillPlan:
    rows: int
    products: list[list[tuple[int, int, torch.Tensor]]]  # per layer: (first row, end row, CSR matrix) per run


def _nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def _csr(crow: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int]) -> torch.Tensor:
    with warnings.catch_warnings():  # "sparse CSR support is in beta": known, and the kernels are what we want
        warnings.simplefilter("ignore", UserWarning)
        return torch.sparse_csr_tensor(crow, col, values, shape)


def _blocked(row: torch.Tensor, col: torch.Tensor, values: torch.Tensor, shape: tuple[int, int],
             block: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """A layer's entries in the native kernel's layout: by block of `block` output rows, then by column."""
    n_blocks = (shape[0] + block - 1) // block
    which = row // block
    order = torch.argsort(which * shape[1] + col, stable=True)
    start = torch.zeros(n_blocks + 1, dtype=torch.int64)
    start[1:] = torch.bincount(which, minlength=n_blocks).cumsum(0)
    local = (row % block)[order].to(torch.uint8)
    return start.to(torch.int32), local, col[order].to(torch.int16), values[order].contiguous()


def _sparse_mm(matrix: torch.Tensor, dense: torch.Tensor) -> torch.Tensor:
    """matrix @ dense for a CSR matrix. On the CPU, embedding_bag's kernel (one weighted sum of dense rows per
    matrix row) runs it ~1.9x faster than MKL's CSR product at prefill widths (8 rows x 45 tokens of a 135M
    model: +62 instead of +81 ms over a 354 ms prefill). MKL stays faster for one column, so decode keeps it."""
    if matrix.device.type != "cpu":
        return torch.mm(matrix, dense)
    return F.embedding_bag(matrix.col_indices(), dense, matrix.crow_indices(), mode="sum",
                           per_sample_weights=matrix.values(), include_last_offset=True)


def _sparse_dtype(dtype: torch.dtype, device: torch.device) -> torch.dtype:
    """The dtype the CSR products run in: the weights' own where the device's sparse kernels take it, else
    fp32 (MKL's CPU kernels take fp32 and fp64 only; the difference of two bf16 weights is exact in fp32)."""
    if dtype in (torch.float32, torch.float64):
        return dtype
    one = torch.ones(1, dtype=dtype, device=device)
    probe = _csr(torch.tensor([0, 1], dtype=torch.int32, device=device), torch.zeros(1, dtype=torch.int32,
                 device=device), one, (1, 1))
    try:
        torch.mv(probe, one)
        torch.mm(probe, one.view(1, 1))
    except RuntimeError:  # NotImplementedError is one
        return torch.float32
    return dtype


class GuestRows:
    """Wrapped forwards on a model's Linear layers that correct chosen batch rows to their own adapter set.

    Bind once after the Switcher. Each Linear's `forward` is wrapped when a plan is first made active
    (`active(plan)`) and restored by `forget_plans()` or `close()`, so batches of one set run the plain layers.
    A wrapper rather than a forward hook: a module with hooks takes nn.Module's slow call path, which with the
    hook's own call cost ~2 ms of a 115 ms mixed decode step (210 layers, 8 rows, 2-core CPU). A wrapper
    corrects only the module it was made for, so a deep copy of the model (which copies the wrappers) computes
    plain outputs.

    Args:
        model: the model the Switcher is bound to.
        switcher: its Switcher (plans are mapped back to layers through its flat-buffer slots).
        native: run decode steps' corrections with the native kernel (shira_core.guest_kernel) where it builds
            and applies (CPU, fp32 sums, inputs of at most 65,536 features); False, or where it does not, they
            run as PyTorch sparse products over block-diagonal segments.
    """

    def __init__(self, model: nn.Module, switcher: Switcher, native: bool = True) -> None:
        self.switcher = switcher
        self.layers: list[_Layer] = []
        self._active: _DecodePlan | _NativePlan | _PrefillPlan | None = None
        self._decode_key: tuple | None = None
        self._decode: _DecodePlan | _NativePlan | None = None
        self._segments: dict[tuple, _Segment] = {}  # by the rows' deltas: segments a plan may reuse
        self.builds = 0  # segments built (or cut from a built one) so far
        self._build_seconds_per_byte = 0.4e-9  # measured by each build; this first guess is a 2-core CPU's
        users: dict[int, list[tuple[nn.Module, str]]] = {}
        for module in model.modules():
            for pname, param in module.named_parameters(recurse=False):
                users.setdefault(id(param), []).append((module, pname))
        # Per flat buffer: sorted (offset, numel, layer id or -1 when the weight is not a Linear-only weight).
        self._spans: dict[int, tuple[torch.Tensor, list[int], list[str]]] = {}
        spans: dict[int, list[tuple[int, int, int, str]]] = {}
        self._targets: list[tuple[nn.Module, int]] = []  # (Linear, layer id) to wrap while plans are in use
        self._wrapped: list[tuple[nn.Module, object]] = []  # (Linear, its own instance `forward` or None)
        self._closed = False
        for name, param in switcher._params.items():  # noqa: SLF001 - same package, the slot map is the source
            slot = switcher._slots[name]  # noqa: SLF001
            owners = users.get(id(param), [])
            linear = bool(owners) and all(isinstance(m, nn.Linear) and p == "weight" for m, p in owners)
            lid = -1
            if linear and len(slot.shape) == 2:
                lid = len(self.layers)
                self.layers.append(_Layer(name, slot.shape[0], slot.shape[1]))
                self._targets += [(module, lid) for module, _ in owners]
            spans.setdefault(slot.group, []).append((slot.offset, slot.numel, lid, name))
        for gid, items in spans.items():
            items.sort()
            starts = torch.tensor([s[0] for s in items], dtype=torch.int64)
            self._spans[gid] = (starts, [s[2] for s in items], [s[3] for s in items])
        self._offsets = {name: switcher._slots[name].offset for name in switcher._params}  # noqa: SLF001
        params = list(switcher._params.values())  # noqa: SLF001
        self.device = params[0].device if params else torch.device("cpu")
        self.dtype = _sparse_dtype(params[0].dtype, self.device) if params else torch.float32
        # The native decode kernel: CPU, fp32 deltas, and columns that fit 16 bits.
        fits = self.device.type == "cpu" and self.dtype == torch.float32
        fits = fits and all(x.in_features <= 2**16 for x in self.layers)
        self._kernel = guest_kernel.load() if native and fits else None
        self._no_entries = [torch.zeros(x.out_features, dtype=torch.int32, device=self.device) for x in self.layers]
        self._zero = torch.zeros(1, dtype=torch.int32, device=self.device)

    def close(self) -> None:
        """Restores the plain forwards for good: plans made active afterwards have no effect."""
        self._closed = True
        self._unwrap()

    def _wrap(self) -> None:
        if self._wrapped or self._closed:
            return
        for module, lid in self._targets:
            self._wrapped.append((module, module.__dict__.get("forward")))
            module.forward = types.MethodType(self._forward_for(module, lid), module)

    def _unwrap(self) -> None:
        for module, own in reversed(self._wrapped):
            if own is None:
                del module.forward
            else:
                module.forward = own
        self._wrapped = []

    # -- deltas ----------------------------------------------------------------------------------------

    @torch.no_grad()
    def delta(self, plan: SwitchPlan, negate: bool = False) -> SetDelta:
        """The plan's adapted weights minus the base weights (or the reverse, with negate), per Linear layer.

        Raises:
            GuestSetError: the plan changes a weight that is not only used as an nn.Linear weight
                (a tied embedding, a norm), which a Linear's wrapper cannot correct.
        """
        layers: dict[int, _LayerDelta] = {}
        for part in plan.parts:
            starts, lids, names = self._spans[part.group]
            index = part.index.cpu()
            seg = torch.searchsorted(starts, index, right=True) - 1
            which, counts = torch.unique_consecutive(seg, return_counts=True)
            values = part.adapted.to(self.dtype) - part.original.to(self.dtype)
            pos = 0
            for s, n in zip(which.tolist(), counts.tolist(), strict=True):
                lid, name = lids[s], names[s]
                if lid < 0:
                    raise GuestSetError(
                        f"set {plan.label!r} changes {name}, which is not only an nn.Linear weight; "
                        "it cannot share a batch with other sets"
                    )
                layer = self.layers[lid]
                local = index[pos : pos + n] - self._offsets[name]
                row, col = local // layer.in_features, local % layer.in_features
                vals = values[pos : pos + n]
                shape = (layer.out_features, layer.in_features)
                if self._kernel is not None:
                    layers[lid] = _LayerDelta(blocked=_blocked(row, col, vals, shape, self._kernel.block))
                else:
                    crow = torch.zeros(layer.out_features + 1, dtype=torch.int64)
                    crow[1:] = torch.bincount(row, minlength=layer.out_features).cumsum(0)
                    device = part.index.device
                    crow32, col32 = crow.to(device, torch.int32), col.to(device, torch.int32)
                    layers[lid] = _LayerDelta(crow32, col32, vals, _csr(crow32, col32, vals, shape), crow32.diff())
                pos += n
        delta = SetDelta(plan.label, layers, plan.nnz)
        return delta.negated() if negate else delta

    # -- plans -----------------------------------------------------------------------------------------

    def decode_plan(self, terms: Sequence[Sequence[SetDelta]], steps: int = 1) -> _DecodePlan | _NativePlan:
        """The plan for decode steps: row r is corrected by the sum of the deltas in terms[r] (empty: none).

        On the native kernel, each distinct delta and the rows carrying it (no copy). Else runs of rows held by a
        segment built earlier (by a prefill, or for an earlier step; a run may be a part of one) reuse it; the
        rest get new segments. One segment is built for all rows instead when the plan
        would have more than MAX_SEGMENTS, or when the extra segments' products over `steps` decode steps would
        cost more than rebuilding the reused rows. Segments this plan does not use are dropped. Asking again with
        the same deltas in the same order returns the same plan.
        """
        key = tuple(tuple(t) for t in terms)  # identity: SetDelta compares by object
        if key != self._decode_key:
            if self._kernel is not None:
                self._segments = {}  # a prefill's segments; native plans need none
                self._decode, self._decode_key = self._native_plan(key), key
            else:
                self._set_decode(key, steps)
        return self._decode

    @property
    def native(self) -> bool:
        """Whether decode plans run on the native kernel (and copy no deltas)."""
        return self._kernel is not None

    def step_cost(self, guests: Sequence[tuple[int, int]], host_nnz: int) -> float:
        """One decode step's corrections on this way of correcting: see shira_core.guest_cost."""
        return guest_cost.step_cost(self.native, guests, host_nnz)

    def switch_cost(self, entries: int) -> float:
        """Writing `entries` weight entries, in step_cost's units."""
        return guest_cost.switch_cost(self.native, entries)

    def _native_plan(self, key: tuple) -> _NativePlan:
        """One term per distinct delta, with every row that carries it: the kernel reads each delta's entries
        once per step however many rows share it. A build stacks the deltas' address tables (~0.1 ms)."""
        self.builds += 1
        rows: dict[int, list[int]] = {}
        deltas: dict[int, SetDelta] = {}
        for r, row_terms in enumerate(key):
            for d in row_terms:
                deltas.setdefault(id(d), d)
                rows.setdefault(id(d), []).append(r)
        if not deltas:
            empty = torch.zeros(0, len(self.layers), 4, dtype=torch.int64)
            return _NativePlan(len(key), empty, torch.zeros(1, dtype=torch.int64), [False] * len(self.layers), ())
        terms = torch.stack([self._addresses(d) for d in deltas.values()])
        lists = [rows[i] for i in deltas]
        offsets = [0]
        for found in lists:
            offsets.append(offsets[-1] + len(found))
        row_table = torch.tensor(offsets + [r for found in lists for r in found], dtype=torch.int64)
        used = (terms[:, :, 0] != 0).any(0).tolist()
        return _NativePlan(len(key), terms, row_table, used, tuple(deltas.values()))

    def _addresses(self, delta: SetDelta) -> torch.Tensor:
        """The delta's array addresses per layer for the native kernel, made once per delta."""
        if delta.addresses is None:
            table = [[0, 0, 0, 0] for _ in self.layers]
            for lid, part in delta.layers.items():
                table[lid] = [t.data_ptr() for t in part.blocked]
            delta.addresses = torch.tensor(table, dtype=torch.int64)
        return delta.addresses

    def _set_decode(self, key: tuple, steps: int, runs: list | None = None) -> None:
        """Makes the decode plan of `key` (`runs`: its runs, when the caller has them already)."""
        runs = self._runs(key) if runs is None else runs
        if len(runs) > MAX_SEGMENTS or self._merge_pays(runs, steps):  # decided before building any run
            segments = self._whole(key)
        else:
            segments = [(start + at, seg) for start, end, held in runs for at, seg in self._run(key, start, end, held)]
        used = {id(seg) for _, seg in segments}
        self._segments = {k: seg for k, seg in self._segments.items() if id(seg) in used}
        self._decode, self._decode_key = _DecodePlan(len(key), tuple(segments)), key

    def _merge_pays(self, runs: list, steps: int) -> bool:
        """Whether one segment for all runs costs less than the extra segments' products over `steps` steps."""
        if len(runs) < 2:
            return False
        rebuilt = 0.0  # bytes of the reused runs, which one segment would copy again
        for start, end, held in runs:
            if held is not None:
                seg = self._segments[held[0]]
                rebuilt += seg.nbytes * (end - start) / seg.rows
        saved = steps * (len(runs) - 1) * SEGMENT_PRODUCT_SECONDS * len(self.layers)
        return saved > rebuilt * self._build_seconds_per_byte

    def forget_plans(self) -> None:
        """Drops the cached segments (they hold a copy of every row's delta) and the wrappers, until the next plan."""
        self._decode = self._decode_key = None
        self._segments = {}
        if self._active is None:
            self._unwrap()

    def _runs(self, key: tuple) -> list[tuple[int, int, tuple | None]]:
        """The rows of `key` as runs (start, end, held): held = (cached key, first row) for rows that a cached
        segment holds from its row `first` on, None for the rows between them."""
        where: dict[tuple, list[tuple[tuple, int]]] = {}  # a row's terms -> (cached key, row) holding them
        for cached in self._segments:
            for first, terms in enumerate(cached):
                where.setdefault(terms, []).append((cached, first))
        runs: list[tuple[int, int, tuple | None]] = []
        r = 0
        while r < len(key):
            held = self._held_at(key, r, where)
            if held is not None:
                end = r + held[2]
            else:
                end = r + 1
                while end < len(key) and self._held_at(key, end, where) is None:
                    end += 1
            if held is not None or any(key[r:end]):  # a run of host rows only needs no segment
                runs.append((r, end, held[:2] if held is not None else None))
            r = end
        return runs

    @staticmethod
    def _held_at(key: tuple, r: int, where: dict) -> tuple | None:
        """The longest run of rows from r on that a cached segment holds, as (its key, first row there, rows,
        whether that is the whole segment), a whole segment first among runs as long."""
        best = None
        for cached, first in where.get(key[r], ()):
            n = 1
            while r + n < len(key) and first + n < len(cached) and key[r + n] == cached[first + n]:
                n += 1
            exact = first == 0 and n == len(cached)
            if (best is None or (n, exact) > best[2:]) and any(key[r : r + n]):
                best = (cached, first, n, exact)
        return best

    def _run(self, key: tuple, start: int, end: int, held: tuple | None) -> list[tuple[int, _Segment]]:
        """The segment for rows [start, end) of `key`: the cached one, a part of it, or a new one."""
        if held is None:
            return self._whole(key[start:end])
        cached, first = held
        seg = self._segments[cached]
        if first == 0 and end - start == seg.rows:
            return [(0, seg)]
        part = self._segments[key[start:end]] = self._part(seg, first, end - start)
        return [(0, part)]

    def _whole(self, key: tuple) -> list[tuple[int, _Segment]]:
        """One segment for all rows of `key` but the leading and trailing ones without deltas (none if no row has
        any), cached under its rows' deltas."""
        first, end = 0, len(key)
        while first < end and not key[first]:
            first += 1
        while end > first and not key[end - 1]:
            end -= 1
        if first == end:
            return []
        part = key[first:end]
        if part not in self._segments:
            self._segments[part] = self._build_segment(part)
        return [(first, self._segments[part])]

    def _part(self, seg: _Segment, first: int, rows: int) -> _Segment:
        """Rows [first, first + rows) of a segment as a segment of their own: the values are views of the
        segment's, the column indices a shifted copy (a third of a build's bytes)."""
        self.builds += 1
        matrices: list[torch.Tensor | None] = []
        nbytes = 0
        for lid, matrix in enumerate(seg.matrices):
            if matrix is None:
                matrices.append(None)
                continue
            layer = self.layers[lid]
            lo, hi = first * seg.depth * layer.out_features, (first + rows) * seg.depth * layer.out_features
            crow = matrix.crow_indices()[lo : hi + 1]
            k0, k1 = int(crow[0]), int(crow[-1])
            crow = crow - k0
            col = matrix.col_indices()[k0:k1] - first * layer.in_features
            vals = matrix.values()[k0:k1]
            nbytes += _nbytes(crow) + _nbytes(col) + _nbytes(vals)
            matrices.append(_csr(crow, col, vals, (hi - lo, rows * layer.in_features)))
        return _Segment(rows, seg.depth, matrices, nbytes)

    def _build_segment(self, terms: tuple[tuple[SetDelta, ...], ...]) -> _Segment:
        self.builds += 1
        began = time.perf_counter()
        # Block row v = r * depth + k holds the k-th delta of row r; its columns are row r's inputs.
        rows, depth = len(terms), max((len(t) for t in terms), default=0)
        blocks = [t[k] if k < len(t) else None for t in terms for k in range(depth)]
        matrices: list[torch.Tensor | None] = []
        nbytes = 0
        for lid, layer in enumerate(self.layers):
            if not any(d is not None and lid in d.layers for d in blocks):
                matrices.append(None)
                continue
            counts, cols, values = [self._zero], [], []  # crow = cumsum of [0, entries per row]
            for v, d in enumerate(blocks):
                part = d.layers.get(lid) if d is not None else None
                if part is None:
                    counts.append(self._no_entries[lid])
                    continue
                counts.append(part.counts)
                cols.append(part.col + (v // depth) * layer.in_features)
                values.append(part.values)
            crow, col, vals = torch.cat(counts).cumsum(0, dtype=torch.int32), torch.cat(cols), torch.cat(values)
            nbytes += _nbytes(crow) + _nbytes(col) + _nbytes(vals)
            shape = (len(blocks) * layer.out_features, rows * layer.in_features)
            matrices.append(_csr(crow, col, vals, shape))
        if nbytes:  # the build rate, for deciding when a rebuild pays (moving average: the machine drifts)
            rate = (time.perf_counter() - began) / nbytes
            self._build_seconds_per_byte = 0.5 * (self._build_seconds_per_byte + rate)
        return _Segment(rows, depth, matrices, nbytes)

    def prefill_plan(self, terms: Sequence[Sequence[SetDelta]], running: Sequence[Sequence[SetDelta]] = (),
                     steps: int = 1) -> _DecodePlan | _NativePlan | _PrefillPlan:
        """The plan for a prefill pass over len(terms) rows of any number of tokens each, which then join the
        `running` rows (their terms) for about `steps` decode steps.

        On the native kernel, the same kind of plan as a decode step's (each distinct delta with its rows): the
        kernel runs eight tokens at a time as the lanes of one vector multiply-add per entry, so a prefill costs
        no segment and no copy (SmolLM2-135M, 45 tokens, 2-core CPU: one row +10.9 ms against +28.5 for the
        products below, two rows of two sets +20.0 against +30.5).

        Without it, consecutive rows with the same delta form one run. A single run is one sparse product over all
        its tokens, read and written in place. Several runs share the decode plan's block-diagonal matrices instead:
        one product per layer for all rows and tokens, at the price of a copy of the inputs and a strided add
        (8 rows of 5 sets, 45 tokens each: +89 ms over a 487 ms prefill, against +145 ms with a product per
        run). The decode step that follows asks for the plan of the running rows and these, so it is built here:
        one segment for all of them when the decode plan would merge its segments anyway (the new rows are
        prefilled with a part cut from it), else a segment for the new rows that the running ones' segments join.
        """
        key = tuple(tuple(t) for t in terms)
        if self._kernel is not None:  # the kernel runs prefills too: no segment, no copy
            return self._native_plan(key)
        if any(running):
            batch = tuple(tuple(t) for t in running) + key
            runs = self._runs(batch)
            if len(runs) > MAX_SEGMENTS or self._merge_pays(runs, steps):
                return self._prefill_part(batch, len(running), steps, runs)
        runs: list[list] = []  # [first row, end row, delta]
        open_runs: dict[int, list] = {}  # id(delta) -> its run, if that run reaches the previous row
        for r, deltas in enumerate(terms):
            reaching = {}
            for d in deltas:
                run = open_runs.get(id(d))
                if run is None:
                    run = [r, r, d]
                    runs.append(run)
                run[1] = r + 1
                reaching[id(d)] = run
            open_runs = reaching
        if len(runs) > 1:  # one segment for these rows, kept (with the running batch's) for the next step
            self._decode, self._decode_key = _DecodePlan(len(key), tuple(self._whole(key))), key
            return self._decode
        products: list[list[tuple[int, int, torch.Tensor]]] = [[] for _ in self.layers]
        for start, end, d in runs:
            for lid, layer in d.layers.items():
                products[lid].append((start, end, layer.matrix))
        return _PrefillPlan(len(terms), products)

    def _prefill_part(self, batch: tuple, joined: int, steps: int, runs: list) -> _DecodePlan:
        """Builds the decode plan of `batch` as one segment and returns the plan of its rows from `joined` on
        (the rows being prefilled): their part of that segment. The part is not cached, so the plan budget
        holds (when the rows before them leave, a part is cut again)."""
        self._set_decode(batch, steps, runs)
        rows = len(batch) - joined
        segments = []
        for first, seg in self._decode.segments:  # one, or none when no row has deltas
            lo, hi = max(first, joined), min(first + seg.rows, len(batch))
            if lo < hi:
                segments.append((lo - joined, self._part(seg, lo - first, hi - lo)))
        return _DecodePlan(rows, tuple(segments))

    @contextlib.contextmanager
    def active(self, plan: _DecodePlan | _NativePlan | _PrefillPlan | None) -> Iterator[None]:
        """Makes `plan` apply to the forward passes inside the block (None: plain forward passes)."""
        if plan is not None:
            self._wrap()
        previous, self._active = self._active, plan
        try:
            yield
        finally:
            self._active = previous

    # -- the wrapped forward ----------------------------------------------------------------------------

    def _forward_for(self, owner: nn.Module, lid: int):
        own = owner.__dict__.get("forward")  # another library's wrapper (bound to `owner`): ours runs around it
        plain = type(owner).forward

        def forward(module: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if module is not owner:  # a deep copy of the model: its own plain output
                return plain(module, x, *args, **kwargs)
            out = own(x, *args, **kwargs) if own is not None else plain(module, x, *args, **kwargs)
            plan = self._active
            if plan is not None:
                self._correct(plan, lid, x, out)
            return out

        return forward

    def _correct(self, plan: _DecodePlan | _NativePlan | _PrefillPlan, lid: int, x: torch.Tensor,
                 out: torch.Tensor) -> None:
        if x.shape[0] != plan.rows:
            raise RuntimeError(f"guest plan is for {plan.rows} rows, the forward pass has {x.shape[0]}")
        if isinstance(plan, _NativePlan):
            if plan.used[lid]:  # fp32 sums, rounded into out's dtype
                self._kernel.correct(plan.terms, plan.row_table, lid, x, out)
            return
        if isinstance(plan, _DecodePlan):
            if x.dim() == 3 and x.shape[1] > 1:  # a prefill pass
                for start, seg in plan.segments:
                    matrix = seg.matrices[lid]
                    if matrix is not None:
                        self._prefill_segment(seg, matrix, x[start : start + seg.rows], out[start : start + seg.rows])
                return
            # One token per row: each segment's rows in one product on flat views. Slicing costs as much as an
            # empty product (~4 us), so a segment that covers the batch is not sliced.
            flat, xs = out.view(-1), x.reshape(-1)
            n_out, n_in = self.layers[lid].out_features, self.layers[lid].in_features
            for start, seg in plan.segments:
                matrix = seg.matrices[lid]
                if matrix is None:
                    continue
                if seg.rows == plan.rows:
                    self._decode_segment(seg, matrix, xs, flat)
                else:
                    end = start + seg.rows
                    self._decode_segment(seg, matrix, xs[start * n_in : end * n_in], flat[start * n_out : end * n_out])
            return
        layer = self.layers[lid]
        for start, end, matrix in plan.products[lid]:
            xs = x[start:end].reshape(-1, layer.in_features)  # [rows * tokens, in], a view
            ys = out[start:end].view(-1, layer.out_features)
            if matrix.dtype == xs.dtype == ys.dtype:
                ys.t().addmm_(matrix, xs.t())  # written in place: ~10% faster than a product, then an add
            else:
                ys.add_(torch.mm(matrix, xs.t().to(matrix.dtype)).t().to(ys.dtype))

    @staticmethod
    def _prefill_segment(seg: _Segment, matrix: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> None:
        """All the segment's rows and tokens in one product (x: [rows, tokens, in])."""
        rows, tokens = x.shape[0], x.shape[1]
        xs = x.transpose(-1, -2).reshape(-1, tokens).to(matrix.dtype)  # [rows * in, tokens], row blocks
        ys = _sparse_mm(matrix, xs)  # [depth * rows * out, tokens]
        if seg.depth > 1:
            ys = ys.view(rows, seg.depth, -1, tokens).sum(1)
        out.add_(ys.view(rows, -1, tokens).transpose(-1, -2))

    @staticmethod
    def _decode_segment(seg: _Segment, matrix: torch.Tensor, x: torch.Tensor, out: torch.Tensor) -> None:
        """out += the segment's corrections, for flat x [rows * in] and flat out [rows * out]."""
        if seg.depth == 1 and matrix.dtype == out.dtype:
            out.addmv_(matrix, x)
            return
        y = torch.mv(matrix, x.to(matrix.dtype))
        if seg.depth > 1:
            y = y.view(seg.rows, seg.depth, -1).sum(1)
        out.add_(y.view(-1))  # rounds into the output's dtype
