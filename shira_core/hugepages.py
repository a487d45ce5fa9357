"""Weight buffers on transparent huge pages, where Linux offers them.

A decode step streams every weight once, and with 4 KiB pages the reads of SmolLM2-135M's 540 MB cross ~130,000
pages a step, so the page walks are part of the cost: one thread summing 450 MB read 44 GB/s from 4 KiB pages
and 52-58 GB/s from 2 MiB ones on this VM (`transparent_hugepage=madvise`, the common default). The buffer is
advised before its first write, so its pages are huge from the start.
"""

from __future__ import annotations

import ctypes
import logging
import sys

import torch

log = logging.getLogger(__name__)

HUGE_PAGE = 2 << 20
MADV_HUGEPAGE = 14
MIN_BYTES = 16 * HUGE_PAGE  # smaller buffers gain nothing worth the alignment slack


def zeros(numel: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """torch.zeros(numel), on huge pages where the buffer is large, on the CPU, on Linux; plain otherwise."""
    size = torch.tensor([], dtype=dtype).element_size()
    if device.type != "cpu" or not sys.platform.startswith("linux") or numel * size < MIN_BYTES:
        return torch.zeros(numel, dtype=dtype, device=device)
    raw = torch.empty(numel * size + HUGE_PAGE, dtype=torch.uint8)  # not written yet: no pages behind it
    start = -raw.data_ptr() % HUGE_PAGE
    advised = (numel * size) // HUGE_PAGE * HUGE_PAGE
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        if libc.madvise(ctypes.c_void_p(raw.data_ptr() + start), ctypes.c_size_t(advised), MADV_HUGEPAGE) != 0:
            log.debug("madvise(MADV_HUGEPAGE) refused: errno %d", ctypes.get_errno())
    except (OSError, AttributeError) as e:  # no libc symbol: plain pages
        log.debug("madvise unavailable: %s", e)
    return raw[start : start + numel * size].view(dtype).zero_()
