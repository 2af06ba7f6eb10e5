"""Tests for fedbif_jax.quant: Eq. 1-5 of the paper.

Covers the step size of Eq. 5 (`step_size`), stochastic and nearest quantization (Eq. 1-2,
`quantize`: unbiasedness over many keys, integer range and dtype, hand-computed values),
dequantization (Eq. 3), the bit decomposition of Eq. 4 (`to_bits` / `from_bits`) in offset and
sign-magnitude encodings (round trips for every representable integer, hand-computed bit
patterns), `int_range`, and the one-line ValueErrors raised for bad m, encodings and alpha.
"""

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedbif_jax import quant

_FAST = settings(max_examples=30, deadline=None)
_VEC = 16  # fixed vector length for property tests, so that ops compile once


def _clamped(x, alpha, m, encoding="offset"):
  """Reference clamp(x / alpha, lo, hi) in float64 (Eq. 1 before rounding)."""
  lo, hi = quant.int_range(m, encoding)
  return np.clip(np.asarray(x, np.float64) / float(alpha), lo, hi)


# ----------------------------------------------------------------------------- int_range


@pytest.mark.parametrize("m, expected", [(1, (-1, 0)), (2, (-2, 1)), (4, (-8, 7)),
                                         (8, (-128, 127))])
def test_int_range_offset_is_minus_2_pow_m_minus_1_to_2_pow_m_minus_1_minus_1(m, expected):
  assert quant.int_range(m) == expected
  assert quant.int_range(m, "offset") == expected


@pytest.mark.parametrize("m, expected", [(2, (-1, 1)), (4, (-7, 7)), (8, (-127, 127))])
def test_int_range_sign_magnitude_is_symmetric(m, expected):
  assert quant.int_range(m, "sign_magnitude") == expected


# ----------------------------------------------------------------------------- step_size


@pytest.mark.parametrize("x, m, expected", [
    ([0.3, -0.74, 1.0], 2, 0.5),     # 1.0 / 2^1
    ([0.3, -0.74, 1.0], 4, 0.125),   # 1.0 / 2^3
    ([0.3, -0.74, 1.0], 1, 1.0),     # 1.0 / 2^0
    ([-3.0, 1.0], 3, 0.75),          # 3 / 2^2: the max is taken over |x|
    ([[0.5, -2.0], [1.5, 0.25]], 8, 2.0 / 128.0),
])
def test_step_size_is_max_abs_over_2_pow_m_minus_1(x, m, expected):
  alpha = quant.step_size(jnp.asarray(x, jnp.float32), m)
  assert alpha.shape == ()
  assert alpha.dtype == jnp.float32
  assert float(alpha) == pytest.approx(expected, rel=1e-7)


@pytest.mark.parametrize("m", [1, 2, 4, 8])
def test_step_size_of_zero_tensor_is_positive_and_finite(m):
  alpha = quant.step_size(jnp.zeros((3, 4), jnp.float32), m)
  assert np.isfinite(float(alpha)) and float(alpha) > 0
  assert float(alpha) == pytest.approx(1.0 / 2 ** (m - 1))


# ----------------------------------------------------------------------------- quantize


def test_quantize_nearest_hand_computed_m2():
  # alpha = 1.0 / 2 = 0.5; x / alpha = [0.6, -1.48, 2.0]; clamp to [-2, 1] -> [0.6, -1.48, 1];
  # nearest rounding -> [1, -1, 1].
  x = jnp.asarray([0.3, -0.74, 1.0], jnp.float32)
  alpha = quant.step_size(x, 2)
  assert float(alpha) == 0.5
  q = quant.quantize(x, alpha, 2)
  assert q.dtype == jnp.int8
  np.testing.assert_array_equal(np.asarray(q), [1, -1, 1])
  np.testing.assert_array_equal(np.asarray(quant.dequantize(q, alpha)), [0.5, -0.5, 0.5])


def test_quantize_nearest_hand_computed_m4_clamps_both_ends():
  # alpha = 0.25, range [-8, 7]: x / alpha = [-12, -8, -1.2, 0.9, 6.6, 40] -> [-8, -8, -1, 1, 7, 7]
  x = jnp.asarray([-3.0, -2.0, -0.3, 0.225, 1.65, 10.0], jnp.float32)
  q = quant.quantize(x, jnp.float32(0.25), 4)
  np.testing.assert_array_equal(np.asarray(q), [-8, -8, -1, 1, 7, 7])


