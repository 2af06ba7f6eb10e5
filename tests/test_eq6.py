"""Tests for FedBiF's server aggregation, Eq. 6 of the paper (fedbif_jax.algorithms.fedbif).

Covers `aggregate_bits` (Eq. 6: weighted mean of the clients' activated bits plus the frozen bits
the server already knows), `recover_client_bits` and `aggregate_by_recovery` (recover each
client's full bit tensor, its integers by Eq. 4, dequantize and average). Eq. 6 is checked
against an independent numpy reference ("recover every client's model from its activated and
frozen bits, then average") for s = 1, 2, m = 4, 8, uniform and data-size client weights; against
two fully hand-computed tiny examples; for sign-magnitude recovery; under jit; and for the
ValueErrors raised on bad alpha, client weights, bit widths and shapes.
"""

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from conftest import small_config
from fedbif_jax import quant
from fedbif_jax import selectors
from fedbif_jax.algorithms import get_algorithm
from fedbif_jax.algorithms.base import RoundInfo
from fedbif_jax.algorithms.fedbif import aggregate_bits
from fedbif_jax.algorithms.fedbif import aggregate_by_recovery
from fedbif_jax.algorithms.fedbif import aggregate_ints
from fedbif_jax.algorithms.fedbif import recover_client_bits
from fedbif_jax.pytrees import Bits

_FAST = settings(max_examples=15, deadline=None)
_CLIENTS = 3
_LEAF = (5, 4)   # fixed shapes: one compile per (m, s)


def _reference(active_bits, frozen_bits, active, alpha, weights, m):
  """Recover each client's bits and integers (Eq. 4), weighted mean, times alpha (Eq. 3)."""
  active_bits = np.asarray(active_bits, np.int64)
  frozen_bits = np.asarray(frozen_bits, np.int64)
  idx = np.flatnonzero(np.asarray(active))              # ascending bit indices
  num_clients = active_bits.shape[0]
  full = np.repeat(frozen_bits[None], num_clients, axis=0)
  full[:, idx] = active_bits
  pow2 = (2 ** np.arange(m)).reshape((1, m) + (1,) * (full.ndim - 2))
  ints = np.sum(pow2 * full, axis=1) - 2 ** (m - 1)     # [C, ...]
  assert ints.min() >= -(2 ** (m - 1)) and ints.max() <= 2 ** (m - 1) - 1
  w = np.asarray(weights, np.float64).reshape((-1,) + (1,) * (ints.ndim - 1))
  return float(alpha) * np.sum(w * ints, axis=0)


def _weights(kind, rng, num_clients=_CLIENTS):
  if kind == "uniform":
    return np.full((num_clients,), 1.0 / num_clients, np.float32)
  n = rng.integers(1, 1000, size=num_clients)            # client data sizes n_k
  return (n / n.sum()).astype(np.float32)


# ----------------------------------------------------------------------------- hand-computed


def test_eq6_hand_computed_m4_s1_two_clients_one_weight():
  # Server integer q = 3 -> u = q + 8 = 11 = 1 + 2 + 8 -> bits (LSB first) [1, 1, 0, 1].
  frozen = quant.to_bits(jnp.asarray([3], jnp.int8), 4)
  np.testing.assert_array_equal(np.asarray(frozen)[:, 0], [1, 1, 0, 1])
  active = jnp.asarray([False, False, True, False])      # bit 2 (weight 4) is trained
  uploads = jnp.asarray([[[1]], [[0]]], jnp.uint8)       # [C=2, s=1, 1]
  alpha = jnp.float32(0.5)
  # Client A: u = 1 + 2 + 4 + 8 = 15 -> q = 7; client B: u = 11 -> q = 3.
  # Uniform: 0.5 * ((7 + 3) / 2) = 2.5. Eq. 6: 0.5 * (4 * 0.5 + (1 + 2 + 8) - 8) = 2.5.
  uniform = jnp.asarray([0.5, 0.5], jnp.float32)
  np.testing.assert_allclose(np.asarray(aggregate_bits(uploads, frozen, active, alpha, uniform, 4)),
                             [2.5], rtol=1e-7)
  np.testing.assert_allclose(np.asarray(aggregate_by_recovery(uploads, frozen, active, alpha,
                                                              uniform, 4)), [2.5], rtol=1e-7)
  # Data sizes n = (30, 10) -> p = (0.75, 0.25): 0.5 * (0.75 * 7 + 0.25 * 3) = 3.0.
  sized = jnp.asarray([0.75, 0.25], jnp.float32)
  np.testing.assert_allclose(np.asarray(aggregate_bits(uploads, frozen, active, alpha, sized, 4)),
                             [3.0], rtol=1e-7)
  np.testing.assert_allclose(np.asarray(aggregate_by_recovery(uploads, frozen, active, alpha,
                                                              sized, 4)), [3.0], rtol=1e-7)


