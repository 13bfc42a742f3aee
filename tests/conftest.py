"""Shared pytest setup: markers that skip with the remedy when a requirement is missing.

Fixtures of one area live beside its tests (tests/hub_server.py, ...); checkpoint builders shared
by many test files live in tests/builders.py.
"""

from __future__ import annotations

import importlib.util
import sys
from pathlib import Path

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
