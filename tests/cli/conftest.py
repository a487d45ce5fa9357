"""Fixtures the CLI tests share with tests/core (the tiny_llama factory comes from tests/conftest.py)."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from core.conftest import random_adapter

from shira_core import SparseAdapter


@pytest.fixture(scope="session")
def make_adapter() -> Callable[..., SparseAdapter]:
    """Factory: ``make_adapter(model, name, seed, layers=None, density=0.1, pool=0.25, scale=0.05, dtype=fp32)``."""
    return random_adapter
