"""Hooks into the libraries that load checkpoints, each in its own module and imported on demand.

Importing this package imports none of those libraries; import the integration you need::

    import fastsafetensors.integrations.transformers   # from_pretrained(loader="fastsafetensors")
    from fastsafetensors.integrations.accelerate import enabled   # load_checkpoint_and_dispatch

| module | library | what it adds |
| --- | --- | --- |
| ``transformers`` | transformers >= 5.0, < 6 | ``from_pretrained(..., loader="fastsafetensors")`` |
| ``accelerate`` | accelerate >= 1.0, < 2 | ``enabled()``, ``install()``: its checkpoint reads |

vLLM and SGLang need no hook: their ``--load-format fastsafetensors`` imports this package and
calls the upstream-compatible API in :mod:`fastsafetensors.compat` and
:mod:`fastsafetensors.parallel_loader` (docs/compat.md).
"""

from __future__ import annotations

__all__: list[str] = []


def major_version(version: str) -> int:
    """The major release of a library's version string; -1 when it does not parse (as
    unsupported as a wrong one)."""
    try:
        from packaging.version import Version

        return Version(version).release[0]
    except Exception:
        return -1


def human_size(nbytes: int) -> str:
    """``83.9 MB``: sizes in the integrations' INFO lines (GB = 1e9 bytes)."""
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if nbytes >= scale:
            return f"{nbytes / scale:.1f} {unit}"
    return f"{nbytes} B"