def test_eq6_hand_computed_m4_s2_two_clients_two_weights():
  # Round 0 of the sequential selector: bits {2, 3} active ('1100' read MSB first).
  active = selectors.sequential(0, 4, 2)
  # Server integers [-3, 5] -> u = [5, 13] -> bits [[1, 1], [0, 0], [1, 1], [0, 1]].
  frozen = quant.to_bits(jnp.asarray([-3, 5], jnp.int8), 4)
  np.testing.assert_array_equal(np.asarray(frozen), [[1, 1], [0, 0], [1, 1], [0, 1]])
  # Uploads [C, s, weights]: per client, row 0 is bit 2 and row 1 is bit 3 (ascending);
  # client A sends weight0 (b2, b3) = (0, 1), weight1 (1, 1); client B weight0 (1, 1), weight1 (0, 0).
  uploads = jnp.asarray([[[0, 1], [1, 1]],     # client A: b2 row, b3 row
                         [[1, 0], [1, 0]]],    # client B: b2 row, b3 row
                        jnp.uint8)
  # Weight 0: A u = 1 + 8 = 9 -> 1; B u = 1 + 4 + 8 = 13 -> 5; mean 3 -> 0.25 * 3 = 0.75.
  # Weight 1: A u = 1 + 4 + 8 = 13 -> 5; B u = 1 -> -7; mean -1 -> -0.25.
  alpha = jnp.float32(0.25)
  weights = jnp.asarray([0.5, 0.5], jnp.float32)
  got = aggregate_bits(uploads, frozen, active, alpha, weights, 4)
  assert got.shape == (2,) and got.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(got), [0.75, -0.25], rtol=1e-7)
  np.testing.assert_allclose(
      np.asarray(aggregate_by_recovery(uploads, frozen, active, alpha, weights, 4)),
      [0.75, -0.25], rtol=1e-7)


def test_recover_client_bits_hand_computed():
  frozen = jnp.asarray([[1, 0], [0, 0], [1, 1], [0, 1]], jnp.uint8)      # [m=4, 2]
  active = jnp.asarray([False, True, False, True])                       # bits 1 and 3
  uploads = jnp.asarray([[[1, 1], [1, 0]],                               # client 0: b1, b3
                         [[0, 1], [0, 0]]], jnp.uint8)                   # client 1: b1, b3
  full = recover_client_bits(uploads, frozen, active)
  assert full.shape == (2, 4, 2) and full.dtype == jnp.float32
  np.testing.assert_array_equal(np.asarray(full[0]), [[1, 0], [1, 1], [1, 1], [1, 0]])
  np.testing.assert_array_equal(np.asarray(full[1]), [[1, 0], [0, 1], [1, 1], [0, 0]])


# ----------------------------------------------------------------------------- vs reference


