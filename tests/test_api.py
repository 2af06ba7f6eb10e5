"""The Python API (`fedbif_jax.__init__`): progress from Python, the returned and the stored global
model, per-round callbacks, user models and algorithms, and validation before any data loads."""
import json
import logging
import os
import re
import subprocess
import sys

import flax.linen as nn
import jax.numpy as jnp
import numpy as np
import pytest

import fedbif_jax
from conftest import REPO, small_config
from fedbif_jax import algorithms, models
from fedbif_jax import data as data_lib
from fedbif_jax.algorithms import fedavg


def _accuracy_by_hand(config, variables) -> float:
  """Test accuracy of `variables` by model.apply on the normalised test images (not the
  library's evaluator)."""
  dataset = data_lib.load_dataset(config.data.source, name=config.data.name)
  model = models.get_model(config.model.name, dataset.num_classes)
  x = (jnp.asarray(dataset.x_test, jnp.float32) / 255.0 - dataset.mean) / dataset.std
  logits = model.apply(variables, x, train=False)
  return float(np.mean(np.argmax(np.asarray(logits), -1) == dataset.y_test))


@pytest.fixture(scope="module")
def python_run(tmp_path_factory):
  """One 3-round FedBiF run through the public API, with its log records and callback rows."""
  workdir = str(tmp_path_factory.mktemp("api") / "run")
  config = small_config(rounds=3, checkpoint_every=1)
  seen, records = [], []
  collect = logging.Handler()
  collect.emit = lambda record: records.append(record.getMessage())
  logger = logging.getLogger("fedbif_jax")
  logger.addHandler(collect)
  try:
    result = fedbif_jax.train_and_evaluate(config, workdir, callbacks=[seen.append])
  finally:
    logger.removeHandler(collect)
  return config, workdir, result, seen, records


def test_progress_lines_reach_a_caller_that_set_up_no_level(python_run):
  *_, records = python_run
  rounds = [r for r in records if r.startswith("round ")]
  assert [r.split()[1] for r in rounds] == ["1/3", "2/3", "3/3"]
  # The first round includes the compiles: no estimate from it; later ones estimate.
  # (the estimate's value depends on the machine's load: a 0.5 s round reads 0m00s or 0m01s)
  assert rounds[0].endswith("eta -") and re.search(r"eta \d+m\d\ds$", rounds[1])
  assert logging.getLogger("fedbif_jax").level == logging.NOTSET  # restored afterwards


def test_the_returned_model_reproduces_the_final_test_accuracy(python_run):
  config, _, result, _, _ = python_run
  assert set(result.variables) == {"params"}  # the digits CNN has no BatchNorm
  assert _accuracy_by_hand(config, result.variables) == pytest.approx(
      result.summary["final_accuracy"], abs=1e-6)


def test_load_global_reads_the_same_model_from_the_workdir(python_run):
  config, workdir, result, _, _ = python_run
  loaded = fedbif_jax.load_global(workdir)
  assert loaded.round == 3 and loaded.config.algorithm == config.algorithm
  flat_loaded = dict(zip(*map(list, zip(*_flat(loaded.variables)))))
  for path, leaf in _flat(result.variables):
    np.testing.assert_array_equal(flat_loaded[path], leaf)
  assert _accuracy_by_hand(loaded.config, loaded.variables) == pytest.approx(
      result.summary["final_accuracy"], abs=1e-6)
  earlier = fedbif_jax.load_global(workdir, step=2)   # checkpoints keep the last two rounds
  assert earlier.round == 2
  with pytest.raises(fedbif_jax.ConfigError, match="no checkpoint after round 1"):
    fedbif_jax.load_global(workdir, step=1)


def _flat(tree):
  import jax
  return [(jax.tree_util.keystr(p), np.asarray(x))
          for p, x in jax.tree_util.tree_flatten_with_path(tree)[0]]


def test_load_global_without_a_run_is_one_line(tmp_path):
  with pytest.raises(fedbif_jax.ConfigError, match="holds no config.json"):
    fedbif_jax.load_global(str(tmp_path))


