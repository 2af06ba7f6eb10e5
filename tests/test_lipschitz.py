"""The Lipschitz upper bound: power iteration against exact singular values (numpy SVD)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedbif_jax.lipschitz import linear_layers, lipschitz_upper_bound, spectral_norm
from fedbif_jax.models import get_model


def _matrix(fn, shape):
  """The materialised matrix of the linear part of an affine fn on inputs of `shape`."""
  flat = lambda v: fn(v.reshape(shape)).reshape(-1)
  return np.asarray(jax.jacfwd(flat)(jnp.zeros(int(np.prod(shape)))))


class OneDense(nn.Module):
  @nn.compact
  def __call__(self, x, train=False):
    return nn.Dense(7)(x)


class ConvBN(nn.Module):
  strides: int = 1

  @nn.compact
  def __call__(self, x, train=False):
    x = nn.Conv(3, (3, 3), strides=self.strides, use_bias=False)(x)
    return nn.BatchNorm(use_running_average=not train)(x)


def test_dense_layer_matches_svd():
  model = OneDense()
  variables = model.init(jax.random.key(0), jnp.ones((1, 10)))
  bound, norms = lipschitz_upper_bound(model, variables, (10,), jax.random.key(1), 200)
  exact = np.linalg.svd(np.asarray(variables["params"]["Dense_0"]["kernel"]), compute_uv=False)[0]
  np.testing.assert_allclose(bound, exact, rtol=1e-4)
  assert list(norms) == ["Dense_0"]


def test_conv_layer_matches_its_materialised_matrix():
  conv = nn.Conv(3, (3, 3), strides=2, padding="SAME")
  variables = conv.init(jax.random.key(0), jnp.ones((1, 5, 5, 2)))
  fn = lambda x: conv.apply(variables, x)
  exact = np.linalg.svd(_matrix(fn, (1, 5, 5, 2)), compute_uv=False)[0]
  np.testing.assert_allclose(spectral_norm(fn, (1, 5, 5, 2), jax.random.key(1), 300), exact,
                             rtol=1e-4)
  # The kernel's own matrix norm is a different (wrong) quantity for a convolution.
  kernel_norm = np.linalg.svd(np.asarray(variables["params"]["kernel"]).reshape(-1, 3),
                              compute_uv=False)[0]
  assert abs(kernel_norm - exact) > 1e-3


def test_batchnorm_is_folded_into_the_conv_before_it():
  model = ConvBN(strides=1)
  variables = model.init(jax.random.key(0), jnp.ones((1, 4, 4, 2)))
  variables = jax.tree.map(lambda x: x, variables)
  variables["batch_stats"]["BatchNorm_0"]["var"] = jnp.array([0.25, 4.0, 1.0])
  variables["batch_stats"]["BatchNorm_0"]["mean"] = jnp.array([1.0, -2.0, 0.5])
  variables["params"]["BatchNorm_0"]["scale"] = jnp.array([2.0, 0.5, -1.0])
  layers = linear_layers(model, variables, jnp.zeros((1, 4, 4, 2)))
  assert len(layers) == 1, "the BatchNorm is folded, not a layer of its own"
  full = lambda x: model.apply(variables, x, train=False)
  exact = np.linalg.svd(_matrix(full, (1, 4, 4, 2)), compute_uv=False)[0]
  bound, _ = lipschitz_upper_bound(model, variables, (4, 4, 2), jax.random.key(1), 300)
  np.testing.assert_allclose(bound, exact, rtol=1e-4)


@pytest.mark.slow
def test_cnn_bound_is_above_the_networks_local_gain():
  """The product bound must dominate the spectral norm of the input-output Jacobian."""
  model = get_model("cnn", 10)
  variables = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
  bound, norms = lipschitz_upper_bound(model, variables, (8, 8, 1), jax.random.key(1), 100)
  assert len(norms) == 4
  for seed in range(3):
    x = jax.random.normal(jax.random.key(seed), (1, 8, 8, 1))
    jac = jax.jacrev(lambda z: model.apply(variables, z.reshape(1, 8, 8, 1)).reshape(-1))(
        x.reshape(-1))
    assert np.linalg.svd(np.asarray(jac), compute_uv=False)[0] <= bound * (1 + 1e-4)


def test_probe_matches_the_bound_and_histograms_the_last_layer():
  from fedbif_jax.metrics import make_lipschitz_probe
  model = get_model("cnn", 10)
  variables = model.init(jax.random.key(0), jnp.ones((1, 8, 8, 1)))
  probe = make_lipschitz_probe(model, lambda state: state, (8, 8, 1), iterations=100)
  bound, histogram = probe(variables, jax.random.key(1))
  expected, _ = lipschitz_upper_bound(model, variables, (8, 8, 1), jax.random.key(1), 100)
  np.testing.assert_allclose(bound, expected, rtol=1e-5)
  assert histogram["layer"] == "Dense_1"
  assert sum(histogram["counts"]) == 128 * 10 and len(histogram["edges"]) == 42
