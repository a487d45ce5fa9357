"""The correction planner: which plan corrects which rows, built as rarely as possible.

A decode plan on PyTorch's products is a list of segments (shira_core.batched.segments). Rows that join a
running batch either get a segment of their own, lined up after the running ones, or, when that extra
segment's products over the batch's remaining steps would cost more than copying the running rows' deltas
again, one segment for the whole batch, built at their prefill (which runs on their part of it). Rows that stay
when others leave keep a part of a cached segment. A second segment costs one more product per layer and two
slices (0.5-4 ms per step over 210 layers on a 2-core CPU, depending on the day), a build 20-40 ms for 8 rows;
past MAX_SEGMENTS segments a plan is built as one.

On the native kernel a plan lists each distinct delta (its arrays' addresses per layer) and the rows carrying
it: it copies nothing, and prefills use the same kind of plan.
"""

from __future__ import annotations

import time
from collections.abc import Sequence

import torch

from .deltas import ARRAYS, PackedDelta
from .layout import LinearLayer
from .plans import KernelPlan, PrefillPlan, Segment, SegmentPlan
from .segments import build_segment, cut_segment

# A decode plan of more segments than this is built as one instead. Each extra segment costs one more sparse
# product per layer, 0.5-4 ms per step (SmolLM2-135M, 2-core CPU); rebuilding 8 rows costs 20-40 ms once, so past
# a few segments the rebuild pays back within a request's remaining steps.
MAX_SEGMENTS = 4
# What one more segment costs per corrected layer and decode step: a sparse product and two slices (2.5-20 us on a
# 2-core CPU, depending on the day; a kernel launch or more on a GPU).
SEGMENT_PRODUCT_SECONDS = 10e-6

Terms = tuple[tuple[PackedDelta, ...], ...]  # per row, the deltas that correct it (empty: none)


