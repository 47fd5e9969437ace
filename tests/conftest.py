"""Shared pytest fixtures and markers: GPU tests skip cleanly without CUDA."""
import os
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
TRAIN_TEMP = REPO / "RWKV-v7" / "train_temp"
RWKV_V5 = REPO / "RWKV-v5"


def pytest_collection_modifyitems(config, items):
    try:
        import torch

        has_cuda = torch.cuda.is_available()
    except Exception:
        has_cuda = False
    if has_cuda:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def repo():
    return REPO


@pytest.fixture(scope="session")
def cpu_env():
    """Environment for subprocesses: CPU only, quiet, no wandb network."""
    env = dict(os.environ)
    env.update({"CUDA_VISIBLE_DEVICES": "", "WANDB_MODE": "disabled", "PYTHONUNBUFFERED": "1",
                "PYTHON": sys.executable,  # the scripts' interpreter: this one, which has the test deps
                "PYTHONWARNINGS": "ignore::DeprecationWarning"})
    return env
