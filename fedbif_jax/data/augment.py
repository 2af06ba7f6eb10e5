"""Image preprocessing in JAX: normalisation, and training-time augmentation applied per client
batch with the client's step key.

``data.augment``:

* ``none`` - the images as they are;
* ``crop_flip`` - the CIFAR augmentation of the authors' framework (docs/REFERENCE_NOTES.md),
  torchvision's ``RandomCrop(32, padding=4)`` + ``RandomHorizontalFlip()``: per example, pad the
  uint8 image with 4 black (0) pixels on every side, cut a random window of the original size
  (offsets uniform in 0..8 on each axis), and mirror it left-right with probability 0.5.
  Padding happens on the uint8 pixels, before normalisation, as torchvision pads before
  ``Normalize``; a padded pixel therefore becomes -mean/std after normalisation.

Pure functions of (key, images): the same key gives the same batch on every backend, and each
client and step draws its own (`fedbif_jax/client.py` passes the per-step key).

`normalize` turns the (augmented) uint8 images into the model's float32 input, for local
training (`fedbif_jax/client.py`) and evaluation (`fedbif_jax/metrics.py`) alike.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fedbif_jax.errors import check

AUGMENTATIONS = ("none", "crop_flip")
CROP_PADDING = 4


def check_augment(name: str, field: str = "data.augment") -> str:
  """Returns `name` if it is one of `AUGMENTATIONS`; raises ConfigError naming `field` if not."""
  check(name in AUGMENTATIONS, field, f"one of {', '.join(AUGMENTATIONS)}", name)
  return name


def random_crop_flip(key: jax.Array, x: jax.Array, padding: int = CROP_PADDING) -> jax.Array:
  """Random crop after zero padding, then a random horizontal flip, independently per example.

  Args:
    key: PRNG key.
    x: images [B, H, W, C] (any dtype; uint8 in the engine).
    padding: zero pixels added on each side before cropping.
  Returns:
    [B, H, W, C], x's dtype.
  """
  b, h, w, c = x.shape
  k_y, k_x, k_flip = jax.random.split(key, 3)
  dy = jax.random.randint(k_y, (b,), 0, 2 * padding + 1)
  dx = jax.random.randint(k_x, (b,), 0, 2 * padding + 1)
  flip = jax.random.bernoulli(k_flip, 0.5, (b,))
  padded = jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)))

  def one(image, oy, ox, mirror):
    crop = jax.lax.dynamic_slice(image, (oy, ox, 0), (h, w, c))
    return jnp.where(mirror, crop[:, ::-1], crop)

  return jax.vmap(one)(padded, dy, dx, flip)


def augment_batch(name: str, key: jax.Array, x: jax.Array) -> jax.Array:
  """Applies the augmentation `name` (one of `AUGMENTATIONS`) to images x [B, H, W, C]."""
  check_augment(name)
  if name == "crop_flip":
    return random_crop_flip(key, x)
  return x


def normalize(x_uint8: jax.Array, mean: jax.Array, std: jax.Array) -> jax.Array:
  """uint8 images [..., C] -> float32 (x / 255 - mean) / std, per channel."""
  return (x_uint8.astype(jnp.float32) / 255.0 - mean) / std
