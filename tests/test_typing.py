"""The package stays mypy-clean and ruff-clean, with the settings in pyproject.toml.

Both tools run from the repository root so that they read its ``[tool.mypy]`` and ``[tool.ruff]``
sections; they come with the ``test`` extra (pip install 'fastsafetensors[test]').
"""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]


def _run(*command: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", *command], cwd=ROOT, capture_output=True,
                          text=True, timeout=600)


# A cold run checks torch's stubs too (about half a minute); .mypy_cache makes reruns quick.
@pytest.mark.slow
def test_mypy_clean() -> None:
    pytest.importorskip("mypy", reason="mypy is not installed: pip install 'fastsafetensors[test]'")
    proc = _run("mypy")
    assert proc.returncode == 0, f"mypy found errors:\n{proc.stdout}{proc.stderr}"


def test_ruff_clean() -> None:
    pytest.importorskip("ruff", reason="ruff is not installed: pip install 'fastsafetensors[test]'")
    # --no-cache: nothing written into the source tree for a sub-second check.
    proc = _run("ruff", "check", "--no-cache", "--output-format=concise", "fastsafetensors")
    assert proc.returncode == 0, f"ruff found problems:\n{proc.stdout}{proc.stderr}"
