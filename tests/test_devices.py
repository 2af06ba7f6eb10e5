"""`fedbif_jax/devices.py`: the CPU split into host devices, decided before JAX starts."""
import os
import subprocess
import sys

import pytest

from conftest import REPO
from fedbif_jax import devices
from fedbif_jax.errors import ConfigError


def test_split_cpu_asks_jax_for_host_devices_unless_xla_flags_force_a_count():
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  code = ("from fedbif_jax import devices; n = devices.split_cpu({}); import jax; "
          "from fedbif_jax import parallel; "
          "print(n, jax.local_device_count(), len(parallel.sequential_devices()))")
  run = lambda arg: subprocess.run([sys.executable, "-c", code.format(arg)], env=env, cwd=REPO,
                                   capture_output=True, text=True, check=True).stdout.split()
  cores = len(os.sched_getaffinity(0))
  assert run(3) == ["3", "3", str(min(3, cores))]
  auto = str(min(cores, devices.MAX_AUTO_CPU_DEVICES))
  assert run(0) == [auto, auto, auto]
  assert devices.split_cpu(2, {"XLA_FLAGS": "--xla_force_host_platform_device_count=4"}) is None
  with pytest.raises(ConfigError, match="cpu_devices"):
    devices.split_cpu(-1)


def test_importing_devices_imports_no_jax():
  code = "import sys; import fedbif_jax.devices; print('jax' in sys.modules)"
  out = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True,
                       check=True).stdout.split()
  assert out == ["False"]
