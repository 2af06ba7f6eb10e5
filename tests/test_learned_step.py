"""The learned step size (``fedbif.step="learned"``, Sec. 6's open idea; see the module docstring
of `fedbif_jax/algorithms/fedbif.py`).

Oracles, none computed by the code under test:

* the gradient of beta = log(alpha / alpha_received) against a central finite difference of the
  same loss written in numpy, float64 (the loss in JAX is checked equal to it at those points),
  times LSQ's gradient scale 1 / sqrt(N * Q_P) computed here by hand;
* the model a client rebuilds right after receiving (after virtual bits inheritance) against
  alpha * q of the downlink, to the bit, and the broadcast integers against the stochastic
  rounding of theta / alpha with the server's stored alpha;
* the aggregate of client models with unequal steps and unequal weights against a hand-computed
  example and a numpy recovery sum_k p_k alpha_k z_k; equal steps against Eq. 6 to the bit;
* a short training run on the digits: it learns, the step changes across rounds, the server's
  step is the p-weighted mean of the uploaded ones, and the uplink's bpp is unchanged;
* the config errors.
"""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_config
from fedbif_jax import quant
from fedbif_jax import selectors
from fedbif_jax import rounds
from fedbif_jax import train as train_lib
from fedbif_jax import wire
from fedbif_jax.algorithms import fedbif as fedbif_lib
from fedbif_jax.algorithms import get_algorithm
from fedbif_jax.algorithms.base import RoundInfo
from fedbif_jax.errors import ConfigError
from fedbif_jax.pytrees import Bits

_FIXED = dict(fedbif__active_bits=2, fedbif__selector="fixed", fedbif__fixed_bits=(1, 3))


def _np_ints(bits: np.ndarray, m: int, encoding: str) -> np.ndarray:
  """Eq. 4 over the leading bit axis of 0/1 bits [m, ...], int64 (offset or sign-magnitude)."""
  pow2 = (2 ** np.arange(m)).reshape((m,) + (1,) * (bits.ndim - 1))
  if encoding == "offset":
    return np.sum(pow2 * bits, axis=0) - 2 ** (m - 1)
  return (1 - 2 * bits[m - 1]) * np.sum(pow2[:m - 1] * bits[:m - 1], axis=0)


def _np_bits(q: np.ndarray, m: int, encoding: str) -> np.ndarray:
  q = np.asarray(q, np.int64)
  if encoding == "offset":
    return np.stack([((q + 2 ** (m - 1)) >> j) & 1 for j in range(m)])
  return np.stack([(np.abs(q) >> j) & 1 for j in range(m - 1)] + [(q < 0).astype(np.int64)])


# --------------------------------------------------------------------------- (a) the gradient