def test_quantize_nearest_rounds_half_to_even():
  x = jnp.asarray([0.5, 1.5, 2.5, -0.5, -1.5], jnp.float32)
  q = quant.quantize(x, jnp.float32(1.0), 4)
  np.testing.assert_array_equal(np.asarray(q), [0, 2, 2, 0, -2])


def test_quantize_sign_magnitude_uses_symmetric_range():
  # m=3 sign-magnitude: [-3, 3]; offset would allow -4.
  x = jnp.asarray([-10.0, -3.2, 2.9, 10.0], jnp.float32)
  q = quant.quantize(x, jnp.float32(1.0), 3, encoding="sign_magnitude")
  np.testing.assert_array_equal(np.asarray(q), [-3, -3, 3, 3])
  q_off = quant.quantize(x, jnp.float32(1.0), 3)
  np.testing.assert_array_equal(np.asarray(q_off), [-4, -3, 3, 3])


@pytest.mark.parametrize("m", [1, 3, 8])
def test_zero_tensor_quantizes_to_zeros(m):
  x = jnp.zeros((4, 5), jnp.float32)
  alpha = quant.step_size(x, m)
  for key in (None, jax.random.PRNGKey(0), jax.random.PRNGKey(7)):
    q = quant.quantize(x, alpha, m, key)
    assert q.dtype == jnp.int8 and q.shape == (4, 5)
    np.testing.assert_array_equal(np.asarray(q), np.zeros((4, 5), np.int8))
    np.testing.assert_array_equal(np.asarray(quant.dequantize(q, alpha)), np.zeros((4, 5)))


@pytest.mark.parametrize("m, alpha", [(3, 0.125), (2, 0.5), (8, 2.0 ** -6)])
def test_stochastic_quantize_is_unbiased_over_2000_keys(m, alpha):
  # alpha is a power of two so that x / alpha is exact in float32 and grid points stay exact.
  lo, hi = quant.int_range(m)
  # Values inside the range (fractional and on the grid) and beyond both ends.
  y = np.asarray([lo - 2.7, lo, lo + 0.3, -0.5, -0.123, 0.0, 0.01, 0.25, 0.5, 0.9,
                  hi - 0.6, hi, hi + 0.1, hi + 5.0], np.float64)
  x = jnp.asarray(y * alpha, jnp.float32)
  a = jnp.float32(alpha)
  n = 2000
  keys = jax.random.split(jax.random.PRNGKey(1234), n)
  deq = jax.vmap(lambda k: quant.dequantize(quant.quantize(x, a, m, k), a))(keys)
  deq = np.asarray(deq, np.float64)
  assert deq.shape == (n, y.size)

  target = _clamped(np.asarray(x), alpha, m)   # clamp(x / alpha) in integer units
  frac = target - np.floor(target)
  std_err = alpha * np.sqrt(frac * (1.0 - frac) / n)
  mean = deq.mean(axis=0)
  # 4 standard errors, plus float32 slack for elements whose variance is 0.
  np.testing.assert_array_less(np.abs(mean - alpha * target), 4.0 * std_err + 1e-5 * alpha)
  # Elements exactly on the grid or clamped are deterministic.
  exact = frac == 0.0
  assert exact.any()
  np.testing.assert_allclose(deq[:, exact], np.broadcast_to(alpha * target[exact], (n, exact.sum())),
                             rtol=1e-6)
  # Fractional elements really are random (both neighbours appear).
  for j in np.flatnonzero(~exact):
    assert len(np.unique(deq[:, j])) == 2


def test_stochastic_rounding_frequency_matches_fraction():
  # y = 0.25 -> 1 with probability 0.25, y = -1.75 -> -1 with probability 0.25.
  x = jnp.asarray([0.25, -1.75], jnp.float32)
  keys = jax.random.split(jax.random.PRNGKey(5), 2000)
  q = np.asarray(jax.vmap(lambda k: quant.quantize(x, jnp.float32(1.0), 4, k))(keys))
  assert set(np.unique(q[:, 0])) == {0, 1}
  assert set(np.unique(q[:, 1])) == {-2, -1}
  se = np.sqrt(0.25 * 0.75 / 2000)
  assert abs((q[:, 0] == 1).mean() - 0.25) < 4 * se
  assert abs((q[:, 1] == -1).mean() - 0.25) < 4 * se


