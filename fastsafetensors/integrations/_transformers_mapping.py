"""Regular expressions of transformers' loading code, compiled when first used (internal).

transformers 5 compiles many regular expressions while it loads a checkpoint, and uses few:

* once per process, before it loads any weight, it builds a table of key renamings and weight
  converters for every model family it knows (1,044 of them in 5.23), each compiling an
  expression as it is made; a load then takes deep copies of the few its model uses. On the
  2-core CPU VM that build took 0.08 s of a 0.2 s load of a model with no bytes to move
  (docs/transformers.md, "Reading ahead");
* for every checkpoint key that no converter takes, it makes a renaming of that one key, which
  compiles the key as an expression (about 0.1 ms a key there) and never matches anything with
  it: 129 keys for the 8 GB Llama-shaped benchmark checkpoint, tens of thousands for some.

During a fastsafetensors load every expression that ``transformers.core_model_loading``
compiles is a :class:`LazyPattern`, compiled when it is first used or when a copy of it is
taken. What transformers then uses behaves as the compiled pattern; the table's entries, which
it hands out as deep copies, give it compiled patterns.

How: ``core_model_loading`` compiles through its module global ``re``; install() puts there a
module that is ``re`` except for ``compile``, which returns a :class:`LazyPattern` while one of
our loads runs in the calling context (the thread that called ``from_pretrained``; transformers'
worker threads, and stock loads, compile as before).
"""

from __future__ import annotations

import re
import types
from collections.abc import Callable
from typing import Any

#: The module whose ``re`` global is replaced.
COMPILE_SITE = ("transformers.core_model_loading", "re")


class LazyPattern:
    """A regular expression compiled on first use; a copy of it is the compiled ``re.Pattern``.

    Attribute access (``search``, ``groupindex``, ...) goes to the compiled pattern, so code that
    uses it in place works the same.
    """

    __slots__ = ("pattern", "flags", "_compiled")

    def __init__(self, pattern: str, flags: int = 0):
        self.pattern = pattern
        self.flags = flags
        self._compiled: re.Pattern[str] | None = None

    def compiled(self) -> re.Pattern[str]:
        # Two threads may both compile: they get equal patterns (re caches them anyway).
        if self._compiled is None:
            self._compiled = re.compile(self.pattern, self.flags)
        return self._compiled

    def __getattr__(self, name: str) -> Any:
        return getattr(self.compiled(), name)

    def __deepcopy__(self, memo: dict[int, Any]) -> re.Pattern[str]:
        return self.compiled()

    def __copy__(self) -> re.Pattern[str]:
        return self.compiled()

    def __reduce__(self) -> tuple[Any, ...]:
        return (re.compile, (self.pattern, self.flags))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, LazyPattern):
            other = other.compiled()
        return self.compiled() == other

    def __hash__(self) -> int:
        return hash(self.compiled())

    def __repr__(self) -> str:
        return f"LazyPattern({self.pattern!r}, {self.flags})"


def lazy_re(ours: Callable[[], bool]) -> types.ModuleType:
    """A module with everything of ``re`` but its ``compile``, which is lazy while ``ours()``."""

    def compile(pattern: Any, flags: int = 0) -> Any:  # noqa: A001 - re's own name
        if isinstance(pattern, str) and ours():
            return LazyPattern(pattern, flags)
        return re.compile(pattern, flags)

    module = types.ModuleType("re", re.__doc__)
    module.__dict__.update({k: v for k, v in vars(re).items() if not k.startswith("__")})
    module.compile = compile  # type: ignore[attr-defined]
    module.__fastsafetensors_original__ = re  # type: ignore[attr-defined]
    return module


def fits() -> bool:
    """Whether this transformers compiles through ``core_model_loading``'s ``re`` global (5.0
    to 5.24 do); where not, nothing is replaced and loads compile as stock."""
    try:
        from transformers import core_model_loading
    except ImportError:
        return False
    current = getattr(core_model_loading, "re", None)
    return current is re or getattr(current, "__fastsafetensors_original__", None) is re
