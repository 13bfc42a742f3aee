"""``from_pretrained(..., loader="fastsafetensors")`` for transformers 5.

Importing this module installs the hook (once; ``install()`` again is a no-op)::

    import fastsafetensors.integrations.transformers
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained("meta-llama/Llama-3.2-1B", dtype="auto",
                                                 device_map="auto", loader="fastsafetensors")

It works wherever ``PreTrainedModel.from_pretrained`` is reached: model classes, ``AutoModel*``
classes, model classes that override ``from_pretrained`` and call ``super()``, and
``pipeline(..., model_kwargs={"loader": "fastsafetensors"})``; for a local folder or a Hub repo
id. The safetensors shards are read by this package, tensor by tensor (or, under tensor
parallelism, only this rank's rows or columns), while transformers keeps its renaming, weight
converters, dtype casts, ``device_map`` dispatch (disk offload included), sharding and
quantization.

- ``loader=None`` or ``"safetensors"``: transformers' stock path, untouched.
- ``loader="fastsafetensors", loader_options={"threads": 8}``: options of
  :func:`fastsafetensors.configure` for this load; unknown names or values raise ``ConfigError``.
- any other name raises ``ConfigError`` (a ``ValueError``) listing the valid ones.
- GGUF (``gguf_file=``), ``.bin`` weights, a caller's ``state_dict=`` and DeepSpeed ZeRO-3 go to
  the stock path, with one INFO line saying why.
- ``with enabled(threads=8): ...``: every ``from_pretrained`` in the block that names no loader
  uses this one.

One INFO line per load on the ``fastsafetensors.integrations.transformers`` logger says how much
was read, how fast, from how many files. ``install()`` checks the transformers version and the
private functions the seam relies on, and raises :class:`IncompatibleVersionError` (an
``ImportError``) naming the supported range if they do not match.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator
from typing import Any

from ._transformers_seam import (
    LOADERS,
    SUPPORTED,
    IncompatibleVersionError,
    check_options,
    is_installed,
)
from ._transformers_seam import install as _install
from ._transformers_seam import reset_default as _reset_default
from ._transformers_seam import set_default as _set_default
from ._transformers_seam import uninstall as _uninstall

__all__ = ["install", "uninstall", "enabled", "is_installed", "LOADERS", "SUPPORTED",
           "IncompatibleVersionError"]


def install() -> None:
    """Add ``loader=`` to ``PreTrainedModel.from_pretrained``. Idempotent; thread-safe.

    Raises IncompatibleVersionError if transformers is not 5.x or its loading internals changed.
    """
    _install()


def uninstall() -> None:
    """Put transformers back exactly as it was. Idempotent."""
    _uninstall()


@contextlib.contextmanager
def enabled(**loader_options: Any) -> Iterator[None]:
    """Within the block (this thread and context), ``from_pretrained`` calls that name no
    ``loader`` load with fastsafetensors and these options.

    >>> from fastsafetensors.integrations.transformers import enabled
    >>> with enabled(threads=8):                                          # doctest: +SKIP
    ...     model = AutoModelForCausalLM.from_pretrained("org/model")
    """
    install()
    token = _set_default(check_options(loader_options))
    try:
        yield
    finally:
        _reset_default(token)


install()
