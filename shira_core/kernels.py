"""Builds every native kernel ahead of serving: `make install` and the image build run this module's main()."""

from __future__ import annotations

import logging

from .batched import kernel
from .decode import linear


def main() -> None:
    """Builds the row-correction and decode kernels and says where each is (or that it is not available here)."""
    logging.basicConfig(level=logging.INFO)
    for label, module in (("row-correction kernel", kernel.load()), ("decode kernel", linear.load())):
        print(f"{label}: {module.__file__ if module else 'not available'}")
