"""Tests for fedbif_jax.bits: the client-side virtual bits of Sec. 3.1-3.2.

Covers the straight-through step function (`ste_step`: exact forward values, identity
gradient), Kaiming initialisation of virtual bits (`init_virtual_bits`: which leaves, shapes,
std, custom predicates), virtual bits inheritance (`inherit`: reproduces the server's
dequantized weights exactly, keeps |v|, lifts exact zeros to 1e-6), the weight rebuild
`weights_from_bits` (offset and sign-magnitude encodings, gradients that reach only activated
bits, scaled by alpha * 2^i), `split_params` / `merge_params`, and the ValueErrors for mismatched
received bits and bad active masks.
"""

import math

import flax.linen as nn
import flax.traverse_util as traverse_util
from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedbif_jax.algorithms import get_algorithm
from fedbif_jax import bits
from fedbif_jax import pytrees
from fedbif_jax import quant
from fedbif_jax.pytrees import Bits

_FAST = settings(max_examples=25, deadline=None)


def _params(scale=1.0, seed=0):
  """A hand-made params pytree: a conv, a dense layer, a BatchNorm and a nested block.

  Values come from numpy so that tests do not compile jax.random for every shape.
  """
  rng = np.random.default_rng(seed)
  normal = lambda *shape: jnp.asarray(scale * rng.standard_normal(shape), jnp.float32)
  return {
      "Conv_0": {"kernel": 0.3 * normal(3, 3, 2, 4), "bias": jnp.full((4,), 0.1)},
      "BatchNorm_0": {"scale": jnp.ones((4,)), "bias": jnp.zeros((4,))},
      "block": {"Dense_0": {"kernel": 2.0 * normal(6, 5), "bias": normal(5)}},
      "Dense_1": {"bias": jnp.zeros((3,))},   # a layer with no bit-trained leaf
  }


_KERNEL_PATHS = {("Conv_0", "kernel"), ("block", "Dense_0", "kernel")}


# ----------------------------------------------------------------------------- ste_step


def test_ste_step_forward_is_exact_step_with_zero_mapping_to_zero():
  v = jnp.asarray([-2.0, -1e-30, -0.0, 0.0, 1e-30, 1e-6, 3.5], jnp.float32)
  h = bits.ste_step(v)
  assert h.dtype == jnp.float32 and h.shape == v.shape
  np.testing.assert_array_equal(np.asarray(h), [0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 1.0])


def test_ste_step_gradient_is_identity():
  v = jnp.asarray([[-2.0, 0.0, 0.5], [1e-3, -1e-3, 7.0]], jnp.float32)
  c = jnp.asarray([[1.5, -2.0, 3.0], [0.25, 4.0, -0.5]], jnp.float32)
  g = jax.grad(lambda x: jnp.sum(c * bits.ste_step(x)))(v)
  np.testing.assert_array_equal(np.asarray(g), np.asarray(c))


@_FAST
@given(seed=st.integers(0, 2 ** 31 - 1))
def test_ste_step_forward_and_gradient_random(seed):
  rng = np.random.default_rng(seed)
  v = rng.standard_normal((4, 6)).astype(np.float32)
  v[0, 0] = 0.0
  v = jnp.asarray(v)
  c = jnp.asarray(rng.standard_normal((4, 6)), jnp.float32)
  np.testing.assert_array_equal(np.asarray(bits.ste_step(v)), (np.asarray(v) > 0).astype(np.float32))
  g = jax.grad(lambda x: jnp.sum(c * bits.ste_step(x)))(v)
  np.testing.assert_array_equal(np.asarray(g), np.asarray(c))


# ----------------------------------------------------------------------------- init_virtual_bits


