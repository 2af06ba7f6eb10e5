"""Oracles for the engine's end-to-end numbers: values computed by hand or by independent numpy
code in this file, never by the code under test.

* the evaluator on a hand-made test set whose last batch is padded, and `sparsity` on hand-made
  payloads;
* FedAvg with ``aggregation_weights=data_size`` through the whole engine, on a linear softmax
  model whose full-batch gradient steps are recomputed here in numpy;
* training works at all: FedAvg and FedBiF on the built-in digits end well above chance (10%)
  and their losses fall;
* FedBiF through the engine, round by round, against Eq. 6 written out in numpy (data-size
  weights over clients of unequal size), the ``sparsity`` of each broadcast, and virtual bits
  inheritance (the stored virtual bits keep their magnitudes and take the broadcast's signs);
* the paper's ablations through the engine: sign-magnitude encoding (symmetric integers, the
  server averages the recovered sign-magnitude integers), the fixed selector (always the third
  bit), no VBI (fresh Kaiming magnitudes every round) and the random selector (non-sequential
  masks of exactly s bits, Eq. 6 with them);
* slow: the sharded backend against the sequential one over several rounds with two clients per
  device, and resume after a kill (a torn last line of metrics.jsonl) for every algorithm with
  partial participation.

The engine is observed through spies on `rounds.plan_round` (the round's clients), `rounds.traffic`
(the payloads, exactly as they were counted), the test evaluator (the aggregated server state)
and `train._Store.scatter` (the clients' stored states).
"""
import contextlib
import json
import os
import shutil
from typing import Any

import chex
import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import orbax.checkpoint as ocp
import pytest

from conftest import small_config, without_wall_clock
from fedbif_jax import data as data_lib
from fedbif_jax import metrics as metrics_lib
from fedbif_jax import rounds
from fedbif_jax import train as train_lib
from fedbif_jax.train import train_and_evaluate
from fedbif_jax.pytrees import Bits


# ----------------------------------------------------------------------------- recording


class Recording:
  """What one `train_and_evaluate` call did, round by round."""

  def __init__(self):
    self.job = None          # the run's Job (data, partition sizes, model)
    self.plans = []          # RoundPlan per round
    self.downlinks = []      # host copies of each round's downlink
    self.uplinks = []        # host copies of each round's stacked uplinks
    self.servers = []        # host copies of the server state after each round's aggregation
    self.stores = []         # per round: {client id: its stored state after the round}
    self.rows = []           # metrics.jsonl

  def read_rows(self, workdir):
    with open(os.path.join(workdir, "metrics.jsonl")) as f:
      self.rows = [json.loads(line) for line in f]


@contextlib.contextmanager
def recording():
  rec = Recording()
  build_job, plan_round, traffic = rounds.build_job, rounds.plan_round, rounds.traffic
  make_evaluator, scatter = metrics_lib.make_evaluator, train_lib._Store.scatter

  def build_job_spy(config):
    rec.job = build_job(config)
    return rec.job

  def plan_round_spy(config, job, t):
    rec.plans.append(plan_round(config, job, t))
    return rec.plans[-1]

  def traffic_spy(downlink, uplinks, num_weights, *codec):
    rec.downlinks.append(jax.device_get(downlink))
    rec.uplinks.append(jax.device_get(uplinks))
    return traffic(downlink, uplinks, num_weights, *codec)

  def make_evaluator_spy(model, eval_variables, dataset, batch_size, split="test"):
    evaluate = make_evaluator(model, eval_variables, dataset, batch_size, split)

    def spy(server_state):
      if split == "test":
        rec.servers.append(jax.device_get(server_state))
      return evaluate(server_state)
    return spy

  def scatter_spy(self, ids, stacked):
    scatter(self, ids, stacked)
    rec.stores.append({int(c): jax.tree.map(np.array, self.states[int(c)]) for c in ids})

  with pytest.MonkeyPatch.context() as mp:
    mp.setattr(rounds, "build_job", build_job_spy)
    mp.setattr(rounds, "plan_round", plan_round_spy)
    mp.setattr(rounds, "traffic", traffic_spy)
    mp.setattr(metrics_lib, "make_evaluator", make_evaluator_spy)
    mp.setattr(train_lib._Store, "scatter", scatter_spy)
    yield rec


