"""The native CPU kernel for the row corrections of mixed batches (csrc/row_corrections.cpp), built on first use.

Corrected rows stream every delta entry of their sets once per forward pass. PyTorch's CPU sparse products read
each row's own copy of a set's entries with int32 columns; this kernel reads a set's entries once for all its
rows, stored by block of output rows and by column within a block, so its loop has no per-row branch
(SmolLM2-135M, 8 rows over 5 sets, 2-core CPU, all 210 layers of a step: 8.3-8.8 ms, against 11.3-12.4 for the
CSR layout it had first and more for PyTorch's products). It is an accelerator only: the RowCorrector computes
the same sums without it, so a machine without a C++ compiler runs the PyTorch path.

Built and loaded by shira_core.native.
"""

from __future__ import annotations

import functools
import logging
from pathlib import Path
from types import ModuleType

from .. import native

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "row_corrections.cpp"


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernel module (its `correct(terms, rows, layer, x, out)` and `block`), or None where it
    cannot be built here."""
    try:
        return native.build([SOURCE], "shira_row_corrections")
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, no headers: all mean the PyTorch path
        log.warning("row-correction kernel unavailable, using PyTorch's sparse products: %s", e)
        return None
