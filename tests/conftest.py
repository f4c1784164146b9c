"""Suite-wide settings."""

import pytest
import torch


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Test shapes are tiny and gain nothing from threads; with two pytest
    workers on two cores, OpenMP spin-waiting would make them many times
    slower. Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
