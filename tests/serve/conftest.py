"""Fixtures of the `tunelab serve` tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module", autouse=True)
def one_torch_thread():
    """One torch thread in this process (the in-process servers and models): on a small shared machine two threads
    that wait on each other are many times slower."""
    import torch

    old = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(old)