@pytest.mark.parametrize("m", [1, 4, 8])
def test_init_virtual_bits_only_kernels_with_bit_axis(m):
  params = _params()
  v = bits.init_virtual_bits(jax.random.PRNGKey(1), params, m)
  flat_v = traverse_util.flatten_dict(v)
  flat_p = traverse_util.flatten_dict(params)
  assert set(flat_v) == _KERNEL_PATHS
  for path, leaf in flat_v.items():
    assert leaf.shape == (m,) + flat_p[path].shape
    assert leaf.dtype == jnp.float32
    assert np.all(np.isfinite(np.asarray(leaf)))
  # Biases and BatchNorm leaves are absent, the nesting is kept.
  assert "bias" not in v["Conv_0"] and "BatchNorm_0" not in v and "Dense_1" not in v
  assert set(v["block"]["Dense_0"]) == {"kernel"}


def test_init_virtual_bits_is_deterministic_given_key_and_differs_across_keys():
  params = _params()
  a = bits.init_virtual_bits(jax.random.PRNGKey(3), params, 4)
  b = bits.init_virtual_bits(jax.random.PRNGKey(3), params, 4)
  c = bits.init_virtual_bits(jax.random.PRNGKey(4), params, 4)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
  for x, z in zip(jax.tree.leaves(a), jax.tree.leaves(c)):
    assert not np.array_equal(np.asarray(x), np.asarray(z))
  # Different leaves get independent draws (not the same stream reshaped).
  d0 = np.asarray(a["Conv_0"]["kernel"]).ravel()
  d1 = np.asarray(a["block"]["Dense_0"]["kernel"]).ravel()
  assert not np.allclose(d0[:10] / np.std(d0), d1[:10] / np.std(d1))


def test_init_virtual_bits_std_is_kaiming_sqrt_2_over_fan_in():
  shape = (512, 64)   # dense IO: fan_in = 512; 32768 samples with m = 1
  params = {"layer": {"kernel": jax.ShapeDtypeStruct(shape, jnp.float32)}}
  m = 1
  v = np.asarray(bits.init_virtual_bits(jax.random.PRNGKey(0), params, m)["layer"]["kernel"])
  assert v.shape == (1, 512, 64)
  expected = math.sqrt(2.0 / 512)
  n = v.size
  assert abs(v.std() / expected - 1.0) < 4.0 / math.sqrt(2 * n)
  assert abs(v.mean()) < 4.0 * expected / math.sqrt(n)
  # Not the std of a fan_out or fan_in * fan_out convention.
  assert abs(v.std() - math.sqrt(2.0 / 64)) > 0.1 * expected


def test_fan_in_hand_computed():
  assert bits.fan_in((3, 3, 16, 32)) == 144
  assert bits.fan_in((10, 5)) == 10
  assert bits.fan_in((7,)) == 7


def test_init_virtual_bits_custom_predicate():
  params = _params()

  def only_biases(path, leaf):
    return path[-1] == "bias" and path[0] != "BatchNorm_0"

  v = bits.init_virtual_bits(jax.random.PRNGKey(0), params, 4, only_biases)
  flat = traverse_util.flatten_dict(v)
  assert set(flat) == {("Conv_0", "bias"), ("block", "Dense_0", "bias"), ("Dense_1", "bias")}
  assert flat[("Dense_1", "bias")].shape == (4, 3)
  assert flat[("Conv_0", "bias")].shape == (4, 4)
  assert flat[("block", "Dense_0", "bias")].shape == (4, 5)


def test_init_virtual_bits_skips_one_dimensional_kernels():
  v = bits.init_virtual_bits(jax.random.PRNGKey(0), {"a": {"kernel": jnp.zeros((3,))}}, 4)
  assert v == {}


def test_init_virtual_bits_on_flax_model_params():

  class Tiny(nn.Module):

    @nn.compact
    def __call__(self, x):
      x = nn.Conv(3, (3, 3))(x)
      x = nn.relu(x).reshape((x.shape[0], -1))
      return nn.Dense(2)(x)

  # Only shapes matter to the initialiser: take them from eval_shape (no compile).
  params = jax.eval_shape(Tiny().init, jax.random.PRNGKey(0), jnp.zeros((1, 4, 4, 1)))["params"]
  v = bits.init_virtual_bits(jax.random.PRNGKey(1), params, 4)
  assert set(traverse_util.flatten_dict(v)) == {("Conv_0", "kernel"), ("Dense_0", "kernel")}
  assert v["Conv_0"]["kernel"].shape == (4, 3, 3, 1, 3)
  assert v["Dense_0"]["kernel"].shape == (4, 48, 2)


