"""The models' convolutions on XLA's CPU: YNNPACK (XLA's default) against Eigen.

For the 3x3 layer shapes of the small CNN, VGG11-lite and ResNet-18 at batch 64, times the
forward convolution, its input gradient and its weight gradient, each compiled twice: with XLA's
default options (convolutions go to YNNPACK, one thread each) and with
`fedbif_jax.xla_options.CPU_COMPILER_OPTIONS["train"]` (Eigen's convolutions over all intra-op threads),
which the training programs use. This is the measurement behind `fedbif_jax/xla_options.py`.

Usage: python benchmarks/conv_grad.py   (about a minute on 2 CPU cores)
"""
from __future__ import annotations

import json
import os
import time

import jax
import numpy as np


from fedbif_jax import xla_options

SHAPES = [(32, 3, 32), (16, 32, 64), (32, 3, 64), (32, 64, 64), (16, 128, 128), (8, 256, 256),
          (4, 512, 512)]  # (image side, C_in, C_out)
OPTIONS = {"default": None, "eigen": xla_options.CPU_COMPILER_OPTIONS["train"]}


def best_ms(f, *args, repeats: int = 10) -> float:
  jax.block_until_ready(f(*args))
  times = []
  for _ in range(repeats):
    t = time.perf_counter()
    jax.block_until_ready(f(*args))
    times.append(time.perf_counter() - t)
  return 1e3 * float(np.median(times))


def _conv3x3(x, w):
  return jax.lax.conv_general_dilated(x, w, (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))


def measure(shapes=SHAPES, batch: int = 64) -> list[dict]:
  """Per shape and option set: forward, input- and weight-gradient ms (median of 10)."""
  dx = lambda x, w, g: jax.vjp(lambda x: _conv3x3(x, w), x)[1](g)[0]
  dw = lambda x, w, g: jax.vjp(lambda w: _conv3x3(x, w), w)[1](g)[0]
  rows = []
  for side, c_in, c_out in shapes:
    x = jax.random.normal(jax.random.key(0), (batch, side, side, c_in))
    w = jax.random.normal(jax.random.key(1), (3, 3, c_in, c_out))
    g = jax.random.normal(jax.random.key(2), (batch, side, side, c_out))
    row = {"side": side, "c_in": c_in, "c_out": c_out, "batch": batch}
    for name, options in OPTIONS.items():
      jit = lambda f: jax.jit(f, compiler_options=options)
      row[name] = {"forward_ms": best_ms(jit(_conv3x3), x, w),
                   "input_grad_ms": best_ms(jit(dx), x, w, g),
                   "weight_grad_ms": best_ms(jit(dw), x, w, g)}
    rows.append(row)
  return rows


def table(rows: list[dict]) -> list[str]:
  lines = ["| image | C_in -> C_out | forward ms (default / Eigen) | input grad ms | weight grad ms |",
           "|---|---|---|---|---|"]
  for r in rows:
    d, e = r["default"], r["eigen"]
    cell = lambda key: f"{d[key]:.1f} / {e[key]:.1f}"
    lines.append(f"| {r['side']}x{r['side']} | {r['c_in']} -> {r['c_out']} | {cell('forward_ms')} | "
                 f"{cell('input_grad_ms')} | {cell('weight_grad_ms')} |")
  return lines


def main() -> None:
  rows = measure()
  print(f"{jax.devices()[0].device_kind}, JAX {jax.__version__}, batch 64")
  print("\n".join(table(rows)))
  print(json.dumps(rows))


if __name__ == "__main__":
  main()
