"""Shared pieces of the baselines that compress model updates (SignSGD, FedPAQ, FedDQ, DAdaQuant).

Owns:

* the full-precision downlink of FedPAQ, FedDQ and DAdaQuant (the model as FedAvg sends it) and a
  client's local model built from it;
* the local update of the compressed leaves, Delta_k = w_k^{t+1} - w^t (conv and dense kernels,
  chosen by the algorithm's `predicate`); every other leaf (biases, BatchNorm statistics) travels
  in full precision and is averaged as in FedAvg. This follows the FedBiF authors' framework,
  which compresses conv/linear layers only and keeps BatchNorm in full precision (FedDQ's own code
  also quantizes BN tensors; we do not, see docs/BPP.md);
* the symmetric level quantizer of QSGD (Alistarh et al. 2017) that FedPAQ and DAdaQuant use:
  with L levels per sign and a per-tensor scale s,
      Q(x)_j = s / L * q_j,   q_j = floor(L x_j / s) + Bernoulli(frac(L x_j / s)) in [-L, L],
  unbiased (E[Q(x)] = x) because |x_j| <= s; it costs ceil(log2(2L + 1)) bits per element;
* the server step w^{t+1} = w^t + sum_k p_k Q(Delta_k) on the compressed leaves.

Every function is pure over pytrees; compressed leaves are walked in sorted path order and
leaf i draws its randomness from ``fold_in(key, i)``.
"""
from __future__ import annotations

from typing import Any, Callable

import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp

from fedbif_jax import bits as bits_lib
from fedbif_jax.algorithms import base

NORMS = ("max", "l2")


def map_with_keys(fn: Callable, key: jax.Array, *trees: Any) -> dict:
  """fn(path_index_key, *leaves) over nested dicts of arrays in sorted path order.

  Leaf i (in sorted path order) gets ``jax.random.fold_in(key, i)``; returns the same nested
  structure. `fn` may return any pytree (e.g. a tuple), kept as the new leaf.
  """
  flats = [traverse_util.flatten_dict(t) for t in trees]
  out = {}
  for i, path in enumerate(sorted(flats[0])):
    out[path] = fn(jax.random.fold_in(key, i), *(f[path] for f in flats))
  return traverse_util.unflatten_dict(out)


def unzip(tree: Any) -> tuple[dict, ...]:
  """A nested dict whose leaves are tuples -> a tuple of nested dicts (one per tuple slot)."""
  flat = traverse_util.flatten_dict(tree)  # tuples are leaves: only dicts are walked
  width = len(next(iter(flat.values()))) if flat else 0
  return tuple(traverse_util.unflatten_dict({k: v[i] for k, v in flat.items()})
               for i in range(width))


def update_quantizer(name: str, predicate, client_finish, aggregate, **overrides) -> base.Algorithm:
  """An algorithm that broadcasts the full-precision model and uploads a quantized update.

  FedAvg, FedPAQ, FedDQ and DAdaQuant differ only in `client_finish` (how the update is quantized) and
  `aggregate` (how it is folded back); `overrides` replaces any other function (e.g. an `init`
  with extra server state). Server state: ``{"params", "model_state", ...}``; clients are
  stateless.
  """
  def init(key, variables):
    del key
    params, model_state = base.split_variables(variables)
    return {"params": params, "model_state": model_state}

  def init_client(key, variables):
    del key, variables
    return {}

  def broadcast(state, key, info):
    del key, info
    return full_precision_downlink(state, predicate)

  def client_start(downlink, client_state, key):
    del client_state, key
    return start_from_downlink(downlink)

  def model_params(trainable, downlink):
    del downlink
    return trainable

  def eval_variables(state):
    return {"params": state["params"], **state["model_state"]}

  functions = dict(init=init, init_client=init_client, broadcast=broadcast,
                   client_start=client_start, model_params=model_params,
                   client_finish=client_finish, aggregate=aggregate,
                   eval_variables=eval_variables)
  functions.update(overrides)
  return base.Algorithm(name=name, **functions)


def full_precision_downlink(state: dict, predicate) -> dict:
  """The model ``{"params", "model_state"}`` in float32, split as the ledger wants it: kernels
  under "weights" (32 bpp), other params under "other"."""
  weights, other = bits_lib.split_params(state["params"], predicate)
  return {"weights": weights, "other": other, "model_state": state["model_state"]}


