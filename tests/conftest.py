"""Shared fixtures: the tiny preset (real offline MiniLM, tiny random image encoder and diffuser)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


def pytest_configure(config):
    """Under pytest-xdist every worker gets an equal share of the cores (the suite alone uses about one core at a
    time; two workers with two threads each would oversubscribe a 2-core machine)."""
    workers = int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "0"))
    if workers > 1:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // workers))


def pytest_collection_modifyitems(config, items):
    """The learning tests (a teacher trained once, then its student: the longest chain) first, so that under
    ``--dist worksteal`` they stay together on the first worker while the others run the rest beside them; the
    memorisation tests (two minutes of training) right after them, so that the second worker starts with them."""
    order = {"test_learning.py": 0, "test_memorise.py": 1}
    items.sort(key=lambda item: order.get(item.path.name, 2))


@pytest.fixture(scope="session")
def tiny_model():
    from ladic import LaDiC, preset

    torch.manual_seed(0)
    model = LaDiC(preset("tiny")).eval()
    return model


@pytest.fixture(scope="session")
def scenes():
    from ladic.data.scenes import make_scenes

    return make_scenes(6, seed=3, size=32, max_objects=1)
