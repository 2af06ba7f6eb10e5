"""Tests for fedbif_jax.pytrees: the payload leaf, params split / merge, per-leaf keys, and
weighted sums over the client axis, against hand-built trees and numpy references."""
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedbif_jax import pytrees
from fedbif_jax.pytrees import Bits


def _params():
  rng = np.random.default_rng(0)
  normal = lambda *shape: jnp.asarray(rng.standard_normal(shape), jnp.float32)
  return {
      "Conv_0": {"kernel": normal(3, 3, 2, 4), "bias": jnp.full((4,), 0.1)},
      "BatchNorm_0": {"scale": jnp.ones((4,)), "bias": jnp.zeros((4,))},
      "block": {"Dense_0": {"kernel": normal(6, 5), "bias": normal(5)}},
      "Dense_1": {"bias": jnp.zeros((3,))},   # a layer with no kernel
  }


_KERNEL_PATHS = {("Conv_0", "kernel"), ("block", "Dense_0", "kernel")}


# ----------------------------------------------------------------------------- Bits


def test_bits_is_a_pytree_node_and_is_bits_stops_tree_maps_at_it():
  b = Bits(jnp.array([1, 0, 1], jnp.uint8), jnp.asarray(1, jnp.int32))
  assert pytrees.is_bits(b) and not pytrees.is_bits(b.values) and not pytrees.is_bits({"a": b})
  assert len(jax.tree.leaves(b)) == 2                           # values and width
  assert jax.tree.leaves({"w": b}, is_leaf=pytrees.is_bits) == [b]
  doubled = jax.tree.map(lambda x: x * 2, b)                    # a pytree: maps reach both fields
  assert doubled.values.tolist() == [2, 0, 2] and int(doubled.width) == 2


# ----------------------------------------------------------------------------- split / merge


def test_is_kernel_rejects_one_dimensional_kernels_and_other_names():
  assert pytrees.is_kernel(("a", "kernel"), jnp.zeros((2, 3)))
  assert not pytrees.is_kernel(("a", "kernel"), jnp.zeros((3,)))
  assert not pytrees.is_kernel(("a", "scale"), jnp.zeros((2, 3)))


def test_split_params_separates_kernels_and_merge_restores():
  params = _params()
  bit, full = pytrees.split_params(params)
  assert set(traverse_util.flatten_dict(bit)) == _KERNEL_PATHS
  assert set(traverse_util.flatten_dict(full)) == (
      set(traverse_util.flatten_dict(params)) - _KERNEL_PATHS)
  merged = traverse_util.flatten_dict(pytrees.merge_params(bit, full))
  flat = traverse_util.flatten_dict(params)
  assert merged.keys() == flat.keys()
  for path in flat:
    assert merged[path] is flat[path]


def test_split_params_with_a_custom_predicate():
  only_biases = lambda path, leaf: path[-1] == "bias"
  chosen, rest = pytrees.split_params(_params(), only_biases)
  assert set(traverse_util.flatten_dict(chosen)) == {
      ("Conv_0", "bias"), ("BatchNorm_0", "bias"), ("block", "Dense_0", "bias"), ("Dense_1", "bias")}
  assert set(traverse_util.flatten_dict(rest)) == _KERNEL_PATHS | {("BatchNorm_0", "scale")}


def test_merge_params_rejects_overlapping_leaves():
  with pytest.raises(ValueError, match=r"^params: .*a/kernel"):
    pytrees.merge_params({"a": {"kernel": jnp.ones((2, 2))}}, {"a": {"kernel": jnp.ones((2, 2))}})


# ----------------------------------------------------------------------------- per-leaf keys


def test_map_with_keys_gives_leaf_i_in_sorted_path_order_fold_in_key_i():
  key = jax.random.key(7)
  tree = {"b": {"y": 2.0, "x": 1.0}, "a": 0.0, "c": 3.0}   # sorted paths: a, b/x, b/y, c
  out = pytrees.map_with_keys(lambda k, v: (jax.random.key_data(k), v), key, tree)
  order = [("a",), ("b", "x"), ("b", "y"), ("c",)]
  flat = traverse_util.flatten_dict(out)
  for i, path in enumerate(order):
    np.testing.assert_array_equal(flat[path][0], jax.random.key_data(jax.random.fold_in(key, i)))
  assert flat[("b", "y")][1] == 2.0


def test_map_with_keys_split_rule_and_several_trees():
  key = jax.random.key(3)
  keys = jax.random.split(key, 2)
  out = pytrees.map_with_keys(lambda k, a, b: (jax.random.key_data(k), a + b), key,
                              {"q": 1.0, "p": 10.0}, {"q": 2.0, "p": 20.0}, rule="split")
  np.testing.assert_array_equal(out["p"][0], jax.random.key_data(keys[0]))   # "p" sorts first
  np.testing.assert_array_equal(out["q"][0], jax.random.key_data(keys[1]))
  assert out["p"][1] == 30.0 and out["q"][1] == 3.0
  assert pytrees.map_with_keys(lambda k, a: a, key, {}, rule="split") == {}
  with pytest.raises(ValueError, match=r"^rule: "):
    pytrees.map_with_keys(lambda k, a: a, key, {}, rule="nope")


def test_map_with_keys_treats_bits_as_leaves_and_unzip_splits_tuples():
  b = Bits(jnp.zeros((2,), jnp.uint8), jnp.asarray(1, jnp.int32))
  out = pytrees.map_with_keys(lambda k, leaf: (leaf.values.shape, int(leaf.width)),
                              jax.random.key(0), {"l": {"kernel": b}})
  assert out == {"l": {"kernel": ((2,), 1)}}
  first, second = pytrees.unzip({"a": (1, "x"), "b": {"c": (2, "y")}})
  assert first == {"a": 1, "b": {"c": 2}} and second == {"a": "x", "b": {"c": "y"}}
  assert pytrees.unzip({}) == ()


# ----------------------------------------------------------------------------- client axis


def test_weighted_sum_matches_numpy():
  rng = np.random.default_rng(1)
  x = rng.standard_normal((3, 4, 5)).astype(np.float32)
  w = np.array([0.2, 0.5, 0.3], np.float32)
  expected = np.einsum("k,kij->ij", w.astype(np.float64), x.astype(np.float64))
  np.testing.assert_allclose(pytrees.weighted_sum(jnp.asarray(x), jnp.asarray(w)), expected,
                             rtol=1e-6, atol=1e-6)
  # by hand: 0.25 * [1, 2] + 0.75 * [3, 6] = [2.5, 5]
  np.testing.assert_allclose(pytrees.weighted_sum(jnp.array([[1.0, 2.0], [3.0, 6.0]]),
                                                  jnp.array([0.25, 0.75])), [2.5, 5.0])


def test_weighted_mean_over_a_tree_keeps_dtypes():
  stacked = {"f": jnp.array([[1.0, 3.0], [3.0, 5.0]], jnp.float32),
             "n": {"count": jnp.array([2, 4], jnp.int32)}}
  out = pytrees.weighted_mean(stacked, jnp.array([0.5, 0.5]))
  np.testing.assert_array_equal(out["f"], [2.0, 4.0])
  assert out["n"]["count"].dtype == jnp.int32 and int(out["n"]["count"]) == 3


def test_client_axis_broadcasts_a_per_client_vector():
  like = jnp.zeros((3, 2, 4))
  assert pytrees.client_axis(jnp.arange(3.0), like).shape == (3, 1, 1)
  assert pytrees.client_axis(jnp.arange(3.0), jnp.zeros((3,))).shape == (3,)
