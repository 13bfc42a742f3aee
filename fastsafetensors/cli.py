"""The ``fastsafetensors`` command.

``fastsafetensors demo`` makes a small synthetic checkpoint in a temporary folder, loads it with
this package and with safetensors, checks the tensors are equal bit for bit and prints GB/s for
both. ``fastsafetensors inspect SOURCE`` prints the tensors of a file, folder or Hub repo id
without reading their data.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from collections.abc import Sequence

from .errors import FastSafetensorsError
from .frameworks import get_framework

__all__ = ["main"]


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value <= 0:
        raise argparse.ArgumentTypeError(f"must be a positive number of MB, got {text}")
    return value


def _demo(args: argparse.Namespace) -> int:
    get_framework("pt")   # without torch: how to install it, not a traceback
    import torch
    from safetensors.torch import load_file as st_load_file
    from safetensors.torch import save_file

    from . import load_file

    total = args.size_mb * 1_000_000
    # A Llama-like mix: a few large matrices, many small norms, bf16 and f32.
    with tempfile.TemporaryDirectory(prefix="fastsafetensors-demo-") as folder:
        path = os.path.join(folder, "model.safetensors")
        tensors = {}
        rows, cols = 1024, 1024
        layer = 0
        size = 0
        gen = torch.Generator().manual_seed(0)
        while size < total:
            w = torch.randn(rows, cols, generator=gen).to(torch.bfloat16)
            tensors[f"model.layers.{layer}.mlp.weight"] = w
            tensors[f"model.layers.{layer}.norm.weight"] = torch.ones(cols)
            size += w.numel() * 2 + cols * 4
            layer += 1
        save_file(tensors, path)
        del tensors
        nbytes = os.path.getsize(path)
        # Not the path: the folder is removed when the demo ends, so a path to try again with
        # (fastsafetensors inspect ...) would name a file that is gone.
        print(f"made a synthetic checkpoint in a temporary folder, removed at the end: "
              f"model.safetensors, {nbytes / 1e6:.1f} MB, {2 * layer} tensors")

        start = time.perf_counter()
        ours = load_file(path)
        ours_s = time.perf_counter() - start

        start = time.perf_counter()
        # safetensors maps the file lazily; clone() makes it read every byte, as we do.
        theirs = {k: v.clone() for k, v in st_load_file(path).items()}
        theirs_s = time.perf_counter() - start

        same = ours.keys() == theirs.keys() and all(torch.equal(ours[k], theirs[k]) for k in ours)
        print(f"fastsafetensors.load_file            {nbytes / 1e9 / ours_s:6.2f} GB/s "
              f"({ours_s:.3f} s)")
        print(f"safetensors.load_file + clone        {nbytes / 1e9 / theirs_s:6.2f} GB/s "
              f"({theirs_s:.3f} s)")
        print(f"tensors equal bit for bit: {same}  (warm page cache; "
              f"benchmarks/bench_load.py measures cold reads and the limits)")
        return 0 if same else 1


def _inspect(args: argparse.Namespace) -> int:
    from .hub import inspect

    summary = inspect(args.path, revision=args.revision, subfolder=args.subfolder,
                      variant=args.variant, local_files_only=args.offline or None)
    for name, info in summary.tensors.items():
        print(f"{name}\t{info.dtype}\t{list(info.shape)}\t{info.nbytes}")
    print(summary, file=sys.stderr)
    print(f"{len(summary.tensors)} tensors, {summary.total_bytes} data bytes", file=sys.stderr)
    return 0


DEMO = """Make a synthetic checkpoint in a temporary folder, load it with fastsafetensors and
with safetensors, check that the tensors are equal bit for bit, and print GB/s for both. No
network or GPU needed; the folder is removed afterwards."""

INSPECT = """List the tensors of a .safetensors file, a checkpoint folder or a Hugging Face Hub
repo id, reading headers only. One line per tensor goes to stdout (name, dtype, shape, bytes,
tab-separated, for other tools); the summary goes to stderr."""


def main(argv: Sequence[str] | None = None) -> int:
    from . import __version__

    parser = argparse.ArgumentParser(
        prog="fastsafetensors",
        description="Load safetensors checkpoints fast. Try 'fastsafetensors demo', or "
                    "'fastsafetensors inspect PATH' to list a checkpoint's tensors.")
    parser.add_argument("--version", action="version", version=f"%(prog)s {__version__}")
    sub = parser.add_subparsers(dest="command", required=True)
    raw = argparse.RawDescriptionHelpFormatter   # the descriptions are wrapped already
    demo = sub.add_parser("demo", help="load a synthetic checkpoint both ways and compare",
                          description=DEMO, formatter_class=raw)
    demo.add_argument("--size-mb", type=_positive, default=256,
                      help="checkpoint size (default 256)")
    demo.set_defaults(run=_demo)
    inspect = sub.add_parser("inspect", help="list the tensors of a file, folder or Hub repo "
                                             "(headers only)", description=INSPECT,
                          formatter_class=raw)
    inspect.add_argument("path", help="a .safetensors file, a folder or a Hub repo id")
    inspect.add_argument("--revision", help="Hub branch, tag or commit (default: main)")
    inspect.add_argument("--subfolder", help="e.g. unet for a diffusers pipeline")
    inspect.add_argument("--variant", help="e.g. fp16 for model.fp16.safetensors")
    inspect.add_argument("--offline", action="store_true",
                         help="use the Hugging Face cache only (like HF_HUB_OFFLINE=1)")
    inspect.set_defaults(run=_inspect)
    args = parser.parse_args(argv)
    try:
        return int(args.run(args))
    except BrokenPipeError:
        # The reader went away (| head): no error to report. Python would print one more
        # when it flushes stdout at exit, so stdout points at /dev/null from here.
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 141   # as a tool killed by SIGPIPE
    except (OSError, ValueError, KeyError, RuntimeError, FastSafetensorsError) as exc:
        print(f"fastsafetensors: {exc}", file=sys.stderr)
        return 2
    except Exception as exc:
        from .hub import _network_errors

        if not isinstance(exc, _network_errors()):   # the HTTP client's own, no OSError
            raise
        print(f"fastsafetensors: the Hub could not be reached: {type(exc).__name__}: {exc}",
              file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
