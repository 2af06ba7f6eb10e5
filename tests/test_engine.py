"""The federated engine: local training with masks, parallel backends, client state, the round loop.

Covers `fedbif_jax/client.py`, `parallel.py`, `algorithms/fedavg.py`, `algorithms/fedbif.py`
(as algorithms) and `train.py` on the built-in digits.
"""
import contextlib
import gc
import json
import os

import chex
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import small_config, without_wall_clock
from fedbif_jax import data as data_lib
from fedbif_jax import lipschitz
from fedbif_jax import metrics as metrics_lib
from fedbif_jax import parallel
from fedbif_jax import rounds
from fedbif_jax.algorithms import get_algorithm
from fedbif_jax.algorithms.base import RoundInfo
from fedbif_jax.client import Batches, TrainData, make_local_training
from fedbif_jax.errors import ConfigError
from fedbif_jax.models import get_model
from fedbif_jax.rounds import TrainingDiverged, build_job
from fedbif_jax.train import train_and_evaluate


@pytest.fixture(scope="module")
def digits():
  return data_lib.load_dataset("builtin", name="digits")


class AvgPoolCNN(nn.Module):
  """The small CNN with average instead of max pooling, for exact backend comparisons.

  Max-pool gradients go to the window's argmax; a 1-ulp difference between two programs (vmap
  batches the convolutions differently) can flip a near-tie and route a gradient elsewhere, a
  legitimate subgradient choice that then grows over steps. Average pooling has no such ties.
  """

  @nn.compact
  def __call__(self, x, train=False, mask=None):
    for features in (8, 16):
      x = nn.avg_pool(nn.relu(nn.Conv(features, (3, 3))(x)), (2, 2), strides=(2, 2))
    return nn.Dense(10)(x.reshape((x.shape[0], -1)))


def _info(num_clients):
  return RoundInfo(jnp.full((num_clients,), 1.0 / num_clients), jnp.full((num_clients,), 100.0))


def _setup(digits, algorithm="fedbif", model=None, **kw):
  config = small_config(algorithm=algorithm, **kw)
  model = model or get_model("cnn", 10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 1)))
  algo = get_algorithm(config)
  local = make_local_training(algo, model, optax.sgd(config.lr), digits.mean, digits.std)
  server = algo.init(jax.random.key(1), variables)
  data = TrainData(jnp.asarray(digits.x_train), jnp.asarray(digits.y_train))
  return config, algo, local, server, variables, data


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedavg", "fedbif"])
def test_fully_masked_step_changes_nothing(digits, algorithm):
  _, algo, local, server, variables, data = _setup(digits, algorithm)
  downlink = algo.broadcast(server, jax.random.key(2), _info(3))
  client_state = algo.init_client(jax.random.key(3), variables)
  carry = local.start(downlink, client_state, jax.random.key(4))
  batches = Batches(jnp.arange(64, dtype=jnp.int32).reshape(2, 32), jnp.zeros((2, 32)))
  after = local.steps(downlink, carry, data, batches, jax.random.key(5), num_steps=2)
  chex.assert_trees_all_equal(after._replace(step=carry.step), carry)
  assert int(after.step) == 2