@pytest.mark.parametrize("encoding, q_p", [("offset", 8), ("sign_magnitude", 7)])
@pytest.mark.parametrize("beta0", [0.0, 0.3])
def test_step_gradient_is_the_lsq_scaled_finite_difference(encoding, q_p, beta0):
  """One 6x5 dense kernel, m = 4, bits 1 and 3 activated, loss 0.5 * sum((w - t)^2) + sum(w^3)
  (not linear in alpha). dL/dbeta is a central difference of the loss in float64 numpy
  (h = 1e-5: truncation ~h^2 |L'''| < 1e-8, rounding ~1e-16 |L| / h < 1e-10, both far below the
  float32 gradient's own rounding, hence rtol 1e-5); the trainable beta receives it times
  step_lr_scale * g, g = 1 / sqrt(N * Q_P) with N = 30 and Q_P = 8 (offset) or 7
  (sign-magnitude) by hand."""
  m, scale = 4, 3.0
  algo = get_algorithm(small_config(fedbif__step="learned", fedbif__step_lr_scale=scale,
                                      fedbif__encoding=encoding, **_FIXED))
  rng = np.random.default_rng(7)
  lo, hi = quant.int_range(m, encoding)
  q = rng.integers(lo, hi + 1, (6, 5))
  alpha0 = np.float32(0.0625)
  active = np.array([False, True, False, True])
  downlink = {"weights": {"d": {"kernel": Bits(jnp.asarray(q, jnp.int8), jnp.int32(m))}},
              "alpha": {"d": {"kernel": jnp.asarray(alpha0)}}, "other": {},
              "active": jnp.asarray(active)}
  v = rng.standard_normal((2, 6, 5)).astype(np.float32)
  t = rng.standard_normal((6, 5))

  def jax_loss(beta):
    trainable = {"active_bits": {"d": {"kernel": jnp.asarray(v)}}, "other": {},
                 "log_step": {"d": {"kernel": beta}}}
    w = algo.model_params(trainable, downlink)["d"]["kernel"]
    return 0.5 * jnp.sum((w - t) ** 2) + jnp.sum(w ** 3)

  bits = _np_bits(q, m, encoding)
  bits[active] = (v > 0).astype(np.int64)          # the activated bits are h(v)
  z = _np_ints(bits, m, encoding).astype(np.float64)

  def np_loss(beta):
    w = float(alpha0) * math.exp(beta) * z
    return 0.5 * np.sum((w - t) ** 2) + np.sum(w ** 3)

  h = 1e-5
  fd = (np_loss(beta0 + h) - np_loss(beta0 - h)) / (2 * h)
  for b in (beta0 - 0.1, beta0, beta0 + 0.1):     # the JAX loss is this loss
    np.testing.assert_allclose(float(jax_loss(jnp.float32(b))), np_loss(b), rtol=1e-5)
  g = 1.0 / math.sqrt(30 * q_p)
  assert fedbif_lib.lsq_gradient_scale(30, m, encoding) == pytest.approx(g, rel=1e-12)
  grad = float(jax.grad(jax_loss)(jnp.float32(beta0)))
  np.testing.assert_allclose(grad, scale * g * fd, rtol=1e-5)
  # dL/dalpha is exactly sum_j dL/dw_j z_j (z the forward's integer), so
  # dL/dbeta = alpha * sum_j dL/dw_j z_j.
  w = float(alpha0) * math.exp(beta0) * z
  exact = float(alpha0) * math.exp(beta0) * np.sum((w - t + 3 * w ** 2) * z)
  np.testing.assert_allclose(fd, exact, rtol=1e-7)


def test_bits_gradient_uses_the_current_learned_step():
  """dL/dv_i = alpha * 2^i * dL/dw with alpha = alpha_received * exp(beta)."""
  algo = get_algorithm(small_config(fedbif__step="learned", **_FIXED))
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.integers(-8, 8, (6, 5)), jnp.int8)
  downlink = {"weights": {"d": {"kernel": Bits(q, jnp.int32(4))}},
              "alpha": {"d": {"kernel": jnp.float32(0.25)}}, "other": {},
              "active": jnp.asarray([False, True, False, True])}
  target = jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)

  def loss(v):
    trainable = {"active_bits": {"d": {"kernel": v}}, "other": {},
                 "log_step": {"d": {"kernel": jnp.float32(0.5)}}}
    return jnp.sum(algo.model_params(trainable, downlink)["d"]["kernel"] * target)

  grad = jax.grad(loss)(jnp.asarray(rng.standard_normal((2, 6, 5)), jnp.float32))
  alpha = 0.25 * math.exp(0.5)
  np.testing.assert_allclose(grad[0], alpha * 2 * target, rtol=1e-6)
  np.testing.assert_allclose(grad[1], alpha * 8 * target, rtol=1e-6)


# ------------------------------------------------------------------ (b) broadcast and receipt


def _server(algo, rng, shapes, round_index=1):
  """A learned-step server state over a conv and a dense layer, with odd stored steps."""
  params = {name: {"kernel": jnp.asarray(rng.standard_normal(shape) * 0.1, jnp.float32),
                   "bias": jnp.asarray(rng.standard_normal(shape[-1:]), jnp.float32)}
            for name, shape in shapes.items()}
  state = algo.init(jax.random.key(0), {"params": params})
  state["round"] = jnp.asarray(round_index, jnp.int32)
  return state, params


