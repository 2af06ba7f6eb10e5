"""Errors the library raises for bad user input.

`ConfigError` is a `ValueError` whose message is one line that names the offending
field and what is allowed, e.g. ``fedbif.bits: must be an integer in 1..8, got 9``.
`launch.py` prints such errors without a traceback and exits with status 2.
"""
from __future__ import annotations

import math


class ConfigError(ValueError):
  """Bad user input: the message names the field and the allowed values."""


def check_positive_number(field: str, value) -> None:
  """Raises ConfigError unless value is a finite int/float > 0 (not a bool)."""
  check(isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
        and value > 0, field, "a finite number > 0", value)


def check(condition: bool, field: str, allowed: str, got) -> None:
  """Raises `ConfigError('<field>: must be <allowed>, got <got!r>')` unless condition."""
  if not condition:
    raise ConfigError(f"{field}: must be {allowed}, got {got!r}")


def check_one_of(field: str, value, choices) -> None:
  """Raises ConfigError unless value is one of `choices` (named in the message, in order)."""
  check(value in choices, field, f"one of {', '.join(choices)}", value)


def check_int(field: str, value, lo: int, hi: int | None = None, allowed: str | None = None
              ) -> None:
  """Raises ConfigError unless value is an int (not a bool) in lo..hi (hi None: no upper bound).

  The message says ``an integer in lo..hi`` (or ``an integer >= lo``) unless `allowed` is given.
  """
  ok = isinstance(value, int) and not isinstance(value, bool) and value >= lo and (
      hi is None or value <= hi)
  if allowed is None:
    allowed = f"an integer in {lo}..{hi}" if hi is not None else f"an integer >= {lo}"
  check(ok, field, allowed, value)
