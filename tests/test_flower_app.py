"""The Flower App that ``pyproject.toml`` declares, without starting Flower: what ``flwr run .``
reads (components, run config, the bundle's files), how the run config maps onto launch.py's
``--config.a.b=value`` flags, and the SuperNode's data cache (`fedbif_jax.deploy.cache`): a client
built from it equals one built from the data set's source and trains the same round bit for bit.
The real deployments are in ``test_flower_loopback.py`` and ``test_flower_resume.py``."""
import importlib
import io
import os
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest

pytest.importorskip("flwr")

from conftest import REPO  # noqa: E402

OVERRIDES = ["--config.num_clients=3", "--config.rounds=2", "--config.local_epochs=1"]


def _app():
  from flwr.cli.config_utils import load_and_validate
  config, warnings = load_and_validate(Path(REPO) / "pyproject.toml")
  return config["tool"]["flwr"], warnings


def test_pyproject_declares_the_flower_app():
  from flwr.clientapp import ClientApp
  from flwr.serverapp import ServerApp
  from flwr.supercore import object_ref

  from fedbif_jax.deploy import runconfig
  tool, warnings = _app()  # raises on a missing or invalid field, as `flwr run` does
  assert warnings == ['Recommended property "license" missing in [project]'], warnings
  components = tool["app"]["components"]
  kinds = {"serverapp": ServerApp, "clientapp": ClientApp}
  for name, ref in components.items():
    assert object_ref.validate(ref, check_module=True, project_dir=REPO) == (True, None), ref
    module, _, attribute = ref.partition(":")
    assert isinstance(getattr(importlib.import_module(module), attribute), kinds[name]), ref
  assert components == {"serverapp": "fedbif_jax.deploy.apps:server_app",
                        "clientapp": "fedbif_jax.deploy.apps:client_app"}
  # SuperLink connections live in $FLWR_HOME/config.toml since Flower 1.26: `flwr run` would move
  # a [tool.flwr.federations] table there and comment it out of pyproject.toml.
  assert "federations" not in tool
  # The run config's defaults: the quickstart as its config file has it.
  defaults = tool["app"]["config"]
  assert set(defaults) == {runconfig.CONFIG_KEY, runconfig.OVERRIDES_KEY, runconfig.ROUNDS_KEY,
                           runconfig.EPOCHS_KEY, runconfig.WORKDIR_KEY, runconfig.ROUND_TIMEOUT_KEY,
                           runconfig.NODE_TIMEOUT_KEY}
  assert runconfig.config_of(defaults) == runconfig.load_config("configs/quickstart.py")
  assert runconfig.workdir_of(defaults) == os.path.expanduser("~/fedbif_jax_runs/flower")
  assert [runconfig.seconds_of(defaults, k) for k in (runconfig.ROUND_TIMEOUT_KEY,
                                                  runconfig.NODE_TIMEOUT_KEY)] == [600.0, 120.0]


def test_the_bundle_carries_the_package_and_the_configs():
  from flwr.cli.build import build_fab_from_disk
  fab = build_fab_from_disk(Path(REPO))
  names = zipfile.ZipFile(io.BytesIO(fab)).namelist()
  tracked = subprocess.run(["git", "ls-files", "fedbif_jax/*.py", "configs/*.py"], cwd=REPO,
                           capture_output=True, text=True, check=True).stdout.split()
  assert tracked and not set(tracked) - set(names), sorted(set(tracked) - set(names))
  assert {"pyproject.toml", "experiments/grid.py", "experiments/tuned.json"} <= set(names)
  assert not [n for n in names if n.startswith(("tests/", "experiments/results/", "notebooks/"))]
  assert len(fab) < 2 ** 20, len(fab)


