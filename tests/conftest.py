"""Shared fixtures: small configs on the built-in digits that run in seconds.

The test process sees 4 CPU devices (XLA_FLAGS, set before JAX starts) so that the sharded
backend is tested without a GPU.
"""
import logging
import os

if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") +
                             " --xla_force_host_platform_device_count=4").strip()

# XLA's compiled programs are kept on disk and reused, within a run of the suite (many tests
# compile the same small programs) and across runs: the persistent cache is keyed by the program,
# the jax version and the flags, so a hit is the program a compile would make. Subprocesses
# (launch.py, the Flower tests) inherit it. FEDBIF_TEST_JAX_CACHE=off turns it off,
# FEDBIF_TEST_JAX_CACHE=DIR moves it (it is not size-limited: a size limit needs `filelock`; the
# suite's programs take tens of MB, delete the folder to reclaim them).
_CACHE = os.environ.get("FEDBIF_TEST_JAX_CACHE",
                        os.path.join(os.path.expanduser("~"), ".cache", "fedbif_jax", "jax-tests"))
if _CACHE != "off" and "JAX_COMPILATION_CACHE_DIR" not in os.environ:
  os.environ["JAX_COMPILATION_CACHE_DIR"] = _CACHE
  os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  import jax  # a plugin may have imported jax before this file: set the options, not only env
  jax.config.update("jax_compilation_cache_dir", _CACHE)
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

from fedbif_jax.config import base_config, set_fields


def small_config(**overrides):
  """FedBiF on digits with 4 clients and 2 short rounds, on one device; dotted keys (``__``)
  override fields."""
  c = base_config()
  c.rounds = 2
  c.num_clients = 4
  c.local_epochs = 1
  c.batch_size = 64
  c.lr = 0.05
  c.checkpoint_every = 0
  # One device: each device compiles its own copy of the step programs, which would dominate
  # these seconds-long runs; the tests of the multi-device spread ask for it.
  c.client_devices = 1
  set_fields(c, overrides, sep="__")
  c.lock()
  return c


def without_wall_clock(summary: dict) -> dict:
  """`summary` without ``wall_seconds``, the one field in which two runs of a config (straight,
  or killed and resumed) may differ."""
  return {k: v for k, v in summary.items() if k != "wall_seconds"}


@pytest.fixture
def make_config():
  return small_config


SHARED_DATA = os.environ.get("FEDBIF_DATA_DIR", os.path.join(REPO, "..", "shared", "data"))


@pytest.fixture
def serverapp():
  """What flwr-serverapp sets up before a ServerApp runs (Message() reads the task identity), and
  the `fedbif_jax` log records; both restored afterwards."""
  from flwr.supercore.task_identity import TaskIdentity
  identity = (TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id)
  TaskIdentity.run_id, TaskIdentity.node_id, TaskIdentity.task_id = 1, 0, 1
  logger = logging.getLogger("fedbif_jax")
  saved = (list(logger.handlers), logger.level, logger.propagate)
  records = []
  collect = logging.Handler()
  collect.emit = lambda record: records.append(record.getMessage())
  logger.addHandler(collect)
  logger.setLevel(logging.INFO)
  try:
    yield records
  finally:
    logger.handlers[:] = saved[0]
    logger.setLevel(saved[1])
    logger.propagate = saved[2]
    TaskIdentity._run_id, TaskIdentity._node_id, TaskIdentity._task_id = identity
