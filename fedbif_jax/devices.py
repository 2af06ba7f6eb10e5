"""How many host devices this process's CPU is split into, decided before JAX starts its CPU
backend (launch.py, experiments/grid.py and benchmarks call `split_cpu` first).

No JAX at import: importing this module must not start (or fix the options of) a JAX backend.
"""
from __future__ import annotations

import os

from fedbif_jax.errors import check

MAX_AUTO_CPU_DEVICES = 4


def cores() -> int:
  """The CPU cores this process may run on."""
  return max(1, len(os.sched_getaffinity(0)))


def split_cpu(cpu_devices: int, environ=None) -> int | None:
  """Asks JAX for `cpu_devices` host devices (0: one per core, at most MAX_AUTO_CPU_DEVICES), so
  that the sequential backend (`fedbif_jax/parallel.py`) can run that many clients at once. Must
  run before JAX starts its CPU backend. Leaves JAX alone (returns None) when XLA_FLAGS already
  forces a device count. Returns the count asked for. The cap of the automatic choice is a guess
  beyond the 2 cores we measured on (docs/PERFORMANCE.md): each device holds its own copy of the
  training set."""
  environ = os.environ if environ is None else environ
  check(isinstance(cpu_devices, int) and not isinstance(cpu_devices, bool) and cpu_devices >= 0,
        "cpu_devices", "0 (one per core) or an integer >= 1", cpu_devices)
  if "xla_force_host_platform_device_count" in environ.get("XLA_FLAGS", ""):
    return None
  count = cpu_devices or min(cores(), MAX_AUTO_CPU_DEVICES)
  import jax  # pylint: disable=import-outside-toplevel
  jax.config.update("jax_num_cpu_devices", count)
  return count
