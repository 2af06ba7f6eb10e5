"""SignSGD with majority vote (Bernstein et al., ICLR 2019), federated: 1 bpp up, 1 bpp down.

Round t (FedBiF paper, Sec. 4.1: "SignSGD only transfers the sign of the model updates and
aggregates the binary updates by majority vote"; Table 1: 1 bpp up and down):
1. broadcast - the server sends the previous round's vote V^{t-1} in {-1, +1}^d over the conv and
   dense kernels as 1 bit per weight (1 = +1), the server step eta as one float32
   (0 in round 0: there is no vote yet), and the biases and BatchNorm statistics in full precision.
2. client_start - every client keeps its own copy of the kernels (client state, initialised from
   the same initial variables, the model all parties derive from ``config.seed``) and applies the
   vote: w^t = w^{t-1} + eta V^{t-1}. The copy is then bit-for-bit the server's model, so the
   1-bit downlink is real: the kernels themselves never travel.
3. local training - E epochs of SGD from w^t (the engine's shared local training, lr =
   ``config.lr``).
4. client_finish - the client sends s_k = sign(w_k - w^t) as 1 bit per weight, and its biases and
   BatchNorm statistics in full precision. It stores w^t as its copy.
5. aggregate - majority vote V^t = sign(sum_k s_k) (one client, one vote, as in Bernstein et al.;
   the engine's aggregation weights are not used for the vote), and w^{t+1} = w^t + eta V^t;
   full-precision leaves are averaged as in FedAvg.

Choices (the papers leave them open):
* ``signsgd.server_lr`` (eta > 0): the server step, applied identically by server and clients.
* ``signsgd.tie_break``: a zero update (sign(0), e.g. a weight that got no gradient) and a tied
  vote (sum_k s_k = 0, possible with an even number of clients) must still become one bit.
  "random" (default) draws a fair coin (client key for sign(0), the server's key for a tie), so
  dead weights do a zero-mean random walk instead of drifting; "positive" maps both to +1.
* Partial participation is refused (``clients_per_round`` must be 0 or num_clients): a client that
  missed a round would hold a stale copy and would need the full model, which the one downlink of
  the engine's interface cannot carry for some clients only.
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from fedbif_jax import pytrees
from fedbif_jax.algorithms import base
from fedbif_jax.errors import check, check_one_of, check_positive_number
from fedbif_jax.pytrees import Bits, is_bits

TIE_BREAKS = ("random", "positive")


def sign_bits(x: jax.Array, key: jax.Array | None, tie_break: str = "random") -> jax.Array:
  """1-bit sign: uint8 1 where x > 0, 0 where x < 0; x == 0 -> a fair coin ("random") or 1.

  Args:
    x: float or integer array [...].
    key: PRNG key for the coin (unused for "positive").
  Returns:
    uint8 [...] of 0/1 (1 means +1).
  """
  if tie_break == "random":
    coin = jax.random.bernoulli(key, 0.5, jnp.shape(x))
  else:
    coin = jnp.ones(jnp.shape(x), bool)
  return jnp.where(x > 0, True, jnp.where(x < 0, False, coin)).astype(jnp.uint8)


def majority_vote(bits: jax.Array, key: jax.Array | None, tie_break: str = "random") -> jax.Array:
  """V = sign(sum_k (2 b_k - 1)) as 1-bit uint8 [...], from the clients' bits uint8 [C, ...]."""
  total = jnp.sum(2 * bits.astype(jnp.int32) - 1, axis=0)
  return sign_bits(total, key, tie_break)


def apply_vote(weights: dict, vote: dict, step: jax.Array) -> dict:
  """w + step * (2 V - 1) per kernel (float32; V as uint8 0/1). Server and clients call this same
  function with the same float32 step, so their models stay identical bit for bit."""
  return jax.tree.map(
      lambda w, v: w + jnp.asarray(step, w.dtype) * (2.0 * v.astype(w.dtype) - 1.0),
      weights, vote)