# ----------------------------------------------------------------------------- inherit


def _server_round(params, m, seed, encoding="offset"):
  """What the server sends: per-kernel (alpha, q) and the received bits (Eq. 5, 1, 4)."""
  bit_params, _ = pytrees.split_params(params)
  flat = traverse_util.flatten_dict(bit_params)
  alphas, ints, received = {}, {}, {}
  for i, path in enumerate(sorted(flat)):
    alphas[path] = quant.step_size(flat[path], m)
    ints[path] = quant.quantize(flat[path], alphas[path], m, jax.random.PRNGKey(seed + i), encoding)
    received[path] = quant.to_bits(ints[path], m, encoding)
  unflat = traverse_util.unflatten_dict
  return unflat(alphas), unflat(ints), unflat(received)


@pytest.mark.slow
@pytest.mark.parametrize("m", [1, 4, 8])
def test_weights_from_bits_right_after_inherit_equals_dequantized_server_model(m):
  params = _params()
  virtual = bits.init_virtual_bits(jax.random.PRNGKey(11), params, m)
  alphas, ints, received = _server_round(params, m, seed=100)
  inherited = bits.inherit(virtual, received)
  for active in (jnp.zeros((m,), bool), jnp.ones((m,), bool), jnp.arange(m) == m - 1):
    w = bits.weights_from_bits(inherited, alphas, active, m)
    assert set(traverse_util.flatten_dict(w)) == _KERNEL_PATHS
    flat_w, flat_q = traverse_util.flatten_dict(w), traverse_util.flatten_dict(ints)
    flat_a = traverse_util.flatten_dict(alphas)
    for path in _KERNEL_PATHS:
      expected = quant.dequantize(flat_q[path], flat_a[path])
      assert flat_w[path].dtype == jnp.float32
      np.testing.assert_array_equal(np.asarray(flat_w[path]), np.asarray(expected))
  # The hard bits the client now holds are exactly the received bits.
  for got, sent in zip(jax.tree.leaves(bits.hard_bits(inherited)), jax.tree.leaves(received)):
    np.testing.assert_array_equal(np.asarray(got), np.asarray(sent))


@pytest.mark.parametrize("m", [4])
def test_weights_from_bits_after_inherit_sign_magnitude(m):
  params = _params()
  virtual = bits.init_virtual_bits(jax.random.PRNGKey(2), params, m)
  alphas, ints, received = _server_round(params, m, seed=7, encoding="sign_magnitude")
  inherited = bits.inherit(virtual, received)
  w = bits.weights_from_bits(inherited, alphas, jnp.ones((m,), bool), m, "sign_magnitude")
  flat_w, flat_q = traverse_util.flatten_dict(w), traverse_util.flatten_dict(ints)
  flat_a = traverse_util.flatten_dict(alphas)
  for path in _KERNEL_PATHS:
    np.testing.assert_array_equal(np.asarray(flat_w[path]),
                                  np.asarray(quant.dequantize(flat_q[path], flat_a[path])))


def test_inherit_keeps_magnitudes_and_dtype_and_sets_signs_from_bits():
  params = _params()
  m = 4
  virtual = bits.init_virtual_bits(jax.random.PRNGKey(5), params, m)
  _, _, received = _server_round(params, m, seed=3)
  inherited = bits.inherit(virtual, received)
  assert jax.tree.structure(inherited) == jax.tree.structure(virtual)
  for v, b, new in zip(jax.tree.leaves(virtual), jax.tree.leaves(received),
                       jax.tree.leaves(inherited)):
    assert new.shape == v.shape and new.dtype == v.dtype
    v, b, new = np.asarray(v), np.asarray(b), np.asarray(new)
    np.testing.assert_array_equal(np.abs(new), np.abs(v))
    np.testing.assert_array_equal(new > 0, b == 1)
    np.testing.assert_array_equal(new, np.where(b == 1, np.abs(v), -np.abs(v)))


