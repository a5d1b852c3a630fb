"""Shared fixtures: tiny slice stores built directly in the store format."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from store_factory import build_store


@pytest.fixture
def tiny_store(tmp_path: Path) -> Path:
    """A 12-case, 1-channel, 32x32 store with blob lesions and a 3-fold split file."""
    return build_store(tmp_path / "store", n_cases=12, slices_per_case=8, size=(32, 32))


@pytest.fixture(autouse=True)
def _seed() -> None:
    np.random.seed(0)
