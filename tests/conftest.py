import os
import sys
from pathlib import Path

import pytest
import torch

SHARED = Path(__file__).resolve().parents[1].parent / "shared"
sys.path.insert(0, str(Path(__file__).parent))


def pytest_configure(config):
    torch.manual_seed(0)
    torch.set_num_threads(min(2, os.cpu_count() or 1))


@pytest.fixture(scope="session")
def hf_thinker():
    from model_zoo.tiny import tiny_hf_thinker

    return tiny_hf_thinker(seed=0, attn="eager")


@pytest.fixture(scope="session")
def model(hf_thinker):
    from hooked_av import HookedAVModel

    return HookedAVModel.from_hf_model(hf_thinker)
