"""models/conv.py: the offset-products weight gradient equals XLA's, and is used only where it
applies (3x3, stride 1, padding 1, NHWC, images of at least 16x16, on CPU)."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fedbif_jax.models import conv


def _xla(x, w, stride=1, padding=((1, 1), (1, 1))):
  return lax.conv_general_dilated(x, w, (stride, stride), padding,
                                  dimension_numbers=conv.NHWC)


@pytest.mark.parametrize("shape", [(2, 16, 16, 3, 8), (3, 16, 20, 5, 4), (1, 32, 32, 2, 2)])
def test_offsets_weight_grad_equals_xla(shape):
  n, h, w, c_in, c_out = shape
  x = jax.random.normal(jax.random.key(0), (n, h, w, c_in))
  kernel = jax.random.normal(jax.random.key(1), (3, 3, c_in, c_out))
  loss = lambda f: lambda x, k: jnp.sum(jnp.sin(f(x, k)))
  ours = jax.jit(jax.grad(loss(conv.conv3x3_fast_weight_grad), argnums=(0, 1)))(x, kernel)
  ref = jax.jit(jax.grad(loss(_xla), argnums=(0, 1)))(x, kernel)
  np.testing.assert_allclose(ours[0], ref[0], rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(ours[1], ref[1], rtol=1e-4, atol=1e-4)
  # The hand-written sum of one offset (i, j) = (0, 2): x_pad[n, h + 0, w + 2] * g[n, h, w].
  g = jnp.cos(_xla(x, kernel))
  padded = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
  by_hand = np.einsum("nhwc,nhwd->cd", padded[:, 0:h, 2:w + 2], np.asarray(g))
  np.testing.assert_allclose(ours[1][0, 2], by_hand, rtol=1e-4, atol=1e-4)


def _is_fast(x_shape, k_shape, **kwargs):
  args = dict(window_strides=(1, 1), padding=((1, 1), (1, 1)), lhs_dilation=None,
              rhs_dilation=None, dimension_numbers=conv.NHWC, feature_group_count=1,
              batch_group_count=1)
  args.update(kwargs)
  return conv._is_padded_3x3(jnp.zeros(x_shape), jnp.zeros(k_shape), **args)


def test_only_padded_3x3_stride_1_convs_of_large_images_take_the_fast_gradient():
  assert _is_fast((2, 16, 16, 3), (3, 3, 3, 8))
  assert _is_fast((2, 16, 16, 3), (3, 3, 3, 8), padding="SAME")
  assert not _is_fast((2, 8, 8, 3), (3, 3, 3, 8))                       # too small
  assert not _is_fast((2, 16, 16, 3), (1, 1, 3, 8))                     # 1x1
  assert not _is_fast((2, 16, 16, 3), (3, 3, 3, 8), window_strides=(2, 2))
  assert not _is_fast((2, 16, 16, 3), (3, 3, 3, 8), padding="VALID")
  assert not _is_fast((2, 16, 16, 4), (3, 3, 2, 8), feature_group_count=2)
  assert not _is_fast((2, 16, 16, 3), (3, 3, 3, 8), dimension_numbers=("NCHW", "OIHW", "NCHW"))
  assert not _is_fast((2, 16, 16, 3), (3, 3, 3, 8), dimension_numbers=None)  # lax's NCHW default


@pytest.mark.parametrize("padding,strides", [("SAME", 1), (((1, 1), (1, 1)), 1), ("SAME", 2)])
def test_flax_conv_with_our_function_equals_flax_conv(padding, strides):
  x = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
  plain = nn.Conv(4, (3, 3), strides=strides, padding=padding)
  ours = nn.Conv(4, (3, 3), strides=strides, padding=padding,
                 conv_general_dilated=conv.conv_general_dilated)
  params = plain.init(jax.random.key(4), x)
  loss = lambda m: lambda p: jnp.sum(m.apply(p, x) ** 2)
  np.testing.assert_allclose(ours.apply(params, x), plain.apply(params, x), rtol=1e-6)
  g_ours, g_plain = jax.grad(loss(ours))(params), jax.grad(loss(plain))(params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4), g_ours, g_plain)
