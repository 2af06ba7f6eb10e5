"""The small CNNs of the engine's CIFAR-10 setup, the offline quickstart and the CPU study.

``cnn`` (`SmallCNN`): two 3x3 conv layers (32 and 64 channels, 'SAME' padding, ReLU, 2x2
max-pool), then dense 128 (ReLU) and dense `num_classes`. No BatchNorm. Each ReLU follows its
max-pool (the same values and gradients, `fedbif_jax.models.layers.max_pool_2x2`, on a 4x smaller
tensor); the convolutions' weight gradients are loop-safe under vmap (`fedbif_jax.models.conv`).
Kernels are He-normal (untruncated normal with variance 2 / fan_in, as PyTorch's
``kaiming_normal_``), biases zero. On 32x32x3 inputs it has 545,098 parameters (the dense
4096 -> 128 layer holds 524,416 of them).

``cnn_bn`` (`SmallCNNBN`): the same network with BatchNorm, as all three of the paper's models
have it: conv (no bias) -> max-pool -> BatchNorm -> ReLU, twice, then the same dense layers.
BatchNorm follows `fedbif_jax.models.layers.batch_norm` (masked statistics in train mode,
running averages in eval mode). It normalises the pooled, 4x smaller tensor: on the 2-core CPU a
FedBiF round of the CPU study (10 clients x 16 steps of 64) took 5.0 s this way and 8.6 s with
BatchNorm before the pool. 545,194 parameters on 32x32x3 inputs (the two conv biases replaced by
BatchNorm scale and bias) plus 192 BatchNorm statistics.
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax

from fedbif_jax.models import conv
from fedbif_jax.models.layers import batch_norm, conv3x3, max_pool_2x2

he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")
SMALL_CNN_WIDTHS = (32, 64)
SMALL_CNN_HIDDEN = 128


def _classifier(x: jax.Array, num_classes: int) -> jax.Array:
  x = x.reshape((x.shape[0], -1))
  x = nn.relu(nn.Dense(SMALL_CNN_HIDDEN, kernel_init=he_normal)(x))
  return nn.Dense(num_classes, kernel_init=he_normal)(x)


class SmallCNN(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, mask: Optional[jax.Array] = None):
    del train, mask  # no BatchNorm or dropout
    for features in SMALL_CNN_WIDTHS:
      x = nn.Conv(features, (3, 3), padding="SAME", kernel_init=he_normal,
                  conv_general_dilated=conv.conv_general_dilated)(x)
      x = nn.relu(max_pool_2x2(x))  # pool first: same values and gradient (layers.py)
    return _classifier(x, self.num_classes)


class SmallCNNBN(nn.Module):
  """`SmallCNN` with BatchNorm after each (bias-free) convolution."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, mask: Optional[jax.Array] = None):
    for i, features in enumerate(SMALL_CNN_WIDTHS):
      x = conv3x3(features, name=f"conv{i}")(x)
      x = max_pool_2x2(x)  # BatchNorm on the pooled tensor (module docstring)
      x = nn.relu(batch_norm(x, train, mask, name=f"bn{i}"))
    return _classifier(x, self.num_classes)
