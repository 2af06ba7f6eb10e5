"""Flax models by name.

`get_model(name, num_classes)` returns an unbound Flax module whose ``__call__(x, train, mask)``
maps float32 images [B, H, W, C] to logits [B, num_classes]. ``mask`` (float [B], 1 = real
example) lets BatchNorm models ignore padded examples; models without BatchNorm ignore it.
"""
from __future__ import annotations

import flax.linen as nn

from fedbif_jax.errors import check
from fedbif_jax.models.cnn import SmallCNN

MODELS = {
    "cnn": SmallCNN,
}


def get_model(name: str, num_classes: int) -> nn.Module:
  """The model registered under `name` with a `num_classes`-way classifier."""
  check(name in MODELS, "model.name", f"one of {', '.join(sorted(MODELS))}", name)
  return MODELS[name](num_classes=num_classes)
