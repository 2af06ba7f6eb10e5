"""The models' convolutions, with a weight gradient that XLA's CPU backend runs fast in loops.

On XLA's CPU backend a convolution's weight gradient (XLA computes it as another convolution,
whose kernel is the output gradient) runs 100x slower or more inside a while loop
(`lax.scan`) than outside one; its forward and input gradient do not (benchmarks/
compile_options.py on the 2-core CPU, two runs: 4 SGD steps of a 16x16x32->64 conv at batch 64
took 25-28 ms unrolled, 4.0-4.2 s scanned, and 51-57 ms scanned under vmap with this module's
weight gradient). The vmap and sharded backends run each client's
steps in a `lax.scan` under `jax.vmap` (`fedbif_jax/parallel.py`).

`conv_general_dilated` is a drop-in for ``lax.conv_general_dilated`` (Flax's
``nn.Conv(conv_general_dilated=...)``). For an ungrouped, undilated NHWC convolution it keeps
XLA's forward and input gradient, and its weight gradient is a `jax.custom_batching.custom_vmap`
function:

* unbatched (the sequential backend: no loop): XLA's own, which with `fedbif_jax/xla_options.py`
  is Eigen's over all intra-op threads, faster than any rewrite we measured
  (benchmarks/conv_grad.py);
* batched over clients (vmap, sharded) on CPU: one batched matrix product per kernel offset
  (i, j), which stays fast inside the scan:

    dW[i, j] = sum over (n, h, w) of  x_pad[n, s*h + i, s*w + j, :]^T  g[n, h, w, :]

  On other platforms the batched gradient is XLA's, vmapped.

The values equal XLA's up to float summation order. Other convolutions are
``lax.conv_general_dilated`` unchanged. `conv_nhwc` is a `jax.custom_vjp`: reverse mode only, no
`jax.jvp` through it (`fedbif_jax.lipschitz`, which needs forward mode, rebuilds each Flax conv
with ``lax.conv_general_dilated``: the same linear map).
"""
from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from jax import lax

NHWC = ("NHWC", "HWIO", "NHWC")


def _conv(x, w, strides, pads):
  return lax.conv_general_dilated(x, w, strides, pads, dimension_numbers=NHWC)


def weight_grad_by_offsets(x: jax.Array, g: jax.Array, kernel_hw: tuple[int, int],
                           strides: tuple[int, int], pads: tuple) -> jax.Array:
  """The gradient of sum(g * conv(x, w)) with respect to w [kh, kw, C_in, C_out], as one matrix
  product per kernel offset: x_pad's strided view at (i, j) [N*H_out*W_out, C_in]^T @ g."""
  n, h_out, w_out, c_out = g.shape
  c_in = x.shape[-1]
  (sh, sw), (kh, kw) = strides, kernel_hw
  padded = jnp.pad(x, ((0, 0), tuple(pads[0]), tuple(pads[1]), (0, 0)))
  g = g.reshape(n * h_out * w_out, c_out)
  view = lambda i, j: padded[:, i:i + sh * (h_out - 1) + 1:sh, j:j + sw * (w_out - 1) + 1:sw, :]
  rows = [jnp.dot(view(i, j).reshape(-1, c_in).T, g) for i in range(kh) for j in range(kw)]
  return jnp.stack(rows).reshape(kh, kw, c_in, c_out).astype(x.dtype)


@functools.lru_cache(maxsize=None)
def _weight_grad(kernel_hw: tuple[int, int], strides: tuple[int, int], pads: tuple):
  """dW(x, g) of one convolution geometry: XLA's when unbatched, offsets when vmapped on CPU."""
  w_shape = lambda x, g: kernel_hw + (x.shape[-1], g.shape[-1])

  def xla(x, g):
    w = jnp.zeros(w_shape(x, g), x.dtype)
    return jax.vjp(lambda w: _conv(x, w, strides, pads), w)[1](g)[0]

  @jax.custom_batching.custom_vmap
  def weight_grad(x, g):
    return xla(x, g)

  @weight_grad.def_vmap
  def _batched(axis_size, in_batched, x, g):
    x, g = (a if batched else jnp.broadcast_to(a, (axis_size,) + a.shape)
            for a, batched in zip((x, g), in_batched))
    by_offsets = lambda x, g: jax.vmap(
        lambda x, g: weight_grad_by_offsets(x, g, kernel_hw, strides, pads))(x, g)
    return lax.platform_dependent(x, g, cpu=by_offsets, default=jax.vmap(xla)), True

  return weight_grad


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_nhwc(x: jax.Array, w: jax.Array, strides: tuple[int, int], pads: tuple) -> jax.Array:
  """An NHWC/HWIO convolution with explicit ((lo, hi), (lo, hi)) padding; see the module doc."""
  return _conv(x, w, strides, pads)


def _forward(x, w, strides, pads):
  return _conv(x, w, strides, pads), (x, w)


def _backward(strides, pads, residuals, g):
  x, w = residuals
  dx = jax.vjp(lambda x: _conv(x, w, strides, pads), x)[1](g)[0]
  return dx, _weight_grad(tuple(w.shape[:2]), strides, pads)(x, g)


conv_nhwc.defvjp(_forward, _backward)


def _is_plain_nhwc(lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
                   batch_group_count) -> bool:
  """4-D, NHWC/HWIO, no dilation, no feature or batch groups."""
  if lhs.ndim != 4 or feature_group_count != 1 or batch_group_count != 1:
    return False
  if any(d is not None and tuple(d) != (1, 1) for d in (lhs_dilation, rhs_dilation)):
    return False
  # None is lax's default layout (NCHW, OIHW), not ours.
  layout = lambda numbers: lax.conv_dimension_numbers(lhs.shape, rhs.shape, numbers)
  return layout(dimension_numbers) == layout(NHWC)


def conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation=None, rhs_dilation=None,
                         dimension_numbers=None, feature_group_count=1, batch_group_count=1,
                         precision=None, preferred_element_type=None):
  """``lax.conv_general_dilated``, through `conv_nhwc` where it applies (see the module doc)."""
  if precision is None and preferred_element_type is None and _is_plain_nhwc(
      lhs, rhs, lhs_dilation, rhs_dilation, dimension_numbers, feature_group_count,
      batch_group_count):
    strides = tuple(int(s) for s in window_strides)
    if isinstance(padding, str):
      padding = lax.padtype_to_pads(lhs.shape[1:3], rhs.shape[:2], strides, padding)
    pads = tuple((int(lo), int(hi)) for lo, hi in padding)
    return conv_nhwc(lhs, rhs, strides, pads)
  return lax.conv_general_dilated(lhs, rhs, window_strides, padding, lhs_dilation, rhs_dilation,
                                  dimension_numbers, feature_group_count, batch_group_count,
                                  precision, preferred_element_type)
