"""Test setup: Triton's CPU interpreter when no GPU is present (must be set before triton is imported)."""
import os

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def poison_(t: torch.Tensor) -> torch.Tensor:
    """Fill with NaN (or the dtype's max for integers) so an unwritten output element fails a comparison."""
    return t.fill_(float("nan")) if t.is_floating_point() else t.fill_(torch.iinfo(t.dtype).max)


@pytest.fixture
def poisoned():
    """Run the body with every kernel output NaN-filled before the kernel writes it."""
    from t2t_fast.runtime import poisoned_outputs

    with poisoned_outputs():
        yield