def test_load_global_without_checkpoints_creates_nothing(tmp_path):
  with open(tmp_path / "config.json", "w") as f:
    json.dump({"algorithm": "fedavg"}, f)
  with pytest.raises(fedbif_jax.ConfigError, match="has no checkpoints/"):
    fedbif_jax.load_global(str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == ["config.json"]   # a reader leaves the workdir as it was


def test_callbacks_get_every_row_as_written(python_run):
  _, workdir, _, seen, _ = python_run
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    assert [json.loads(line) for line in f] == seen


def test_summary_has_losses_wall_time_environment_and_integer_bytes(python_run):
  _, workdir, result, seen, _ = python_run
  with open(os.path.join(workdir, "summary.json")) as f:
    summary = json.load(f)
  assert summary == result.summary
  assert summary["final_loss"] == seen[-1]["test_loss"]
  assert summary["wall_seconds"] == pytest.approx(sum(r["wall_seconds"] for r in seen))
  for key in ("total_bytes", "total_uplink_bytes", "total_downlink_bytes"):
    assert isinstance(summary[key], int)
  assert summary["total_bytes"] == sum(r["uplink_bits"] + r["downlink_bits"] for r in seen) // 8
  env = summary["environment"]
  assert env["fedbif_jax"] == fedbif_jax.__version__ and env["backend"] == "cpu"
  assert env["devices"] == 4 and env["processes"] == 1  # conftest's forced host devices


class TinyMLP(nn.Module):
  num_classes: int

  @nn.compact
  def __call__(self, x, train=False, mask=None):
    del train, mask
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(16, name="hidden")(x))
    return nn.Dense(self.num_classes, name="logits")(x)


@pytest.fixture
def user_registrations():
  yield
  models.MODELS.pop("tiny_mlp", None)
  algorithms.ALGORITHMS.pop("my_fedavg", None)


def test_user_model_and_algorithm_register_and_train(tmp_path, user_registrations):
  fedbif_jax.register_model("tiny_mlp", TinyMLP)
  fedbif_jax.register_algorithm("my_fedavg", fedavg.make)
  with pytest.raises(ValueError, match="'tiny_mlp': already registered"):
    fedbif_jax.register_model("tiny_mlp", TinyMLP)
  with pytest.raises(ValueError, match="must be registered with a callable"):
    fedbif_jax.register_algorithm("broken", "fedavg")
  config = small_config(rounds=1, algorithm="my_fedavg", model__name="tiny_mlp")
  result = fedbif_jax.train_and_evaluate(config, str(tmp_path))
  assert result.summary["algorithm"] == "my_fedavg"
  assert set(result.variables["params"]) == {"hidden", "logits"}
  assert result.summary["mean_uplink_bpp"] == 32.0


def test_algorithm_fields_are_checked_before_any_data_loads(tmp_path, monkeypatch):
  def no_data(*args, **kwargs):
    raise AssertionError("the data was read before the algorithm's fields were checked")

  monkeypatch.setattr(data_lib, "load_dataset", no_data)
  config = small_config(data__source="tfds", data__name="cifar10", fedbif__active_bits=3)
  with pytest.raises(fedbif_jax.ConfigError, match="fedbif.active_bits"):
    fedbif_jax.train_and_evaluate(config, str(tmp_path))


@pytest.mark.slow  # a fresh Python process: imports and compiles (~15 s)
def test_a_bare_python_process_prints_progress(tmp_path):
  code = ("import fedbif_jax\n"
          "c = fedbif_jax.base_config()\n"
          "c.rounds, c.num_clients, c.local_epochs, c.checkpoint_every = 2, 3, 1, 0\n"
          f"r = fedbif_jax.train_and_evaluate(c, {str(tmp_path / 'run')!r})\n"
          "print('final', r.summary['final_accuracy'])\n")
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  result = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, env=env,
                          capture_output=True, text=True, timeout=600)
  assert result.returncode == 0, result.stderr
  lines = (result.stdout + result.stderr).splitlines()  # a library's log handler may use either
  assert any("round 1/2 " in l for l in lines) and any("round 2/2 " in l for l in lines)
  assert result.stdout.splitlines()[-1].startswith("final ")