_SHAPES = {"conv": (3, 3, 2, 4), "dense": (5, 3)}


def test_round_zero_step_is_eq5_and_broadcast_quantizes_with_the_stored_step():
  algo = get_algorithm(small_config(num_clients=3, fedbif__step="learned"))
  rng = np.random.default_rng(1)
  state, params = _server(algo, rng, _SHAPES)
  for name in _SHAPES:   # round 0: Eq. 5, max|theta| / 2^(m-1)
    assert float(state["alpha"][name]["kernel"]) == np.float32(
        np.abs(np.asarray(params[name]["kernel"])).max() / 8)
  # Later rounds: whatever the server stores (here steps unrelated to max|theta|).
  state["alpha"] = {"conv": {"kernel": jnp.float32(0.0371)}, "dense": {"kernel": jnp.float32(0.05)}}
  info = RoundInfo(jnp.full(3, 1 / 3, jnp.float32), jnp.ones(3, jnp.float32))
  downlink = algo.broadcast(state, jax.random.key(2), info)
  for name in _SHAPES:
    alpha = np.float32(state["alpha"][name]["kernel"])
    assert np.float32(downlink["alpha"][name]["kernel"]) == alpha
    q = np.asarray(downlink["weights"][name]["kernel"].values, np.int64)
    y = np.clip(np.asarray(params[name]["kernel"]) / alpha, -8, 7)
    assert np.all((q == np.floor(y)) | (q == np.ceil(y)))         # Eq. 1-2 with Eq. 1's clamp
    assert q.min() >= -8 and q.max() <= 7


def test_the_received_model_is_alpha_times_q_to_the_bit_after_inheritance():
  algo = get_algorithm(small_config(num_clients=3, fedbif__step="learned", fedbif__active_bits=2))
  rng = np.random.default_rng(2)
  state, params = _server(algo, rng, _SHAPES)
  state["alpha"] = {"conv": {"kernel": jnp.float32(0.0371)}, "dense": {"kernel": jnp.float32(0.0123)}}
  info = RoundInfo(jnp.full(3, 1 / 3, jnp.float32), jnp.ones(3, jnp.float32))
  downlink = algo.broadcast(state, jax.random.key(3), info)
  for seed in range(3):   # clients with their own virtual bits, inherited on receipt
    client = algo.init_client(jax.random.key(10 + seed), {"params": params})
    local = algo.client_start(downlink, client, jax.random.key(seed))
    assert all(float(b) == 0.0 for b in jax.tree.leaves(local.trainable["log_step"]))
    rebuilt = algo.model_params(local.trainable, downlink)
    for name in _SHAPES:
      alpha = np.float32(downlink["alpha"][name]["kernel"])
      q = np.asarray(downlink["weights"][name]["kernel"].values)
      np.testing.assert_array_equal(np.asarray(rebuilt[name]["kernel"]),
                                    alpha * q.astype(np.float32))
      np.testing.assert_array_equal(rebuilt[name]["bias"], params[name]["bias"])
    # Untrained, the client uploads the step it received.
    uplink, _ = algo.client_finish(downlink, client, local, jax.random.key(0), {})
    for name in _SHAPES:
      assert float(uplink["alpha"][name]["kernel"]) == float(downlink["alpha"][name]["kernel"])


# ------------------------------------------------------------------------- (c, d) aggregation