class CorrectionPlanner:
    """Builds and caches correction plans for the rows of a batch.

    Args:
        layers: the corrected Linear layers.
        device: where the deltas live.
        native: plans for the native kernel (KernelPlan) instead of PyTorch's products (SegmentPlan).
    """

    def __init__(self, layers: Sequence[LinearLayer], device: torch.device, native: bool) -> None:
        self.layers = list(layers)
        self.native = native
        self.decode: SegmentPlan | KernelPlan | None = None
        self._decode_key: tuple | None = None
        self._segments: dict[tuple, Segment] = {}  # by the rows' deltas: segments a plan may reuse
        self.builds = 0  # segments built (or cut from a built one) so far
        self._build_seconds_per_byte = 0.4e-9  # measured by each build; this first guess is a 2-core CPU's
        self._no_entries = [torch.zeros(x.out_features, dtype=torch.int32, device=device) for x in self.layers]

    def forget(self) -> None:
        """Drops the cached segments (they hold a copy of every row's delta)."""
        self.decode = self._decode_key = None
        self._segments = {}

    def decode_plan(self, terms: Sequence[Sequence[PackedDelta]], steps: int = 1) -> SegmentPlan | KernelPlan:
        """The plan for decode steps: row r is corrected by the sum of the deltas in terms[r] (empty: none).

        On the native kernel, each distinct delta and the rows carrying it (no copy). Else runs of rows held by a
        segment built earlier (by a prefill, or for an earlier step; a run may be a part of one) reuse it; the
        rest get new segments. One segment is built for all rows instead when the plan would have more than
        MAX_SEGMENTS, or when the extra segments' products over `steps` decode steps would cost more than
        rebuilding the reused rows. Segments this plan does not use are dropped. Asking again with the same deltas
        in the same order returns the same plan.
        """
        key = tuple(tuple(t) for t in terms)  # identity: PackedDelta compares by object
        if key != self._decode_key:
            if self.native:
                self._segments = {}  # a prefill's segments; kernel plans need none
                self.decode, self._decode_key = self._kernel_plan(key), key
            else:
                self._set_decode(key, steps)
        return self.decode

    def prefill_plan(self, terms: Sequence[Sequence[PackedDelta]], running: Sequence[Sequence[PackedDelta]] = (),
                     steps: int = 1) -> SegmentPlan | KernelPlan | PrefillPlan:
        """The plan for a prefill pass over len(terms) rows of any number of tokens each, which then join the
        `running` rows (their terms) for about `steps` decode steps.

        On the native kernel, the same kind of plan as a decode step's: the kernel runs eight tokens at a time as
        the lanes of one vector multiply-add per entry, so a prefill costs no segment and no copy (SmolLM2-135M,
        45 tokens, 2-core CPU: one row +10.9 ms against +28.5 for the products below).

        Without it, consecutive rows with the same delta form one run. A single run is one sparse product over all
        its tokens, read and written in place. Several runs share the decode plan's block-diagonal matrices
        instead: one product per layer for all rows and tokens (8 rows of 5 sets, 45 tokens each: +89 ms over a
        487 ms prefill, against +145 ms with a product per run). The decode step that follows asks for the plan
        of the running rows and these, so it is built here: one segment for all of them when the decode plan
        would merge its segments anyway (the new rows are prefilled with a part cut from it), else a segment for
        the new rows that the running ones' segments join.
        """
        key = tuple(tuple(t) for t in terms)
        if self.native:
            return self._kernel_plan(key)
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
            self.decode, self._decode_key = SegmentPlan(len(key), tuple(self._whole(key))), key
            return self.decode
        products: list[list[tuple[int, int, torch.Tensor]]] = [[] for _ in self.layers]
        for start, end, d in runs:
            for lid, layer in d.layers.items():
                products[lid].append((start, end, layer.matrix))
        return PrefillPlan(len(terms), products)

    # -- the native kernel's plans -----------------------------------------------------------------------

    def _kernel_plan(self, key: Terms) -> KernelPlan:
        """One term per distinct delta, with every row that carries it: the kernel reads each delta's entries
        once per step however many rows share it. A build stacks the deltas' address tables (~0.1 ms)."""
        self.builds += 1
        rows: dict[int, list[int]] = {}
        deltas: dict[int, PackedDelta] = {}
        for r, row_terms in enumerate(key):
            for d in row_terms:
                deltas.setdefault(id(d), d)
                rows.setdefault(id(d), []).append(r)
        if not deltas:
            empty = torch.zeros(0, len(self.layers), ARRAYS, dtype=torch.int64)
            return KernelPlan(len(key), empty, torch.zeros(1, dtype=torch.int64), [False] * len(self.layers), ())
        terms = torch.stack([self._addresses(d) for d in deltas.values()])
        lists = [rows[i] for i in deltas]
        offsets = [0]
        for found in lists:
            offsets.append(offsets[-1] + len(found))
        row_table = torch.tensor(offsets + [r for found in lists for r in found], dtype=torch.int64)
        used = (terms[:, :, 0] != 0).any(0).tolist()
        return KernelPlan(len(key), terms, row_table, used, tuple(deltas.values()))

    def _addresses(self, delta: PackedDelta) -> torch.Tensor:
        """The delta's array addresses per layer for the native kernel, made once per delta."""
        if delta.addresses is None:
            table = [[0] * ARRAYS for _ in self.layers]
            for lid, part in delta.layers.items():
                table[lid] = [t.data_ptr() for t in part.groups]
            delta.addresses = torch.tensor(table, dtype=torch.int64)
        return delta.addresses

    # -- segments ----------------------------------------------------------------------------------------

    def _set_decode(self, key: Terms, steps: int, runs: list | None = None) -> None:
        """Makes the decode plan of `key` (`runs`: its runs, when the caller has them already)."""
        runs = self._runs(key) if runs is None else runs
        if len(runs) > MAX_SEGMENTS or self._merge_pays(runs, steps):  # decided before building any run
            segments = self._whole(key)
        else:
            segments = [(start + at, seg) for start, end, held in runs for at, seg in self._run(key, start, end, held)]
        used = {id(seg) for _, seg in segments}
        self._segments = {k: seg for k, seg in self._segments.items() if id(seg) in used}
        self.decode, self._decode_key = SegmentPlan(len(key), tuple(segments)), key

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

    def _runs(self, key: Terms) -> list[tuple[int, int, tuple | None]]:
        """The rows of `key` as runs (start, end, held): held = (cached key, first row) for rows that a cached
        segment holds from its row `first` on, None for the rows between them."""
        where: dict[tuple, list[tuple[tuple, int]]] = {}  # a row's terms -> (cached key, row) holding them
        for cached in self._segments:
            for first, terms in enumerate(cached):
                where.setdefault(terms, []).append((cached, first))
        runs: list[tuple[int, int, tuple | None]] = []
        r = 0
        while r < len(key):
            held = _held_at(key, r, where)
            if held is not None:
                end = r + held[2]
            else:
                end = r + 1
                while end < len(key) and _held_at(key, end, where) is None:
                    end += 1
            if held is not None or any(key[r:end]):  # a run of rows of the merged set needs no segment
                runs.append((r, end, held[:2] if held is not None else None))
            r = end
        return runs

    def _run(self, key: Terms, start: int, end: int, held: tuple | None) -> list[tuple[int, Segment]]:
        """The segment for rows [start, end) of `key`: the cached one, a part of it, or a new one."""
        if held is None:
            return self._whole(key[start:end])
        cached, first = held
        seg = self._segments[cached]
        if first == 0 and end - start == seg.rows:
            return [(0, seg)]
        self.builds += 1
        part = self._segments[key[start:end]] = cut_segment(seg, first, end - start, self.layers)
        return [(0, part)]

    def _whole(self, key: Terms) -> list[tuple[int, Segment]]:
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
            self.builds += 1
            began = time.perf_counter()
            seg = self._segments[part] = build_segment(part, self.layers, self._no_entries)
            if seg.nbytes:  # the build rate, for deciding when a rebuild pays (moving average: the machine drifts)
                rate = (time.perf_counter() - began) / seg.nbytes
                self._build_seconds_per_byte = 0.5 * (self._build_seconds_per_byte + rate)
        return [(first, self._segments[part])]

    def _prefill_part(self, batch: Terms, joined: int, steps: int, runs: list) -> SegmentPlan:
        """Builds the decode plan of `batch` as one segment and returns the plan of its rows from `joined` on
        (the rows being prefilled): their part of that segment. The part is not cached, so the plan budget
        holds (when the rows before them leave, a part is cut again)."""
        self._set_decode(batch, steps, runs)
        rows = len(batch) - joined
        segments = []
        for first, seg in self.decode.segments:  # one, or none when no row has deltas
            lo, hi = max(first, joined), min(first + seg.rows, len(batch))
            if lo < hi:
                self.builds += 1
                segments.append((lo - joined, cut_segment(seg, lo - first, hi - lo, self.layers)))
        return SegmentPlan(rows, tuple(segments))


def _held_at(key: Terms, r: int, where: dict) -> tuple | None:
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