@pytest.mark.parametrize("weighting", ["uniform", "data_size"])
@pytest.mark.parametrize("m, s", [(4, 1), (4, 2), (8, 1), (8, 2)])
@_FAST
@given(seed=st.integers(0, 2 ** 31 - 1), round_index=st.integers(0, 15))
def test_eq6_equals_recover_then_average(m, s, weighting, seed, round_index):
  rng = np.random.default_rng(seed)
  # The server's integers come from a real quantized tensor; its bits are the frozen bits.
  theta = jnp.asarray(rng.standard_normal(_LEAF) * rng.uniform(0.01, 10.0), jnp.float32)
  alpha = quant.step_size(theta, m)
  q = quant.quantize(theta, alpha, m, jax.random.PRNGKey(seed))
  frozen = quant.to_bits(q, m)
  active = selectors.sequential(round_index, m, s)
  uploads = jnp.asarray(rng.integers(0, 2, size=(_CLIENTS, s) + _LEAF), jnp.uint8)
  weights = _weights(weighting, rng)

  expected = _reference(uploads, frozen, active, alpha, weights, m)
  got = aggregate_bits(uploads, frozen, active, alpha, jnp.asarray(weights), m)
  assert got.shape == _LEAF and got.dtype == jnp.float32
  atol = float(alpha) * 2 ** m * 1e-6
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=atol)
  by_recovery = aggregate_by_recovery(uploads, frozen, active, alpha, jnp.asarray(weights), m)
  np.testing.assert_allclose(np.asarray(by_recovery), expected, rtol=1e-6, atol=atol)
  # From the integers themselves (what FedBiF's aggregate uses): the same, to the bit.
  from_ints = aggregate_ints(uploads, q, active, alpha, jnp.asarray(weights), m)
  np.testing.assert_array_equal(np.asarray(from_ints), np.asarray(got))
  np.testing.assert_allclose(np.asarray(got), np.asarray(by_recovery), rtol=1e-6, atol=atol)
  # The result is a weighted mean of representable weights: inside the quantization range.
  lo, hi = quant.int_range(m)
  assert np.all(np.asarray(got) >= lo * float(alpha) - atol)
  assert np.all(np.asarray(got) <= hi * float(alpha) + atol)


@pytest.mark.parametrize("m, s", [(4, 2), (8, 1)])
def test_eq6_with_random_masks_and_non_contiguous_bits(m, s):
  rng = np.random.default_rng(m * 10 + s)
  for trial in range(5):
    active = selectors.random(jax.random.PRNGKey(trial), m, s)
    frozen = jnp.asarray(rng.integers(0, 2, size=(m,) + _LEAF), jnp.uint8)
    uploads = jnp.asarray(rng.integers(0, 2, size=(_CLIENTS, s) + _LEAF), jnp.uint8)
    weights = _weights("data_size", rng)
    alpha = jnp.float32(rng.uniform(0.001, 1.0))
    expected = _reference(uploads, frozen, active, alpha, weights, m)
    got = aggregate_bits(uploads, frozen, active, alpha, jnp.asarray(weights), m)
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6,
                               atol=float(alpha) * 2 ** m * 1e-6)


@pytest.mark.parametrize("m, s", [(4, 1), (8, 2)])
def test_eq6_clients_returning_the_server_bits_reproduce_the_server_model(m, s):
  rng = np.random.default_rng(0)
  theta = jnp.asarray(rng.standard_normal(_LEAF), jnp.float32)
  alpha = quant.step_size(theta, m)
  q = quant.quantize(theta, alpha, m, jax.random.PRNGKey(1))
  frozen = quant.to_bits(q, m)
  for t in range(m // s):
    active = selectors.sequential(t, m, s)
    idx = selectors.active_indices(active, s)
    uploads = jnp.broadcast_to(frozen[idx][None], (_CLIENTS, s) + _LEAF)
    weights = jnp.asarray(_weights("data_size", rng))
    got = aggregate_bits(uploads, frozen, active, alpha, weights, m)
    np.testing.assert_allclose(np.asarray(got), np.asarray(quant.dequantize(q, alpha)),
                               rtol=1e-6, atol=float(alpha) * 1e-5)


def test_eq6_with_all_bits_active_is_the_weighted_mean_of_client_integers():
  m = 4
  rng = np.random.default_rng(3)
  client_ints = rng.integers(-8, 8, size=(_CLIENTS,) + _LEAF)
  uploads = jnp.stack([quant.to_bits(jnp.asarray(c, jnp.int8), m) for c in client_ints])
  frozen = jnp.asarray(rng.integers(0, 2, size=(m,) + _LEAF), jnp.uint8)   # ignored
  weights = np.asarray([0.2, 0.3, 0.5], np.float32)
  got = aggregate_bits(uploads, frozen, jnp.ones((m,), bool), jnp.float32(0.5),
                       jnp.asarray(weights), m)
  expected = 0.5 * np.tensordot(weights.astype(np.float64), client_ints, axes=1)
  np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-6)