def make(predicate=pytrees.is_kernel, *, server_lr, tie_break, num_clients,
         clients_per_round) -> base.Algorithm:
  """SignSGD with the server step `server_lr` and `tie_break` (module docstring; the defaults
  are `config.base_config`'s ``signsgd`` section). `num_clients` and `clients_per_round`, the
  run's, must say that every client takes part in every round. Raises ConfigError naming a bad
  field."""
  check_positive_number("signsgd.server_lr", server_lr)
  check_one_of("signsgd.tie_break", tie_break, TIE_BREAKS)
  check(clients_per_round in (0, num_clients), "clients_per_round",
        f"0 or num_clients={num_clients} for algorithm signsgd (clients keep the "
        "model and receive only 1-bit votes, so every client must take part in every round)",
        clients_per_round)

  def init(key, variables):
    params, model_state = base.split_variables(variables)
    kernels, _ = pytrees.split_params(params, predicate)
    return {"params": params, "model_state": model_state,
            "vote": jax.tree.map(lambda w: jnp.ones(w.shape, jnp.uint8), kernels),
            "step": jnp.zeros((), jnp.float32),   # round 0 has no vote to apply
            "key": jax.random.key_data(key), "round": jnp.zeros((), jnp.int32)}

  def init_client(key, variables):
    del key
    kernels, _ = pytrees.split_params(variables["params"], predicate)
    return {"weights": kernels}

  def broadcast(state, key, info):
    del key, info
    _, other = pytrees.split_params(state["params"], predicate)
    return {"weights": jax.tree.map(lambda v: Bits(v, jnp.asarray(1, jnp.int32)), state["vote"]),
            "step": state["step"], "other": other, "model_state": state["model_state"]}

  def vote_of(downlink):
    return jax.tree.map(lambda b: b.values, downlink["weights"],
                        is_leaf=is_bits)

  def current_weights(downlink, client_state):
    return apply_vote(client_state["weights"], vote_of(downlink), downlink["step"])

  def client_start(downlink, client_state, key):
    del key
    params = pytrees.merge_params(current_weights(downlink, client_state), downlink["other"])
    return base.LocalState(trainable=params, model_state=downlink["model_state"])

  def model_params(trainable, downlink):
    del downlink
    return trainable

  def client_finish(downlink, client_state, local, key, stats):
    del stats
    start = current_weights(downlink, client_state)
    local_weights, other = pytrees.split_params(local.trainable, predicate)
    deltas = jax.tree.map(lambda w, g: w - g, local_weights, start)
    signs = pytrees.map_with_keys(   # sorted paths; leaf i draws fold_in(key, i)
        lambda k, d: Bits(sign_bits(d, k, tie_break), jnp.asarray(1, jnp.int32)), key, deltas)
    uplink = {"weights": signs, "other": other, "model_state": local.model_state}
    return uplink, {"weights": start}

  def aggregate(state, downlink, uplinks, weights, client_metrics):
    del downlink, client_metrics
    tie_key = jax.random.fold_in(jax.random.wrap_key_data(state["key"]), state["round"])
    vote = pytrees.map_with_keys(lambda k, u: majority_vote(u.values, k, tie_break), tie_key,
                                 uplinks["weights"])
    step = jnp.asarray(server_lr, jnp.float32)
    kernels, _ = pytrees.split_params(state["params"], predicate)
    other = pytrees.weighted_mean(uplinks["other"], weights)
    return {"params": pytrees.merge_params(apply_vote(kernels, vote, step), other),
            "model_state": pytrees.weighted_mean(uplinks["model_state"], weights),
            "vote": vote, "step": step, "key": state["key"], "round": state["round"] + 1}

  def eval_variables(state):
    return {"params": state["params"], **state["model_state"]}

  return base.Algorithm("signsgd", init, init_client, broadcast, client_start, model_params,
                        client_finish, aggregate, eval_variables)
