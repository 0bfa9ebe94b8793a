"""Shared test settings: one intra-op thread (tiny models are much faster that way on 2 cores)."""

import pytest
import torch


@pytest.fixture(autouse=True, scope="session")
def _single_thread():
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)
