"""The exception tree: builtin bases, messages, pickling, and the errors raised for a missing
framework and for device='cuda' without a GPU."""

from __future__ import annotations

import builtins
import errno
import pickle
import sys
from pathlib import Path
from typing import Any

import pytest
import torch
from builders import open_fds, write_file

import fastsafetensors
import fastsafetensors.errors as errors_module
from fastsafetensors import (
    BackendUnavailableError,
    BudgetInfeasibleError,
    CheckpointIndexError,
    CheckpointNotFoundError,
    ClosedFileError,
    ConfigError,
    CudaError,
    FastSafetensorsError,
    FastSafetensorsFile,
    FrameworkNotInstalledError,
    HeaderError,
    HostMemoryError,
    LazyTensorFactory,
    NoGPUError,
    NotAFileError,
    PeerLoadError,
    RankMismatchError,
    ReadError,
    TensorNotFoundError,
    UnsupportedDTypeError,
)

BUILTIN_BASES = {
    HeaderError: ValueError, CheckpointIndexError: ValueError, TensorNotFoundError: KeyError,
    NotAFileError: IsADirectoryError,
    CheckpointNotFoundError: FileNotFoundError, FrameworkNotInstalledError: ModuleNotFoundError,
    UnsupportedDTypeError: TypeError, ClosedFileError: ValueError, ConfigError: ValueError,
    ReadError: OSError, NoGPUError: RuntimeError, BackendUnavailableError: RuntimeError,
    CudaError: RuntimeError, BudgetInfeasibleError: ValueError, HostMemoryError: MemoryError,
}


def _examples() -> list[FastSafetensorsError]:
    return [
        FastSafetensorsError("something went wrong"),
        HeaderError("/ckpt/model.safetensors", "data_offsets [0, 4] leave a gap", "w"),
        HeaderError(None, "header is not valid JSON"),
        NotAFileError("/ckpt"),
        CheckpointIndexError("/ckpt/model.safetensors.index.json", "names a missing shard", "w"),
        TensorNotFoundError("lm_head.weigth", "/ckpt/m.safetensors",
                            ["lm_head.weight", "model.norm.weight"]),
        TensorNotFoundError("x"),
        CheckpointNotFoundError("/ckpt/missing.safetensors"),
        CheckpointNotFoundError("/ckpt/missing.safetensors", "download it first"),
        FrameworkNotInstalledError("torch", "pt", "pip install torch"),
        UnsupportedDTypeError("BF16", "np", "w"),
        UnsupportedDTypeError("F8_E4M3", "np"),
        UnsupportedDTypeError("BF16", "np", "w", "/ckpt/m.safetensors"),
        ClosedFileError("/ckpt/m.safetensors"),
        ConfigError("io", "fast", ["auto", "buffered", "direct"]),
        ReadError("/ckpt/m.safetensors", 4096, 8192, 100),
        HostMemoryError(68_719_476_736),
        NoGPUError("cuda:1", "only 1 GPU(s) are visible"),
        NoGPUError("cuda"),
        BackendUnavailableError("gds", "kvikio is not installed"),
        CudaError("cuMemcpyHtoDAsync", 700, "CUDA_ERROR_ILLEGAL_ADDRESS"),
        BudgetInfeasibleError("device_memory_budget=1 MiB is too small", 1 << 20, 3 << 20),
        BudgetInfeasibleError("raised by vLLM with a message alone"),
        PeerLoadError([1, 3], ["/ckpt/b.safetensors", "/ckpt/d.safetensors"]),
        RankMismatchError(1, "get_tensor('w')", [0], [2]),
    ]


ERROR_CLASSES = [getattr(errors_module, n) for n in errors_module.__all__]


def _generic(cls: type[FastSafetensorsError]) -> FastSafetensorsError:
    """An instance of a class this file has no hand-made example for (one added later): every
    field gets a placeholder string."""
    return cls(**{field: f"<{field}>" for field in cls._fields})


