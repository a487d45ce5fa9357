"""The RowCorrector: wrapped forwards on a model's Linear layers that correct chosen batch rows to their own set.

The Switcher writes one set M (the merged set, or nothing: the base) into the weights, so every Linear computes
W_M x. A row of another set S needs W_S x, so the wrapped forward adds (W_S - W_M) x to that row's output:
d_S = W_S - W0 plus the negated d_M, both packed once per set (shira_core.batched.deltas).
"""

from __future__ import annotations

import contextlib
import types
from collections.abc import Iterator, Sequence

import torch
from torch import nn

from ..decode import DecodeLinear
from ..switcher import ScatterPlan, Switcher
from . import cost, deltas, kernel, ops
from .deltas import PackedDelta
from .layout import LinearLayout
from .planner import CorrectionPlanner
from .plans import CorrectionPlan, KernelPlan, SegmentPlan

_HOOKED = object()  # in _wrapped: the layer's DecodeLinear.correction was set, its forward left alone


class RowCorrector:
    """Corrects chosen rows of each forward pass to their own adapter set, through wrapped Linear forwards.

    Bind once after the Switcher. Each Linear's `forward` is wrapped when a plan is first made active
    (`active(plan)`) and restored by `forget_plans()` or `close()`, so batches of one set run the plain layers.
    A wrapper rather than a forward hook: a module with hooks takes nn.Module's slow call path, which with the
    hook's own call cost ~2 ms of a 115 ms mixed decode step (210 layers, 8 rows, 2-core CPU). A wrapper
    corrects only the module it was made for, so a deep copy of the model (which copies the wrappers) computes
    plain outputs.

    Args:
        model: the model the Switcher is bound to.
        switcher: its Switcher (plans are mapped back to layers through its bound weights).
        native: run the corrections with the native kernel (shira_core.batched.kernel) where it builds and
            applies (CPU, fp32 sums, inputs of at most 65,536 features); False, or where it does not, they run as
            PyTorch sparse products over block-diagonal segments.
    """

    def __init__(self, model: nn.Module, switcher: Switcher, native: bool = True) -> None:
        self.layout = LinearLayout(model, switcher)
        self.layers = self.layout.layers
        self.device = self.layout.device
        self.dtype = ops.sparse_dtype(self.layout.weight_dtype, self.device)
        # The native kernel: CPU, fp32 deltas, and columns that fit 16 bits.
        fits = self.device.type == "cpu" and self.dtype == torch.float32
        fits = fits and all(x.in_features <= 2**16 for x in self.layers)
        self._kernel = kernel.load() if native and fits else None
        self.planner = CorrectionPlanner(self.layers, self.device, native=self._kernel is not None)
        self._active: CorrectionPlan | None = None
        self._wrapped: list[tuple[nn.Module, object]] = []  # (Linear, its own instance `forward` or None)
        self._closed = False

    @property
    def native(self) -> bool:
        """Whether plans run on the native kernel (and copy no deltas)."""
        return self._kernel is not None

    @property
    def builds(self) -> int:
        """Plans and segments built so far (a metric of the planner's cache)."""
        return self.planner.builds

    def delta(self, plan: ScatterPlan, negate: bool = False) -> PackedDelta:
        """The set's delta from the base (or the reverse, with negate), packed for this corrector.

        Raises:
            UnbatchableSetError: the set changes a weight that is not only an nn.Linear weight.
        """
        packed = deltas.pack(plan, self.layout, self.dtype, native=self._kernel is not None)
        return packed.negated() if negate else packed

    def decode_plan(self, terms: Sequence[Sequence[PackedDelta]], steps: int = 1) -> SegmentPlan | KernelPlan:
        return self.planner.decode_plan(terms, steps)

    def prefill_plan(self, terms: Sequence[Sequence[PackedDelta]], running: Sequence[Sequence[PackedDelta]] = (),
                     steps: int = 1) -> CorrectionPlan:
        return self.planner.prefill_plan(terms, running, steps)

    def step_cost(self, corrected: Sequence[tuple[int, int]], merged_nnz: int) -> float:
        """One decode step's corrections on this way of correcting: see shira_core.batched.cost."""
        return cost.step_cost(self.native, corrected, merged_nnz)

    def switch_cost(self, entries: int) -> float:
        """Writing `entries` weight entries, in step_cost's units."""
        return cost.switch_cost(self.native, entries)

    @contextlib.contextmanager
    def active(self, plan: CorrectionPlan | None) -> Iterator[None]:
        """Makes `plan` apply to the forward passes inside the block (None: plain forward passes)."""
        if plan is not None:
            self._wrap()
        previous, self._active = self._active, plan
        try:
            yield
        finally:
            self._active = previous

    def forget_plans(self) -> None:
        """Drops the cached plans (segments hold a copy of every row's delta) and the wrappers, until the next."""
        self.planner.forget()
        if self._active is None:
            self._unwrap()

    def close(self) -> None:
        """Restores the plain forwards for good: plans made active afterwards have no effect."""
        self._closed = True
        self._unwrap()

    def _wrap(self) -> None:
        if self._wrapped or self._closed:
            return
        for module, lid in self.layout.targets:
            if isinstance(module, DecodeLinear) and "correction" not in module.__dict__:
                # its own hook, so a decode step can run several layers in one kernel call and still correct each
                self._wrapped.append((module, _HOOKED))
                module.correction = self._correction_for(module, lid)
                continue
            self._wrapped.append((module, module.__dict__.get("forward")))
            module.forward = types.MethodType(self._forward_for(module, lid), module)

    def _unwrap(self) -> None:
        for module, own in reversed(self._wrapped):
            if own is _HOOKED:
                del module.correction
            elif own is None:
                del module.forward
            else:
                module.forward = own
        self._wrapped = []

    def _correction_for(self, owner: nn.Module, lid: int):
        layer = self.layers[lid]

        def correction(module: nn.Module, x: torch.Tensor, out: torch.Tensor) -> None:
            plan = self._active
            if module is owner and plan is not None:  # a deep copy of the model: its own plain output
                ops.correct(plan, lid, layer, x, out, self._kernel)

        return correction

    def _forward_for(self, owner: nn.Module, lid: int):
        own = owner.__dict__.get("forward")  # another library's wrapper (bound to `owner`): ours runs around it
        plain = type(owner).forward
        layer = self.layers[lid]

        def forward(module: nn.Module, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
            if module is not owner:  # a deep copy of the model: its own plain output
                return plain(module, x, *args, **kwargs)
            out = own(x, *args, **kwargs) if own is not None else plain(module, x, *args, **kwargs)
            plan = self._active
            if plan is not None:
                ops.correct(plan, lid, layer, x, out, self._kernel)
            return out

        return forward

