"""models/conv.py and xla_options.py: our convolution equals lax's (values and gradients, plain
and vmapped); its weight gradient is XLA's own when unbatched and matrix products (no
convolution, so no slow while-loop path) when vmapped on CPU; the CPU compile options apply
where this jaxlib accepts them."""
import re

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

from fedbif_jax import xla_options
from fedbif_jax.models import conv

GEOMETRIES = [  # (N, H, W, C_in, C_out), kernel, stride, padding
    ((2, 16, 16, 5, 4), 3, 1, ((1, 1), (1, 1))),
    ((2, 17, 15, 3, 2), 3, 2, ((1, 1), (1, 1))),
    ((2, 9, 9, 4, 6), 1, 2, "VALID"),
    ((2, 8, 8, 3, 4), 3, 2, "SAME"),
    ((1, 7, 9, 3, 4), 3, 1, "SAME"),
]


def _lax(x, w, stride, padding):
  return lax.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=conv.NHWC)


def _ours(x, w, stride, padding):
  return conv.conv_general_dilated(x, w, (stride, stride), padding, dimension_numbers=conv.NHWC)


@pytest.mark.slow
@pytest.mark.parametrize("shape,k,stride,padding", GEOMETRIES)
def test_equals_lax_plain_and_vmapped(shape, k, stride, padding):
  n, h, w, c_in, c_out = shape
  x = jax.random.normal(jax.random.key(0), (3, n, h, w, c_in))
  kernel = jax.random.normal(jax.random.key(1), (3, k, k, c_in, c_out))
  grads = lambda f: jax.grad(lambda x, w: jnp.sum(jnp.sin(f(x, w, stride, padding))), (0, 1))
  np.testing.assert_array_equal(_ours(x[0], kernel[0], stride, padding),
                                _lax(x[0], kernel[0], stride, padding))
  # Unbatched: XLA's own gradients, to the bit.
  for a, b in zip(grads(_ours)(x[0], kernel[0]), grads(_lax)(x[0], kernel[0])):
    np.testing.assert_array_equal(a, b)
  # Vmapped over clients (the vmap/sharded backends): offset products, equal to float rounding.
  ours = jax.jit(jax.vmap(grads(_ours)))(x, kernel)
  ref = jax.vmap(grads(_lax))(x, kernel)
  np.testing.assert_array_equal(ours[0], ref[0])
  np.testing.assert_allclose(ours[1], ref[1], rtol=1e-4, atol=1e-4)


def test_offsets_weight_grad_by_hand():
  x = jax.random.normal(jax.random.key(2), (2, 6, 5, 3))
  g = jax.random.normal(jax.random.key(3), (2, 3, 3, 4))  # stride 2, padding 1: 3x3 outputs
  dw = conv.weight_grad_by_offsets(x, g, (3, 3), (2, 2), ((1, 1), (1, 1)))
  padded = np.pad(np.asarray(x), ((0, 0), (1, 1), (1, 1), (0, 0)))
  # Offset (i, j) = (2, 1): x_pad[n, 2h + 2, 2w + 1, c] * g[n, h, w, d].
  by_hand = sum(np.outer(padded[b, 2 * r + 2, 2 * c + 1], np.asarray(g)[b, r, c])
                for b in range(2) for r in range(3) for c in range(3))
  np.testing.assert_allclose(dw[2, 1], by_hand, rtol=1e-5, atol=1e-5)


def test_weight_grad_is_a_convolution_only_when_unbatched():
  weight_grad = conv._weight_grad((3, 3), (1, 1), ((1, 1), (1, 1)))
  x = jnp.zeros((2, 8, 8, 3))
  g = jnp.zeros((2, 8, 8, 4))
  ops = lambda f, *a: set(re.findall(r"\b(convolution|dot)\(",
                                     jax.jit(f).lower(*a).compile().as_text()))
  assert "convolution" in ops(weight_grad, x, g)
  assert ops(jax.vmap(weight_grad), jnp.stack([x, x]), jnp.stack([g, g])) == {"dot"}