def start_from_downlink(downlink: dict) -> base.LocalState:
  """A client's local model: exactly the broadcast full-precision model."""
  params = bits_lib.merge_params(downlink["weights"], downlink["other"])
  return base.LocalState(trainable=params, model_state=downlink["model_state"])


def local_update(global_weights: dict, local_params: dict, predicate) -> tuple[dict, dict]:
  """(Delta, other): Delta = local kernels - global kernels (float32, pruned nested dict) and the
  client's full-precision non-kernel leaves."""
  local_weights, other = bits_lib.split_params(local_params, predicate)
  delta = jax.tree.map(lambda w, g: w.astype(jnp.float32) - g.astype(jnp.float32),
                       local_weights, global_weights)
  return delta, other


def level_width(levels: jax.Array) -> jax.Array:
  """ceil(log2(2L + 1)) for integer L >= 1, exactly: 2L+1 is odd, so it equals bit_length(L) + 1.

  levels: int32 array (any shape). Returns int32, same shape. L=1 -> 2, 2..3 -> 3, 4..7 -> 4.
  """
  levels = jnp.asarray(levels, jnp.int32)
  return (32 - jax.lax.clz(levels) + 1).astype(jnp.int32)


def tensor_scale(x: jax.Array, norm: str = "max") -> jax.Array:
  """The quantizer's scale s: max|x| ("max") or ||x||_2 ("l2", QSGD as printed in FedPAQ).

  float32 scalar > 0 (an all-zero tensor gets 1; it quantizes to zeros).
  """
  x = x.astype(jnp.float32)
  s = jnp.max(jnp.abs(x)) if norm == "max" else jnp.sqrt(jnp.sum(x * x))
  return jnp.where(s > 0, s, 1.0)


def quantize_levels(x: jax.Array, levels: jax.Array, key: jax.Array, norm: str = "max",
                    dtype=jnp.int16) -> tuple[jax.Array, jax.Array]:
  """Unbiased stochastic quantization to integers in [-L, L] (module docstring).

  Args:
    x: float array [...], one tensor's update.
    levels: L >= 1, int scalar (may be traced).
    key: PRNG key for the stochastic rounding.
    norm: "max" or "l2", see `tensor_scale`.
    dtype: integer storage dtype; must hold [-L, L].
  Returns:
    (q, s): q `dtype` [...] in [-L, L]; s float32 scalar. Dequantize with `dequantize_levels`.
  """
  s = tensor_scale(x, norm)
  lv = jnp.asarray(levels, jnp.float32)
  y = jnp.clip(x.astype(jnp.float32) / s * lv, -lv, lv)
  floor = jnp.floor(y)
  q = floor + (jax.random.uniform(key, y.shape, jnp.float32) < (y - floor)).astype(jnp.float32)
  return jnp.clip(q, -lv, lv).astype(dtype), s


def dequantize_levels(q: jax.Array, levels: jax.Array, scale: jax.Array) -> jax.Array:
  """s / L * q, float32 with q's shape."""
  return q.astype(jnp.float32) * (jnp.asarray(scale, jnp.float32) /
                                  jnp.asarray(levels, jnp.float32))


def client_axis(x: jax.Array, like: jax.Array) -> jax.Array:
  """Reshape a per-client [C] array to broadcast against `like` [C, ...]."""
  return jnp.reshape(x, (-1,) + (1,) * (like.ndim - 1))


def apply_mean_update(state: dict, mean_delta: dict, uplinks: dict, weights: jax.Array,
                      predicate) -> tuple[dict, dict]:
  """(params, model_state) of the next round: w^t + mean Delta on the compressed leaves, the
  weighted mean of the clients' full-precision leaves ("other", "model_state") elsewhere."""
  global_weights, _ = bits_lib.split_params(state["params"], predicate)
  new_weights = jax.tree.map(lambda g, d: (g.astype(jnp.float32) + d).astype(g.dtype),
                             global_weights, mean_delta)
  other = base.weighted_mean(uplinks["other"], weights)
  return (bits_lib.merge_params(new_weights, other),
          base.weighted_mean(uplinks["model_state"], weights))


def weighted_sum_over_clients(per_client: jax.Array, weights: jax.Array) -> jax.Array:
  """sum_k weights[k] * per_client[k] for per_client float32 [C, ...]."""
  return jnp.sum(client_axis(weights.astype(jnp.float32), per_client) * per_client, axis=0)