def recorded_run(config, workdir, model=None) -> Recording:
  """Runs `config` in `workdir` under the spies; `model` (a Flax module) replaces the config's
  model."""
  with recording() as rec, pytest.MonkeyPatch.context() as mp:
    if model is not None:
      mp.setattr(rounds, "get_model", lambda name, num_classes: model)
    train_and_evaluate(config, str(workdir))
  rec.read_rows(str(workdir))
  assert len(rec.servers) == len(rec.downlinks) == len(rec.rows) == config.rounds
  return rec


def _flat(tree) -> dict:
  return traverse_util.flatten_dict(tree)


def _data_weights(rec, t) -> np.ndarray:
  """p_k = n_k / sum of the round's n_k, from the partition's sizes (float64)."""
  n = np.asarray(rec.job.sizes, np.float64)[rec.plans[t].ids]
  return n / n.sum()


# ----------------------------------------------------------------------------- numpy FedBiF


def np_bits(q: np.ndarray, m: int, encoding: str) -> np.ndarray:
  """The m bits (LSB first, [m, ...]) of integers q. offset (Eq. 4): q + 2^(m-1) in binary;
  sign_magnitude: |q| in bits 0..m-2 and the sign (1 = negative) in bit m-1."""
  q = np.asarray(q, np.int64)
  if encoding == "offset":
    u = q + 2 ** (m - 1)
    return np.stack([(u >> j) & 1 for j in range(m)]).astype(np.int64)
  a = np.abs(q)
  return np.stack([(a >> j) & 1 for j in range(m - 1)] + [(q < 0).astype(np.int64)])


def np_ints(bits: np.ndarray, m: int, encoding: str) -> np.ndarray:
  """Inverse of `np_bits` over the bit axis (axis 1 of [C, m, ...])."""
  pow2 = (2 ** np.arange(m)).reshape((1, m) + (1,) * (bits.ndim - 2))
  if encoding == "offset":
    return np.sum(pow2 * bits, axis=1) - 2 ** (m - 1)
  magnitude = np.sum(pow2[:, :m - 1] * bits[:, :m - 1], axis=1)
  return (1 - 2 * bits[:, m - 1]) * magnitude


def np_eq6(q, alpha, active, uploads, p, m) -> np.ndarray:
  """Eq. 6 as printed, in float64: alpha * (sum_k p_k sum_{i in S} 2^i b_{i,k}
  + sum_{j not in S} 2^j b_j - 2^(m-1)), b_j the bits of the broadcast integers q."""
  frozen = np_bits(q, m, "offset")
  idx = np.flatnonzero(active)                       # ascending: the uploads' row order
  uploads = np.asarray(uploads, np.float64)          # [C, s, ...]
  active_part = sum(2.0 ** i * np.tensordot(p, uploads[:, r], axes=1) for r, i in enumerate(idx))
  frozen_part = sum(2.0 ** j * frozen[j] for j in range(m) if j not in idx)
  return float(alpha) * (active_part + frozen_part - 2.0 ** (m - 1))


def np_recovered_mean(q, alpha, active, uploads, p, m, encoding) -> np.ndarray:
  """Fig. 1 steps 5-6: every client's bits (its uploads where active, the broadcast's bits
  elsewhere), its integers, then the p-weighted mean times alpha."""
  frozen = np_bits(q, m, encoding)
  full = np.repeat(frozen[None], len(p), axis=0)
  full[:, np.flatnonzero(active)] = np.asarray(uploads, np.int64)
  return float(alpha) * np.tensordot(p, np_ints(full, m, encoding).astype(np.float64), axes=1)


def check_fedbif_rounds(rec, m, encoding="offset", weights="data_size"):
  """Every round's aggregated server model against the numpy oracle of this file."""
  for t in range(len(rec.servers)):
    down, up, server = rec.downlinks[t], rec.uplinks[t], rec.servers[t]
    num = len(rec.plans[t].ids)
    p = _data_weights(rec, t) if weights == "data_size" else np.full(num, 1.0 / num)
    ints, alphas = _flat(down["weights"]), _flat(down["alpha"])
    ups, params = _flat(up["weights"]), _flat(server["params"])
    assert set(ints) == set(ups) and ints
    for path, q in ints.items():
      args = (q.values, alphas[path], down["active"], ups[path].values, p, m)
      expected = (np_eq6(*args) if encoding == "offset" else np_recovered_mean(*args, encoding))
      np.testing.assert_allclose(params[path], expected, rtol=1e-6, atol=1e-5 * float(alphas[path]),
                                 err_msg=f"round {t} {path}")
    for path, stacked in _flat(up["other"]).items():   # biases: FedAvg's weighted mean
      np.testing.assert_allclose(params[path], np.tensordot(p, stacked, axes=1), rtol=1e-5,
                                 atol=1e-6, err_msg=f"round {t} {path}")