@pytest.mark.slow
def test_padded_examples_do_not_count(digits):
  """A batch [a, b, c, d] with mask [1, 1, 0, 0] steps exactly like [a, b, a, b] unmasked."""
  _, algo, local, server, variables, data = _setup(digits, "fedbif")
  downlink = algo.broadcast(server, jax.random.key(2), _info(3))
  carry = local.start(downlink, algo.init_client(jax.random.key(3), variables), jax.random.key(4))
  masked = Batches(jnp.array([[0, 1, 2, 3]], jnp.int32), jnp.array([[1.0, 1.0, 0.0, 0.0]]))
  doubled = Batches(jnp.array([[0, 1, 0, 1]], jnp.int32), jnp.ones((1, 4)))
  a = local.steps(downlink, carry, data, masked, jax.random.key(5), num_steps=1)
  b = local.steps(downlink, carry, data, doubled, jax.random.key(5), num_steps=1)
  chex.assert_trees_all_close(a.local, b.local, atol=1e-6)
  assert float(a.count) == 2.0 and float(b.count) == 4.0
  np.testing.assert_allclose(2 * float(a.loss_sum), float(b.loss_sum), rtol=1e-5)
  changed = jax.tree.map(lambda x, y: bool(jnp.any(x != y)), a.local.trainable, carry.local.trainable)
  assert any(jax.tree.leaves(changed)), "a real step must change the trainable leaves"


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedavg", "fedbif"])
def test_backends_agree(digits, algorithm):
  """sequential (1 device; 4 devices; unroll 3 over 2 devices, which runs whole chunks and
  single remainder steps), vmap and sharded give the same uplinks and states (1e-5); the same
  sequential program on 1 or 4 devices gives identical bits.

  Two kinds of exact ties make backends legitimately pick different subgradients, after which
  trajectories drift apart: max-pool near-ties, and ReLU at exactly 0 where FedBiF's integer
  kernels cancel on the digits' constant background (float summation order then decides the
  sign). The comparison therefore uses random pixels and average pooling.
  """
  rng = np.random.default_rng(0)
  noisy = digits._replace(x_train=rng.integers(0, 256, digits.x_train.shape, dtype=np.uint8))
  config, algo, local, server, variables, data = _setup(noisy, algorithm, model=AvgPoolCNN())
  parts = data_lib.partition("dirichlet", digits.y_train, 3, np.random.default_rng(0), mu=0.5)
  idx, mask = data_lib.round_batches(parts, 64, 2, np.random.default_rng(1))
  assert len({int(m.sum()) for m in mask}) > 1, "clients of unequal size exercise the padding"
  downlink = jax.jit(algo.broadcast)(server, jax.random.key(2), _info(3))
  states = jax.tree.map(lambda *x: np.stack(x), *[
      jax.device_get(algo.init_client(jax.random.key(10 + c), variables)) for c in range(3)])
  keys = jax.random.split(jax.random.key(3), 3)
  results = {}
  assert jax.device_count() == 4, "conftest forces 4 host devices; 3 clients pad to 4"
  assert {int(m.sum(axis=-1).astype(bool).sum()) % 3 for m in mask} != {0}, "a remainder step"
  cases = [("sequential", 1, 1), ("sequential", 1, 4), ("sequential", 3, 2), ("vmap", 1, 0),
           ("sharded", 1, 0)]
  assert {name for name, _, _ in cases} == set(parallel.BACKENDS), "every registered backend"
  for name, unroll, devices in cases:
    runner = parallel.make_runner(name, local, unroll, devices)
    results[(name, unroll, devices)] = runner.run(downlink, states, idx, mask, keys,
                                                  runner.place(data))
  reference = results[("sequential", 1, 1)]
  chex.assert_trees_all_equal(results[("sequential", 1, 4)], reference)
  for other in results.values():
    chex.assert_trees_all_close(other[0], reference[0], atol=1e-5)
    chex.assert_trees_all_close(other[1], reference[1], atol=1e-5)
    chex.assert_trees_all_close(other[2], reference[2], rtol=1e-5)
  weights = jnp.full((3,), 1 / 3)
  new_server = jax.jit(algo.aggregate)(server, downlink, reference[0], weights, reference[2])
  changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)), new_server["params"], server["params"])
  assert all(jax.tree.leaves(changed))


def test_fedavg_aggregates_weighted_mean(digits):
  _, algo, _, server, _, _ = _setup(digits, "fedavg")
  downlink = algo.broadcast(server, jax.random.key(0), _info(3))
  ups = [jax.tree.map(lambda x, k=k: x + k, downlink) for k in (1.0, 2.0, 4.0)]
  stacked = jax.tree.map(lambda *x: jnp.stack(x), *ups)
  new = algo.aggregate(server, downlink, stacked, jnp.array([0.5, 0.25, 0.25]), None)
  expected = jax.tree.map(lambda x: x + 2.0, server["params"])  # 0.5*1 + 0.25*2 + 0.25*4
  chex.assert_trees_all_close(new["params"], expected, atol=1e-6)


def test_run_writes_metrics_summary_and_bits(tmp_path):
  summary = train_and_evaluate(small_config(), str(tmp_path)).summary
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert [r["round"] for r in rows] == [0, 1]
  for key in ("test_accuracy", "test_loss", "train_loss", "uplink_bits", "downlink_bits",
              "cumulative_bytes", "sparsity", "wall_seconds"):
    assert key in rows[0]
  assert rows[0]["uplink_bpp"] == 1.0 and rows[0]["downlink_bpp"] == 4.0
  assert rows[1]["cumulative_bytes"] == 2 * rows[0]["cumulative_bytes"]
  assert 0.0 < rows[0]["sparsity"] < 1.0
  assert summary["mean_uplink_bpp"] == 1.0 and summary["mean_downlink_bpp"] == 4.0
  assert json.load(open(tmp_path / "summary.json")) == summary
  assert os.path.getsize(tmp_path / "curves.png") > 1000
  assert json.load(open(tmp_path / "config.json"))["fedbif"]["bits"] == 4


