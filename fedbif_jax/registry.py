"""Name -> factory tables that user code extends (`models.MODELS`, `algorithms.ALGORITHMS`)."""
from __future__ import annotations

from typing import Callable


def add(registry: dict, kind: str, name: str, factory: Callable, replace: bool = False) -> None:
  """Puts `factory` into `registry` under `name`; `kind` ("model", "algorithm") names the table in
  the one-line ValueError for an empty name, a non-callable or an unintended replacement."""
  if not isinstance(name, str) or not name:
    raise ValueError(f"{kind} name: must be a non-empty string, got {name!r}")
  if not callable(factory):
    raise ValueError(f"{kind} {name!r}: must be registered with a callable, got "
                     f"{type(factory).__name__}")
  if name in registry and not replace:
    raise ValueError(f"{kind} {name!r}: already registered (pass replace=True to replace it)")
  registry[name] = factory