# ----------------------------------------------------------------------------- evaluator


class _Affine(nn.Module):
  """logits = flatten(x) @ kernel + bias (a Dense layer the tests set by hand)."""
  num_classes: int = 2

  @nn.compact
  def __call__(self, x, train=False, mask=None):
    return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def _toy_dataset():
  """Five 1x1x2 images with pixels 0 or 255, so that x / 255 is 0 or 1 (mean 0, std 1)."""
  x = np.array([[255, 0], [0, 255], [0, 0], [255, 255], [255, 0]], np.uint8).reshape(5, 1, 1, 2)
  y = np.array([0, 0, 1, 1, 1], np.int32)
  return data_lib.Dataset("toy", x, y, x, y, 2, np.zeros(2, np.float32), np.ones(2, np.float32),
                          x, y)


# logits = x @ diag(2, 1) + (0, 0.5):
#   e0 x=(1,0): (2, 0.5)  label 0 right, CE = log(1 + e^-1.5) = 0.2014133
#   e1 x=(0,1): (0, 1.5)  label 0 wrong, CE = log(1 + e^1.5)  = 1.7014133
#   e2 x=(0,0): (0, 0.5)  label 1 right, CE = log(1 + e^-0.5) = 0.4740770
#   e3 x=(1,1): (2, 1.5)  label 1 wrong, CE = log(1 + e^0.5)  = 0.9740770
#   e4 x=(1,0): (2, 0.5)  label 1 wrong, CE = log(1 + e^1.5)  = 1.7014133
# accuracy 2/5 = 0.4; mean CE 5.0523939 / 5 = 1.0104788. A padded slot (index 0, e0: right,
# CE 0.2014) that counted would give 3/5 or 3/6 and another mean.
_TOY_STATE = {"params": {"Dense_0": {"kernel": jnp.array([[2.0, 0.0], [0.0, 1.0]]),
                                     "bias": jnp.array([0.0, 0.5])}}}


@pytest.mark.parametrize("batch_size", [2, 3, 5, 8])   # last batch padded by 1, 1, 0, 3
@pytest.mark.parametrize("split", ["test", "validation"])
def test_evaluator_by_hand_with_a_padded_last_batch(batch_size, split):
  evaluate = metrics_lib.make_evaluator(_Affine(), lambda state: state, _toy_dataset(),
                                        batch_size, split)
  accuracy, loss = evaluate(_TOY_STATE)
  assert accuracy == pytest.approx(0.4, abs=1e-7)
  assert loss == pytest.approx(1.0104788, abs=1e-6)


def test_sparsity_by_hand():
  # Integers: [[0, 1], [-8, 0]] and [0, 0, 7]: 4 zeros of 7. The zero biases under "other" and
  # the zero mask are not weights.
  ints = {"weights": {"a": {"kernel": Bits(np.array([[0, 1], [-8, 0]], np.int8), np.int32(4))},
                      "b": {"kernel": Bits(np.array([0, 0, 7], np.int8), np.int32(4))}},
          "other": {"a": {"bias": np.zeros(5, np.float32)}}, "active": np.zeros(4, bool)}
  assert metrics_lib.sparsity(ints) == 4 / 7
  # Floats: 0.0 and -0.0 are zeros, 1e-30 is not: 2 of 4.
  floats = {"weights": {"k": np.array([0.0, -0.0, 1e-30, 3.0], np.float32)},
            "other": {"bias": np.zeros(10, np.float32)}}
  assert metrics_lib.sparsity(floats) == 0.5
  assert metrics_lib.sparsity({"weights": {"k": np.ones((3, 3), np.float32)}}) == 0.0


# ----------------------------------------------------------------------------- FedAvg, p_k


