"""Shared fixtures: tiny slice stores built directly in the store format; one intra-op
thread for modules that train tiny models (``pytestmark = pytest.mark.usefixtures(
"one_thread")``), and for every test in a pytest-xdist worker (two workers share two
cores)."""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
import torch

from store_factory import build_store

if os.environ.get("PYTEST_XDIST_WORKER"):  # two workers on two cores: one thread each
    torch.set_num_threads(1)


@pytest.fixture
def tiny_store(tmp_path: Path) -> Path:
    """A 12-case, 1-channel, 32x32 store with blob lesions and a 3-fold split file."""
    return build_store(tmp_path / "store", n_cases=12, slices_per_case=8, size=(32, 32))


@pytest.fixture(autouse=True)
def _seed() -> None:
    np.random.seed(0)


@pytest.fixture(scope="module")
def one_thread() -> Iterator[None]:
    """Tiny models: one intra-op thread avoids OpenMP contention on a busy 2-core box."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)
