"""Whether this machine can build the native decode kernel (shira_core.batched.kernel), for tests that need it."""

from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest


def can_build_kernel() -> bool:
    """What correction_kernel.load needs: torch's C++ compiler (CXX, else c++) and ninja (on PATH or beside Python)."""
    compiler = shutil.which(os.environ.get("CXX", "c++"))
    ninja = shutil.which("ninja") or shutil.which("ninja", path=str(Path(sys.executable).parent))
    return bool(compiler and ninja)


needs_kernel = pytest.mark.skipif(not can_build_kernel(),
                                  reason="no C++ compiler or ninja: the kernel cannot build, PyTorch's products run")