def test_stochastic_quantize_is_deterministic_given_key():
  x = jax.random.normal(jax.random.PRNGKey(0), (64,))
  alpha = quant.step_size(x, 4)
  k = jax.random.PRNGKey(3)
  np.testing.assert_array_equal(np.asarray(quant.quantize(x, alpha, 4, k)),
                                np.asarray(quant.quantize(x, alpha, 4, k)))
  assert not np.array_equal(np.asarray(quant.quantize(x, alpha, 4, k)),
                            np.asarray(quant.quantize(x, alpha, 4, jax.random.PRNGKey(4))))


@_FAST
@given(values=st.lists(st.floats(-50.0, 50.0, width=32), min_size=_VEC, max_size=_VEC),
       alpha=st.floats(0.01, 4.0),
       m=st.integers(1, 8),
       seed=st.integers(0, 2 ** 31 - 1),
       encoding=st.sampled_from(["offset", "sign_magnitude"]))
def test_quantize_outputs_are_int8_in_range_and_floor_or_floor_plus_one(values, alpha, m, seed,
                                                                        encoding):
  if encoding == "sign_magnitude" and m == 1:
    m = 2
  x = jnp.asarray(values, jnp.float32)
  lo, hi = quant.int_range(m, encoding)
  target = _clamped(np.asarray(x), np.float32(alpha), m, encoding)
  eps = 1e-5 * max(1.0, float(np.abs(target).max()))

  q_rand = quant.quantize(x, jnp.float32(alpha), m, jax.random.PRNGKey(seed), encoding)
  q_near = quant.quantize(x, jnp.float32(alpha), m, None, encoding)
  for q in (q_rand, q_near):
    assert q.dtype == jnp.int8 and q.shape == (_VEC,)
    q = np.asarray(q, np.int64)
    assert q.min() >= lo and q.max() <= hi
  q_rand = np.asarray(q_rand, np.float64)
  # Stochastic: floor(clamped) or floor(clamped) + 1 (with slack for float32 division).
  assert np.all(q_rand >= np.floor(target - eps))
  assert np.all(q_rand <= np.floor(target + eps) + 1)
  assert np.all(np.abs(q_rand - target) < 1 + eps)
  # Nearest: within half a step of the clamped value.
  assert np.all(np.abs(np.asarray(q_near, np.float64) - target) <= 0.5 + eps)


# ----------------------------------------------------------------------------- dequantize


def test_dequantize_is_alpha_times_q():
  q = jnp.asarray([[-8, 0], [3, 7]], jnp.int8)
  x = quant.dequantize(q, jnp.float32(0.125))
  assert x.dtype == jnp.float32 and x.shape == (2, 2)
  np.testing.assert_array_equal(np.asarray(x), [[-1.0, 0.0], [0.375, 0.875]])


# ----------------------------------------------------------------------------- to_bits / from_bits


@pytest.mark.parametrize("m", list(range(1, 9)))
def test_offset_bits_round_trip_every_integer(m):
  lo, hi = quant.int_range(m)
  q = jnp.arange(lo, hi + 1, dtype=jnp.int32).astype(jnp.int8)
  b = quant.to_bits(q, m)
  assert b.shape == (m, hi - lo + 1) and b.dtype == jnp.uint8
  b_np = np.asarray(b)
  assert set(np.unique(b_np)) <= {0, 1}
  # bits[i] is the bit of weight 2^i of u = q + 2^(m-1) (Eq. 4).
  u = np.arange(lo, hi + 1) + 2 ** (m - 1)
  expected = np.stack([(u >> i) & 1 for i in range(m)]).astype(np.uint8)
  np.testing.assert_array_equal(b_np, expected)
  back = quant.from_bits(b, m)
  np.testing.assert_array_equal(np.asarray(back), np.arange(lo, hi + 1))
  # Eq. 4 by hand: sum_i 2^i b_i - 2^(m-1).
  manual = (2 ** np.arange(m))[:, None] * b_np.astype(np.int64)
  np.testing.assert_array_equal(manual.sum(axis=0) - 2 ** (m - 1), np.arange(lo, hi + 1))


