"""transformers' conversion mapping with its regular expressions compiled when used (internal).

Before it loads any weight, transformers 5 builds once per process a table of key renamings and
weight converters for every model family it knows (1,044 of them in 5.23), and each compiles a
regular expression as it is made; a load then takes copies of the few its model uses. On the
2-core CPU VM that build took 0.08 s of a 0.2 s load of a model with no bytes to move
(docs/transformers.md, "Reading ahead"). When a fastsafetensors load is the one that
builds the table, each expression is compiled when a copy of it is taken (transformers hands
out deep copies) or when it is used, so a load gets the same compiled patterns as stock and the
rest are never compiled.

How: ``transformers.core_model_loading`` compiles through its module global ``re``; install()
puts there a module that is ``re`` except that its ``compile`` returns a :class:`LazyPattern`
while this thread builds the table for one of our loads. Stock loads, and tables built outside
our loads, compile as before.
"""

from __future__ import annotations

import re
import threading
import types
from collections.abc import Callable
from typing import Any

#: The function that builds the table, and the module whose ``re`` global it compiles through.
BUILD_SITE = ("transformers.conversion_mapping", "_build_checkpoint_conversion_mapping")
COMPILE_SITE = ("transformers.core_model_loading", "re")

_building = threading.local()


class LazyPattern:
    """A regular expression compiled on first use; a copy of it is the compiled ``re.Pattern``.

    Attribute access (``search``, ``groupindex``, ...) goes to the compiled pattern, so code that
    uses the table's own entries without copying them works the same.
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


def _compile(pattern: Any, flags: int = 0) -> Any:
    if getattr(_building, "active", False) and isinstance(pattern, str):
        return LazyPattern(pattern, flags)
    return re.compile(pattern, flags)


def lazy_re() -> types.ModuleType:
    """A module with everything of ``re`` but its own ``compile`` (see the module docstring)."""
    module = types.ModuleType("re", re.__doc__)
    module.__dict__.update({k: v for k, v in vars(re).items() if not k.startswith("__")})
    module.compile = _compile  # type: ignore[attr-defined]
    module.__fastsafetensors_original__ = re  # type: ignore[attr-defined]
    return module


def make_build_hook(original: Callable[[], Any],
                    ours: Callable[[], bool]) -> Callable[[], Any]:
    """``_build_checkpoint_conversion_mapping`` that compiles lazily when ``ours()`` says this
    thread runs one of our loads."""

    def _build_checkpoint_conversion_mapping() -> Any:
        if not ours() or getattr(_building, "active", False):
            return original()
        _building.active = True
        try:
            return original()
        finally:
            _building.active = False

    _build_checkpoint_conversion_mapping.__fastsafetensors_original__ = original  # type: ignore[attr-defined]
    return _build_checkpoint_conversion_mapping


def fits() -> bool:
    """Whether this transformers builds its table and compiles as described above (5.0 to
    5.23 do); where not, nothing is replaced and loads compile as stock."""
    try:
        from transformers import conversion_mapping, core_model_loading
    except ImportError:
        return False
    current = getattr(core_model_loading, "re", None)
    return (callable(getattr(conversion_mapping, BUILD_SITE[1], None))
            and (current is re or getattr(current, "__fastsafetensors_original__", None) is re))