def test_the_run_config_maps_onto_launch_py_flags():
  from flwr.common.config import parse_config_args

  from fedbif_jax.deploy import runconfig
  from fedbif_jax.errors import ConfigError
  # What `flwr run --run-config "..."` hands the apps, with a value that needs quoting.
  run_config = parse_config_args(
      ["config='configs/quickstart.py' overrides=\"num_clients=3 'data.path=/a b.npz' "
       "--config.lr=0.1\" num-server-rounds=2 local-epochs=0"])
  assert runconfig.overrides_of(run_config) == [
      "--config.num_clients=3", "--config.data.path=/a b.npz", "--config.lr=0.1",
      "--config.rounds=2"]
  # The launcher's run config reads back as launch.py's flags.
  flags = OVERRIDES + ["--config.data.path=/a b.npz"]
  run_config = runconfig.launcher_run_config("configs/quickstart.py", flags, "/tmp/w", 60, 10)
  assert runconfig.overrides_of(run_config) == flags
  assert runconfig.config_of(run_config) == runconfig.load_config("configs/quickstart.py", flags)
  assert run_config[runconfig.CONFIG_KEY] == os.path.join("configs", "quickstart.py")
  errors = {
      "overrides: must be space-separated field=value pairs, got 'rounds'": {"overrides": "rounds"},
      "num-server-rounds: rounds is set in overrides too; set it in one place":
          {"overrides": "rounds=3", "num-server-rounds": 2},
      "local-epochs: must be an integer >= 0 (0: the config file's local_epochs), got '2'":
          {"local-epochs": "2"},
      "overrides: No closing quotation": {"overrides": "'lr=0.1"},
  }
  for message, bad in errors.items():
    with pytest.raises(ConfigError) as error:
      runconfig.overrides_of(bad)
    assert str(error.value) == message
  with pytest.raises(ConfigError, match=r"^config: must name a config file"):
    runconfig.config_of({})
  with pytest.raises(ConfigError, match=r"^workdir: must be"):
    runconfig.workdir_of({"workdir": ""})
  with pytest.raises(ConfigError, match=r"^round-timeout: must be a number of seconds > 0"):
    runconfig.seconds_of({"round-timeout": 0}, "round-timeout")


@pytest.mark.slow
def test_a_client_from_the_node_cache_equals_one_from_the_source(tmp_path):
  """Digits with a training subset and a validation hold-out (the cache holds the result of
  both): the cached client's job, and its round 0, are the uncached client's bit for bit; a
  fresh process reads the cache without importing scikit-learn (the digits' source)."""
  import jax

  from fedbif_jax.deploy import cache, roles, runconfig
  flags = OVERRIDES + ["--config.data.train_subset=900", "--config.data.validation=100"]
  config = runconfig.load_config("configs/quickstart.py", flags)
  source = roles.Client(config)
  _, note = cache.client_role(config, str(tmp_path))
  path = cache.data_path(str(tmp_path), config)
  assert note == f"data set cached in {path}" and os.path.isfile(path)
  cached, note = cache.client_role(config, str(tmp_path))
  assert note == f"data set from {path}"
  assert cached.config is config
  a, b = source.job, cached.job
  for field in ("name", "num_classes", "x_train", "y_train", "x_test", "y_test", "mean", "std"):
    assert np.array_equal(getattr(a.dataset, field), getattr(b.dataset, field)), field
  assert len(a.dataset.y_val) == 100 and len(b.dataset.y_val) == 0  # a client never uses it
  assert all(np.array_equal(p, q) for p, q in zip(a.parts, b.parts))
  assert (a.num_weights, a.max_steps) == (b.num_weights, b.max_steps)
  server = roles.Server(config)
  downlink = server.open_round(0).message
  runs = [c.train(0, 1, downlink, c.initial_state(1)) for c in (source, cached)]
  assert np.array_equal(runs[0][0], runs[1][0]) and runs[0][1] == runs[1][1]
  assert all(jax.tree.leaves(jax.tree.map(np.array_equal, runs[0][2], runs[1][2])))
  # Another data config is another file; a fresh process reads this one without the source.
  other = runconfig.load_config("configs/quickstart.py", OVERRIDES)
  assert cache.data_path(str(tmp_path), other) != path
  code = ("import sys\nfrom fedbif_jax.deploy import cache, runconfig\n"
          f"config = runconfig.load_config('configs/quickstart.py', {flags!r})\n"
          f"print(cache.client_role(config, {str(tmp_path)!r})[1], 'sklearn' in sys.modules)\n")
  out = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                       text=True, timeout=300)
  assert out.returncode == 0, out.stderr[-3000:]
  assert out.stdout.split() == ["data", "set", "from", path, "False"], out.stdout

