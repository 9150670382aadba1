"""Shared test set-up: no test may reach the Hugging Face Hub, and randomness comes from explicit seeds."""

import os

os.environ["HF_HUB_OFFLINE"] = "1"
# The tests run tiny models, which gain nothing from a second intra-op thread and lose a lot to it whenever another
# process shares the cores (measured here: 2-50x slower); set before torch is imported so subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402


@pytest.fixture
def generator():
    """A freshly seeded CPU generator, so each test's draws do not depend on test order."""
    return torch.Generator().manual_seed(0)


@pytest.fixture
def single_thread():
    """Run a test on one intra-op thread: Monte Carlo loops of many small tensor ops only lose time to threading
    (badly so when other processes share the cores); the previous setting is restored afterwards."""
    previous = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(previous)


# Diffusers' vendored tests run through tests/test_diffusers_contracts.py, against this package's pipelines.
collect_ignore = ["diffusers_tests"]