def _hand_case(alphas):
  """Integers [3, -8] of one 1x2 kernel, bit 2 activated (offset binary, m = 4): u = q + 8 =
  [11, 0]. Three clients upload bit 2 = [1, 1], [0, 1], [1, 0]: their integers
  z_0 = [7, -4], z_1 = [3, -4], z_2 = [7, -8]. Biases [1], [2], [4]."""
  downlink = {"weights": {"d": {"kernel": Bits(jnp.asarray([[3, -8]], jnp.int8), jnp.int32(4))}},
              "alpha": {"d": {"kernel": jnp.float32(0.5)}}, "other": {"d": {"bias": jnp.zeros(1)}},
              "model_state": {}, "active": jnp.asarray([False, False, True, False])}
  uplinks = {"weights": {"d": {"kernel": Bits(jnp.asarray([[[[1, 1]]], [[[0, 1]]], [[[1, 0]]]],
                                                         jnp.uint8), jnp.ones(3, jnp.int32))}},
             "other": {"d": {"bias": jnp.asarray([[1.0], [2.0], [4.0]])}}, "model_state": {},
             "alpha": {"d": {"kernel": jnp.asarray(alphas, jnp.float32)}}}
  state = {"params": {}, "model_state": {}, "round": jnp.int32(5),
           "alpha": {"d": {"kernel": jnp.float32(0.5)}}}
  return state, downlink, uplinks


def test_aggregate_by_hand_with_unequal_steps_and_weights():
  """p = (0.1, 0.3, 0.6), alpha = (0.5, 1.0, 0.25):
    weight 0: 0.1 * 0.5 * 7 + 0.3 * 1.0 * 3 + 0.6 * 0.25 * 7 = 0.35 + 0.9 + 1.05 = 2.3
    weight 1: 0.1 * 0.5 * -4 + 0.3 * 1.0 * -4 + 0.6 * 0.25 * -8 = -0.2 - 1.2 - 1.2 = -2.6
    step: 0.1 * 0.5 + 0.3 * 1.0 + 0.6 * 0.25 = 0.5; biases 0.1 + 0.6 + 2.4 = 3.1.
  (Eq. 6 with the broadcast's 0.5 for every client would give 2.9 and -3.2.)"""
  algo = get_algorithm(small_config(num_clients=3, fedbif__step="learned"))
  state, downlink, uplinks = _hand_case([0.5, 1.0, 0.25])
  new = jax.jit(algo.aggregate)(state, downlink, uplinks, jnp.asarray([0.1, 0.3, 0.6]), None)
  np.testing.assert_allclose(new["params"]["d"]["kernel"], [[2.3, -2.6]], rtol=1e-6)
  np.testing.assert_allclose(new["alpha"]["d"]["kernel"], 0.5, rtol=1e-6)
  np.testing.assert_allclose(new["params"]["d"]["bias"], [3.1], rtol=1e-6)
  assert int(new["round"]) == 6


