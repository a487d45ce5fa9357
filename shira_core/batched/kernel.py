"""The native CPU kernel for the row corrections of mixed batches (csrc/row_corrections.cpp), built on first use.

Corrected rows stream every delta entry of their sets once per forward pass. PyTorch's CPU sparse products read
each row's own copy of a set's entries with int32 columns; this kernel reads a set's entries once for all its
rows, stored by block of output rows and by column within a block, so its loop has no per-row branch
(SmolLM2-135M, 8 rows over 5 sets, 2-core CPU, all 210 layers of a step: 8.3-8.8 ms, against 11.3-12.4 for the
CSR layout it had first and more for PyTorch's products). It is an accelerator only: the RowCorrector computes
the same sums without it, so a machine without a C++ compiler runs the PyTorch path.

The build (~1 minute on 2 cores) goes through torch.utils.cpp_extension into its cache directory
(TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions), under a name that carries the source's hash, so an
edited kernel is rebuilt and an unchanged one loads in well under a second. cpp_extension runs `ninja` from
PATH; the CLI and the service put the venv's bin directory on PATH (a venv that is not activated has its
ninja there), so this module leaves the environment alone.
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import logging
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)

SOURCE = Path(__file__).parent / "csrc" / "row_corrections.cpp"


@functools.cache
def load() -> ModuleType | None:
    """The compiled kernel module (its `correct(terms, rows, layer, x, out)` and `block`), or None where it
    cannot be built here."""
    try:
        from torch.utils import cpp_extension

        name = f"shira_row_corrections_{hashlib.sha256(SOURCE.read_bytes()).hexdigest()[:12]}"
        return _prebuilt(name) or cpp_extension.load(name=name, sources=[str(SOURCE)],
                                                     extra_cflags=["-O3", "-fopenmp"], verbose=False)
    except Exception as e:  # noqa: BLE001 - no compiler, no ninja, no headers: all mean the PyTorch path
        log.warning("row-correction kernel unavailable, using PyTorch's sparse products: %s", e)
        return None


def _prebuilt(name: str) -> ModuleType | None:
    """The module an earlier build left in the cache, imported directly. cpp_extension.load checks for a compiler and
    reruns ninja in every new process, so an image without a compiler could not use the kernel its build stage made.
    The name carries the source's hash; a module built against another torch fails to import and is rebuilt."""
    from torch.utils import cpp_extension

    try:
        path = Path(cpp_extension._get_build_directory(name, verbose=False)) / f"{name}.so"
    except (AttributeError, TypeError, OSError):  # a torch without it, or a build folder we cannot create
        return None
    if not path.is_file():
        return None
    try:
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(module)
        return module
    except ImportError as e:
        log.info("prebuilt row-correction kernel %s does not load (%s); rebuilding", path, e)
        return None


def main() -> None:
    """Builds the kernel ahead of serving (make install and the image build call it) and says where it is."""
    logging.basicConfig(level=logging.INFO)
    module = load()
    print(f"row-correction kernel: {module.__file__ if module else 'not available'}")
