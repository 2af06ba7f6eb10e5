"""`fedbif_jax/parallel.py`: the backends registry and the sequential backend's plan. That every
backend gives the same round is tests/test_engine.py's `test_backends_agree` (all of `BACKENDS`)."""
import os

import jax
import pytest

from fedbif_jax import parallel
from fedbif_jax.errors import ConfigError


def test_registry_names_the_backends_and_auto_resolves_per_platform():
  assert set(parallel.BACKENDS) == {"sequential", "vmap", "sharded"}
  assert parallel.backend_names() == ("auto", *parallel.BACKENDS)
  assert parallel.resolve_backend("auto", "cpu") == "sequential"
  assert parallel.resolve_backend("auto", "gpu") == parallel.resolve_backend("auto", "tpu") == "vmap"
  for name in parallel.BACKENDS:
    assert parallel.resolve_backend(name, "gpu") == name


def test_unknown_backend_is_one_line_naming_parallel_and_the_allowed_values():
  with pytest.raises(ConfigError) as error:
    parallel.make_runner("threads", None)
  message = str(error.value)
  assert "\n" not in message and message.startswith("parallel: ")
  assert all(name in message for name in parallel.backend_names()), message
  assert "'threads'" in message


@pytest.mark.parametrize("real_steps,unroll,calls", [
    (10, 4, [4, 4, 1, 1]), (8, 4, [4, 4]), (3, 4, [1, 1, 1]), (0, 4, []), (5, 1, [1] * 5)])
def test_chunk_plan_runs_whole_chunks_then_single_steps(real_steps, unroll, calls):
  assert parallel.chunk_plan(real_steps, unroll) == calls


def test_sequential_spreads_clients_over_at_most_one_cpu_device_per_core():
  cores = len(os.sched_getaffinity(0))
  assert len(parallel.sequential_devices()) == min(jax.local_device_count(), cores)
  assert parallel.sequential_devices(3) == jax.local_devices()[:3]
  with pytest.raises(ConfigError, match="client_devices"):
    parallel.make_runner("sequential", None, 1, client_devices=-1)