def test_inherit_lifts_exact_zero_virtual_bits_to_1e_minus_6():
  virtual = {"d": {"kernel": jnp.asarray([[[0.0, -0.0], [0.0, 0.3]],
                                          [[-0.5, 0.0], [2.0, -0.0]]], jnp.float32)}}
  received = {"d": {"kernel": jnp.asarray([[[1, 0], [0, 1]],
                                           [[1, 1], [0, 0]]], jnp.uint8)}}
  new = np.asarray(bits.inherit(virtual, received)["d"]["kernel"])
  tiny = np.float32(1e-6)
  expected = np.asarray([[[tiny, -tiny], [-tiny, 0.3]],
                         [[0.5, tiny], [-2.0, -tiny]]], np.float32)
  np.testing.assert_array_equal(new, expected)
  # The step of the inherited bits is the received bit, zeros included.
  np.testing.assert_array_equal(np.asarray(bits.ste_step(jnp.asarray(new))),
                                np.asarray(received["d"]["kernel"], np.float32))


@_FAST
@given(seed=st.integers(0, 2 ** 31 - 1), log_scale=st.floats(-6.0, 6.0),
       active_bits=st.sets(st.integers(0, 3)))
def test_inherit_then_rebuild_matches_dequantize_random_models(seed, log_scale, active_bits):
  m = 4  # fixed shapes and m: one compile for all examples
  params = _params(scale=float(2.0 ** log_scale), seed=seed)
  virtual = bits.init_virtual_bits(jax.random.PRNGKey(seed), params, m)
  alphas, ints, received = _server_round(params, m, seed=seed % 1000)
  active = jnp.asarray([i in active_bits for i in range(m)])
  w = traverse_util.flatten_dict(
      bits.weights_from_bits(bits.inherit(virtual, received), alphas, active, m))
  flat_q, flat_a = traverse_util.flatten_dict(ints), traverse_util.flatten_dict(alphas)
  for path in _KERNEL_PATHS:
    np.testing.assert_array_equal(np.asarray(w[path]),
                                  np.asarray(quant.dequantize(flat_q[path], flat_a[path])))


def test_inherit_rejects_different_shapes():
  virtual = {"d": {"kernel": jnp.ones((4, 3, 2))}}
  for bad in (jnp.ones((4, 2, 3), jnp.uint8), jnp.ones((3, 3, 2), jnp.uint8)):
    with pytest.raises(ValueError, match=r"^received_bits: .*d/kernel.*shape"):
      bits.inherit(virtual, {"d": {"kernel": bad}})


def test_inherit_rejects_different_leaf_sets():
  virtual = {"d": {"kernel": jnp.ones((4, 3, 2))}, "e": {"kernel": jnp.ones((4, 2, 2))}}
  missing = {"d": {"kernel": jnp.ones((4, 3, 2), jnp.uint8)}}
  extra = {"d": {"kernel": jnp.ones((4, 3, 2), jnp.uint8)},
           "e": {"kernel": jnp.ones((4, 2, 2), jnp.uint8)},
           "f": {"kernel": jnp.ones((4, 2, 2), jnp.uint8)}}
  renamed = {"d": {"kernel": jnp.ones((4, 3, 2), jnp.uint8)},
             "e": {"weight": jnp.ones((4, 2, 2), jnp.uint8)}}
  for bad in (missing, extra, renamed):
    with pytest.raises(ValueError, match=r"^received_bits: leaves .* do not match virtual_bits"):
      bits.inherit(virtual, bad)


