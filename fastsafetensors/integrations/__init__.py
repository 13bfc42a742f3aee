"""Hooks into the libraries that load checkpoints, each in its own module and imported on demand.

Importing this package imports none of those libraries; import the integration you need::

    import fastsafetensors.integrations.transformers   # from_pretrained(loader="fastsafetensors")

| module | library | what it adds |
| --- | --- | --- |
| ``transformers`` | transformers >= 5.0, < 6 | ``from_pretrained(..., loader="fastsafetensors")`` |
"""

from __future__ import annotations

__all__: list[str] = []