@pytest.mark.parametrize("m", list(range(2, 9)))
def test_sign_magnitude_bits_round_trip_every_integer(m):
  lo, hi = quant.int_range(m, "sign_magnitude")
  q = jnp.arange(lo, hi + 1, dtype=jnp.int32).astype(jnp.int8)
  b = quant.to_bits(q, m, "sign_magnitude")
  assert b.shape == (m, hi - lo + 1) and b.dtype == jnp.uint8
  b_np = np.asarray(b)
  ints = np.arange(lo, hi + 1)
  np.testing.assert_array_equal(b_np[m - 1], (ints < 0).astype(np.uint8))
  for i in range(m - 1):
    np.testing.assert_array_equal(b_np[i], (np.abs(ints) >> i) & 1)
  np.testing.assert_array_equal(np.asarray(quant.from_bits(b, m, "sign_magnitude")), ints)


@pytest.mark.parametrize("q, bits", [
    (-8, [0, 0, 0, 0]),   # u = 0
    (0, [0, 0, 0, 1]),    # u = 8
    (7, [1, 1, 1, 1]),    # u = 15
    (-3, [1, 0, 1, 0]),   # u = 5 = 1 + 4
    (3, [1, 1, 0, 1]),    # u = 11 = 1 + 2 + 8
    (-1, [1, 1, 1, 0]),   # u = 7
])
def test_offset_bit_patterns_m4_hand_computed(q, bits):
  b = quant.to_bits(jnp.asarray(q, jnp.int8), 4)
  assert b.shape == (4,) and b.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(b), bits)
  assert int(quant.from_bits(jnp.asarray(bits, jnp.uint8), 4)) == q


@pytest.mark.parametrize("q, bits", [
    (-3, [1, 1, 0, 1]),   # magnitude 3 = [1, 1, 0], sign 1
    (3, [1, 1, 0, 0]),
    (0, [0, 0, 0, 0]),
    (-7, [1, 1, 1, 1]),
    (5, [1, 0, 1, 0]),
])
def test_sign_magnitude_bit_patterns_m4_hand_computed(q, bits):
  b = quant.to_bits(jnp.asarray(q, jnp.int8), 4, "sign_magnitude")
  np.testing.assert_array_equal(np.asarray(b), bits)
  assert int(quant.from_bits(jnp.asarray(bits, jnp.uint8), 4, "sign_magnitude")) == q


def test_sign_magnitude_negative_zero_decodes_to_zero():
  assert int(quant.from_bits(jnp.asarray([0, 0, 0, 1], jnp.uint8), 4, "sign_magnitude")) == 0


def test_to_bits_keeps_shape_with_bit_axis_first():
  q = jnp.asarray([[[-8, 7, 0], [1, -1, 3]]], jnp.int8)     # shape (1, 2, 3)
  b = quant.to_bits(q, 4)
  assert b.shape == (4, 1, 2, 3) and b.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(b[:, 0, 0, 0]), [0, 0, 0, 0])
  np.testing.assert_array_equal(np.asarray(b[:, 0, 1, 2]), [1, 1, 0, 1])
  back = quant.from_bits(b, 4)
  assert back.shape == (1, 2, 3)
  np.testing.assert_array_equal(np.asarray(back), np.asarray(q))


def test_quantized_tensor_survives_the_bit_round_trip():
  x = jnp.asarray(np.random.default_rng(0).standard_normal((3, 5)), jnp.float32)
  for m in (2, 8):
    alpha = quant.step_size(x, m)
    q = quant.quantize(x, alpha, m, jax.random.PRNGKey(m))
    np.testing.assert_array_equal(np.asarray(quant.from_bits(quant.to_bits(q, m), m)),
                                  np.asarray(q, np.int32))


# ----------------------------------------------------------------------------- bad input


@pytest.mark.parametrize("m", [0, 9, -1, 2.0, 4.5, "4", True, None])
def test_bad_bit_width_raises_naming_m_and_range(m):
  x = jnp.ones((3,), jnp.float32)
  for fn in (lambda: quant.step_size(x, m), lambda: quant.to_bits(jnp.zeros((3,), jnp.int8), m),
             lambda: quant.check_bits(m), lambda: quant.int_range(m),
             lambda: quant.quantize(x, jnp.float32(1.0), m),
             lambda: quant.from_bits(jnp.zeros((4, 3), jnp.uint8), m)):
    with pytest.raises(ValueError, match=r"^m: .*1\.\.8") as info:
      fn()
    assert "\n" not in str(info.value)


