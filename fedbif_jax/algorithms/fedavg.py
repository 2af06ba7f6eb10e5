"""FedAvg (McMahan et al. 2017; FedBiF paper Sec. 2.1): full-precision models both ways.

w^{t+1} = sum_{k in C^t} p_k w_k^{t+1}, with p_k uniform (1/|C^t|) or by data size, as the engine
chooses. BatchNorm statistics are averaged the same way. Every leaf travels as float32: 32 bpp
up and down. FedAvg is the update quantizer of `updates.update_quantizer` whose "quantizer" is
the identity: the client sends its whole model.
"""
from __future__ import annotations

from fedbif_jax import pytrees
from fedbif_jax.algorithms import base, updates


def make(predicate=pytrees.is_kernel) -> base.Algorithm:
  """FedAvg (no hyperparameters). `predicate` only decides which leaves the ledger reports as
  "weights" (bpp)."""

  def client_finish(downlink, client_state, local, key, stats):
    del downlink, key, stats
    model = {"params": local.trainable, "model_state": local.model_state}
    return updates.full_precision_downlink(model, predicate), client_state

  def aggregate(state, downlink, uplinks, weights, client_metrics):
    del state, downlink, client_metrics
    mean = pytrees.weighted_mean(uplinks, weights)
    params = pytrees.merge_params(mean["weights"], mean["other"])
    return {"params": params, "model_state": mean["model_state"]}

  return updates.update_quantizer("fedavg", predicate, client_finish, aggregate)
