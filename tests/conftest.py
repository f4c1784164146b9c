"""Suite-wide settings."""

import os

import pytest
import torch

if not torch.cuda.is_available():
    # Triton kernels run on CPU tensors through Triton's interpreter, which is chosen
    # when a kernel is defined: set it before anything imports memlayers.kernels.triton_bag.
    os.environ.setdefault("TRITON_INTERPRET", "1")


@pytest.fixture(autouse=True)
def _one_intra_op_thread():
    """Test shapes are tiny and gain nothing from threads; with two pytest
    workers on two cores, OpenMP spin-waiting would make them many times
    slower. Restored after each test."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
