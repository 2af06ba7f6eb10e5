"""3x3 convolutions whose weight gradient XLA's CPU backend computes fast (the models' convs).

On XLA's CPU backend the weight gradient of a 3x3, stride-1 convolution over a large image is
its slowest part: XLA computes it as a convolution whose kernel is the whole 32x32 or 16x16
output gradient, which takes about 4x the forward convolution's time on the same layer
(benchmarks/conv_grad.py, docs/PERFORMANCE.md). `conv_general_dilated` is a drop-in for
``lax.conv_general_dilated`` (Flax's ``nn.Conv(conv_general_dilated=...)``) that keeps XLA's
forward and input gradient and, on CPU, computes the weight gradient of such a convolution as
nine matrix products, one per kernel offset (i, j):

  dW[i, j] = sum over (n, h, w) of  x_pad[n, h + i, w + j, :]^T  g[n, h, w, :]

i.e. ``dot(shifted input [N*H*W, C_in]^T, output gradient [N*H*W, C_out])``. The values equal
XLA's weight gradient up to float summation order. Other convolutions (strided, 1x1, grouped,
small images, where XLA's own gradient is as fast or faster) and other platforms than CPU
(`lax.platform_dependent`) use ``lax.conv_general_dilated`` unchanged.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")
# benchmarks/conv_grad.py on the 2-core CPU (docs/PERFORMANCE.md): the nine products win from
# 16x16 images up (1.1-2.9x) and lose at 8x8 (0.94x at 8x8x256->256).
MIN_PIXELS = 16 * 16


def _conv3x3(x, w):
  return lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)), dimension_numbers=NHWC)


def weight_grad_by_offsets(x: jax.Array, g: jax.Array) -> jax.Array:
  """The gradient of sum(g * conv3x3(x, w)) with respect to w ([3, 3, C_in, C_out]), padding 1."""
  n, h, w, c_in = x.shape
  padded = jnp.pad(x, ((0, 0), (1, 1), (1, 1), (0, 0)))
  g = g.reshape(n * h * w, g.shape[-1])
  rows = [[jnp.dot(padded[:, i:i + h, j:j + w, :].reshape(n * h * w, c_in).T, g)
           for j in range(3)] for i in range(3)]
  return jnp.stack([jnp.stack(r) for r in rows]).astype(x.dtype)


@jax.custom_vjp
def conv3x3_fast_weight_grad(x: jax.Array, w: jax.Array) -> jax.Array:
  """conv3x3 (NHWC, HWIO, stride 1, padding 1), with `weight_grad_by_offsets` on CPU."""
  return _conv3x3(x, w)


def _forward(x, w):
  return _conv3x3(x, w), (x, w)


def _backward(residuals, g):
  x, w = residuals
  dx = jax.vjp(lambda x: _conv3x3(x, w), x)[1](g)[0]
  xla_dw = lambda x, g: jax.vjp(lambda w: _conv3x3(x, w), w)[1](g)[0]
  dw = lax.platform_dependent(x, g, cpu=weight_grad_by_offsets, default=xla_dw)
  return dx, dw


conv3x3_fast_weight_grad.defvjp(_forward, _backward)


def _is_padded_3x3(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                   dimension_numbers, feature_group_count, batch_group_count) -> bool:
  if lhs.ndim != 4 or rhs.shape[:2] != (3, 3) or tuple(window_strides) != (1, 1):
    return False
  if padding != "SAME" and (isinstance(padding, str)
                            or [tuple(p) for p in padding] != [(1, 1), (1, 1)]):
    return False
  if any(d is not None and tuple(d) != (1, 1) for d in (lhs_dilation, rhs_dilation)):
    return False
  if feature_group_count != 1 or batch_group_count != 1:
    return False
  # None is lax's default layout (NCHW, OIHW), not ours.
  layout = lambda numbers: lax.conv_dimension_numbers(lhs.shape, rhs.shape, numbers)
  return (layout(dimension_numbers) == layout(NHWC)
          and lhs.shape[1] * lhs.shape[2] >= MIN_PIXELS)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """``lax.conv_general_dilated``, with `conv3x3_fast_weight_grad` where it is faster."""
  if precision is None and preferred_element_type is None and _is_padded_3x3(
      lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation, dimension_numbers,
      feature_group_count, batch_group_count):
    return conv3x3_fast_weight_grad(lhs, rhs)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                  dimension_numbers, feature_group_count, batch_group_count,
                                  precision, preferred_element_type)