@pytest.mark.slow
def test_fedavg_run_is_32_bits_both_ways(tmp_path):
  summary = train_and_evaluate(small_config(algorithm="fedavg", rounds=1),
                               str(tmp_path)).summary
  assert summary["mean_uplink_bpp"] == 32.0 and summary["mean_downlink_bpp"] == 32.0


@pytest.mark.slow
def test_fedbif_bpp_follows_bits_and_active_bits(tmp_path):
  summary = train_and_evaluate(small_config(rounds=1, fedbif__bits=8, fedbif__active_bits=2),
                               str(tmp_path)).summary
  assert summary["mean_uplink_bpp"] == 2.0 and summary["mean_downlink_bpp"] == 8.0


@pytest.mark.slow
def test_client_state_persists_only_for_selected_clients(tmp_path, monkeypatch):
  """With 2 of 5 clients per round, a client's virtual bits change only in rounds it trains."""
  from fedbif_jax import train as train_lib
  snapshots = []
  original = train_lib._Store.scatter

  def spy(self, ids, stacked):
    before = {c: jax.tree.map(np.copy, s) for c, s in self.states.items()}
    original(self, ids, stacked)
    snapshots.append((set(int(i) for i in ids), before,
                      {c: jax.tree.map(np.copy, s) for c, s in self.states.items()}))

  monkeypatch.setattr(train_lib._Store, "scatter", spy)
  train_and_evaluate(small_config(rounds=3, num_clients=5, clients_per_round=2), str(tmp_path))
  assert all(len(sel) == 2 for sel, _, _ in snapshots)
  assert len(set().union(*[sel for sel, _, _ in snapshots])) > 2, "sampling must vary by round"
  for selected, before, after in snapshots:
    for c in before:
      same = all(jax.tree.leaves(jax.tree.map(np.array_equal, before[c], after[c])))
      assert same == (c not in selected), (c, selected)


@pytest.mark.slow
def test_tfds_source_runs_through_the_engine(tmp_path):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=40):
    summary = train_and_evaluate(
        small_config(rounds=1, num_clients=2, data__source="tfds", data__name="mnist",
                     data__min_size=1), str(tmp_path)).summary
    test_set = data_lib.load_dataset("tfds", name="mnist")
  # The mock images are random, so the accuracy is a whole number of the 40 mock test images
  # (the evaluator's 1000-slot batch holds 960 padded slots that must not count) and the loss
  # a finite mean over them.
  assert len(test_set.y_test) == 40 and len(test_set.x_train) == 40
  correct = summary["final_accuracy"] * 40
  assert abs(correct - round(correct)) < 1e-9, summary["final_accuracy"]
  row = json.loads(open(tmp_path / "metrics.jsonl").readline())
  assert summary["mean_uplink_bpp"] == 1.0 and 0.0 < row["test_loss"] < 100.0
  assert row["train_loss"] > 0.0


@pytest.mark.parametrize("overrides, field", [
    (dict(algorithm="fedsgd"), "algorithm"),
    (dict(model__name="resnet9000"), "model.name"),
    (dict(data__name="imagenet"), "data.name"),
    (dict(data__source="ftp"), "data.source"),
    (dict(data__partition="pathological"), "data.partition"),
    (dict(data__mu=0.0), "data.mu"),
    (dict(fedbif__bits=9), "fedbif.bits"),
    (dict(fedbif__active_bits=0), "fedbif.active_bits"),
    (dict(fedbif__active_bits=3), "fedbif.active_bits"),
    (dict(num_clients=5000), "data.num_clients"),
    (dict(data__source="npz", data__path="/nonexistent/cifar10.npz"), "data.path"),
    (dict(clients_per_round=7), "clients_per_round"),
    (dict(lr=-1.0), "lr"),
    (dict(aggregation_weights="median"), "aggregation_weights"),
    (dict(parallel="threads"), "parallel"),
])
def test_bad_config_names_the_field(tmp_path, overrides, field):
  with pytest.raises(ConfigError) as info:
    train_and_evaluate(small_config(**overrides), str(tmp_path))
  message = str(info.value)
  assert message.startswith(field + ":"), message
  assert "\n" not in message


