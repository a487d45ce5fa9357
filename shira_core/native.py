"""Builds and loads the C++ extensions in shira_core (the row-correction and decode-linear kernels).

A build (~1 minute on 2 cores) goes through torch.utils.cpp_extension into its cache directory
(TORCH_EXTENSIONS_DIR, else ~/.cache/torch_extensions), under a name that carries the source's hash, so an
edited kernel is rebuilt and an unchanged one loads in well under a second. cpp_extension runs `ninja` from
PATH; the CLI and the service put the venv's bin directory on PATH (a venv that is not activated has its
ninja there), so this module leaves the environment alone.
"""

from __future__ import annotations

import hashlib
import importlib.util
import logging
from pathlib import Path
from types import ModuleType

log = logging.getLogger(__name__)


def build(sources: list[Path], prefix: str) -> ModuleType:
    """The extension compiled from `sources`, built on first use; raises where it cannot be built here."""
    from torch.utils import cpp_extension

    digest = hashlib.sha256(b"".join(s.read_bytes() for s in sources)).hexdigest()[:12]
    name = f"{prefix}_{digest}"
    return _prebuilt(name) or cpp_extension.load(name=name, sources=[str(s) for s in sources],
                                                 extra_cflags=["-O3", "-fopenmp"], verbose=False)


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
        log.info("prebuilt kernel %s does not load (%s); rebuilding", path, e)
        return None