def test_check_bits_accepts_numpy_integers_and_names_custom_field():
  assert quant.check_bits(np.int64(4)) == 4
  assert type(quant.check_bits(np.int32(3))) is int
  with pytest.raises(ValueError, match=r"^fedbif\.bits: .*1\.\.8.*got 9"):
    quant.check_bits(9, "fedbif.bits")


def test_sign_magnitude_with_one_bit_raises():
  for fn in (lambda: quant.check_bits(1, encoding="sign_magnitude"),
             lambda: quant.to_bits(jnp.zeros((2,), jnp.int8), 1, "sign_magnitude"),
             lambda: quant.from_bits(jnp.zeros((1, 2), jnp.uint8), 1, "sign_magnitude"),
             lambda: quant.quantize(jnp.zeros((2,)), jnp.float32(1.0), 1,
                                    encoding="sign_magnitude")):
    with pytest.raises(ValueError, match=r"^m: .*2\.\.8.*sign_magnitude"):
      fn()


def test_unknown_encoding_raises():
  with pytest.raises(ValueError, match=r"^encoding: .*offset.*sign_magnitude"):
    quant.to_bits(jnp.zeros((2,), jnp.int8), 4, "twos_complement")


def test_from_bits_with_wrong_leading_axis_raises():
  with pytest.raises(ValueError, match=r"^bits: .*m=4"):
    quant.from_bits(jnp.zeros((3, 2), jnp.uint8), 4)


@pytest.mark.parametrize("alpha", [0.0, -0.5, float("nan"), float("inf")])
def test_non_positive_or_non_finite_alpha_raises(alpha):
  x = jnp.ones((3,), jnp.float32)
  with pytest.raises(ValueError, match=r"^alpha: .*> 0"):
    quant.quantize(x, jnp.float32(alpha), 4)
  with pytest.raises(ValueError, match=r"^alpha: .*> 0"):
    quant.quantize(x, alpha, 4, jax.random.PRNGKey(0))
  with pytest.raises(ValueError, match=r"^alpha: .*> 0"):
    quant.dequantize(jnp.ones((3,), jnp.int8), jnp.float32(alpha))


def test_alpha_array_with_one_non_positive_entry_raises():
  with pytest.raises(ValueError, match=r"^alpha: "):
    quant.dequantize(jnp.ones((2,), jnp.int8), jnp.asarray([0.5, 0.0], jnp.float32))


# ----------------------------------------------------------------------------- QSGD levels, FedDQ min-max


def test_fedpaq_quantizer_is_unbiased_on_its_grid():
  x = jnp.array([0.5, -1.0, 0.25, 0.0])
  keys = jax.random.split(jax.random.key(0), 20000)
  q, s = jax.vmap(lambda k: quant.quantize_levels(x, 7, k, "max", jnp.int8))(keys)
  assert float(s[0]) == 1.0
  # 7 * x = [3.5, -7, 1.75, 0]: rounds to {3, 4}, -7 exactly, {1, 2}, 0 exactly
  assert set(np.unique(q[:, 0]).tolist()) == {3, 4} and set(np.unique(q[:, 2]).tolist()) == {1, 2}
  assert np.all(q[:, 1] == -7) and np.all(q[:, 3] == 0)
  mean = jnp.mean(quant.dequantize_levels(q, 7, s[:, None]), axis=0)
  np.testing.assert_allclose(mean, x, atol=0.01)
  l2 = jax.vmap(lambda k: quant.dequantize_levels(*quant.quantize_levels(
      x, 7, k, "l2", jnp.int8)[0:1], 7, quant.tensor_scale(x, "l2")))(keys)
  np.testing.assert_allclose(jnp.mean(l2, axis=0), x, atol=0.01)


def test_feddq_minmax_quantizer_by_hand():
  x = jnp.array([0.0, 0.25, 1.0, 0.5])
  q, f = quant.quantize_minmax(x, jnp.float32(0.0), jnp.float32(1.0), jnp.int32(2))
  np.testing.assert_allclose(f, 1 / 3)                      # 4 levels over [0, 1]
  np.testing.assert_array_equal(q, [0, 1, 3, 2])            # 0, 0.75, 3, 1.5 rounded (ties to even)
  np.testing.assert_allclose(quant.dequantize_minmax(q, f, 0.0), [0, 1 / 3, 1, 2 / 3], atol=1e-6)


