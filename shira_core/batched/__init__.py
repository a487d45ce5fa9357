"""Batched row corrections: rows of different adapter sets in one forward pass over weights that hold one set.

Serving frameworks call this multi-adapter batching. The decode corrections are BGMV-like (a per-row adapter
mapping, as in vLLM's punica_wrapper and LoRAX's adapter_indices); the prefill runs of rows with one set are
SGMV-like (segments, as in LoRAX's adapter_segments). Here the adapters are sparse deltas, not LoRA factors,
so a correction is a sparse product: out[r] += (W_S - W_M) x[r] for a row r of set S while set M is merged.

Modules, lowest first (each imports only those above it, and nothing in service/):
    layout.py    which Linear layers are corrected, and where their weights sit in the Switcher's buffers
    deltas.py    PackedDelta: one set's delta from the base, packed per layer (CSR or the kernel's groups)
    plans.py     the correction plans (SegmentPlan, KernelPlan, PrefillPlan)
    segments.py  block-diagonal segments for PyTorch's sparse products
    planner.py   CorrectionPlanner: which plan corrects which rows, cached across steps
    kernel.py    the native CPU kernel (csrc/row_corrections.cpp), built on first use
    ops.py       the correction products, PyTorch's or the kernel's
    cost.py      what corrections cost per step against a switch of the merged set
    corrector.py RowCorrector: binds to the model's Linear layers and wraps their forwards
"""

from .corrector import RowCorrector
from .deltas import PackedDelta, UnbatchableSetError

__all__ = ["PackedDelta", "RowCorrector", "UnbatchableSetError"]
