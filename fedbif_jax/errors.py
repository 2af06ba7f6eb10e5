"""Errors the library raises for bad user input.

`ConfigError` is a `ValueError` whose message is one line that names the offending
field and what is allowed, e.g. ``fedbif.bits: must be an integer in 1..8, got 9``.
`launch.py` prints such errors without a traceback and exits with status 2.
"""


class ConfigError(ValueError):
  """Bad user input: the message names the field and the allowed values."""


def check(condition: bool, field: str, allowed: str, got) -> None:
  """Raises `ConfigError('<field>: must be <allowed>, got <got!r>')` unless condition."""
  if not condition:
    raise ConfigError(f"{field}: must be {allowed}, got {got!r}")
