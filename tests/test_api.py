"""safetensors' verbs (load_file, loads, safe_open) and configure(): signatures, results equal
to safetensors', and the precedence explicit > configure block > environment > default."""

from __future__ import annotations

import gc
import logging
import pickle
import threading
import warnings
from pathlib import Path

import numpy as np
import pytest
import safetensors
import safetensors.numpy
import safetensors.torch
import torch
from builders import (
    assert_bitwise_equal,
    open_fds,
    opens_direct,
    require_o_direct,
    small_tensors,
    write_file,
)

import fastsafetensors
from fastsafetensors import ConfigError, FastSafetensorsFile, config, configure
from fastsafetensors.loader.posix import STATS


@pytest.fixture
def ckpt(tmp_path: Path) -> tuple[Path, dict[str, torch.Tensor]]:
    tensors = small_tensors()
    tensors["odd"] = torch.arange(4097, dtype=torch.uint8)  # ends off a 4 KiB boundary
    return write_file(tmp_path / "model.safetensors", tensors, {"format": "pt"}), tensors


# -- load_file ---------------------------------------------------------------------------------

def test_load_file(ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = ckpt
    reference = safetensors.torch.load_file(path)
    for source in (path, str(path)):
        ours = fastsafetensors.load_file(source)
        assert set(ours) == set(tensors)
        for name in tensors:
            assert_bitwise_equal(ours[name], reference[name])


def test_load_file_owns_its_memory(ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    """Fully read tensors, not a mapping: rewriting the file afterwards changes nothing."""
    path, tensors = ckpt
    ours = fastsafetensors.load_file(path)
    path.write_bytes(b"\0" * path.stat().st_size)
    for name in tensors:
        assert_bitwise_equal(ours[name], tensors[name])
    ours["big_write"] = ours["lm_head.weight"].add_(1)  # writable
    assert torch.equal(ours["big_write"], tensors["lm_head.weight"] + 1)


def test_load_file_numpy(ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = ckpt
    del tensors["model.layers.0.mlp.up_proj.weight"]  # BF16
    path = write_file(path.with_name("np.safetensors"), tensors)
    ours = fastsafetensors.load_file(path, framework="np")
    reference = safetensors.numpy.load_file(path)
    for name in tensors:
        assert isinstance(ours[name], np.ndarray)
        assert ours[name].dtype == reference[name].dtype
        assert ours[name].shape == reference[name].shape
        assert ours[name].tobytes() == reference[name].tobytes()


@pytest.mark.parametrize("call", ["load_file", "loads"])
def test_options_are_keyword_only(ckpt: tuple[Path, dict[str, torch.Tensor]], call: str) -> None:
    path, _ = ckpt
    arg = path if call == "load_file" else path.read_bytes()
    with pytest.raises(TypeError):
        getattr(fastsafetensors, call)(arg, "cpu")
    with pytest.raises(TypeError):
        FastSafetensorsFile(path, "cpu")  # type: ignore[misc]


def test_load_file_logs_one_info_line(ckpt: tuple[Path, dict[str, torch.Tensor]],
                                      caplog: pytest.LogCaptureFixture) -> None:
    path, _ = ckpt
    with caplog.at_level(logging.DEBUG, logger="fastsafetensors"):
        fastsafetensors.load_file(path)
    infos = [r for r in caplog.records if r.levelno == logging.INFO]
    assert len(infos) == 1 and "GB/s" in infos[0].getMessage()
    assert infos[0].name.startswith("fastsafetensors")


def test_package_logging_is_quiet() -> None:
    handlers = logging.getLogger("fastsafetensors").handlers
    assert all(isinstance(h, logging.NullHandler) for h in handlers)


# -- loads -----------------------------------------------------------------------------------

def test_loads_bytes_like(ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = ckpt
    data = path.read_bytes()
    reference = safetensors.torch.load(data)
    for blob in (data, bytearray(data), memoryview(data)):
        ours = fastsafetensors.loads(blob)
        assert set(ours) == set(tensors)
        for name in tensors:
            assert_bitwise_equal(ours[name], reference[name])


def test_loads_copies_the_data(ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = ckpt
    blob = bytearray(path.read_bytes())
    ours = fastsafetensors.loads(blob)
    blob[:] = b"\xff" * len(blob)
    del blob
    for name in tensors:
        assert_bitwise_equal(ours[name], tensors[name])


def test_loads_numpy(ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = ckpt
    del tensors["model.layers.0.mlp.up_proj.weight"]
    data = safetensors.torch.save(tensors)
    ours = fastsafetensors.loads(data, framework="np")
    for name in tensors:
        assert ours[name].tobytes() == tensors[name].numpy().tobytes()


# -- safe_open -------------------------------------------------------------------------------

def test_safe_open_matches_safetensors(ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = ckpt
    with fastsafetensors.safe_open(path, framework="pt", device="cpu") as ours, \
            safetensors.safe_open(path, framework="pt", device="cpu") as ref:
        assert ours.keys() == ref.keys()
        assert ours.offset_keys() == ref.offset_keys()
        assert ours.metadata() == ref.metadata()
        for name in ref.keys():
            assert_bitwise_equal(ours.get_tensor(name), ref.get_tensor(name))
            assert ours.get_slice(name).get_shape() == ref.get_slice(name).get_shape()
            assert ours.get_slice(name).get_dtype() == ref.get_slice(name).get_dtype()
        # safetensors' handle reads every tensor here (the user's FastSafetensorsFile
        # .get_tensors() is metadata only, and this handle returned that silently)
        theirs = ref.get_tensors()
        mine = ours.get_tensors()
        assert list(mine) == list(theirs)
        for name, tensor in theirs.items():
            assert_bitwise_equal(mine[name], tensor)
        assert ours.get_tensor_infos() == FastSafetensorsFile(path).get_tensors()
    # positional framework, like safetensors.safe_open(path, "pt"); backend accepted
    with fastsafetensors.safe_open(str(path), "pt", backend="pread") as f:
        assert f.keys() == sorted(ckpt[1])
    with fastsafetensors.safe_open(path, "numpy") as f:
        assert isinstance(f.get_tensor("odd"), np.ndarray)


# -- configure -------------------------------------------------------------------------------

@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    for option in config.OPTIONS.values():
        monkeypatch.delenv(option.env, raising=False)
    return monkeypatch


def test_config_precedence(clean_env: pytest.MonkeyPatch) -> None:
    assert config.get("io") == "auto"
    assert config.get("threads") == config.OPTIONS["threads"].default()
    clean_env.setenv("FASTSAFETENSORS_IO", "buffered")
    clean_env.setenv("FASTSAFETENSORS_THREADS", "3")
    assert config.get("io") == "buffered" and config.get("threads") == 3  # env, read late
    with configure(io="direct", threads=5):
        assert config.get("io") == "direct" and config.get("threads") == 5  # block > env
        assert config.get("io", "auto") == "auto"  # explicit > block
        assert config.get("threads", 7) == 7
        with configure(threads=6):
            assert config.get("threads") == 6 and config.get("io") == "direct"
        assert config.get("threads") == 5
    assert config.get("io") == "buffered"
    clean_env.delenv("FASTSAFETENSORS_IO")
    assert config.get("io") == "auto"


def test_configure_block_is_restored_after_an_error(clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(RuntimeError):
        with configure(io="buffered"):
            raise RuntimeError("boom")
    assert config.get("io") == "auto"


def test_configure_is_local_to_its_thread(clean_env: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    with configure(io="buffered"):
        worker = threading.Thread(target=lambda: seen.append(config.get("io")))
        worker.start()
        worker.join()
    assert seen == ["auto"]


def test_configure_outside_a_with_block_sets_nothing_and_says_so(
        clean_env: pytest.MonkeyPatch) -> None:
    # configure() reads like a setter; called alone it sets nothing, which only a warning tells.
    with pytest.warns(RuntimeWarning, match="only inside a `with` block.*FASTSAFETENSORS_"):
        configure(threads=3)
        gc.collect()
    assert not config.is_set("threads")
    with pytest.raises(ConfigError, match="io='bogus'"):
        configure(io="bogus")   # checked on the call, with or without a with block


def test_configure_nests_reenters_and_decorates(clean_env: pytest.MonkeyPatch) -> None:
    block = configure(threads=7)
    with block:
        with configure(threads=5):
            assert config.get("threads") == 5
        with block:
            assert config.get("threads") == 7
        assert config.get("threads") == 7
    assert not config.is_set("threads")

    @configure(threads=6)
    def threads() -> int:
        return int(config.get("threads"))

    assert threads() == threads() == 6 and not config.is_set("threads")


def test_a_decorated_function_never_called_does_not_warn(clean_env: pytest.MonkeyPatch) -> None:
    # Decorating is using it (each call enters it): the warning is for a bare statement only.
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")

        @configure(threads=6)
        def unused() -> None: ...

        del unused
        gc.collect()
    assert [str(w.message) for w in seen] == []


def test_one_configure_object_serves_threads_at_once(clean_env: pytest.MonkeyPatch) -> None:
    """A decorated function (or one block object) entered by two threads whose blocks overlap,
    the first in leaving first: each thread leaves its own block, with nothing left set."""
    entered = threading.Barrier(2)
    first_left = threading.Event()
    seen: dict[str, tuple[object, bool]] = {}
    errors: list[BaseException] = []

    @configure(threads=6)
    def work() -> int:
        entered.wait()
        if threading.current_thread().name == "second":
            first_left.wait()
        return int(config.get("threads"))

    def run() -> None:
        try:
            inside = work()
            seen[threading.current_thread().name] = (inside, config.is_set("threads"))
        except BaseException as exc:  # pragma: no cover - reported below
            errors.append(exc)
        finally:
            if threading.current_thread().name == "first":
                first_left.set()

    threads = [threading.Thread(target=run, name=name) for name in ("first", "second")]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    assert seen == {"first": (6, False), "second": (6, False)}


@pytest.mark.parametrize("call", ["load", "iter_tensors"])
def test_a_mistyped_keyword_names_the_function_and_the_likely_one(
        call: str, ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = ckpt
    for source in (path, path.parent):   # a file, and a folder (which goes the Hub's way)
        for typo, meant in (("thread", "threads"), ("revison", "revision")):
            with pytest.raises(TypeError, match=f"^{call}\\(\\) got an unexpected keyword "
                                                f"argument '{typo}' \\(did you mean "
                                                f"'{meant}'\\?\\); it takes device"):
                getattr(fastsafetensors, call)(source, **{typo: 1})


@pytest.mark.parametrize("options,fragments", [
    ({"bogus": 1}, ["bogus", "threads", "io", "chunk_bytes"]),
    ({"io": "fast"}, ["io='fast'", "auto", "buffered", "direct"]),
    ({"backend": "cufile"}, ["auto", "gds", "posix"]),
    ({"threads": 0}, ["a positive integer"]),
    ({"threads": "many"}, ["a positive integer"]),
    ({"chunk_bytes": -1}, ["a positive integer"]),
])
def test_configure_rejects_unknown(options: dict[str, object], fragments: list[str],
                                   clean_env: pytest.MonkeyPatch) -> None:
    with pytest.raises(ConfigError) as excinfo:
        with configure(**options):
            pass
    assert isinstance(excinfo.value, ValueError)
    for fragment in fragments:
        assert fragment in str(excinfo.value)


def test_bad_environment_value(clean_env: pytest.MonkeyPatch,
                               ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    # Named by its variable: the caller never passed io= or threads=.
    clean_env.setenv("FASTSAFETENSORS_IO", "turbo")
    with pytest.raises(ConfigError, match="environment variable FASTSAFETENSORS_IO='turbo' is "
                                          "not valid; expected one of: auto, buffered"):
        config.get("io")
    with pytest.raises(ConfigError, match="valid"):
        config.get("no_such_option")
    clean_env.delenv("FASTSAFETENSORS_IO")
    clean_env.setenv("FASTSAFETENSORS_THREADS", "0")
    with pytest.raises(ConfigError, match="environment variable FASTSAFETENSORS_THREADS='0'"):
        fastsafetensors.load_file(ckpt[0])
    with pytest.raises(ConfigError) as excinfo:
        config.get("threads")
    assert str(pickle.loads(pickle.dumps(excinfo.value))) == str(excinfo.value)


def test_bad_arguments_release_everything(ckpt: tuple[Path, dict[str, torch.Tensor]],
                                          clean_env: pytest.MonkeyPatch) -> None:
    path, _ = ckpt
    before = open_fds()
    with pytest.raises(ConfigError, match="direct"):
        fastsafetensors.load_file(path, io="fast")
    with pytest.raises(ConfigError, match="positive"):
        fastsafetensors.load_file(path, threads=0)
    with pytest.raises(ConfigError):
        fastsafetensors.load_file(path, framework="tf")
    assert open_fds() == before


def test_precedence_reaches_the_loader(ckpt: tuple[Path, dict[str, torch.Tensor]],
                                       clean_env: pytest.MonkeyPatch) -> None:
    """Whether reads bypass the page cache follows the resolved io option."""
    path, tensors = ckpt
    if not opens_direct(path):
        pytest.skip("this filesystem refuses O_DIRECT, so io=direct cannot be observed")

    def direct_reads(**kwargs: object) -> int:
        before = STATS.snapshot()[2]
        out = fastsafetensors.load_file(path, **kwargs)  # type: ignore[arg-type]
        for name in tensors:
            assert_bitwise_equal(out[name], tensors[name])
        return STATS.snapshot()[2] - before

    assert direct_reads(io="buffered") == 0
    clean_env.setenv("FASTSAFETENSORS_IO", "direct")
    assert direct_reads() > 0
    with configure(io="buffered"):
        assert direct_reads() == 0
        assert direct_reads(io="direct") > 0


def test_load_unknown_tensor_names_close_matches(tmp_path):
    from safetensors.torch import save_file

    paths = []
    for i in range(2):
        path = tmp_path / f"s{i}.safetensors"
        save_file({f"layer{i}.weight": torch.zeros(2)}, str(path))
        paths.append(str(path))
    with pytest.raises(fastsafetensors.TensorNotFoundError) as info:
        fastsafetensors.load(paths, tensors=["layer1.weight", "layer9.weight"])
    message = str(info.value)
    assert "'layer9.weight'" in message and "(2 tensors)" in message
    assert "'layer1.weight'" in message  # a close match, from the files' own names


def test_loads_counts_bytes_of_a_view_of_wider_items(tmp_path: Path) -> None:
    # len() of a memoryview counts its items: a view of 8-byte items read as a file of 1/8 size.
    tensors = {"a": torch.arange(8, dtype=torch.float32), "b": torch.ones(2, 3)}
    data = safetensors.torch.save(tensors)
    assert len(data) % 8 == 0   # safetensors pads its header to 8 bytes
    ours = fastsafetensors.loads(memoryview(data).cast("Q"))
    for name, tensor in tensors.items():
        assert_bitwise_equal(ours[name], tensor)


@pytest.mark.parametrize("framework", ["pt", "np"])
@pytest.mark.parametrize("dtype", ["nonsense", "zeros", 5])
def test_unknown_dtype_name_is_a_config_error(ckpt: tuple[Path, dict[str, torch.Tensor]],
                                              framework: str, dtype: str) -> None:
    path, tensors = ckpt
    name = next(n for n, t in tensors.items() if t.dtype == torch.float32)
    with FastSafetensorsFile(path, framework=framework) as f, \
            pytest.raises(ConfigError, match=f"dtype={dtype!r} is not valid"):
        f.get_tensor(name, dtype=dtype)


# -- lists of files, keywords, options --------------------------------------------------------

def test_a_tensor_in_two_listed_files_is_an_error(tmp_path: Path) -> None:
    from fastsafetensors.errors import CheckpointIndexError

    a = write_file(tmp_path / "a.safetensors", {"x": torch.zeros(2), "y": torch.ones(2)})
    b = write_file(tmp_path / "b.safetensors", {"x": torch.full((2,), 7.0)})
    for call in (lambda: fastsafetensors.load([a, b]),
                 lambda: list(fastsafetensors.iter_tensors([a, b])),
                 lambda: fastsafetensors.load([a, b], tensors=["x"])):
        with pytest.raises(CheckpointIndexError, match="also stored in a.safetensors"):
            call()
    with pytest.raises(ConfigError, match="each file once"):
        fastsafetensors.load([a, a])


def test_tensors_given_as_one_string_is_a_config_error(
        ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, tensors = ckpt
    name = next(iter(tensors))
    with pytest.raises(ConfigError, match="a list of tensor names"):
        fastsafetensors.load(path, tensors=name)
    assert list(fastsafetensors.load(path, tensors=[name])) == [name]


def test_unknown_keywords_and_backends_are_refused_for_files(
        ckpt: tuple[Path, dict[str, torch.Tensor]]) -> None:
    path, _ = ckpt
    with pytest.raises(TypeError, match="'thread'"):
        fastsafetensors.load(path, thread=4)
    with pytest.raises(ConfigError, match="backend"):
        fastsafetensors.load(path, backend="bogus")
    assert fastsafetensors.load(path, revision="main").keys()   # a Hub keyword: ignored here



@pytest.mark.parametrize("where", ["after the block", "on another thread"])
def test_a_stream_reads_with_the_options_of_its_call(tmp_path: Path, where: str,
                                                     clean_env: pytest.MonkeyPatch) -> None:
    """The options in force where iter_tensors was called hold for its whole stream, wherever
    and whenever it is consumed: not the first file with them and the next without."""
    paths = []
    for i in range(2):
        paths.append(tmp_path / f"part{i}.safetensors")
        safetensors.torch.save_file({f"w{i}": torch.arange(65536, dtype=torch.int32) + i},
                                    str(paths[-1]))

    def reads(stream: object, consume: object) -> int:
        STATS.reset()
        got: dict[str, torch.Tensor] = {}
        consume(lambda: got.update(stream))   # type: ignore[operator]
        assert torch.equal(got["w1"], torch.arange(65536, dtype=torch.int32) + 1)
        return STATS.reads

    def here(work: object) -> None:
        work()   # type: ignore[operator]

    def elsewhere(work: object) -> None:
        thread = threading.Thread(target=work)   # type: ignore[arg-type]
        thread.start()
        thread.join()

    consume = here if where == "after the block" else elsewhere
    with configure(io="buffered", chunk_bytes=4096):
        inside = reads(fastsafetensors.iter_tensors(paths), here)
        stream = fastsafetensors.iter_tensors(paths)
    assert reads(stream, consume) == inside >= 2 * 64   # 256 KiB a file, in 4 KiB reads

def test_configured_threads_hold_for_direct_loads(ckpt: tuple[Path, dict[str, torch.Tensor]],
                                                  monkeypatch: pytest.MonkeyPatch) -> None:
    # Only an explicit threads= argument stopped the switch to direct_threads (8).
    import fastsafetensors.loader.cpu as cpu

    path, _ = ckpt
    require_o_direct(path)
    used: list[int] = []
    real_run = cpu._run
    monkeypatch.setattr(cpu, "_run", lambda work, threads: used.append(threads)
                        or real_run(work, threads))
    with fastsafetensors.configure(threads=1, chunk_bytes=4096):
        fastsafetensors.load_file(path, io="direct")
    monkeypatch.setenv("FASTSAFETENSORS_THREADS", "3")
    with fastsafetensors.configure(chunk_bytes=4096):
        fastsafetensors.load_file(path, io="direct")
    monkeypatch.delenv("FASTSAFETENSORS_THREADS")
    with fastsafetensors.configure(chunk_bytes=4096):
        fastsafetensors.load_file(path, io="direct")
    assert used == [1, 3, fastsafetensors.config.get("direct_threads")]
