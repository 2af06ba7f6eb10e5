"""FedAvg (McMahan et al. 2017; FedBiF paper Sec. 2.1): full-precision models both ways.

w^{t+1} = sum_{k in C^t} p_k w_k^{t+1}, with p_k uniform (1/|C^t|) or by data size, as the engine
chooses. BatchNorm statistics are averaged the same way. Every leaf travels as float32: 32 bpp
up and down.
"""
from __future__ import annotations

from fedbif_jax import bits as bits_lib
from fedbif_jax.algorithms import base


def make(config=None, predicate=bits_lib.is_kernel) -> base.Algorithm:
  """FedAvg. `predicate` only decides which leaves the ledger reports as "weights" (bpp)."""
  del config

  def init(key, variables):
    del key
    params, model_state = base.split_variables(variables)
    return {"params": params, "model_state": model_state}

  def init_client(key, variables):
    del key, variables
    return {}

  def payload(params, model_state):
    weights, other = bits_lib.split_params(params, predicate)
    return {"weights": weights, "other": other, "model_state": model_state}

  def broadcast(state, key, info):
    del key, info
    return payload(state["params"], state["model_state"])

  def client_start(downlink, client_state, key):
    del client_state, key
    params = bits_lib.merge_params(downlink["weights"], downlink["other"])
    return base.LocalState(trainable=params, model_state=downlink["model_state"])

  def model_params(trainable, downlink):
    del downlink
    return trainable

  def client_finish(downlink, client_state, local, key, stats):
    del downlink, key, stats
    return payload(local.trainable, local.model_state), client_state

  def aggregate(state, downlink, uplinks, weights, client_metrics):
    del state, downlink, client_metrics
    mean = base.weighted_mean(uplinks, weights)
    params = bits_lib.merge_params(mean["weights"], mean["other"])
    return {"params": params, "model_state": mean["model_state"]}

  def eval_variables(state):
    return {"params": state["params"], **state["model_state"]}

  return base.Algorithm("fedavg", init, init_client, broadcast, client_start, model_params,
                        client_finish, aggregate, eval_variables)