class _Linear(nn.Module):
  """Softmax regression on the flattened image: its SGD step is a few lines of numpy."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train=False, mask=None):
    return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


def _np_full_batch_steps(w, b, x, y, lr, steps):
  """`steps` gradient steps of mean softmax cross-entropy over all of (x, y), float64."""
  onehot = np.eye(w.shape[1])[y]
  for _ in range(steps):
    logits = x @ w + b
    prob = np.exp(logits - logits.max(axis=1, keepdims=True))
    prob /= prob.sum(axis=1, keepdims=True)
    g = (prob - onehot) / len(y)
    w, b = w - lr * x.T @ g, b - lr * g.sum(axis=0)
  return w, b


def test_fedavg_with_data_size_weights_is_the_numpy_weighted_mean(tmp_path, monkeypatch):
  """5 clients of 132 to 396 examples (Dirichlet(0.3)), 2 rounds of 2 local epochs; a batch holds a whole
  client, so each epoch is one full-batch step, recomputed here in float64 from the broadcast
  model; the server model must be sum_k (n_k / n) w_k, not the uniform mean."""
  monkeypatch.setattr(rounds, "get_model", lambda name, num_classes: _Linear(num_classes))
  config = small_config(algorithm="fedavg", rounds=2, num_clients=5, local_epochs=2,
                        batch_size=1024, lr=0.1, data__partition="dirichlet", data__mu=0.3,
                        aggregation_weights="data_size")
  rec = recorded_run(config, tmp_path)
  ds = rec.job.dataset
  sizes = np.array([len(p) for p in rec.job.parts])
  assert sizes.max() <= 1024 and sizes.max() > 2 * sizes.min(), sizes
  x_all = ((ds.x_train.astype(np.float64) / 255 - ds.mean) / ds.std).reshape(len(ds.x_train), -1)
  w = np.asarray(rec.downlinks[0]["weights"]["Dense_0"]["kernel"], np.float64)  # w^0 as sent
  b = np.asarray(rec.downlinks[0]["other"]["Dense_0"]["bias"], np.float64)
  for t in range(2):
    clients = [_np_full_batch_steps(w, b, x_all[part], ds.y_train[part], 0.1, 2)
               for part in rec.job.parts]
    p = sizes / sizes.sum()
    w_new = sum(pk * wk for pk, (wk, _) in zip(p, clients))
    b_new = sum(pk * bk for pk, (_, bk) in zip(p, clients))
    uniform = sum(wk for wk, _ in clients) / len(clients)
    got = rec.servers[t]["params"]["Dense_0"]
    np.testing.assert_allclose(got["kernel"], w_new, rtol=1e-4, atol=2e-6)
    np.testing.assert_allclose(got["bias"], b_new, rtol=1e-4, atol=2e-6)
    assert np.abs(uniform - w_new).max() > 100 * 2e-6, "the weighting must be visible"
    w, b = w_new, b_new


# ----------------------------------------------------------------------------- training works


def test_fedavg_trains_well_above_chance_and_its_loss_falls(tmp_path):
  """6 rounds of 4 IID clients on the digits (10 classes, chance 0.1). Measured on the 2-core
  CPU: test accuracy 0.506, 0.814, 0.867, 0.858, 0.903, 0.828; train loss 4.68 -> 0.39."""
  train_and_evaluate(small_config(algorithm="fedavg", rounds=6), str(tmp_path))
  rows = [json.loads(line) for line in open(tmp_path / "metrics.jsonl")]
  assert rows[-1]["test_accuracy"] > 0.7 and max(r["test_accuracy"] for r in rows) > 0.8
  assert rows[-1]["train_loss"] < 0.25 * rows[0]["train_loss"]
  assert rows[-1]["test_loss"] < 0.5 * rows[0]["test_loss"]


@pytest.fixture(scope="module")
def fedbif_run(tmp_path_factory):
  """FedBiF-1/4, 4 clients of unequal size (Dirichlet(1)), data-size weights, 6 rounds."""
  config = small_config(rounds=6, data__partition="dirichlet", data__mu=1.0,
                        aggregation_weights="data_size")
  return recorded_run(config, tmp_path_factory.mktemp("fedbif"))


@pytest.mark.slow
def test_fedbif_trains_well_above_chance_and_its_loss_falls(fedbif_run):
  """Measured on the 2-core CPU: test accuracy 0.256, 0.317, 0.344, 0.353, 0.531, 0.622;
  train loss 4.77 -> 1.49 (partition sizes 444, 390, 347, 256)."""
  rows = fedbif_run.rows
  assert rows[-1]["test_accuracy"] > 0.45
  assert rows[-1]["train_loss"] < 0.5 * rows[0]["train_loss"]
  assert rows[-1]["test_loss"] < rows[0]["test_loss"]
  assert all(r["uplink_bpp"] == 1.0 and r["downlink_bpp"] == 4.0 for r in rows)


def test_fedbif_server_model_is_eq6_with_data_size_weights(fedbif_run):
  sizes = np.asarray(fedbif_run.job.sizes)
  assert sizes.max() > 1.3 * sizes.min(), f"the clients must differ in size: {sizes}"
  check_fedbif_rounds(fedbif_run, m=4)
  # The test has teeth: with uniform weights Eq. 6 gives another model.
  with pytest.raises(AssertionError):
    check_fedbif_rounds(fedbif_run, m=4, weights="uniform")


def test_sparsity_is_the_fraction_of_zero_broadcast_integers(fedbif_run):
  for down, row in zip(fedbif_run.downlinks, fedbif_run.rows):
    ints = np.concatenate([b.values.ravel() for b in _flat(down["weights"]).values()])
    assert ints.size == 52768      # the digits CNN's kernels: 288 + 18432 + 32768 + 1280
    assert row["sparsity"] == np.count_nonzero(ints == 0) / ints.size
    assert 0.05 < row["sparsity"] < 0.6


def _check_inherited(rec, m, encoding, vbi):
  """Round t >= 1, every client, every kernel: the stored virtual bits of the bits that were not
  activated are the round's starting bits. With VBI (Sec. 3.2): max(|v|, 1e-6) of the client's
  previous virtual bits with the sign of the broadcast bit; without VBI: fresh magnitudes (none
  equal to the previous ones) with the broadcast signs. The activated bits' signs are the bits
  the client uploaded."""
  fresh = {}   # kernel path -> the magnitudes of its frozen bits, all clients and rounds
  for t in range(1, len(rec.stores)):
    down, up = rec.downlinks[t], _flat(rec.uplinks[t]["weights"])
    inactive = ~np.asarray(down["active"])
    for i, c in enumerate(rec.plans[t].ids):
      prev = _flat(rec.stores[t - 1][int(c)]["virtual_bits"])
      now = _flat(rec.stores[t][int(c)]["virtual_bits"])
      for path, q in _flat(down["weights"]).items():
        received = np_bits(q.values, m, encoding)
        np.testing.assert_array_equal(now[path][inactive] > 0, received[inactive] == 1)
        np.testing.assert_array_equal((now[path][~inactive] > 0).astype(np.uint8),
                                      up[path].values[i])
        magnitude = np.maximum(np.abs(prev[path][inactive]), np.float32(1e-6))
        if vbi:
          np.testing.assert_array_equal(np.abs(now[path][inactive]), magnitude)
        else:
          assert np.mean(np.abs(now[path][inactive]) == magnitude) < 0.01
          fresh.setdefault(path, []).append(np.abs(now[path][inactive]).ravel())
  return {path: np.concatenate(v) for path, v in fresh.items()}


def test_vbi_keeps_each_clients_magnitudes_and_takes_the_broadcast_signs(fedbif_run):
  _check_inherited(fedbif_run, 4, "offset", vbi=True)


# ----------------------------------------------------------------------------- ablations


class _TinyCNN(nn.Module):
  """One 3x3 conv (8 channels, kernel [3, 3, 1, 8]) and a dense layer (kernel [128, 10]): the
  ablations' properties do not depend on the model, and this one compiles fast."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train=False, mask=None):
    x = nn.avg_pool(nn.relu(nn.Conv(8, (3, 3))(x)), (2, 2), strides=(2, 2))
    return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