@pytest.mark.slow
def test_a_full_disk_at_a_checkpoint_is_one_line_and_the_previous_checkpoint_resumes(
    tmp_path, monkeypatch):
  import errno

  import orbax.checkpoint as ocp
  real_save = ocp.CheckpointManager.save

  def save(self, step, *args, **kwargs):  # the disk fills up when round 3's checkpoint is written
    if step == 3:
      raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))
    return real_save(self, step, *args, **kwargs)

  monkeypatch.setattr(ocp.CheckpointManager, "save", save)
  config = small_config(algorithm="fedavg", rounds=4, checkpoint_every=1)
  workdir = tmp_path / "run"
  with pytest.raises(ConfigError) as info:
    train_and_evaluate(config, str(workdir))
  message = str(info.value)
  assert "\n" not in message
  assert message.startswith(f"workdir: writing the round-3 checkpoint in '{workdir}' failed "
                            "(No space left on device); the round-2 checkpoint in ")
  assert message.endswith("is intact; free space and rerun the same command to resume from it")
  assert not (workdir / "summary.json").exists()
  # Space freed: the same command resumes from round 2 and ends where a straight run ends.
  monkeypatch.undo()
  resumed = train_and_evaluate(config, str(workdir)).summary
  straight = train_and_evaluate(config, str(tmp_path / "straight")).summary
  assert without_wall_clock(resumed) == without_wall_clock(straight)
  rows = [json.loads(l) for l in (workdir / "metrics.jsonl").read_text().splitlines()]
  assert [r["round"] for r in rows] == [0, 1, 2, 3]


def test_a_workdir_that_cannot_take_files_is_one_line_before_any_work(tmp_path):
  from fedbif_jax.train import check_writable
  # Root may write anywhere, so a read-only directory cannot be made here; a directory squatting
  # on the probe's name fails the same open() call (IsADirectoryError, an OSError).
  (tmp_path / f".write_probe_{os.getpid()}").mkdir()
  with pytest.raises(ConfigError, match=r"^workdir: must be writable, cannot create a file in "
                     r".* \(Is a directory\)$"):
    check_writable(str(tmp_path))
  with pytest.raises(ConfigError, match="workdir: must be writable"):
    train_and_evaluate(small_config(), str(tmp_path))
  assert sorted(os.listdir(tmp_path)) == [f".write_probe_{os.getpid()}"]  # nothing written
  (tmp_path / "fine").mkdir()
  check_writable(str(tmp_path / "fine"))  # a writable one passes and leaves nothing behind
  assert os.listdir(tmp_path / "fine") == []


@pytest.mark.slow
def test_nan_loss_stops_and_keeps_last_checkpoint(tmp_path, monkeypatch):
  real = metrics_lib.make_evaluator
  calls = []

  def flaky(*args, **kwargs):  # the third evaluation (round 2) sees a NaN loss
    evaluate = real(*args, **kwargs)

    def wrapped(state):
      calls.append(1)
      acc, loss = evaluate(state)
      return (acc, float("nan")) if len(calls) == 3 else (acc, loss)
    return wrapped

  monkeypatch.setattr(metrics_lib, "make_evaluator", flaky)
  config = small_config(algorithm="fedavg", rounds=4, checkpoint_every=1)
  with pytest.raises(TrainingDiverged, match=r"round 2: non-finite loss \(train [0-9.]+, test "
                     r"nan\); stopped, the last checkpoint \(round 2\)"):
    train_and_evaluate(config, str(tmp_path))
  assert sorted(os.listdir(tmp_path / "checkpoints")) == ["1", "2"]
  # The kept checkpoint resumes the same run: rounds 2-3 are trained from it.
  monkeypatch.undo()
  summary = train_and_evaluate(config, str(tmp_path)).summary
  assert summary["rounds"] == 4
  # A run that diverges before its first checkpoint says so.
  with pytest.raises(TrainingDiverged, match="stopped before any checkpoint was written"):
    train_and_evaluate(small_config(algorithm="fedavg", lr=1e30, checkpoint_every=1),
                       str(tmp_path / "fresh"))


