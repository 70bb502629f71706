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


class Stopped(Exception):
    """Raised by a `stop_at` stand-in: the run reached it."""


@pytest.fixture
def stop_at(monkeypatch):
    """`stop_at(module, name)` replaces `module.name` by a stand-in that records its keyword arguments in
    `stop_at.calls` as (name, kwargs) and raises `Stopped`: a script's main() runs up to the first such call, so a
    test sees which expensive step it would take, and with what, without taking it."""
    calls: list[tuple[str, dict]] = []

    def patch(module, name: str) -> None:
        def stand_in(*args, **kwargs):
            calls.append((name, kwargs))
            raise Stopped(name)

        monkeypatch.setattr(module, name, stand_in)

    patch.calls = calls
    return patch