@pytest.fixture(scope="module")
def sign_fixed_no_vbi_run(tmp_path_factory):
  """The sign-bit, fixed-bit and no-VBI ablations together (each property below is specific to
  one of them): FedBiF-1/4, 3 rounds, 4 clients of unequal size, data-size weights."""
  config = small_config(rounds=3, fedbif__encoding="sign_magnitude", fedbif__selector="fixed",
                        fedbif__vbi=False, data__partition="dirichlet", data__mu=1.0,
                        aggregation_weights="data_size")
  return recorded_run(config, tmp_path_factory.mktemp("ablations"), _TinyCNN())


@pytest.mark.slow
def test_sign_magnitude_through_the_engine(sign_fixed_no_vbi_run):
  rec = sign_fixed_no_vbi_run
  ints = np.concatenate([b.values.ravel() for d in rec.downlinks
                         for b in _flat(d["weights"]).values()])
  # m = 4 sign-magnitude holds -7..7 (offset binary would reach -8), and uses both ends.
  assert ints.min() == -7 and ints.max() == 7
  # The server averages each client's recovered sign-magnitude integers (Eq. 6 does not hold).
  check_fedbif_rounds(rec, m=4, encoding="sign_magnitude")
  assert all(r["uplink_bpp"] == 1.0 and r["downlink_bpp"] == 4.0 for r in rec.rows)


