"""The native CPU kernel for the row corrections of mixed batches (csrc/row_corrections.cpp), built on first use.

Corrected rows stream every delta entry of their sets once per forward pass. PyTorch's CPU sparse products read
each row's own copy of a set's entries; this kernel runs up to eight rows as the lanes of one vector, so a set's
entries are read once for all of them, in the layout of shira_core.batched.deltas.grouped (SmolLM2-135M, 8 rows
over 5 sets, 2-core CPU, all 210 layers of a decode step: ~5 ms). It is an accelerator only: the RowCorrector
computes the same sums without it, so a machine without a C++ compiler runs the PyTorch path.

Built and loaded by shira_core.native.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

from .. import native
from .deltas import GROUP, LANES, WINDOW

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "row_corrections.cpp"


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernel module (its `correct(terms, rows, layer, x, out)`), or None where it cannot be built
    here."""
    try:
        module = native.build([SOURCE], "shira_row_corrections")
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, no headers: all mean the PyTorch path
        log.warning("row-correction kernel unavailable, using PyTorch's sparse products: %s", e)
        return None
    if (module.window, module.group, module.lanes) != (WINDOW, GROUP, LANES):  # an edit to one side only: a bug
        raise RuntimeError(f"row-correction kernel: windows of {module.window} rows, groups of {module.group}, "
                           f"{module.lanes} lanes; shira_core.batched.deltas has {WINDOW}, {GROUP}, {LANES}")
    return module