def test_other_convolutions_are_lax_unchanged():
  x = jax.random.normal(jax.random.key(4), (2, 3, 8, 8))                  # NCHW
  w = jax.random.normal(jax.random.key(5), (4, 3, 3, 3))                  # OIHW
  ours = conv.conv_general_dilated(x, w, (1, 1), "SAME")                 # lax's default layout
  np.testing.assert_array_equal(ours, lax.conv_general_dilated(x, w, (1, 1), "SAME"))
  assert not conv._is_plain_nhwc(x, w, None, None, None, 1, 1)
  nhwc = jnp.zeros((2, 8, 8, 4))
  assert not conv._is_plain_nhwc(nhwc, jnp.zeros((3, 3, 2, 4)), None, None, conv.NHWC, 2, 1)
  assert not conv._is_plain_nhwc(nhwc, jnp.zeros((3, 3, 4, 4)), None, (2, 2), conv.NHWC, 1, 1)
  assert conv._is_plain_nhwc(nhwc, jnp.zeros((3, 3, 4, 4)), (1, 1), None, conv.NHWC, 1, 1)


@pytest.mark.parametrize("padding,strides", [("SAME", 1), (((1, 1), (1, 1)), 1), ("SAME", 2),
                                             ("VALID", 2)])
def test_flax_conv_with_our_function_equals_flax_conv(padding, strides):
  x = jax.random.normal(jax.random.key(3), (2, 16, 16, 3))
  plain = nn.Conv(4, (3, 3), strides=strides, padding=padding)
  ours = nn.Conv(4, (3, 3), strides=strides, padding=padding,
                 conv_general_dilated=conv.conv_general_dilated)
  params = plain.init(jax.random.key(4), x)
  loss = lambda m: lambda p: jnp.sum(m.apply(p, x) ** 2)
  np.testing.assert_array_equal(ours.apply(params, x), plain.apply(params, x))
  g_ours, g_plain = jax.grad(loss(ours))(params), jax.grad(loss(plain))(params)
  jax.tree.map(np.testing.assert_array_equal, g_ours, g_plain)


def test_compiler_options_only_where_accepted(monkeypatch):
  for program in ("train", "server"):  # jaxlib 0.10.2 takes them
    assert xla_options.compiler_options("cpu", program) == xla_options.CPU_COMPILER_OPTIONS[program]
    assert xla_options.compiler_options("gpu", program) is None
    assert xla_options.compiler_options("tpu", program) is None
  with pytest.raises(ValueError, match="program: must be one of train, server"):
    xla_options.compiler_options("cpu", "eval")
  # A jaxlib that refuses the option (renamed or removed) runs with XLA's defaults.
  monkeypatch.setitem(xla_options.CPU_COMPILER_OPTIONS, "train",
                      {"xla_cpu_experimental_ynn_fusion_type": "NO_SUCH_FUSION_TYPE"})
  xla_options._accepted.cache_clear()
  try:
    assert xla_options.compiler_options("cpu") is None
    assert xla_options.compiler_options("cpu", "server") is not None
  finally:
    xla_options._accepted.cache_clear()


@pytest.mark.parametrize("program", ["train", "server"])
def test_a_program_under_the_options_computes_the_same(program):
  x = jax.random.normal(jax.random.key(6), (4, 16, 16, 8))
  w = jax.random.normal(jax.random.key(7), (3, 3, 8, 16))
  weights = jnp.array([0.1, 0.2, 0.3, 0.4])
  def f(x, w):  # a convolution's weight gradient, and a weighted sum over a leading axis
    dw = jax.grad(lambda w: jnp.sum(jnp.sin(_lax(x, w, 1, "SAME"))))(w)
    return dw, jnp.sum(weights[:, None, None, None] * x, axis=0)
  tuned = xla_options.jit(f, program, platform="cpu")(x, w)
  for a, b in zip(tuned, jax.jit(f)(x, w)):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-4)
