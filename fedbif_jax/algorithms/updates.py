"""Shared pieces of the baselines that compress model updates (SignSGD, FedPAQ, FedDQ, DAdaQuant).

Owns:

* the full-precision downlink of FedPAQ, FedDQ and DAdaQuant (the model as FedAvg sends it) and a
  client's local model built from it;
* the local update of the compressed leaves, Delta_k = w_k^{t+1} - w^t (conv and dense kernels,
  chosen by the algorithm's `predicate`); every other leaf (biases, BatchNorm statistics) travels
  in full precision and is averaged as in FedAvg. This follows the FedBiF authors' framework,
  which compresses conv/linear layers only and keeps BatchNorm in full precision (FedDQ's own code
  also quantizes BN tensors; we do not, see docs/BPP.md);
* the server step w^{t+1} = w^t + sum_k p_k Q(Delta_k) on the compressed leaves.

The quantizers themselves (QSGD's levels for FedPAQ and DAdaQuant, FedDQ's min-max) live in
`fedbif_jax.quant`. Every function is pure over pytrees; compressed leaves are walked in sorted
path order and leaf i draws its randomness from ``fold_in(key, i)`` (`pytrees.map_with_keys`).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fedbif_jax import pytrees
from fedbif_jax.algorithms import base


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
  weights, other = pytrees.split_params(state["params"], predicate)
  return {"weights": weights, "other": other, "model_state": state["model_state"]}


def start_from_downlink(downlink: dict) -> base.LocalState:
  """A client's local model: exactly the broadcast full-precision model."""
  params = pytrees.merge_params(downlink["weights"], downlink["other"])
  return base.LocalState(trainable=params, model_state=downlink["model_state"])


def local_update(global_weights: dict, local_params: dict, predicate) -> tuple[dict, dict]:
  """(Delta, other): Delta = local kernels - global kernels (float32, pruned nested dict) and the
  client's full-precision non-kernel leaves."""
  local_weights, other = pytrees.split_params(local_params, predicate)
  delta = jax.tree.map(lambda w, g: w.astype(jnp.float32) - g.astype(jnp.float32),
                       local_weights, global_weights)
  return delta, other


def apply_mean_update(state: dict, mean_delta: dict, uplinks: dict, weights: jax.Array,
                      predicate) -> tuple[dict, dict]:
  """(params, model_state) of the next round: w^t + mean Delta on the compressed leaves, the
  weighted mean of the clients' full-precision leaves ("other", "model_state") elsewhere."""
  global_weights, _ = pytrees.split_params(state["params"], predicate)
  new_weights = jax.tree.map(lambda g, d: (g.astype(jnp.float32) + d).astype(g.dtype),
                             global_weights, mean_delta)
  other = pytrees.weighted_mean(uplinks["other"], weights)
  return (pytrees.merge_params(new_weights, other),
          pytrees.weighted_mean(uplinks["model_state"], weights))
