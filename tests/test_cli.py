"""The ``fastsafetensors`` command: ``demo`` and ``inspect``."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from builders import raw_bytes, small_tensors, write_file

from fastsafetensors.cli import main


def _command() -> list[str]:
    """The installed console script (next to this interpreter, or on PATH), else the module."""
    beside = Path(sys.executable).with_name("fastsafetensors")
    if beside.exists():
        return [str(beside)]
    found = shutil.which("fastsafetensors")
    return [found] if found else [sys.executable, "-m", "fastsafetensors.cli"]


def test_demo(tmp_path: Path) -> None:
    env = {**os.environ, "TMPDIR": str(tmp_path)}
    proc = subprocess.run([*_command(), "demo", "--size-mb", "8"], capture_output=True,
                          text=True, timeout=300, env=env, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "equal bit for bit: True" in proc.stdout
    assert proc.stdout.count("GB/s") >= 2  # for this package and for safetensors
    assert list(tmp_path.iterdir()) == []  # the temporary checkpoint is cleaned up
    # so its path is not printed: a user who tried it next found no such file
    assert str(tmp_path) not in proc.stdout


def test_inspect_lists_tensors(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    tensors = small_tensors()
    path = write_file(tmp_path / "m.safetensors", tensors)
    assert main(["inspect", str(path)]) == 0
    out, err = capsys.readouterr()
    rows = [line.split("\t") for line in out.splitlines()]
    assert {r[0] for r in rows} == set(tensors)
    by_name = {r[0]: r for r in rows}
    assert by_name["model.layers.0.mlp.up_proj.weight"][1:] == ["BF16", "[32, 16]", "1024"]
    assert by_name["step"][1:] == ["I64", "[]", "8"]
    assert f"{len(tensors)} tensors" in err


def test_inspect_command_line(tmp_path: Path) -> None:
    path = write_file(tmp_path / "m.safetensors", {"w": torch.zeros(3, 5)})
    proc = subprocess.run([*_command(), "inspect", str(path)], capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split("\t")[:3] == ["w", "F32", "[3, 5]"]


@pytest.mark.parametrize("content,fragment", [
    (b"\0\0", "8-byte header length"),
    (raw_bytes({"w": {"dtype": "F99", "shape": [1], "data_offsets": [0, 4]}}, b"\0" * 4),
     "unknown dtype 'F99'"),
    (None, "No such file or directory"),
])
def test_inspect_reports_errors(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                content: bytes | None, fragment: str) -> None:
    path = tmp_path / "bad.safetensors"
    if content is not None:
        path.write_bytes(content)
    assert main(["inspect", str(path)]) == 2
    out, err = capsys.readouterr()
    assert err.startswith("fastsafetensors: ") and fragment in err and out == ""


def test_usage_errors() -> None:
    with pytest.raises(SystemExit) as excinfo:
        main([])
    assert excinfo.value.code == 2
    with pytest.raises(SystemExit) as excinfo:
        main(["--help"])
    assert excinfo.value.code == 0
    for size in ("0", "-5"):   # an empty checkpoint "equal bit for bit" proved nothing
        with pytest.raises(SystemExit) as excinfo:
            main(["demo", "--size-mb", size])
        assert excinfo.value.code == 2


def test_help_version_and_a_folder_without_weights(tmp_path: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import fastsafetensors

    for argv in (["--help"], ["demo", "--help"], ["inspect", "--help"], ["--version"]):
        with pytest.raises(SystemExit) as excinfo:
            main(argv)
        assert excinfo.value.code == 0
    out = capsys.readouterr().out
    assert "``" not in out   # no reST markup in plain text
    assert "bit for bit" in out and "stdout" in out and "stderr" in out   # what each one does
    assert out.rstrip().endswith(f"fastsafetensors {fastsafetensors.__version__}")
    (tmp_path / "config.json").write_text("{}")
    assert main(["inspect", str(tmp_path)]) == 2
    assert "--subfolder" in capsys.readouterr().err   # the flag, not only the keyword


def test_a_reader_that_goes_away_is_no_error(tmp_path: Path) -> None:
    # fastsafetensors inspect ... | head -1: the rest of the lines meet a closed pipe.
    path = write_file(tmp_path / "m.safetensors",
                      {f"t{i}": torch.zeros(1) for i in range(20000)})
    proc = subprocess.run(f"{' '.join(_command())} inspect {path} | head -1", shell=True,
                          capture_output=True, text=True, timeout=300,
                          executable="/bin/bash")
    assert proc.stdout.count("\n") == 1
    assert "Broken pipe" not in proc.stderr and "Traceback" not in proc.stderr, proc.stderr
