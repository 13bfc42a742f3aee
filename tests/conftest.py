"""Shared pytest setup: markers that skip with the remedy when a requirement is missing.

Fixtures of one area live beside its tests (tests/hub_server.py, ...); checkpoint builders shared
by many test files live in tests/builders.py.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))


def _cuda_available() -> bool:
    try:
        import torch
    except ModuleNotFoundError:
        return False
    return bool(torch.cuda.is_available())


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    requirements = {
        "gpu": (_cuda_available, "needs an NVIDIA GPU and a CUDA build of torch "
                                 "(pip install torch with CUDA; check nvidia-smi)"),
        "transformers": (lambda: importlib.util.find_spec("transformers") is not None,
                         "needs transformers: pip install 'fastsafetensors[transformers]'"),
    }
    checked: dict[str, bool] = {}
    for item in items:
        for marker, (probe, remedy) in requirements.items():
            if marker in item.keywords:
                if marker not in checked:
                    checked[marker] = probe()
                if not checked[marker]:
                    item.add_marker(pytest.mark.skip(reason=remedy))


from hub_server import hub_server  # noqa: F401,E402


@pytest.fixture(autouse=True)
def _collector_left_on() -> Any:
    """Every test leaves Python's garbage collector as it found it, on and with no pause of
    fastsafetensors/gcpause.py open: a broken pause would otherwise turn it off for all the
    tests after, silently."""
    import gc

    from fastsafetensors import gcpause

    yield
    left = (gc.isenabled(), gcpause._depth)
    if left != (True, 0):
        gcpause._depth = 0
        gc.enable()
        pytest.fail(f"the test left the garbage collector {'on' if left[0] else 'off'} with "
                    f"{left[1]} pause(s) open; it must leave it on with none")