def test_fixed_selector_trains_the_third_bit_every_round(sign_fixed_no_vbi_run):
  # The paper's "third bit" of m = 4 from the most significant: index m - 3 = 1.
  for down in sign_fixed_no_vbi_run.downlinks:
    np.testing.assert_array_equal(down["active"], [False, True, False, False])


def test_without_vbi_the_frozen_bits_get_fresh_kaiming_magnitudes(sign_fixed_no_vbi_run):
  fresh = _check_inherited(sign_fixed_no_vbi_run, 4, "sign_magnitude", vbi=False)
  # Kaiming-normal magnitudes of std sqrt(2 / fan_in) have mean std * sqrt(2 / pi): the conv
  # kernel [3, 3, 1, 8] (fan-in 9): 0.4714 * 0.7979 = 0.3761 over 3 frozen planes x 72 weights
  # x 4 clients x 2 rounds = 1728 draws (standard error 1.8%); the dense kernel [128, 10]
  # (fan-in 128): 0.1250 * 0.7979 = 0.09974 over 30720 draws (standard error 0.4%).
  expected = {("Conv_0", "kernel"): (1728, 0.3761, 0.08), ("Dense_0", "kernel"): (30720, 0.09974,
                                                                                 0.02)}
  assert set(fresh) == set(expected)
  for path, (count, mean, rel) in expected.items():
    assert fresh[path].size == count
    assert np.mean(fresh[path]) == pytest.approx(mean, rel=rel), path


@pytest.fixture(scope="module")
def random_selector_run(tmp_path_factory):
  """FedBiF-2/8 with the random selector, 3 rounds, 4 IID clients (uniform weights)."""
  config = small_config(rounds=3, fedbif__bits=8, fedbif__active_bits=2,
                        fedbif__selector="random")
  return recorded_run(config, tmp_path_factory.mktemp("random"), _TinyCNN())


@pytest.mark.slow
def test_random_selector_through_the_engine(random_selector_run):
  rec = random_selector_run
  masks = [tuple(np.flatnonzero(d["active"]).tolist()) for d in rec.downlinks]
  assert all(len(m) == 2 for m in masks), masks
  # The sequential selector (msb first) would give (6, 7), (4, 5), (2, 3).
  assert masks != [(6, 7), (4, 5), (2, 3)] and len(set(masks)) > 1, masks
  check_fedbif_rounds(rec, m=8, weights="uniform")
  assert all(r["uplink_bpp"] == 2.0 and r["downlink_bpp"] == 8.0 for r in rec.rows)


# ----------------------------------------------------------------------------- slow: backends