def _all_examples() -> list[FastSafetensorsError]:
    examples = _examples()
    covered = {type(e) for e in examples}
    return examples + [_generic(c) for c in ERROR_CLASSES if c not in covered]


def test_every_error_class_is_exercised() -> None:
    assert set(ERROR_CLASSES) == {type(e) for e in _all_examples()}
    assert {type(e) for e in _examples()} >= set(BUILTIN_BASES)


@pytest.mark.parametrize("cls", ERROR_CLASSES, ids=lambda c: c.__name__)
def test_hierarchy(cls: type[Exception]) -> None:
    from safetensors import SafetensorError

    assert issubclass(cls, FastSafetensorsError) and issubclass(cls, Exception)
    assert issubclass(cls, SafetensorError)   # code written for safetensors catches it
    if cls in BUILTIN_BASES:
        assert issubclass(cls, BUILTIN_BASES[cls])
    elif cls is not FastSafetensorsError:
        # a class added later still subclasses a builtin users already catch
        assert any(base.__module__ == "builtins" and base not in (Exception, BaseException)
                   for base in cls.__mro__), cls
    # the tree is drawn in the module docstring
    assert cls.__name__ in (errors_module.__doc__ or "")
    assert cls.__doc__


@pytest.mark.parametrize("error", _all_examples(), ids=lambda e: type(e).__name__)
def test_errors_pickle(error: FastSafetensorsError) -> None:
    message = str(error)
    assert message == getattr(error, "message", message) and len(message) > 10
    for protocol in range(pickle.HIGHEST_PROTOCOL + 1):
        copy = pickle.loads(pickle.dumps(error, protocol=protocol))
        assert type(copy) is type(error)
        assert str(copy) == message
        for field in type(error)._fields:
            assert getattr(copy, field) == getattr(error, field)
    with pytest.raises(type(error)):
        raise pickle.loads(pickle.dumps(error))


def test_messages() -> None:
    e = HeaderError("/x/model-00002.safetensors", "ends at byte 9 but the file has 5", "lm_head")
    assert str(e) == "model-00002.safetensors: tensor 'lm_head': ends at byte 9 but the file has 5"
    assert (e.path, e.reason, e.tensor) == ("/x/model-00002.safetensors",
                                            "ends at byte 9 but the file has 5", "lm_head")
    nf = CheckpointNotFoundError("/x/missing.safetensors")
    assert str(nf).startswith("[Errno 2] No such file or directory: '/x/missing.safetensors'")
    assert nf.errno == errno.ENOENT and nf.filename == "/x/missing.safetensors"
    rd = ReadError("/x/m.safetensors", 10, 20, 5)
    assert rd.errno == errno.EIO and "10" in str(rd) and "20" in str(rd)
    tn = TensorNotFoundError("w", None, [f"w{i}" for i in range(20)])
    assert str(tn).count("'w") <= 6  # the name and at most five matches
    cfg = ConfigError("io", "fast", ["auto", "buffered"])
    assert "auto" in str(cfg) and "buffered" in str(cfg) and "'fast'" in str(cfg)
    assert str(NoGPUError("cuda")).startswith("No CUDA GPUs are available")


def test_builtin_except_clauses_catch_them(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError):
        FastSafetensorsFile(tmp_path / "missing.safetensors")
    path = write_file(tmp_path / "m.safetensors", {"a": torch.zeros(1)})
    with FastSafetensorsFile(path) as fsf:
        with pytest.raises(KeyError):
            fsf["b"]
    (tmp_path / "bad.safetensors").write_bytes(b"\0" * 3)
    with pytest.raises(ValueError):
        fastsafetensors.load_file(tmp_path / "bad.safetensors")
    with pytest.raises(FastSafetensorsError):
        fastsafetensors.load_file(tmp_path / "bad.safetensors")