def test_reinitialize_keeps_signs_from_bits_but_draws_new_magnitudes():
  params = _params()
  virtual = bits.init_virtual_bits(jax.random.PRNGKey(0), params, 4)
  alphas, ints, received = _server_round(params, 4, seed=9)
  fresh = bits.reinitialize(jax.random.PRNGKey(1), virtual, received)
  for v, b, new in zip(jax.tree.leaves(virtual), jax.tree.leaves(received),
                       jax.tree.leaves(fresh)):
    assert new.shape == v.shape
    np.testing.assert_array_equal(np.asarray(new) > 0, np.asarray(b) == 1)
    assert not np.array_equal(np.abs(np.asarray(new)), np.abs(np.asarray(v)))
  w = traverse_util.flatten_dict(bits.weights_from_bits(fresh, alphas, jnp.ones((4,), bool), 4))
  for path, q in traverse_util.flatten_dict(ints).items():
    a = traverse_util.flatten_dict(alphas)[path]
    np.testing.assert_array_equal(np.asarray(w[path]), np.asarray(quant.dequantize(q, a)))


# ----------------------------------------------------------------------------- weights_from_bits


def test_weights_from_bits_offset_hand_computed():
  # m = 4, one weight per column; bits (LSB first) from the sign of v.
  v = jnp.asarray([[0.3, -0.2, 0.1],    # bit 0
                   [-0.1, -0.4, 0.2],   # bit 1
                   [0.5, -0.6, -0.3],   # bit 2
                   [-0.2, 0.7, 0.4]],   # bit 3
                  jnp.float32)
  # u = [1 + 4, 8, 1 + 2 + 8] = [5, 8, 11] -> q = u - 8 = [-3, 0, 3]; alpha = 0.5.
  w = bits.weights_from_bits({"k": v}, {"k": jnp.float32(0.5)}, jnp.zeros((4,), bool), 4)["k"]
  np.testing.assert_array_equal(np.asarray(w), [-1.5, 0.0, 1.5])


def test_weights_from_bits_sign_magnitude_rebuilds_signed_magnitude():
  m = 4
  v = jnp.asarray(np.random.default_rng(8).standard_normal((m, 5, 3)), jnp.float32)
  alpha = jnp.float32(0.25)
  w = bits.weights_from_bits({"k": v}, {"k": alpha}, jnp.ones((m,), bool), m,
                             "sign_magnitude")["k"]
  h = (np.asarray(v) > 0).astype(np.float64)
  magnitude = h[0] + 2 * h[1] + 4 * h[2]
  expected = (1 - 2 * h[3]) * magnitude * 0.25
  np.testing.assert_array_equal(np.asarray(w), expected.astype(np.float32))
  # Hand-computed single weight: magnitude bits [1, 0, 1] -> 5, sign bit 1 -> -5 * 0.25.
  one = jnp.asarray([[0.1], [-0.1], [0.2], [0.3]], jnp.float32)
  w1 = bits.weights_from_bits({"k": one}, {"k": alpha}, jnp.ones((m,), bool), m,
                              "sign_magnitude")["k"]
  np.testing.assert_array_equal(np.asarray(w1), [-1.25])


@pytest.mark.parametrize("active_bits", [(0,), (3,), (1, 2), (0, 1, 2, 3), ()])
def test_gradients_reach_only_active_bits_scaled_by_alpha_2_pow_i(active_bits):
  m = 4
  rng = np.random.default_rng(21)
  v = {"a": {"kernel": jnp.asarray(rng.standard_normal((m, 3, 2)), jnp.float32)},
       "b": {"kernel": jnp.asarray(rng.standard_normal((m, 2, 2, 1, 3)), jnp.float32)}}
  g = {"a": {"kernel": jnp.asarray(rng.standard_normal((3, 2)), jnp.float32)},
       "b": {"kernel": jnp.arange(12.0).reshape(2, 2, 1, 3) - 5.0}}
  alphas = {"a": {"kernel": jnp.float32(0.375)}, "b": {"kernel": jnp.float32(0.02)}}
  active = jnp.zeros((m,), bool).at[jnp.asarray(active_bits, jnp.int32)].set(True)

  def loss(vb):
    w = bits.weights_from_bits(vb, alphas, active, m)
    return sum(jnp.sum(gl * wl) for gl, wl in zip(jax.tree.leaves(g), jax.tree.leaves(w)))

  grads = jax.grad(loss)(v)
  for name in ("a", "b"):
    gv = np.asarray(grads[name]["kernel"])
    dl_dw = np.asarray(g[name]["kernel"])
    alpha = float(alphas[name]["kernel"])
    for i in range(m):
      if i in active_bits:
        np.testing.assert_allclose(gv[i], alpha * 2 ** i * dl_dw, rtol=1e-6)
      else:
        np.testing.assert_array_equal(gv[i], np.zeros_like(gv[i]))   # exactly zero