class _AvgPoolCNN(nn.Module):
  """The small CNN with average pooling: no max-pool ties, so backends agree to rounding over
  several rounds (see tests/test_engine.py::test_backends_agree)."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train=False, mask=None):
    for features in (8, 16):
      x = nn.avg_pool(nn.relu(nn.Conv(features, (3, 3))(x)), (2, 2), strides=(2, 2))
    return nn.Dense(self.num_classes)(x.reshape((x.shape[0], -1)))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedavg", "fedbif"])
def test_sharded_equals_sequential_over_rounds_with_two_clients_per_device(
    tmp_path, monkeypatch, algorithm):
  """10 clients of unequal size, 8 per round over the 4 host devices (2 per device), 3 rounds,
  data-size weights: the sharded run's server models, uplinks and stored client states follow
  the sequential run's to float rounding. Random pixels (ReLU ties at exactly 0 would let the
  backends pick different subgradients) and average pooling."""
  assert jax.device_count() == 4, "conftest forces 4 host devices"
  load = data_lib.load_dataset

  def noisy(*args, **kwargs):
    ds = load(*args, **kwargs)
    rng = np.random.default_rng(0)
    return ds._replace(x_train=rng.integers(0, 256, ds.x_train.shape, dtype=np.uint8))

  monkeypatch.setattr(data_lib, "load_dataset", noisy)
  monkeypatch.setattr(rounds, "get_model", lambda name, n: _AvgPoolCNN(n))
  runs = {}
  for backend in ("sequential", "sharded"):
    config = small_config(algorithm=algorithm, rounds=3, num_clients=10, clients_per_round=8,
                          data__partition="dirichlet", data__mu=1.0, data__min_size=20,
                          aggregation_weights="data_size", parallel=backend)
    runs[backend] = recorded_run(config, tmp_path / backend)
  seq, shard = runs["sequential"], runs["sharded"]
  assert len(set(np.asarray(seq.job.sizes).tolist())) > 1
  for t in range(3):
    np.testing.assert_array_equal(seq.plans[t].ids, shard.plans[t].ids)
    assert len(seq.plans[t].ids) == 8
    for key in ("uplink_bits", "downlink_bits", "uplink_bpp"):
      assert seq.rows[t][key] == shard.rows[t][key]
    chex.assert_trees_all_close(shard.uplinks[t], seq.uplinks[t], atol=1e-5)
    chex.assert_trees_all_close(shard.servers[t], seq.servers[t], atol=1e-5)
    chex.assert_trees_all_close(shard.stores[t], seq.stores[t], atol=1e-5)
    assert shard.rows[t]["test_accuracy"] == pytest.approx(seq.rows[t]["test_accuracy"],
                                                           abs=1 / 360)
  if algorithm == "fedbif":
    check_fedbif_rounds(shard, m=4)


# ----------------------------------------------------------------------------- slow: resume


def _restore(workdir, step) -> Any:
  manager = ocp.CheckpointManager(os.path.abspath(os.path.join(workdir, "checkpoints")))
  return manager.restore(step, args=ocp.args.StandardRestore())


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedavg", "fedpaq", "feddq", "dadaquant", "signsgd",
                                       "fedbif"])
def test_resume_after_a_kill_with_a_torn_metrics_line_equals_a_straight_run(tmp_path, algorithm):
  """4 rounds, a checkpoint every 2, 2 of 5 clients per round (SignSGD refuses partial
  participation: 3 clients, all). The killed run is the straight run's workdir as a SIGKILL
  during round 3 would leave it: checkpoint 4 never written, round 2's line complete, round 3's
  line torn halfway, no summary. Resuming must redo rounds 2 and 3 to the very same server and
  client states (bit for bit) and metrics (wall time aside)."""
  partial = dict(num_clients=3) if algorithm == "signsgd" else dict(num_clients=5,
                                                                    clients_per_round=2)
  overrides = dict(algorithm=algorithm, rounds=4, checkpoint_every=2, **partial)
  if algorithm == "dadaquant":
    # A near-flat loss (lr 1e-5) over different clients each round: the loss EMA (psi = 0: the
    # loss itself) fails to improve after round 2 and q doubles (measured widths 2, 2, 2, 3
    # bits), a decision that needs the loss history saved in checkpoint 2.
    overrides.update(dadaquant__phi=1, dadaquant__psi=0.0, lr=1e-5)
  config = small_config(**overrides)
  straight, killed = tmp_path / "straight", tmp_path / "killed"
  train_and_evaluate(config, str(straight))
  shutil.copytree(straight, killed)
  shutil.rmtree(killed / "checkpoints" / "4")
  os.remove(killed / "summary.json")
  lines = (killed / "metrics.jsonl").read_text().splitlines(keepends=True)
  assert len(lines) == 4
  (killed / "metrics.jsonl").write_text("".join(lines[:3]) + lines[3][:len(lines[3]) // 2])
  train_and_evaluate(config, str(killed))
  chex.assert_trees_all_equal(_restore(killed, 4), _restore(straight, 4))
  strip = lambda path: [{k: v for k, v in json.loads(line).items() if k != "wall_seconds"}
                        for line in open(path)]
  assert strip(killed / "metrics.jsonl") == strip(straight / "metrics.jsonl")
  assert without_wall_clock(json.loads((killed / "summary.json").read_text())) == (
      without_wall_clock(json.loads((straight / "summary.json").read_text())))
  if algorithm == "dadaquant":
    widths = [r["uplink_bpp"] for r in strip(straight / "metrics.jsonl")]
    assert widths[-1] > widths[0], widths   # q grew in a resumed round
