"""The algorithm interface shared by every federated algorithm.

An `Algorithm` is a NamedTuple of pure functions (in the style of optax's GradientTransformation).
The engine (`fedbif_jax/train.py`) calls them; it never looks inside the states or payloads:

  init(key, variables) -> server_state
  init_client(key, variables) -> client_state                 # persistent, per client id
  broadcast(server_state, key, info) -> downlink                # what the server sends
  client_start(downlink, client_state, key) -> LocalState       # the client's local model
  model_params(trainable, downlink) -> params                   # the Flax params to apply
                                                                # (called every local step)
  client_finish(downlink, client_state, local, key, stats) -> (uplink, client_state)
  aggregate(server_state, downlink, uplinks, weights, client_metrics) -> server_state
  eval_variables(server_state) -> variables                     # the global model to evaluate
  round_stats(downlink, uplinks, weights) -> {name: array}      # optional (None): a round's
                                                                # diagnostics for metrics.jsonl

Local training between `client_start` and `client_finish` is the same for every algorithm (SGD on
`LocalState.trainable`, see `fedbif_jax/client.py`), which composes them into
``client_update(downlink, client_state, batches, key) -> (uplink, client_state, metrics)``.
`info` is the round's `RoundInfo` (what the server knows about the selected clients); `stats`
holds the client's own ``loss_sum`` and ``count`` (examples processed this round, E * n_k).
`uplinks` are the clients' uplinks stacked on a leading client axis; `weights` float32 [C] sum to 1.
`variables` is a Flax variables dict: ``{"params": ..., **model_state}`` where the model state
holds non-trained collections such as BatchNorm's ``batch_stats``.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax


class LocalState(NamedTuple):
  trainable: Any    # what local SGD updates (weights, or FedBiF's activated virtual bits and biases)
  model_state: Any  # non-trained model collections (BatchNorm statistics), updated in train mode
  frozen: Any = None  # what the client keeps unchanged through local training and needs again in
                      # client_finish (FedBiF: its whole inherited virtual bits); carried, never stepped


class RoundInfo(NamedTuple):
  """What the server knows about the round's selected clients, in selection order."""
  weights: jax.Array       # float32 [C], aggregation weights (uniform or data shares), sum 1
  num_examples: jax.Array  # float32 [C], each client's number of training examples n_k


class Algorithm(NamedTuple):
  name: str
  init: Callable[..., Any]
  init_client: Callable[..., Any]
  broadcast: Callable[..., Any]
  client_start: Callable[..., LocalState]
  model_params: Callable[..., Any]
  client_finish: Callable[..., tuple]
  aggregate: Callable[..., Any]
  eval_variables: Callable[..., Any]
  round_stats: Callable[..., dict] | None = None


def split_variables(variables: dict) -> tuple[Any, dict]:
  """(params, model_state) of a Flax variables dict."""
  model_state = {k: v for k, v in variables.items() if k != "params"}
  return variables["params"], model_state
