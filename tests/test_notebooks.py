"""Every notebook in notebooks/ runs top to bottom on the CPU, offline, without an error.

Each one is executed with nbclient in a fresh ``python3`` kernel whose working directory is
notebooks/; huggingface_hub and transformers are told to stay offline, so a notebook that reached
for the network fails here. A cell that raises fails the test with the cell's traceback.
"""

from __future__ import annotations

from pathlib import Path

import pytest

NOTEBOOKS = Path(__file__).resolve().parent.parent / "notebooks"

#: Markers per notebook for what it needs beyond nbclient (the conftest hook skips with the
#: remedy when a requirement is missing).
NEEDS = {
    "transformers_loading.ipynb": [pytest.mark.transformers],
}


def _notebooks() -> list[object]:
    found = sorted(NOTEBOOKS.glob("*.ipynb"))
    return [pytest.param(path, id=path.name, marks=NEEDS.get(path.name, [])) for path in found]


def test_there_are_notebooks() -> None:
    assert _notebooks(), f"no notebook found in {NOTEBOOKS}"


@pytest.mark.parametrize("path", _notebooks())
def test_notebook_runs(path: Path, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")

    # The kernel inherits this environment. Its temporary folders go to a folder of the test's
    # own, which the notebook must leave empty: a checkpoint left behind in /tmp on every run
    # (84 MB for transformers_loading) piles up on the user's disk.
    temp = tmp_path / "tmp"
    temp.mkdir()
    for name, value in {"HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1",
                        "HF_HUB_DISABLE_TELEMETRY": "1", "TOKENIZERS_PARALLELISM": "false",
                        "PYDEVD_DISABLE_FILE_VALIDATION": "1", "TMPDIR": str(temp)}.items():
        monkeypatch.setenv(name, value)
    notebook = nbformat.read(path, as_version=4)
    client = nbclient.NotebookClient(notebook, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(NOTEBOOKS)}})
    client.execute()
    errors = [output for cell in notebook.cells if cell.cell_type == "code"
              for output in cell.get("outputs", []) if output.get("output_type") == "error"]
    assert not errors, errors
    # torch keeps its compile cache there (torchinductor_<user>, one per user, reused)
    left = sorted(p.name for p in temp.iterdir() if not p.name.startswith("torchinductor_"))
    assert left == [], f"the notebook left temporary files: {left}"
