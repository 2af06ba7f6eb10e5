"""The measurements behind `fedbif_jax/xla_options.py`, `models/conv.py` and the max-pool rule.

On this machine's CPU, times:

1. one FedBiF local training step (batch 64, `client.make_local_training`) of the small CNN and
   ResNet-18, compiled with XLA's defaults, with ``CPU_COMPILER_OPTIONS["train"]`` (the training
   programs' options) and with ``CPU_COMPILER_OPTIONS["server"]`` (also no YNNPACK reductions);
2. one FedBiF aggregation of ResNet-18 over 4 clients, with XLA's defaults and with the
   ``server`` options (the server programs' options);
3. the while-loop trap: 4 SGD steps on a 16x16x32->64 convolution (batch 64), unrolled and in a
   `lax.scan`, with lax's convolution, and in a scan vmapped over one client with the models'
   convolution (`models/conv.py`: its vmapped weight gradient is matrix products);
4. the small CNN's training step with `layers.max_pool_2x2` and with a plain reshape-max pool
   (JAX's reduce-max gradient rule), both under the ``train`` options.

Usage: python benchmarks/compile_options.py   (a few minutes on 2 CPU cores)
The last line printed is one JSON object with every figure, in ms.
"""
from __future__ import annotations

import contextlib
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax


from conv_grad import best_ms  # benchmarks/, this script's directory
from fedbif_jax import rounds, xla_options
from fedbif_jax.algorithms import get_algorithm
from fedbif_jax.algorithms.base import RoundInfo
from fedbif_jax.client import Batches, TrainData, make_local_training
from fedbif_jax.config import base_config
from fedbif_jax.models import cnn as cnn_lib
from fedbif_jax.models import conv, get_model

OPTIONS = {"defaults": None, "train": xla_options.CPU_COMPILER_OPTIONS["train"],
           "server": xla_options.CPU_COMPILER_OPTIONS["server"]}
BATCH, CLIENTS = 64, 4


def _fedbif(model_name: str):
  config = base_config()
  config.algorithm = "fedbif"
  model = get_model(model_name, 10)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1, 32, 32, 3)), train=False))(
      jax.random.key(0))
  algo = get_algorithm(config)
  info = RoundInfo(jnp.full((CLIENTS,), 1.0 / CLIENTS), jnp.full((CLIENTS,), 256.0))
  # The simulator's server and its broadcast (rounds.Server); only the aggregation is timed here
  # under other XLA options (`aggregate_ms`).
  plan = rounds.RoundPlan(np.arange(CLIENTS), info, jax.random.key(2), jax.random.key(2), None,
                          None, None)
  rounds_server = rounds.Server(algo, jax.random.key(1), variables, lambda t: plan)
  downlink = rounds_server.open_round(0).downlink
  server = rounds_server.state
  local = make_local_training(algo, model, optax.sgd(0.05), np.zeros(3, np.float32),
                              np.ones(3, np.float32))
  return algo, variables, server, info, downlink, local


def step_ms(model_name: str, repeats: int) -> dict:
  """One jitted local step per call, per option set."""
  algo, variables, _, _, downlink, local = _fedbif(model_name)
  rng = np.random.default_rng(0)
  data = TrainData(jnp.asarray(rng.integers(0, 256, (256, 32, 32, 3), dtype=np.uint8)),
                   jnp.asarray(rng.integers(0, 10, 256), jnp.int32))
  batches = Batches(jnp.asarray(rng.integers(0, 256, (1, BATCH)), jnp.int32),
                    jnp.ones((1, BATCH), jnp.float32))
  key = jax.random.key(3)
  carry = jax.jit(local.start)(downlink, algo.init_client(key, variables), key)
  out = {}
  for name, options in OPTIONS.items():
    step = jax.jit(lambda c: local.steps(downlink, c, data, batches, key, num_steps=1),
                   compiler_options=options)
    out[name] = best_ms(step, carry, repeats=repeats)
  return out


def aggregate_ms() -> dict:
  """FedBiF aggregation of ResNet-18 over CLIENTS clients' uplinks."""
  algo, variables, server, info, downlink, local = _fedbif("resnet18")
  uplinks, metrics = [], []
  for c in range(CLIENTS):
    state = algo.init_client(jax.random.key(c), variables)
    carry = jax.jit(local.start)(downlink, state, jax.random.key(c))
    uplink, _, metric = jax.jit(local.finish)(downlink, state, carry, jax.random.key(c))
    uplinks.append(uplink)
    metrics.append(metric)
  stack = lambda trees: jax.tree.map(lambda *xs: jnp.stack(xs), *trees)
  args = (server, downlink, stack(uplinks), info.weights, stack(metrics))
  return {name: best_ms(jax.jit(algo.aggregate, compiler_options=OPTIONS[name]), *args)
          for name in ("defaults", "server")}


def loop_trap_ms(steps: int = 4) -> dict:
  rng = np.random.default_rng(1)
  x = jnp.asarray(rng.standard_normal((BATCH, 16, 16, 32)), jnp.float32)
  w = jnp.asarray(rng.standard_normal((3, 3, 32, 64)) * 0.01, jnp.float32)

  def sgd(conv_fn):
    return lambda w, x: w - 0.01 * jax.grad(lambda w: jnp.sum(conv_fn(x, w) ** 2))(w)

  def lax_conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=conv.NHWC)

  def ours(x, w):
    return conv.conv_general_dilated(x, w, (1, 1), "SAME", dimension_numbers=conv.NHWC)

  def unrolled(step):
    def run(w, x):
      for _ in range(steps):
        w = step(w, x)
      return w
    return run

  def scanned(step):
    return lambda w, x: jax.lax.scan(lambda w, _: (step(w, x), None), w, None, length=steps)[0]

  jit = lambda f: jax.jit(f, compiler_options=OPTIONS["train"])
  return {"lax_unrolled": best_ms(jit(unrolled(sgd(lax_conv))), w, x, repeats=3),
          "lax_scanned": best_ms(jit(scanned(sgd(lax_conv))), w, x, repeats=3),
          "ours_scanned_vmapped": best_ms(jit(jax.vmap(scanned(sgd(ours)))), w[None], x[None],
                                            repeats=3)}


@contextlib.contextmanager
def _reduce_max_pool():
  """The small CNN with a plain reshape-max pool (JAX's reduce-max gradient rule)."""
  def plain(x):
    n, h, w, c = x.shape
    return x[:, :h - h % 2, :w - w % 2, :].reshape(n, h // 2, 2, w // 2, 2, c).max(axis=(2, 4))
  ours = cnn_lib.max_pool_2x2
  cnn_lib.max_pool_2x2 = plain
  try:
    yield
  finally:
    cnn_lib.max_pool_2x2 = ours


def main() -> None:
  print(f"{jax.devices()[0].device_kind}, {os.cpu_count()} cores, JAX {jax.__version__}")
  result = {"step_cnn": step_ms("cnn", repeats=20), "step_resnet18": step_ms("resnet18", 3)}
  with _reduce_max_pool():
    result["step_cnn_reduce_max_pool"] = step_ms("cnn", repeats=20)["train"]
  result["aggregate_resnet18"] = aggregate_ms()
  result["loop_trap"] = loop_trap_ms()
  for key, value in result.items():
    print(key, value, flush=True)
  print(json.dumps(result))


if __name__ == "__main__":
  main()