def test_sign_magnitude_gradients_follow_the_product_rule_through_the_ste():
  m = 4
  v = jnp.asarray(np.random.default_rng(4).standard_normal((m, 6)), jnp.float32)
  g = jnp.asarray([1.0, -2.0, 0.5, 3.0, -1.0, 0.25])
  alpha = 0.5
  active = jnp.asarray([True, False, True, True])

  def loss(x):
    w = bits.weights_from_bits({"k": x}, {"k": jnp.float32(alpha)}, active, m,
                               "sign_magnitude")["k"]
    return jnp.sum(g * w)

  grad = np.asarray(jax.grad(loss)(v))
  h = (np.asarray(v) > 0).astype(np.float64)
  sign = 1 - 2 * h[3]
  magnitude = h[0] + 2 * h[1] + 4 * h[2]
  gn = np.asarray(g, np.float64)
  np.testing.assert_allclose(grad[0], alpha * sign * 1 * gn, rtol=1e-6)
  np.testing.assert_array_equal(grad[1], np.zeros(6))
  np.testing.assert_allclose(grad[2], alpha * sign * 4 * gn, rtol=1e-6)
  np.testing.assert_allclose(grad[3], alpha * -2.0 * magnitude * gn, rtol=1e-6, atol=0)


def test_weights_from_bits_under_jit_and_with_traced_mask():
  m = 4
  v = {"k": jnp.asarray(np.random.default_rng(0).standard_normal((m, 3)), jnp.float32)}
  alphas = {"k": jnp.float32(0.1)}
  f = jax.jit(lambda vb, act: bits.weights_from_bits(vb, alphas, act, m)["k"])
  eager = bits.weights_from_bits(v, alphas, jnp.ones((m,), bool), m)["k"]
  np.testing.assert_array_equal(np.asarray(f(v, jnp.ones((m,), bool))), np.asarray(eager))
  np.testing.assert_array_equal(np.asarray(f(v, jnp.zeros((m,), bool))), np.asarray(eager))


@pytest.mark.parametrize("shape", [(3,), (5,), (4, 1), ()])
def test_weights_from_bits_rejects_active_mask_of_wrong_length(shape):
  v = {"k": jnp.ones((4, 2, 2))}
  with pytest.raises(ValueError, match=r"^active: .*\(4,\)"):
    bits.weights_from_bits(v, {"k": jnp.float32(1.0)}, jnp.ones(shape, bool), 4)


def test_weights_from_bits_rejects_virtual_bits_with_wrong_bit_axis():
  with pytest.raises(ValueError, match=r"^virtual_bits: .*m=4"):
    bits.weights_from_bits({"k": jnp.ones((3, 2))}, {"k": jnp.float32(1.0)},
                           jnp.ones((4,), bool), 4)


@pytest.mark.parametrize("m", [0, 9])
def test_weights_from_bits_and_init_reject_bad_m(m):
  with pytest.raises(ValueError, match=r"^m: .*1\.\.8"):
    bits.weights_from_bits({"k": jnp.ones((4, 2))}, {"k": jnp.float32(1.0)},
                           jnp.ones((4,), bool), m)
  with pytest.raises(ValueError, match=r"^m: .*1\.\.8"):
    bits.init_virtual_bits(jax.random.PRNGKey(0), _params(), m)