def test_eq6_under_jit_matches_eager():
  m, s = 8, 2
  rng = np.random.default_rng(5)
  frozen = jnp.asarray(rng.integers(0, 2, size=(m,) + _LEAF), jnp.uint8)
  uploads = jnp.asarray(rng.integers(0, 2, size=(_CLIENTS, s) + _LEAF), jnp.uint8)
  weights = jnp.asarray(_weights("data_size", rng))
  alpha = jnp.float32(0.03)
  f = jax.jit(aggregate_bits, static_argnums=5)
  for t in range(4):
    active = selectors.sequential(t, m, s)
    expected = _reference(uploads, frozen, active, alpha, weights, m)
    np.testing.assert_allclose(np.asarray(f(uploads, frozen, active, alpha, weights, m)),
                               expected, rtol=1e-6, atol=1e-6)


# ----------------------------------------------------------------------------- sign-magnitude


def test_aggregate_by_recovery_sign_magnitude_hand_computed():
  # m = 4 sign-magnitude, q = 3 -> bits [1, 1, 0, 0]; only the sign bit (bit 3) is trained.
  frozen = quant.to_bits(jnp.asarray([3], jnp.int8), 4, "sign_magnitude")
  np.testing.assert_array_equal(np.asarray(frozen)[:, 0], [1, 1, 0, 0])
  active = jnp.asarray([False, False, False, True])
  uploads = jnp.asarray([[[1]], [[0]]], jnp.uint8)      # client A flips the sign: -3; B: +3
  weights = jnp.asarray([0.5, 0.5], jnp.float32)
  got = aggregate_by_recovery(uploads, frozen, active, jnp.float32(1.0), weights, 4,
                              encoding="sign_magnitude")
  np.testing.assert_allclose(np.asarray(got), [0.0], atol=1e-7)
  sized = jnp.asarray([0.75, 0.25], jnp.float32)
  got = aggregate_by_recovery(uploads, frozen, active, jnp.float32(0.5), sized, 4,
                              encoding="sign_magnitude")
  np.testing.assert_allclose(np.asarray(got), [0.5 * (0.75 * -3 + 0.25 * 3)], rtol=1e-6)


