"""Weight gradient of the models' 3x3 convolutions: XLA's own against nine offset products.

Times, for the layer shapes of the small CNN, VGG11-lite and ResNet-18 at batch 64, the gradient
of a 3x3 stride-1 convolution with respect to its kernel, computed by XLA (`jax.vjp` of
``lax.conv_general_dilated``) and by `fedbif_jax.models.conv.weight_grad_by_offsets`, plus the
forward convolution for scale. This is the measurement behind ``conv.MIN_PIXELS``.

Usage: python benchmarks/conv_grad.py   (about a minute on 2 CPU cores)
"""
from __future__ import annotations

import json
import os
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fedbif_jax.models import conv  # noqa: E402

SHAPES = [(32, 3, 32), (16, 32, 64), (32, 3, 64), (32, 64, 64), (16, 128, 128), (8, 256, 256),
          (4, 512, 512)]  # (image side, C_in, C_out)


def best_ms(f, *args, repeats: int = 10) -> float:
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))


def measure(shapes=SHAPES, batch: int = 64) -> list[dict]:
  """Per shape: forward, XLA's weight gradient and the offset products, in ms (median)."""
  rows = []
  for side, c_in, c_out in shapes:
    x = jax.random.normal(jax.random.key(0), (batch, side, side, c_in))
    w = jax.random.normal(jax.random.key(1), (3, 3, c_in, c_out))
    g = jax.random.normal(jax.random.key(2), (batch, side, side, c_out))
    xla = jax.jit(lambda x, w, g: jax.vjp(lambda w: conv._conv3x3(x, w), w)[1](g)[0])
    ours = jax.jit(conv.weight_grad_by_offsets)
    np.testing.assert_allclose(ours(x, g), xla(x, w, g), rtol=1e-3, atol=1e-2)
    rows.append({"side": side, "c_in": c_in, "c_out": c_out, "batch": batch,
                 "forward_ms": best_ms(jax.jit(conv._conv3x3), x, w),
                 "xla_ms": best_ms(xla, x, w, g), "offsets_ms": best_ms(ours, x, g)})
  return rows


def table(rows: list[dict]) -> list[str]:
  lines = ["| image | C_in -> C_out | forward ms | XLA weight grad ms | offsets ms | speed-up | used |",
           "|---|---|---|---|---|---|---|"]
  for r in rows:
    used = "yes" if r["side"] ** 2 >= conv.MIN_PIXELS else "no"
    lines.append(f"| {r['side']}x{r['side']} | {r['c_in']} -> {r['c_out']} | {r['forward_ms']:.1f} | "
                 f"{r['xla_ms']:.1f} | {r['offsets_ms']:.1f} | {r['xla_ms'] / r['offsets_ms']:.2f}x | "
                 f"{used} |")
  return lines


def main() -> None:
  rows = measure()
  print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}, batch 64")
  print("\n".join(table(rows)))
  print(json.dumps(rows))


if __name__ == "__main__":
  main()