def test_hard_bits_is_positive_part_as_uint8():
  v = {"k": jnp.asarray([[-1.0, 0.0, 2.0]], jnp.float32)}
  hb = bits.hard_bits(v)["k"]
  assert hb.dtype == jnp.uint8
  np.testing.assert_array_equal(np.asarray(hb), [[0, 0, 1]])


@pytest.mark.slow
@pytest.mark.parametrize("bits_m,active_bits,encoding,selector", [
    (4, 1, "offset", "sequential"), (8, 2, "offset", "sequential"), (4, 1, "offset", "random"),
    (4, 1, "sign_magnitude", "sequential"), (4, 2, "sign_magnitude", "random")])
def test_fedbif_active_only_training_matches_weights_from_bits(bits_m, active_bits, encoding,
                                                               selector):
  """FedBiF trains only the s activated virtual bits and reads the frozen ones off the received
  integers: its weights and gradients equal `weights_from_bits` over all m inherited virtual bits,
  and client_finish puts the trained bits back into the full virtual bits."""
  from fedbif_jax.config import base_config
  from fedbif_jax.selectors import active_indices
  c = base_config()
  c.fedbif.bits, c.fedbif.active_bits, c.fedbif.selector = bits_m, active_bits, selector
  c.fedbif.encoding = encoding
  algo = get_algorithm(c)
  k = jax.random.key(0)
  params = {"dense": {"kernel": 0.3 * jax.random.normal(k, (7, 5)), "bias": jnp.ones(5)},
            "conv": {"kernel": 0.1 * jax.random.normal(jax.random.fold_in(k, 1), (3, 3, 2, 4))}}
  variables = {"params": params}
  server = algo.init(k, variables)
  for rnd in range(3):
    server = server | {"round": jnp.asarray(rnd, jnp.int32)}
    down = algo.broadcast(server, jax.random.fold_in(k, 10 + rnd), None)
    state = algo.init_client(jax.random.fold_in(k, 20 + rnd), variables)
    local = algo.client_start(down, state, jax.random.fold_in(k, 30 + rnd))
    full = local.frozen
    idx = active_indices(down["active"], active_bits)
    assert all(jax.tree.leaves(jax.tree.map(lambda f, a: bool(jnp.all(f[idx] == a)), full,
                                            local.trainable["active_bits"])))

    def reference(active):
      vb = jax.tree.map(lambda f, a: f.at[idx].set(a), full, active)
      return bits.weights_from_bits(vb, down["alpha"], down["active"], bits_m, encoding)

    def ours(active):
      p = algo.model_params({"active_bits": active, "other": local.trainable["other"]}, down)
      return pytrees.split_params(p, pytrees.is_kernel)[0]

    # Perturb the active bits so that some flip sign relative to the received bits.
    active = jax.tree.map(lambda a: a + 0.02 * jax.random.normal(jax.random.fold_in(k, 99), a.shape),
                          local.trainable["active_bits"])
    chex_equal = jax.tree.map(lambda a, b: bool(jnp.array_equal(a, b)), ours(active), reference(active))
    assert all(jax.tree.leaves(chex_equal)), f"round {rnd}: weights differ"
    loss = lambda f: lambda a: sum(jnp.sum(jnp.sin(w)) for w in jax.tree.leaves(f(a)))
    g_ours, g_ref = jax.grad(loss(ours))(active), jax.grad(loss(reference))(active)
    for a, b in zip(jax.tree.leaves(g_ours), jax.tree.leaves(g_ref)):
      np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    up, new_state = algo.client_finish(
        down, state, local._replace(trainable={"active_bits": active,
                                               "other": local.trainable["other"]}), k, {})
    for f, a, n, u in zip(jax.tree.leaves(full), jax.tree.leaves(active),
                          jax.tree.leaves(new_state["virtual_bits"]),
                          jax.tree.leaves(up["weights"], is_leaf=lambda x: isinstance(x, Bits))):
      expected = np.asarray(f).copy()
      expected[np.asarray(idx)] = np.asarray(a)
      np.testing.assert_array_equal(n, expected)
      np.testing.assert_array_equal(u.values, (np.asarray(a) > 0).astype(np.uint8))
