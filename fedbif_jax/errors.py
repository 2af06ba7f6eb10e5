"""Errors the library raises for bad user input.

`ConfigError` is a `ValueError` whose message is one line that names the offending
field and what is allowed, e.g. ``fedbif.bits: must be an integer in 1..8, got 9``.
`launch.py` prints such errors without a traceback and exits with status 2.
"""
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