@pytest.mark.parametrize("encoding", ["offset", "sign_magnitude"])
@pytest.mark.parametrize("m, s, round_index", [(4, 1, 2), (8, 2, 1)])
def test_aggregate_is_the_mean_of_client_models_with_their_own_steps(m, s, round_index, encoding):
  """A real broadcast of a conv and a dense layer; three clients of 100, 300 and 600 examples
  upload random bits and steps alpha_k; every kernel equals sum_k p_k alpha_k z_k with z_k each
  client's integers recovered here in numpy, the server's step sum_k p_k alpha_k, and the next
  broadcast quantizes with that step without clipping (theta / abar inside the m-bit range)."""
  algo = get_algorithm(small_config(num_clients=3, fedbif__bits=m, fedbif__active_bits=s,
                                    fedbif__encoding=encoding, fedbif__step="learned"))
  rng = np.random.default_rng(m + 10 * round_index)
  state, _ = _server(algo, rng, _SHAPES, round_index)
  p = np.array([100.0, 300.0, 600.0]) / 1000.0
  info = RoundInfo(jnp.asarray(p, jnp.float32), jnp.asarray([100.0, 300.0, 600.0], jnp.float32))
  downlink = algo.broadcast(state, jax.random.key(1), info)
  alphas = {name: np.float32(downlink["alpha"][name]["kernel"]) * rng.uniform(0.5, 2.0, 3)
            .astype(np.float32) for name in _SHAPES}
  uplinks = {"weights": {name: {"kernel": Bits(jnp.asarray(rng.integers(0, 2, (3, s) + shape),
                                                           jnp.uint8), jnp.ones(3, jnp.int32))}
                         for name, shape in _SHAPES.items()},
             "other": {name: {"bias": jnp.asarray(rng.standard_normal((3,) + shape[-1:]),
                                                  jnp.float32)} for name, shape in _SHAPES.items()},
             "model_state": {},
             "alpha": {name: {"kernel": jnp.asarray(a)} for name, a in alphas.items()}}
  new = algo.aggregate(state, downlink, uplinks, jnp.asarray(p, jnp.float32), None)
  idx = np.flatnonzero(np.asarray(downlink["active"]))
  lo, hi = quant.int_range(m, encoding)
  for name in _SHAPES:
    frozen = _np_bits(downlink["weights"][name]["kernel"].values, m, encoding)
    ups = np.asarray(uplinks["weights"][name]["kernel"].values, np.int64)
    z = []
    for k in range(3):
      full = frozen.copy()
      full[idx] = ups[k]
      z.append(_np_ints(full, m, encoding).astype(np.float64))
    a = alphas[name].astype(np.float64)
    expected = sum(p[k] * a[k] * z[k] for k in range(3))
    abar = float(np.dot(p, a))
    np.testing.assert_allclose(new["params"][name]["kernel"], expected, rtol=1e-5,
                               atol=1e-6 * abar)
    np.testing.assert_allclose(float(new["alpha"][name]["kernel"]), abar, rtol=1e-6)
    ratio = np.asarray(new["params"][name]["kernel"]) / float(new["alpha"][name]["kernel"])
    assert ratio.min() >= lo - 1e-5 and ratio.max() <= hi + 1e-5
    # The teeth: Eq. 6 with the broadcast step for every client is another model.
    same_step = float(downlink["alpha"][name]["kernel"]) * sum(p[k] * z[k] for k in range(3))
    assert np.abs(same_step - expected).max() > 0.1 * abar
  nxt = algo.broadcast(new, jax.random.key(2), info)
  for name in _SHAPES:
    assert float(nxt["alpha"][name]["kernel"]) == float(new["alpha"][name]["kernel"])


@pytest.mark.parametrize("m, s", [(4, 1), (8, 2)])
def test_equal_steps_reduce_to_eq6_to_the_bit(m, s):
  rng = np.random.default_rng(m * 10 + s)
  for trial in range(5):
    active = selectors.random(jax.random.PRNGKey(trial), m, s)
    q = jnp.asarray(rng.integers(-2 ** (m - 1), 2 ** (m - 1), (5, 4)), jnp.int8)
    uploads = jnp.asarray(rng.integers(0, 2, (3, s, 5, 4)), jnp.uint8)
    n = rng.integers(1, 1000, 3)
    weights = jnp.asarray(n / n.sum(), jnp.float32)
    alpha = jnp.float32(rng.uniform(0.001, 1.0))
    abar, p = fedbif_lib.mean_step(jnp.full((3,), alpha), weights)
    assert float(abar) == float(alpha)
    np.testing.assert_array_equal(np.asarray(p), np.asarray(weights))
    np.testing.assert_array_equal(
        np.asarray(fedbif_lib.aggregate_ints(uploads, q, active, abar, p, m)),
        np.asarray(fedbif_lib.aggregate_ints(uploads, q, active, alpha, weights, m)))


def test_learned_aggregate_with_equal_steps_is_the_max_abs_aggregate():
  """The same downlink and uploads, every client sending the broadcast step back: the learned
  server's model equals the default server's, to the bit."""
  learned = get_algorithm(small_config(num_clients=3, fedbif__step="learned"))
  default = get_algorithm(small_config(num_clients=3))
  state, downlink, uplinks = _hand_case([0.5, 0.5, 0.5])
  weights = jnp.asarray([0.1, 0.3, 0.6])
  a = learned.aggregate(state, downlink, uplinks, weights, None)
  b = default.aggregate(state, downlink, uplinks, weights, None)
  np.testing.assert_array_equal(a["params"]["d"]["kernel"], b["params"]["d"]["kernel"])
  assert float(a["alpha"]["d"]["kernel"]) == 0.5 and "alpha" not in b