def test_stochastic_round_is_floor_or_ceil_with_the_fraction_as_probability():
  y = jnp.full((200_000,), 2.3, jnp.float32)
  r = quant.stochastic_round(y, jax.random.key(11))
  assert set(np.unique(np.asarray(r)).tolist()) == {2.0, 3.0}
  assert abs(float(jnp.mean(r == 3.0)) - 0.3) < 0.005     # 5 sigma ~ 0.005 at n = 2e5
  exact = quant.stochastic_round(jnp.array([-2.0, 0.0, 5.0]), jax.random.key(0))
  np.testing.assert_array_equal(exact, [-2.0, 0.0, 5.0])   # integers never move
  np.testing.assert_array_equal(quant.round_values(jnp.array([0.5, 1.5, -0.6])), [0.0, 2.0, -1.0])


def test_qsgd_levels_are_unbiased_on_a_large_random_sample():
  x = jnp.asarray(np.random.default_rng(5).uniform(-1, 1, 64), jnp.float32)
  keys = jax.random.split(jax.random.key(21), 4000)
  q, s = jax.vmap(lambda k: quant.quantize_levels(x, 3, k, "max", jnp.int8))(keys)
  assert np.all(np.abs(np.asarray(q)) <= 3)
  mean = np.mean(np.asarray(quant.dequantize_levels(q, 3, s[:, None])), axis=0)
  # per element the estimate's std is at most (s / L) / 2 / sqrt(4000) ~ 0.0027 (s <= 1, L = 3)
  np.testing.assert_allclose(mean, np.asarray(x), atol=0.015)


def test_qsgd_level_quantizer_hand_values():
  x = jnp.array([-2.0, 1.0, 0.5, 2.0])
  assert float(quant.tensor_scale(x, "max")) == 2.0
  assert float(quant.tensor_scale(jnp.array([3.0, 4.0]), "l2")) == 5.0
  assert float(quant.tensor_scale(jnp.zeros(3))) == 1.0
  q, s = quant.quantize_levels(x, 1, jax.random.key(0), "max", jnp.int8)
  # L x / s = [-1, 0.5, 0.25, 1]: the ends are exact, the middle ones round to 0 or 1
  assert q.dtype == jnp.int8 and int(q[0]) == -1 and int(q[3]) == 1
  assert int(q[1]) in (0, 1) and int(q[2]) in (0, 1)
  np.testing.assert_allclose(quant.dequantize_levels(jnp.array([-3, 1]), 3, 1.5), [-1.5, 0.5])
  assert quant.level_width(jnp.array([1, 2, 3, 4, 7, 8, 127, 32767])).tolist() == [
      2, 3, 3, 4, 4, 5, 8, 16]                            # ceil(log2(2L + 1))


def test_minmax_quantizer_hand_example_with_offset_range():
  # lo = -1, hi = 2, 2 bits: 4 levels -1, 0, 1, 2 (f = 1); nearest rounding (ties to even)
  x = jnp.array([-1.0, -0.4, 0.5, 1.6, 2.0])
  q, f = quant.quantize_minmax(x, jnp.float32(-1.0), jnp.float32(2.0), jnp.int32(2))
  assert q.dtype == jnp.uint16 and float(f) == 1.0
  np.testing.assert_array_equal(q, [0, 1, 2, 3, 3])        # (x + 1) = 0, 0.6, 1.5, 2.6, 3
  np.testing.assert_allclose(quant.dequantize_minmax(q, f, -1.0), [-1, 0, 1, 2, 2])
  # a constant tensor: f = 1 and every code 0
  q, f = quant.quantize_minmax(jnp.full((3,), 0.7), jnp.float32(0.7), jnp.float32(0.7),
                               jnp.int32(4))
  assert float(f) == 1.0 and q.tolist() == [0, 0, 0]


def test_minmax_stochastic_rounding_is_unbiased():
  x = jnp.asarray(np.random.default_rng(2).uniform(0, 1, 32), jnp.float32)
  keys = jax.random.split(jax.random.key(4), 4000)
  q, f = jax.vmap(lambda k: quant.quantize_minmax(x, jnp.float32(0.0), jnp.float32(1.0),
                                                  jnp.int32(2), k))(keys)
  mean = np.mean(np.asarray(quant.dequantize_minmax(q, f[:, None], 0.0)), axis=0)
  np.testing.assert_allclose(mean, np.asarray(x), atol=0.015)   # f = 1/3: std <= 0.0027