def test_except_clauses_written_for_safetensors_catch_them(tmp_path: Path) -> None:
    from safetensors import SafetensorError

    path = write_file(tmp_path / "m.safetensors", {"a": torch.zeros(2)})
    (tmp_path / "bad.safetensors").write_bytes(b"\0" * 3)
    with fastsafetensors.safe_open(path, framework="pt") as f:
        with pytest.raises(SafetensorError):
            f.get_tensor("b")
        with pytest.raises(SafetensorError):
            f.get_slice("b")
    with pytest.raises(SafetensorError):
        f.get_tensor("a")   # closed
    with pytest.raises(SafetensorError):
        fastsafetensors.safe_open(tmp_path / "bad.safetensors", framework="pt")
    with pytest.raises(SafetensorError):
        fastsafetensors.safe_open(path, framework="PT")


# -- missing framework -----------------------------------------------------------------------

def test_missing_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fastsafetensors.frameworks as frameworks

    path = write_file(tmp_path / "m.safetensors", {"a": torch.arange(3.0)})
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delitem(sys.modules, "fastsafetensors.frameworks.torch", raising=False)
    monkeypatch.delattr(frameworks, "torch", raising=False)
    before = open_fds()
    for attempt in (lambda: FastSafetensorsFile(path), lambda: fastsafetensors.load_file(path),
                    lambda: fastsafetensors.loads(path.read_bytes()),
                    lambda: fastsafetensors.safe_open(path, "pt"),
                    lambda: LazyTensorFactory(path)):
        with pytest.raises(FrameworkNotInstalledError) as excinfo:
            attempt()
        error = excinfo.value
        assert isinstance(error, ModuleNotFoundError) and error.name == "torch"
        assert "pip install" in str(error) and "torch" in str(error)
    assert open_fds() == before
    # numpy needs no torch
    assert fastsafetensors.load_file(path, framework="np")["a"].tolist() == [0.0, 1.0, 2.0]
    with FastSafetensorsFile(path, framework="np") as fsf:
        assert fsf.get_slice("a")[1:].tolist() == [1.0, 2.0]


def test_import_error_inside_framework_is_not_masked(monkeypatch: pytest.MonkeyPatch) -> None:
    """Only a missing torch becomes FrameworkNotInstalledError; other import failures are
    real bugs and propagate unchanged."""
    import fastsafetensors.frameworks as frameworks

    real_import = builtins.__import__

    def broken(name: str, *args: Any, **kwargs: Any) -> Any:
        if name == "torch":
            raise ModuleNotFoundError("No module named 'torch._C'", name="torch._C")
        return real_import(name, *args, **kwargs)

    monkeypatch.delitem(sys.modules, "fastsafetensors.frameworks.torch", raising=False)
    monkeypatch.delattr(frameworks, "torch", raising=False)
    monkeypatch.setattr(builtins, "__import__", broken)
    with pytest.raises(ModuleNotFoundError) as excinfo:
        frameworks.get_framework("pt")
    assert type(excinfo.value) is ModuleNotFoundError


# -- device='cuda' without a GPU ---------------------------------------------------------------

@pytest.mark.parametrize("device, shown", [
    ("cuda", "cuda"), ("cuda:0", "cuda:0"), ("cuda:3", "cuda:3"),
    (1, "cuda:1"), (torch.device("cuda", 2), "cuda:2"),   # as safetensors takes them
])
def test_cuda_without_gpu(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, device: Any,
                          shown: str) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = write_file(tmp_path / "m.safetensors", {"a": torch.arange(3.0)})
    before = open_fds()
    with FastSafetensorsFile(path) as fsf:
        attempts = [
            lambda: FastSafetensorsFile(path, device=device),
            lambda: fastsafetensors.load_file(path, device=device),
            lambda: fastsafetensors.loads(path.read_bytes(), device=device),
            lambda: fastsafetensors.safe_open(path, "pt", device=device),
            lambda: LazyTensorFactory(path, device=device),
            lambda: fsf.get_tensor("a", device=device),
            lambda: fsf.get_slice("a").materialize(device=device),
        ]
        for attempt in attempts:
            with pytest.raises(NoGPUError) as excinfo:
                attempt()
            assert isinstance(excinfo.value, RuntimeError)
            message = str(excinfo.value)
            assert message.startswith("No CUDA GPUs are available")
            assert shown in message and "device='cpu'" in message
        assert fsf.bytes_read == 0
    # The last traceback holds the slice, which holds the descriptor (as a slice taken before
    # close() does, to keep working): gone with it.
    del excinfo
    assert open_fds() == before


