"""The public API, pinned: names in ``fastsafetensors.__all__`` (others may be added, none of
these removed), import paths users rely on, lazy framework imports, and the issue's quickstart
run verbatim."""

from __future__ import annotations

import importlib.metadata
import subprocess
import sys
import textwrap
from pathlib import Path

import fastsafetensors

EXPECTED = {
    "FastSafetensorsFile", "LazyTensor", "LazyTensorFactory", "TensorInfo",
    "load_file", "loads", "safe_open", "configure",
    "FastSafetensorsError", "HeaderError", "CheckpointIndexError", "TensorNotFoundError",
    "CheckpointNotFoundError", "FrameworkNotInstalledError", "UnsupportedDTypeError",
    "ClosedFileError", "ConfigError", "ReadError", "NoGPUError", "BackendUnavailableError",
    "BudgetInfeasibleError",   # vLLM imports it from the top level (its fit planner)
}


def test_all_pins_the_public_names() -> None:
    assert EXPECTED <= set(fastsafetensors.__all__)
    assert len(fastsafetensors.__all__) == len(set(fastsafetensors.__all__))
    for name in fastsafetensors.__all__:
        assert hasattr(fastsafetensors, name), name
    for name in EXPECTED:
        assert getattr(fastsafetensors, name).__doc__, f"{name} has no docstring"


def test_errors_are_the_same_objects_everywhere() -> None:
    import fastsafetensors.errors as errors

    for name in errors.__all__:
        assert getattr(fastsafetensors, name) is getattr(errors, name)


def test_documented_import_paths() -> None:
    from fastsafetensors.file import FastSafetensorsFile
    from fastsafetensors.format import TensorInfo
    from fastsafetensors.lazy_tensor_factory import LazyTensor, LazyTensorFactory

    assert LazyTensorFactory is fastsafetensors.LazyTensorFactory
    assert LazyTensor is fastsafetensors.LazyTensor
    assert FastSafetensorsFile is fastsafetensors.FastSafetensorsFile
    assert TensorInfo is fastsafetensors.TensorInfo


def test_version_satisfies_vllm_requirement() -> None:
    def parse(v: str) -> tuple[int, ...]:
        return tuple(int(p) for p in v.split(".")[:3])

    assert parse(fastsafetensors.__version__) >= (0, 6, 0)
    assert importlib.metadata.version("fastsafetensors") == fastsafetensors.__version__
    assert parse(fastsafetensors.__version__) >= (0, 3, 3)  # vLLM: fastsafetensors>=0.3.3


def _run(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-c", code], cwd=cwd, capture_output=True,
                          text=True, timeout=300)


def test_import_does_not_import_frameworks(tmp_path: Path) -> None:
    proc = _run("import sys, fastsafetensors; "
                "print(sorted(m for m in ('torch', 'numpy', 'transformers', 'vllm') "
                "if m in sys.modules))", tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "[]"


def test_numpy_only_process_never_imports_torch(tmp_path: Path) -> None:
    code = textwrap.dedent("""
        import sys
        import numpy as np
        from safetensors.numpy import save_file
        sys.modules["torch"] = None          # any import of torch now fails
        import fastsafetensors
        save_file({"a": np.arange(6, dtype=np.float32).reshape(2, 3)}, "m.safetensors")
        out = fastsafetensors.load_file("m.safetensors", framework="np")
        with fastsafetensors.FastSafetensorsFile("m.safetensors", framework="np") as f:
            row = f.get_slice("a")[1]
        print(out["a"].sum(), row.tolist())
    """)
    proc = _run(code, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["15.0", "[3.0,", "4.0,", "5.0]"]


QUICKSTART = '''\
import torch
from safetensors.torch import save_file
from fastsafetensors import FastSafetensorsFile
save_file({"layer1.weight": torch.randn(128, 64), "layer1.bias": torch.zeros(128),
           "layer2.weight": torch.ones(64, 32)}, "dummy_model.safetensors")
fsf = FastSafetensorsFile("dummy_model.safetensors")
for name, metadata in fsf.get_tensors().items():   # metadata only: no tensor bytes are read
    print(name, metadata)
t = fsf["layer1.weight"]                           # reads only this tensor's bytes
print(type(t), t.shape)
'''


def test_quickstart_runs_verbatim(tmp_path: Path) -> None:
    proc = _run(QUICKSTART, tmp_path)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert len(lines) == 4
    printed = {line.split(" ", 1)[0]: line for line in lines[:3]}
    assert set(printed) == {"layer1.weight", "layer1.bias", "layer2.weight"}
    assert "shape=(128, 64)" in printed["layer1.weight"] and "'F32'" in printed["layer1.weight"]
    assert "shape=(128,)" in printed["layer1.bias"]
    assert "shape=(64, 32)" in printed["layer2.weight"]
    assert lines[3] == "<class 'torch.Tensor'> torch.Size([128, 64])"
    assert (tmp_path / "dummy_model.safetensors").exists()
