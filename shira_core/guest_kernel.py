"""The native CPU kernel for guest-row decode corrections (csrc/guest_decode.cpp), built on first use.

Guest rows stream every delta entry of their sets once per decode step. PyTorch's CPU sparse products read each
row's own copy of a set's entries with int32 columns; this kernel reads a set's entries once for all its rows,
stored by block of output rows and by column within a block, so its loop has no per-row branch (SmolLM2-135M,
8 rows over 5 sets, 2-core CPU, all 210 layers of a step: 8.3-8.8 ms, against 11.3-12.4 for the CSR layout
it had first and more for PyTorch's products). It is an accelerator only: GuestRows computes the same sums
without it, so a machine without a C++ compiler runs the PyTorch path.

The build (~1 minute on 2 cores) goes through torch.utils.cpp_extension into its cache directory
(TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions), under a name that carries the source's hash, so an
edited kernel is rebuilt and an unchanged one loads in well under a second.
"""

from __future__ import annotations

import functools
import hashlib
import logging
import os
import shutil
import sys
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "guest_decode.cpp"


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernel module (its `correct(terms, rows, layer, x, out)` and `block`), or None where it
    cannot be built here."""
    bindir = str(Path(sys.executable).parent)  # a venv's ninja, when the venv is not activated
    if shutil.which("ninja") is None and shutil.which("ninja", path=bindir):
        os.environ["PATH"] = bindir + os.pathsep + os.environ.get("PATH", "")
    try:
        from torch.utils import cpp_extension

        digest = hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]
        return cpp_extension.load(name=f"shira_guest_decode_{digest}", sources=[str(SOURCE)],
                                  extra_cflags=["-O3", "-fopenmp"], verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, no headers: all mean the PyTorch path
        log.warning("guest-row decode kernel unavailable, using PyTorch's sparse products: %s", e)
        return None


if __name__ == "__main__":  # `python -m shira_core.guest_kernel`: build it ahead of serving (make install does)
    logging.basicConfig(level=logging.INFO)
    module = load()
    print(f"guest decode kernel: {module.__file__ if module else 'not available'}")