def test_bad_device_names(tmp_path: Path) -> None:
    path = write_file(tmp_path / "m.safetensors", {"a": torch.arange(3.0)})
    with pytest.raises(ConfigError, match="cuda"):
        FastSafetensorsFile(path, device="tpu")
    with pytest.raises(ConfigError, match="numpy"):
        FastSafetensorsFile(path, framework="np", device="cuda")


def test_malformed_cuda_device_names_are_config_errors(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """With a GPU, torch's own error for "cuda:x" says little; without one, NoGPUError would
    blame the machine for a typo. Both: ConfigError naming the valid forms."""
    path = write_file(tmp_path / "m.safetensors", {"a": torch.arange(3.0)})
    for gpu in (False, True):
        monkeypatch.setattr(torch.cuda, "is_available", lambda gpu=gpu: gpu)
        monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
        for device in ("cuda:x", "cuda:-1", -1, "cuda:0:1", "cuda: 0", "cudafoo"):
            with pytest.raises(ConfigError, match="cuda:N"):
                fastsafetensors.load_file(path, device=device)
    # An index past the GPUs there are: the ones there are, not "No CUDA GPUs are available".
    with pytest.raises(ConfigError, match="expected one of: cuda:0, .*CUDA_VISIBLE_DEVICES"):
        fastsafetensors.load_file(path, device="cuda:7")


def test_tensor_names_that_are_not_strings(tmp_path: Path) -> None:
    path = write_file(tmp_path / "m.safetensors", {"a": torch.arange(3.0)})
    attempts = [lambda: fastsafetensors.load(path, tensors=[1]),
                lambda: fastsafetensors.load(path, tensors=[1, "zz"]),
                lambda: fastsafetensors.resolve(path, tensors=[1]),
                lambda: LazyTensorFactory(path).create(1)]
    for attempt in attempts:
        with pytest.raises(TensorNotFoundError, match="^1 is not in m.safetensors"):
            attempt()
    with FastSafetensorsFile(path) as fsf, pytest.raises(TensorNotFoundError, match="^None "):
        fsf[None]


@pytest.mark.parametrize("option, value", [
    ("threads", 2.5), ("threads", True), ("threads", "two"), ("staging_bytes", 0),
    ("staging_bytes", -5),
])
def test_option_values_are_checked_on_the_cpu_too(tmp_path: Path, option: str,
                                                  value: Any) -> None:
    path = write_file(tmp_path / "m.safetensors", {"a": torch.arange(3.0)})
    with pytest.raises(ConfigError, match=f"^{option}="):
        fastsafetensors.load(path, **{option: value})
    assert fastsafetensors.load(path, threads="2")["a"].tolist() == [0.0, 1.0, 2.0]  # from env


def test_errors_keep_their_message_through_pickle(tmp_path: Path) -> None:
    folder = tmp_path / "empty"
    folder.mkdir()
    error = CheckpointNotFoundError(folder, "no weights here")
    folder.rmdir()   # unpickled elsewhere, where the folder is not: the same words
    assert str(pickle.loads(pickle.dumps(error))) == str(error)
    path = write_file(tmp_path / "m.safetensors", {"a": torch.arange(3.0)})
    with pytest.raises(ConfigError) as excinfo:
        fastsafetensors.load_file(path, threads=lambda: 1)   # a value that does not pickle
    copy = pickle.loads(pickle.dumps(excinfo.value))
    assert type(copy) is ConfigError and str(copy) == str(excinfo.value)


def test_sources_of_the_wrong_type(tmp_path: Path) -> None:
    path = write_file(tmp_path / "m.safetensors", {"a": torch.arange(3.0)})
    for source in (None, 123, bytes(path)):
        with pytest.raises(TypeError, match="expected a file, folder or Hub repo id"):
            fastsafetensors.load(source)
    loop = tmp_path / "loop.safetensors"
    loop.symlink_to(loop)
    for attempt in (lambda: fastsafetensors.load_file(loop), lambda: FastSafetensorsFile(loop)):
        with pytest.raises(CheckpointNotFoundError, match="symbolic links form a loop"):
            attempt()


def test_compat_file_lists_and_partial_registration(tmp_path: Path) -> None:
    from fastsafetensors import ParallelLoader, SafeTensorsFileLoader

    good = write_file(tmp_path / "good.safetensors", {"a": torch.arange(3.0)})
    clash = write_file(tmp_path / "clash.safetensors", {"a": torch.ones(2), "b": torch.ones(1)})
    for attempt in (lambda: ParallelLoader(None, str(good)),
                    lambda: SafeTensorsFileLoader(None).add_filenames({0: str(good)}),
                    lambda: SafeTensorsFileLoader(None).add_filenames([str(good)])):
        with pytest.raises(TypeError, match="list of file paths|rank: \\[file paths\\]"):
            attempt()
    # A bad file leaves the loader as it was, not holding the files before it.
    loader = SafeTensorsFileLoader(None, "cpu")
    with pytest.raises(HeaderError, match="is also in"):
        loader.add_filenames({0: [str(good), str(clash)]})
    assert loader.get_keys() == [] and not loader.meta
    loader.add_filenames({0: [str(good)]})
    assert loader.copy_files_to_device().get_tensor("a").tolist() == [0.0, 1.0, 2.0]
    for option, value in (("max_batch_bytes", -1), ("device_memory_budget", -1),
                          ("device_memory_budget", float("nan"))):   # 1.5: 1 byte, as upstream
        with pytest.raises(ConfigError, match=f"^{option}="):
            ParallelLoader(None, [str(good)], **{option: value})


def test_compat_and_cli_without_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                      capsys: pytest.CaptureFixture[str]) -> None:
    import fastsafetensors.frameworks as frameworks
    from fastsafetensors import ParallelLoader, SafeTensorsFileLoader
    from fastsafetensors.cli import main

    path = write_file(tmp_path / "m.safetensors", {"a": torch.arange(3.0)})
    monkeypatch.setitem(sys.modules, "torch", None)
    monkeypatch.delitem(sys.modules, "fastsafetensors.frameworks.torch", raising=False)
    monkeypatch.delattr(frameworks, "torch", raising=False)
    for attempt in (lambda: SafeTensorsFileLoader(None, "cpu"),
                    lambda: ParallelLoader(None, [str(path)])):
        with pytest.raises(FrameworkNotInstalledError, match="pip install torch"):
            attempt()
    assert main(["demo", "--size-mb", "1"]) == 2
    assert "pip install torch" in capsys.readouterr().err


