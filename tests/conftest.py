import pytest
import torch


@pytest.fixture(autouse=True)
def _seeded():
    """Every test starts from the same global RNG state, single-threaded for repeatable timings."""
    torch.manual_seed(0)
    torch.set_num_threads(1)
    yield