@pytest.mark.slow
@pytest.mark.parametrize("backend,unroll", [("sequential", 3), ("vmap", 1), ("sharded", 1)])
def test_no_retracing_after_the_first_round(tmp_path, monkeypatch, backend, unroll):
  """Tracing runs the algorithm's Python functions; later rounds must reuse the compiled code,
  even with partial participation over clients of unequal size (with unroll 3, step counts
  with and without a remainder: the sequential backend's two step programs, on every device)."""
  calls = {"traces": 0}

  def counting(config, predicate=None):
    algo = get_algorithm(config) if predicate is None else get_algorithm(config, predicate)

    def counted(fn):
      def wrapper(*args):
        calls["traces"] += 1
        return fn(*args)
      return wrapper

    return algo._replace(model_params=counted(algo.model_params),
                         broadcast=counted(algo.broadcast), aggregate=counted(algo.aggregate))

  monkeypatch.setattr(rounds, "get_algorithm", counting)
  overrides = dict(num_clients=6, clients_per_round=3, data__partition="dirichlet",
                   parallel=backend, unroll=unroll, client_devices=3)
  train_and_evaluate(small_config(rounds=1, **overrides), str(tmp_path / "one"))
  after_one_round = calls["traces"]
  calls["traces"] = 0
  # Traces are shared by devices, compiled programs are not: also count XLA compilations from
  # the start of the second round on.
  compiles_at_round_start = []
  original_plan_round = rounds.plan_round

  def spying_plan_round(*args):
    compiles_at_round_start.append(_COMPILES["n"])
    return original_plan_round(*args)

  monkeypatch.setattr(rounds, "plan_round", spying_plan_round)
  with _counting_compiles() as compiles:
    train_and_evaluate(small_config(rounds=4, **overrides), str(tmp_path / "four"))
  assert after_one_round > 0 and calls["traces"] == after_one_round
  assert len(compiles_at_round_start) == 4 and compiles["n"] == compiles_at_round_start[1], (
      f"compilations at the start of rounds 0-3 and at the end: {compiles_at_round_start}, "
      f"{compiles['n']}")


_COMPILES = {"on": False, "n": 0}


@contextlib.contextmanager
def _counting_compiles():
  """Counts XLA backend compilations (jax.monitoring) inside the block."""
  if "listener" not in _COMPILES:
    def listener(event, duration, **kwargs):
      if _COMPILES["on"] and event == "/jax/core/compile/backend_compile_duration":
        _COMPILES["n"] += 1
    jax.monitoring.register_event_duration_secs_listener(listener)
    _COMPILES["listener"] = listener
  _COMPILES.update(on=True, n=0)
  try:
    yield _COMPILES
  finally:
    _COMPILES["on"] = False


@pytest.mark.slow
def test_sharded_backend_runs_the_engine(tmp_path):
  summary = train_and_evaluate(small_config(parallel="sharded", num_clients=3),
                               str(tmp_path)).summary
  assert summary["mean_uplink_bpp"] == 1.0 and summary["rounds"] == 2


@pytest.mark.slow
def test_many_clients_keep_state_on_host_and_device_memory_flat(tmp_path, monkeypatch):
  """1000 clients, 10 per round: client states live on the host; what the device holds after a
  round does not grow with the number of clients."""
  from fedbif_jax import train as train_lib
  device_bytes = {}
  original = train_lib._Store.scatter

  def record(self, ids, stacked):
    original(self, ids, stacked)
    assert all(isinstance(x, np.ndarray) for x in jax.tree.leaves(stacked))
    gc.collect()  # what is held, not unreachable cycles an earlier run left for the collector
    device_bytes[len(self.states)] = sum(x.nbytes for x in jax.live_arrays())

  monkeypatch.setattr(train_lib._Store, "scatter", record)
  train_and_evaluate(small_config(rounds=2, num_clients=20, clients_per_round=10,
                                  data__min_size=1), str(tmp_path / "few"))
  few = max(device_bytes.values())
  device_bytes.clear()
  summary = train_and_evaluate(small_config(rounds=2, num_clients=1000, clients_per_round=10,
                                            data__min_size=1, checkpoint_every=2),
                               str(tmp_path / "many")).summary
  many = max(device_bytes.values())
  assert summary["rounds"] == 2 and max(device_bytes) == 20  # 20 distinct clients seen
  assert many < 1.1 * few, (few, many)


@pytest.mark.slow
def test_lipschitz_and_histograms_every_k_rounds(tmp_path):
  train_and_evaluate(small_config(rounds=3, lipschitz_every=2), str(tmp_path))
  rows = [json.loads(l) for l in open(tmp_path / "metrics.jsonl")]
  assert ["lipschitz" in r for r in rows] == [True, False, True]  # rounds 0, 2 (the last)
  assert all(r["lipschitz"] > 0 for r in rows if "lipschitz" in r)
  # The untrained model's bound, once, in round 0's row: AutoLip of the initial variables.
  assert ["lipschitz_untrained" in r for r in rows] == [True, False, False]
  job = build_job(small_config(rounds=3, lipschitz_every=2))
  expected, _ = lipschitz.lipschitz_upper_bound(job.model, job.variables,
                                                job.dataset.x_train.shape[1:], jax.random.key(5),
                                                iterations=300)
  assert rows[0]["lipschitz_untrained"] == pytest.approx(expected, rel=0.02)
  histograms = [json.loads(l) for l in open(tmp_path / "histograms.jsonl")]
  assert [h["round"] for h in histograms] == [0, 2]
  assert histograms[0]["layer"] == "Dense_1" and len(histograms[0]["counts"]) == 41
