"""The small CNN of the engine's CIFAR-10 setup and the offline quickstart.

Two 3x3 conv layers (32 and 64 channels, 'SAME' padding, ReLU, 2x2 max-pool), then dense 128
(ReLU) and dense `num_classes`. No BatchNorm. Each ReLU follows its max-pool (the same values and
gradients, `fedbif_jax.models.layers.max_pool_2x2`, on a 4x smaller tensor); the convolutions'
weight gradients are loop-safe under vmap (`fedbif_jax.models.conv`). Kernels are He-normal
(untruncated normal with variance 2 / fan_in, as PyTorch's ``kaiming_normal_``), biases zero.
On 32x32x3 inputs it has 545,098 parameters (the dense 4096 -> 128 layer holds 524,416 of them).
"""
from __future__ import annotations

from typing import Optional

import flax.linen as nn
import jax

from fedbif_jax.models import conv
from fedbif_jax.models.layers import max_pool_2x2

he_normal = nn.initializers.variance_scaling(2.0, "fan_in", "normal")


class SmallCNN(nn.Module):
  num_classes: int = 10

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, mask: Optional[jax.Array] = None):
    del train, mask  # no BatchNorm or dropout
    for features in (32, 64):
      x = nn.Conv(features, (3, 3), padding="SAME", kernel_init=he_normal,
                  conv_general_dilated=conv.conv_general_dilated)(x)
      x = nn.relu(max_pool_2x2(x))  # pool first: same values and gradient (layers.py)
    x = x.reshape((x.shape[0], -1))
    x = nn.relu(nn.Dense(128, kernel_init=he_normal)(x))
    return nn.Dense(self.num_classes, kernel_init=he_normal)(x)
