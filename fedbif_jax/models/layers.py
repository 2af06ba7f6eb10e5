"""Layer helpers shared by the BatchNorm models (VGG11-lite, ResNet): init, conv, masked BatchNorm.

Conventions, after the authors' framework (docs/REFERENCE_NOTES.md) and PyTorch's defaults:

* Convolutions are followed by BatchNorm and carry no bias (a bias before BN is redundant). The
  final linear layer keeps its bias, as in torchvision's ResNet; under FedBiF a bias is a
  full-precision leaf and never bit-trained.
* Kernels are He-normal: untruncated N(0, 2 / fan_in), as PyTorch's ``kaiming_normal_`` and as
  the small CNN. (The authors' sibling repos draw N(0, 0.01); the FedBiF paper initialises the
  virtual bits with Kaiming, so the weights use the same law.)
* 3x3 convolutions pad one pixel on every side (PyTorch's ``padding=1``), not Flax's "SAME",
  which pads a stride-2 conv on an even input only at the bottom/right.
* BatchNorm: momentum 0.9 for the running averages (PyTorch's momentum 0.1), epsilon 1e-5,
  scale 1 and bias 0 at init. In train mode it normalises with the batch's own statistics over
  the *real* examples of the batch (``mask`` > 0): padded examples of the engine's fixed-shape
  schedules (`fedbif_jax/data/batching.py`) neither enter the statistics nor the running
  averages. Flax keeps the biased batch variance in the running average where PyTorch keeps the
  unbiased one: a factor n / (n - 1) with n >= 1,024 values per channel at batch 64, i.e. < 0.1%.
  In eval mode it uses the running statistics (for the global model: the server's average).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedbif_jax.models import conv

he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")

BN_MOMENTUM = 0.9
BN_EPSILON = 1e-5


def conv3x3(features: int, strides: int = 1, name: Optional[str] = None) -> nn.Conv:
  """A bias-free 3x3 convolution with one pixel of zero padding on every side (NHWC), through
  `fedbif_jax.models.conv` (a weight gradient that stays fast in vmapped loops on CPU)."""
  return nn.Conv(features, (3, 3), strides=(strides, strides), padding=((1, 1), (1, 1)),
                 use_bias=False, kernel_init=he_normal, name=name,
                 conv_general_dilated=conv.conv_general_dilated)


def conv1x1(features: int, strides: int = 1, name: Optional[str] = None) -> nn.Conv:
  """A bias-free 1x1 convolution (the ResNet projection shortcut), through
  `fedbif_jax.models.conv`."""
  return nn.Conv(features, (1, 1), strides=(strides, strides), padding="VALID", use_bias=False,
                 kernel_init=he_normal, name=name, conv_general_dilated=conv.conv_general_dilated)


def batch_norm(x: jax.Array, train: bool, mask: Optional[jax.Array],
               name: Optional[str] = None) -> jax.Array:
  """BatchNorm over all axes but the last; call from inside a compact method.

  Args:
    x: float32 [B, ..., C].
    train: True: normalise with the statistics of the real examples of this batch and update
      the running averages (``batch_stats`` must be mutable); False: use the running averages.
    mask: float [B] (1 = real example, 0 = padding) or None (every example is real). Ignored
      in eval mode. A batch whose mask is all zero has undefined (NaN) statistics; the engine
      discards such steps whole.
    name: the submodule's name.
  Returns:
    float32 [B, ..., C], normalised, scaled and shifted per channel.
  """
  bn = nn.BatchNorm(use_running_average=not train, momentum=BN_MOMENTUM, epsilon=BN_EPSILON,
                    name=name)
  if train and mask is not None:
    where = (jnp.asarray(mask) > 0).reshape((-1,) + (1,) * (x.ndim - 1))
    return bn(x, mask=where)
  return bn(x)


def max_pool_2x2(x: jax.Array) -> jax.Array:
  """2x2 max-pool with stride 2 on NHWC (VALID: an odd last row/column is dropped).

  The same values as ``nn.max_pool(x, (2, 2), strides=(2, 2))``, computed as a max over a
  reshape. Gradient: each window's output gradient goes to its maximum; where several entries
  tie for the maximum, all of it goes to the first in row-major order (as PyTorch's CPU
  max-pool does; JAX's reduce-max rule would split it equally). The forward keeps which corner
  that is (int8), so the backward is one elementwise pass, where JAX's reduce-max rule (match,
  count, divide) and reduce_window's select-and-scatter are several. In a whole training step
  the difference is within run-to-run noise (benchmarks/compile_options.py, small-CNN FedBiF
  step on the 2-core CPU: 21.7 vs 23.6 ms with a plain reshape-max in one run, 19.9 vs 20.0 ms
  in another).

  With this rule ``max_pool_2x2(relu(x))`` and ``relu(max_pool_2x2(x))`` have the same values and
  the same gradient, ties included (ReLU is monotone and its gradient at 0 is 0); the models pool
  first, on the larger tensor, and apply ReLU to the 4x smaller one.
  """
  _, h, w, _ = x.shape
  return _max_pool_even(x[:, : h - h % 2, : w - w % 2, :])


def _corners(x: jax.Array) -> list:
  """The four corners of every 2x2 window of an even-sized NHWC x, row-major: 4 x [N, H/2, W/2, C]."""
  n, h, w, c = x.shape
  windows = x.reshape(n, h // 2, 2, w // 2, 2, c)
  return [windows[:, :, i, :, j, :] for i in range(2) for j in range(2)]


@jax.custom_vjp
def _max_pool_even(x: jax.Array) -> jax.Array:
  return _max_pool_forward(x)[0]


def _max_pool_forward(x):
  corners = _corners(x)
  # A reduce_window, not the max of the corners: XLA's CPU backend fuses an elementwise max into
  # the pooled tensor's consumers and recomputes it there from the 4x larger input (seen in an
  # XLA profile of the small CNN's step: inside the transpose that feeds the next convolution's
  # weight gradient); it does not fuse a reduce_window.
  pooled = jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
  first = jnp.full(pooled.shape, 3, jnp.int8)      # which corner holds the first maximum
  for k in (2, 1, 0):
    first = jnp.where(corners[k] == pooled, jnp.int8(k), first)
  return pooled, first


def _max_pool_backward(first, g):
  n, h2, w2, c = first.shape
  corner = (2 * jnp.arange(2, dtype=jnp.int8)[:, None] + jnp.arange(2, dtype=jnp.int8)).reshape(
      1, 1, 2, 1, 2, 1)
  dx = jnp.where(first[:, :, None, :, None, :] == corner, g[:, :, None, :, None, :],
                 jnp.zeros((), g.dtype))
  return (dx.reshape(n, 2 * h2, 2 * w2, c),)


_max_pool_even.defvjp(_max_pool_forward, _max_pool_backward)

