"""Shared fixtures: the tiny preset (real offline MiniLM, tiny random image encoder and diffuser)."""

import os

import pytest
import torch

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")


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