# ----------------------------------------------------------------------------- (f) training


@pytest.mark.slow
def test_learned_step_trains_and_the_step_moves(tmp_path, monkeypatch):
  """FedBiF-1/4 with the learned step, 4 IID clients on the digits, 6 rounds. Measured on the
  2-core CPU: test accuracy 0.300, 0.414, 0.447, 0.456, 0.600, 0.686 (chance 0.1); the last
  broadcast's steps are 0.1-1.1% below round 0's (Eq. 5) at step_lr_scale 1."""
  seen = []
  traffic = rounds.traffic

  def spy(downlink, uplinks, *rest):
    seen.append(jax.device_get((downlink["alpha"], uplinks["alpha"])))
    seen[-1] += (traffic(downlink, uplinks, *rest),)
    return seen[-1][-1]

  monkeypatch.setattr(rounds, "traffic", spy)
  summary = train_lib.train_and_evaluate(small_config(rounds=6, fedbif__step="learned"),
                                         str(tmp_path)).summary
  assert summary["final_accuracy"] > 0.5
  downs = [jax.tree.leaves(d) for d, _, _ in seen]
  assert len(downs[0]) == 4                                   # the CNN's 4 kernels
  for layer in range(4):
    steps = [float(d[layer]) for d in downs]
    assert len(set(steps)) == len(steps), f"kernel {layer}: the step must move every round"
  for t in range(5):   # the next broadcast's step is the p-weighted mean of the uploaded ones
    ups = jax.tree.leaves(seen[t][1])
    for layer in range(4):
      np.testing.assert_allclose(float(downs[t + 1][layer]), np.mean(ups[layer]), rtol=1e-6)
  for _, _, row in seen:   # the steps cost 4 bytes a layer in the total, nothing in the bpp
    assert row["uplink_bpp"] == 1.0 and row["downlink_bpp"] == 4.0


def test_uplink_step_counts_in_the_total_bytes_only():
  config = small_config(fedbif__step="learned")
  algo = get_algorithm(config)
  rng = np.random.default_rng(3)
  state, params = _server(algo, rng, _SHAPES)
  info = RoundInfo(jnp.full(4, 0.25, jnp.float32), jnp.ones(4, jnp.float32))
  downlink = algo.broadcast(state, jax.random.key(0), info)
  client = algo.init_client(jax.random.key(1), {"params": params})
  local = algo.client_start(downlink, client, jax.random.key(2))
  uplink, _ = algo.client_finish(downlink, client, local, jax.random.key(3), {})
  without = {k: v for k, v in uplink.items() if k != "alpha"}
  assert wire.weight_bits(uplink) == wire.weight_bits(without) == 3 * 3 * 2 * 4 + 5 * 3
  assert wire.encoded_size(uplink) > wire.encoded_size(without) + 2 * 4   # two float32 steps


# ----------------------------------------------------------------------------- (g) config


@pytest.mark.parametrize("fields, message", [
    ({"step": "lsq"}, "fedbif.step: must be one of max_abs, learned, got 'lsq'"),
    ({"step": "learned", "step_lr_scale": 0.0}, "fedbif.step_lr_scale: must be a finite number > 0"),
    ({"step": "learned", "step_lr_scale": float("inf")},
     "fedbif.step_lr_scale: must be a finite number > 0"),
    ({"step_lr_scale": 2.0}, r"fedbif.step_lr_scale: must be 1.0 unless fedbif.step=learned"),
])
def test_bad_step_fields_name_the_field(fields, message):
  with pytest.raises(ConfigError, match=message):
    get_algorithm(small_config(**{f"fedbif__{k}": v for k, v in fields.items()}))