def test_bad_sharded_indexes_are_typed(tmp_path: Path) -> None:
    write_file(tmp_path / "m-1.safetensors", {"a": torch.arange(3.0)})
    bodies = ["[" * 100_000]
    if getattr(sys, "get_int_max_str_digits", lambda: 0)():   # 3.10.7+, unless turned off
        bodies.append('{"weight_map": {"a": ' + "9" * 5000 + "}}")
    for body in bodies:
        (tmp_path / "model.safetensors.index.json").write_text(body)
        with pytest.raises(CheckpointIndexError, match="not a valid JSON index"):
            fastsafetensors.load(tmp_path)


def test_iter_tensors_checks_its_arguments_when_called(tmp_path: Path,
                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    """Not at the first next(), which may be far from the call (a generator passed on)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    path = write_file(tmp_path / "m.safetensors", {"a": torch.arange(3.0)})
    with pytest.raises(NoGPUError):
        fastsafetensors.iter_tensors(path, device="cuda:0")
    for option, value in (("io", "x"), ("threads", 0), ("max_device_bytes", -1),
                          ("backend", "nfs")):
        with pytest.raises(ConfigError, match=f"^{option}="):
            fastsafetensors.iter_tensors(path, **{option: value})


def test_numbers_of_other_types_where_callers_pass_them(tmp_path: Path) -> None:
    """numpy ints and 0-d tensors (what an all_reduce returns) for budgets and ranks, 4.0 for
    a thread count, a generator of paths: accepted, and handed on as plain ints and lists."""
    import numpy as np

    from fastsafetensors import ParallelLoader, SafeTensorsFileLoader

    path = write_file(tmp_path / "m.safetensors", {"a": torch.arange(3.0)})
    for budget in (np.int64(1 << 20), torch.tensor(1 << 20)):
        loader = ParallelLoader(None, [str(path)], device_memory_budget=budget,
                                max_batch_bytes=np.int64(1 << 20), max_threads=8.0)
        assert type(loader._budget) is int and type(loader._read_ahead) is int
        with loader:
            assert [n for n, _ in loader.iterate_weights()] == ["a"]
    single = SafeTensorsFileLoader(None, "cpu")
    single.add_filenames({np.int64(0): (p for p in [str(path)])})
    assert single.get_keys() == ["a"]
    assert fastsafetensors.load(path, threads=4.0)["a"].tolist() == [0.0, 1.0, 2.0]


def test_cuda_names_torch_refuses(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: 1)
    path = write_file(tmp_path / "m.safetensors", {"a": torch.arange(3.0)})
    for device in ("cuda:01", "cuda:99999999999999999999", 10 ** 20):
        with pytest.raises(ConfigError, match="cuda:N"):
            fastsafetensors.load_file(path, device=device)


def test_a_json_name_is_an_index_only_when_named_as_one(tmp_path: Path) -> None:
    path = write_file(tmp_path / "weights.json", {"a": torch.arange(3.0)})   # weights, oddly named

    class BytesPath:
        def __fspath__(self) -> bytes:
            return bytes(path)

    for source in (path, BytesPath()):
        assert fastsafetensors.load(source)["a"].tolist() == [0.0, 1.0, 2.0]


def test_errors_with_unpicklable_fields_pickle() -> None:
    error = TensorNotFoundError(lambda: 0, "/x/m.safetensors", ["a"])   # type: ignore[arg-type]
    copy = pickle.loads(pickle.dumps(error))
    assert type(copy) is TensorNotFoundError and str(copy) == str(error)


def test_missing_numpy(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import fastsafetensors.frameworks as frameworks

    path = write_file(tmp_path / "m.safetensors", {"a": torch.arange(3.0)})
    monkeypatch.setitem(sys.modules, "numpy", None)
    monkeypatch.delitem(sys.modules, "fastsafetensors.frameworks.numpy", raising=False)
    monkeypatch.delattr(frameworks, "numpy", raising=False)
    with pytest.raises(FrameworkNotInstalledError, match="pip install numpy") as excinfo:
        fastsafetensors.load_file(path, framework="np")
    assert excinfo.value.name == "numpy"


def test_missing_numpy_with_torch(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # torch runs without numpy, but the torch adapter reads through tensors' numpy views: the
    # error must name numpy and how to install it before any file is opened (torch's own,
    # "Numpy is not available", a RuntimeError, came at the first read).
    import fastsafetensors.frameworks as frameworks

    path = write_file(tmp_path / "m.safetensors", {"a": torch.arange(3.0)})
    monkeypatch.setitem(sys.modules, "numpy", None)
    monkeypatch.delitem(sys.modules, "fastsafetensors.frameworks.torch", raising=False)
    monkeypatch.delattr(frameworks, "torch", raising=False)
    before = open_fds()
    for attempt in (lambda: FastSafetensorsFile(path), lambda: fastsafetensors.load_file(path),
                    lambda: fastsafetensors.safe_open(path, "pt").get_tensor("a")):
        with pytest.raises(FrameworkNotInstalledError, match="pip install numpy") as excinfo:
            attempt()
        assert excinfo.value.name == "numpy"
    assert open_fds() == before


def test_tensors_that_is_not_a_list_is_a_config_error(tmp_path: Path) -> None:
    # tensors=3 said only "'int' object is not iterable", from list(), naming no argument.
    path = write_file(tmp_path / "m.safetensors", {"a": torch.arange(3.0)})
    for call in (lambda: fastsafetensors.load(path, tensors=3),
                 lambda: fastsafetensors.resolve(path, tensors=3)):
        with pytest.raises(ConfigError, match="^tensors=3 .*a list of tensor names"):
            call()


def test_resolve_and_inspect_of_the_wrong_type(tmp_path: Path) -> None:
    # resolve(3) raised AttributeError ('int' object has no attribute 'startswith'), and
    # resolve(None) a TypeError from os.stat that named neither the call nor the argument.
    for call in (fastsafetensors.resolve, fastsafetensors.inspect):
        for source in (None, 3, b"/x", [str(tmp_path)]):
            with pytest.raises(TypeError, match="expected a file, folder or Hub repo id"):
                call(source)


def test_hub_folder_options_of_the_wrong_type(tmp_path: Path) -> None:
    # subfolder=3 raised AttributeError ('int' object has no attribute 'rstrip'); cache_dir=3
    # a TypeError from pathlib that named no argument.
    write_file(tmp_path / "model.safetensors", {"a": torch.arange(3.0)})
    for call in (fastsafetensors.load, fastsafetensors.resolve, fastsafetensors.inspect):
        with pytest.raises(ConfigError, match="^subfolder=3 "):
            call(str(tmp_path), subfolder=3)
        with pytest.raises(ConfigError, match="^cache_dir=3 "):
            call("org/model", cache_dir=3, local_files_only=True)


def test_read_bytes_of_a_non_name_or_another_files_info(tmp_path: Path) -> None:
    # read_bytes(3) raised AttributeError ('int' object has no attribute 'data_offsets'); a
    # TensorInfo of another file read at its offsets here: wrong bytes, or a ReadError.
    big = write_file(tmp_path / "big.safetensors", {"a": torch.arange(4.0), "z": torch.ones(100)})
    small = write_file(tmp_path / "small.safetensors", {"a": torch.arange(2.0)})
    with FastSafetensorsFile(big) as b, FastSafetensorsFile(small) as s:
        with pytest.raises(TensorNotFoundError, match="^3 is not in small.safetensors"):
            s.read_bytes(3)   # type: ignore[arg-type]
        for info in (b.get_tensors()["z"], b.get_tensors()["a"]):
            with pytest.raises(ConfigError, match="^info=.*get_tensors\\(\\) of .*small"):
                s.read_bytes(info)
        assert bytes(s.read_bytes(s.get_tensors()["a"])) == bytes(s.read_bytes("a"))


def test_an_empty_path_is_refused_not_read_as_the_current_folder(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # load("") refused it, but resolve("") and inspect("") read the current folder.
    write_file(tmp_path / "model.safetensors", {"a": torch.arange(3.0)})
    monkeypatch.chdir(tmp_path)
    for call in (fastsafetensors.load, fastsafetensors.resolve, fastsafetensors.inspect):
        with pytest.raises(CheckpointNotFoundError, match="the path is empty"):
            call("")


def test_lazy_tensor_factory_of_the_wrong_type() -> None:
    # LazyTensorFactory(3) said only "'int' object is not iterable".
    for sources in (3, None):
        with pytest.raises(TypeError, match="LazyTensorFactory takes a file path or a list"):
            LazyTensorFactory(sources)   # type: ignore[arg-type]
