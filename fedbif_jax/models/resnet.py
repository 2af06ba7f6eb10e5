"""ResNet-18 and ResNet-34, CIFAR variants (He et al. 2016), with BatchNorm.

The CIFAR stem of the authors' framework (docs/REFERENCE_NOTES.md) and of the usual CIFAR code:

* stem: 3x3 conv, 64 channels, stride 1 + BatchNorm + ReLU; no 7x7 conv, no max-pool;
* four stages of BasicBlocks, 64/128/256/512 channels, first-block strides 1/2/2/2;
  ResNet-18: (2, 2, 2, 2) blocks, ResNet-34: (3, 4, 6, 3);
* BasicBlock: conv3x3(stride) + BN + ReLU, conv3x3 + BN, plus the shortcut, then ReLU. The
  shortcut is the identity, or a 1x1 conv (stride) + BN when the stride or the width changes;
* global average pool (4x4 at 32x32 inputs), then a linear layer with bias.

Convs carry no bias and kernels are He-normal (`fedbif_jax/models/layers.py`). Parameters
(BatchNorm scale and bias included, its running statistics not):

    ResNet-18, 10 classes:  11,173,962 (+ 9,600 BatchNorm statistics)
    ResNet-34, 100 classes: 21,328,292 (+ 17,024 BatchNorm statistics)

Parameter names: ``stem_conv``, ``stem_bn``, ``stage{1..4}_block{k}`` (each with ``conv1``,
``bn1``, ``conv2``, ``bn2`` and, where the shape changes, ``shortcut_conv``, ``shortcut_bn``) and
``head``.
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedbif_jax.models.layers import batch_norm, conv1x1, conv3x3, he_normal

RESNET18_STAGES = (2, 2, 2, 2)
RESNET34_STAGES = (3, 4, 6, 3)


class BasicBlock(nn.Module):
  """Two 3x3 convs with BatchNorm and a shortcut: [B, H, W, Cin] -> [B, H/s, W/s, features]."""
  features: int
  strides: int = 1

  @nn.compact
  def __call__(self, x: jax.Array, train: bool, mask: Optional[jax.Array]) -> jax.Array:
    y = conv3x3(self.features, self.strides, name="conv1")(x)
    y = nn.relu(batch_norm(y, train, mask, name="bn1"))
    y = conv3x3(self.features, name="conv2")(y)
    y = batch_norm(y, train, mask, name="bn2")
    if self.strides != 1 or x.shape[-1] != self.features:
      x = conv1x1(self.features, self.strides, name="shortcut_conv")(x)
      x = batch_norm(x, train, mask, name="shortcut_bn")
    return nn.relu(y + x)


class ResNet(nn.Module):
  """CIFAR ResNet: ``__call__(x float32 [B, H, W, C], train, mask float [B]) -> logits``.

  Logits are float32 [B, num_classes]. Any H, W >= 8 works (total stride 8).
  """
  num_classes: int = 10
  stage_sizes: Sequence[int] = RESNET18_STAGES
  widths: Sequence[int] = (64, 128, 256, 512)
  stage_strides: Sequence[int] = (1, 2, 2, 2)

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, mask: Optional[jax.Array] = None):
    x = conv3x3(self.widths[0], name="stem_conv")(x)
    x = nn.relu(batch_norm(x, train, mask, name="stem_bn"))
    for s, (blocks, features, strides) in enumerate(
        zip(self.stage_sizes, self.widths, self.stage_strides)):
      for b in range(blocks):
        x = BasicBlock(features, strides if b == 0 else 1, name=f"stage{s + 1}_block{b}")(
            x, train, mask)
    x = jnp.mean(x, axis=(1, 2))
    return nn.Dense(self.num_classes, kernel_init=he_normal, name="head")(x)