def test_aggregate_by_recovery_sign_magnitude_matches_numpy_reference():
  m, s = 4, 2
  rng = np.random.default_rng(11)
  frozen = jnp.asarray(rng.integers(0, 2, size=(m,) + _LEAF), jnp.uint8)
  uploads = jnp.asarray(rng.integers(0, 2, size=(_CLIENTS, s) + _LEAF), jnp.uint8)
  weights = _weights("data_size", rng)
  for t in range(2):
    active = selectors.sequential(t, m, s)
    idx = np.flatnonzero(np.asarray(active))
    full = np.repeat(np.asarray(frozen, np.int64)[None], _CLIENTS, axis=0)
    full[:, idx] = np.asarray(uploads)
    ints = (1 - 2 * full[:, 3]) * (full[:, 0] + 2 * full[:, 1] + 4 * full[:, 2])
    expected = 0.125 * np.tensordot(weights.astype(np.float64), ints, axes=1)
    got = aggregate_by_recovery(uploads, frozen, active, jnp.float32(0.125),
                                jnp.asarray(weights), m, encoding="sign_magnitude")
    np.testing.assert_allclose(np.asarray(got), expected, rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------- bad input


def _small_case():
  frozen = jnp.zeros((4,) + _LEAF, jnp.uint8)
  uploads = jnp.zeros((_CLIENTS, 1) + _LEAF, jnp.uint8)
  active = selectors.sequential(0, 4, 1)
  return uploads, frozen, active


@pytest.mark.parametrize("alpha", [0.0, -1.0, float("nan")])
def test_aggregate_bits_rejects_non_positive_alpha(alpha):
  uploads, frozen, active = _small_case()
  weights = jnp.full((_CLIENTS,), 1.0 / _CLIENTS)
  with pytest.raises(ValueError, match=r"^alpha: .*> 0"):
    aggregate_bits(uploads, frozen, active, jnp.float32(alpha), weights, 4)


@pytest.mark.parametrize("num_weights", [1, 2, 4])
def test_aggregation_rejects_client_weights_of_the_wrong_length(num_weights):
  uploads, frozen, active = _small_case()
  weights = jnp.full((num_weights,), 1.0 / num_weights)
  with pytest.raises(ValueError, match=rf"^weights: .*\({_CLIENTS},\)"):
    aggregate_bits(uploads, frozen, active, jnp.float32(1.0), weights, 4)
  with pytest.raises(ValueError, match=rf"^weights: .*\({_CLIENTS},\)"):
    aggregate_by_recovery(uploads, frozen, active, jnp.float32(1.0), weights, 4)


def test_aggregate_bits_rejects_two_dimensional_weights():
  uploads, frozen, active = _small_case()
  with pytest.raises(ValueError, match=r"^weights: "):
    aggregate_bits(uploads, frozen, active, jnp.float32(1.0), jnp.ones((_CLIENTS, 1)) / 3, 4)


@pytest.mark.parametrize("m", [0, 9, 4.0])
def test_aggregate_bits_rejects_bad_bit_width(m):
  uploads, frozen, active = _small_case()
  with pytest.raises(ValueError, match=r"^m: .*1\.\.8"):
    aggregate_bits(uploads, frozen, active, jnp.float32(1.0), jnp.full((_CLIENTS,), 1 / 3), m)


def test_aggregate_bits_rejects_frozen_bits_with_wrong_bit_axis():
  uploads, frozen, active = _small_case()
  with pytest.raises(ValueError, match=r"^frozen_bits: .*m=8"):
    aggregate_bits(uploads, frozen, active, jnp.float32(1.0), jnp.full((_CLIENTS,), 1 / 3), 8)


def test_recover_client_bits_rejects_mismatched_per_bit_shapes():
  frozen = jnp.zeros((4, 5, 4), jnp.uint8)
  uploads = jnp.zeros((2, 1, 4, 5), jnp.uint8)
  with pytest.raises(ValueError, match=r"^active_bits: .*frozen_bits"):
    recover_client_bits(uploads, frozen, selectors.sequential(0, 4, 1))


# ----------------------------------------------------------------------------- FedBiF's aggregate


def test_fedbif_aggregate_by_hand_with_unequal_weights():
  """A hand-made downlink: integers [3, -8] of one 1x2 kernel, alpha 0.5, bit 2 activated.
  u = q + 8 = [11, 0] = [1011b, 0000b]; the frozen bits 0, 1, 3 give [11, 0]. Three clients
  upload bit 2 = [1, 1], [0, 1], [1, 0] with p = (0.1, 0.3, 0.6):
    weight 0: 4 * (0.1 + 0.6) = 2.8;  0.5 * (2.8 + 11 - 8) = 2.9
    weight 1: 4 * (0.1 + 0.3) = 1.6;  0.5 * (1.6 + 0 - 8) = -3.2
  (uniform weights would give 0.5 * (8/3 + 3) = 2.8333 and 0.5 * (8/3 - 8) = -2.6667).
  Biases [1], [2], [4]: 0.1 + 0.6 + 2.4 = 3.1."""
  algo = get_algorithm(small_config(num_clients=3))
  downlink = {"weights": {"d": {"kernel": Bits(jnp.asarray([[3, -8]], jnp.int8), jnp.int32(4))}},
              "alpha": {"d": {"kernel": jnp.float32(0.5)}}, "other": {"d": {"bias": jnp.zeros(1)}},
              "model_state": {}, "active": jnp.asarray([False, False, True, False])}
  uplinks = {"weights": {"d": {"kernel": Bits(jnp.asarray([[[[1, 1]]], [[[0, 1]]], [[[1, 0]]]],
                                                         jnp.uint8), jnp.ones(3, jnp.int32))}},
             "other": {"d": {"bias": jnp.asarray([[1.0], [2.0], [4.0]])}}, "model_state": {}}
  state = {"params": {}, "model_state": {}, "round": jnp.int32(5)}
  new = jax.jit(algo.aggregate)(state, downlink, uplinks, jnp.asarray([0.1, 0.3, 0.6]), None)
  np.testing.assert_allclose(new["params"]["d"]["kernel"], [[2.9, -3.2]], rtol=1e-6)
  np.testing.assert_allclose(new["params"]["d"]["bias"], [3.1], rtol=1e-6)
  assert int(new["round"]) == 6


def _np_eq6_offset(q, alpha, active, uploads, p, m):
  """Eq. 6 as printed, float64: alpha * (sum_k p_k sum_{i in S} 2^i b_{i,k}
  + sum_{j not in S} 2^j b_j - 2^(m-1)), b_j = bit j of q + 2^(m-1)."""
  u = np.asarray(q, np.int64) + 2 ** (m - 1)
  idx = np.flatnonzero(np.asarray(active))
  uploads = np.asarray(uploads, np.float64)
  active_part = sum(2.0 ** i * np.tensordot(p, uploads[:, r], axes=1) for r, i in enumerate(idx))
  frozen_part = sum(2.0 ** j * ((u >> j) & 1) for j in range(m) if j not in idx)
  return float(alpha) * (active_part + frozen_part - 2.0 ** (m - 1))


@pytest.mark.parametrize("m, s, round_index", [(4, 1, 2), (8, 2, 1), (8, 2, 3)])
def test_fedbif_aggregate_is_eq6_with_unequal_data_size_weights(m, s, round_index):
  """FedBiF's `aggregate` on a real broadcast of a conv and a dense layer, three clients of
  100, 300 and 600 examples (p = 0.1, 0.3, 0.6) uploading random bits: every kernel equals
  Eq. 6 computed here in numpy, every bias the p-weighted mean."""
  algo = get_algorithm(small_config(num_clients=3, fedbif__bits=m, fedbif__active_bits=s))
  rng = np.random.default_rng(m + 10 * round_index)
  shapes = {"conv": (3, 3, 2, 4), "dense": (5, 3)}
  params = {name: {"kernel": jnp.asarray(rng.standard_normal(shape), jnp.float32),
                   "bias": jnp.asarray(rng.standard_normal(shape[-1:]), jnp.float32)}
            for name, shape in shapes.items()}
  state = algo.init(jax.random.key(0), {"params": params})
  state["round"] = jnp.asarray(round_index, jnp.int32)
  n = np.array([100.0, 300.0, 600.0])
  p = n / n.sum()
  downlink = algo.broadcast(state, jax.random.key(1), RoundInfo(jnp.asarray(p, jnp.float32),
                                                                jnp.asarray(n, jnp.float32)))
  uplinks = {"weights": {name: {"kernel": Bits(jnp.asarray(rng.integers(0, 2, (3, s) + shape),
                                                           jnp.uint8), jnp.ones(3, jnp.int32))}
                         for name, shape in shapes.items()},
             "other": {name: {"bias": jnp.asarray(rng.standard_normal((3,) + shape[-1:]),
                                                  jnp.float32)} for name, shape in shapes.items()},
             "model_state": {}}
  new = algo.aggregate(state, downlink, uplinks, jnp.asarray(p, jnp.float32), None)
  assert int(new["round"]) == round_index + 1
  for name in shapes:
    q = downlink["weights"][name]["kernel"].values
    alpha = float(downlink["alpha"][name]["kernel"])
    ups = uplinks["weights"][name]["kernel"].values
    expected = _np_eq6_offset(q, alpha, downlink["active"], ups, p, m)
    np.testing.assert_allclose(new["params"][name]["kernel"], expected, rtol=1e-6,
                               atol=1e-5 * alpha)
    uniform = _np_eq6_offset(q, alpha, downlink["active"], ups, np.full(3, 1 / 3), m)
    assert np.abs(uniform - expected).max() > 0.1 * alpha, "the weights must matter here"
    np.testing.assert_allclose(new["params"][name]["bias"],
                               np.tensordot(p, np.asarray(uplinks["other"][name]["bias"]), axes=1),
                               rtol=1e-6, atol=1e-7)
