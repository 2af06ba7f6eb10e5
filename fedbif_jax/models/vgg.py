"""VGG11-lite: VGG11's layer pattern at 7/8 of its width, with BatchNorm, for 32x32 inputs (SVHN).

Layer pattern (VGG11, configuration "A" of Simonyan & Zisserman; "M" = 2x2 max-pool, stride 2):

    conv 56, M, conv 112, M, conv 224, conv 224, M, conv 448, conv 448, M, conv 448, conv 448, M,
    linear num_classes

Every conv is 3x3 with one pixel of padding, no bias, then BatchNorm and ReLU
(`fedbif_jax/models/layers.py`). After five pools a 32x32 image is 1x1x448, flattened into the
linear classifier (with bias). No dropout, no 4096-wide fully connected layers.

Width: the paper calls its SVHN model "a lightweight version of VGG11" and gives no widths. Its
Table 1 does give the uncompressed traffic of a run: "SVHN with VGG11 (2.6 GB)". Read the same
way as its other two rows, which our ResNets reproduce exactly (4 bytes x parameters x rounds:
ResNet-18 11,173,962 x 4 B x 200 = 8.3 GiB, ResNet-34/100 classes 21,328,292 x 4 B x 200 =
15.9 GiB), 2.6 GiB over 100 rounds means 6.85M..7.11M parameters. VGG11's own widths
(64..512, 9,228,362 parameters with this head) give 3.4 GiB; 7/8 of them give 2.63 GiB. So:

    widths (56, 112, 224, 224, 448, 448, 448, 448): 7,066,818 parameters at 10 classes
    (7,057,512 conv, 4,816 BatchNorm scale/bias, 4,490 linear) + 4,816 BatchNorm statistics.

``widths`` is a field, so other widths are one ``VGG(widths=...)`` away.
"""
from __future__ import annotations

from typing import Optional, Sequence

import flax.linen as nn
import jax

from fedbif_jax.errors import check
from fedbif_jax.models.layers import batch_norm, conv3x3, he_normal, max_pool_2x2

VGG11_LITE_WIDTHS = (56, 112, 224, 224, 448, 448, 448, 448)
# Indices of the convs that a 2x2 max-pool follows (VGG11: after convs 1, 2, 4, 6 and 8).
VGG11_POOL_AFTER = (0, 1, 3, 5, 7)


class VGG(nn.Module):
  """VGG with BatchNorm: ``__call__(x float32 [B, H, W, C], train, mask float [B]) -> logits``.

  Logits are float32 [B, num_classes]. H and W must be at least 32 (five 2x2 pools).
  """
  num_classes: int = 10
  widths: Sequence[int] = VGG11_LITE_WIDTHS
  pool_after: Sequence[int] = VGG11_POOL_AFTER

  @nn.compact
  def __call__(self, x: jax.Array, train: bool = False, mask: Optional[jax.Array] = None):
    side = 2 ** len(self.pool_after)
    check(x.shape[1] >= side and x.shape[2] >= side, "model.name",
          f"used with images of at least {side}x{side} for a VGG ({len(self.pool_after)} max-pools)",
          f"{x.shape[1]}x{x.shape[2]} images")
    for i, features in enumerate(self.widths):
      x = conv3x3(features, name=f"conv{i}")(x)
      x = batch_norm(x, train, mask, name=f"bn{i}")
      if i in self.pool_after:  # before the ReLU: same values and gradient (layers.max_pool_2x2)
        x = max_pool_2x2(x)
      x = nn.relu(x)
    x = x.reshape((x.shape[0], -1))
    return nn.Dense(self.num_classes, kernel_init=he_normal, name="head")(x)
