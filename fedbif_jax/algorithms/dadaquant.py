"""DAdaQuant (Hönig et al., ICML 2022): doubly-adaptive quantization, in time and per client.

Round t (FedBiF paper, Sec. 1 and 4.1: "DAdaQuant dynamically adjusts the bitwidth utilized by
each client in each round by monitoring the local training loss and the local dataset size";
formulas as in the third-party implementation summarised in docs/REFERENCE_NOTES.md):

Time-adaptive levels q_t. q_0 = q_min. After round t the server updates an exponential moving
average of the data-weighted mean client training loss,
    F_t = psi F_{t-1} + (1 - psi) L_t,     F_0 = L_0,     L_t = sum_k loss_sum_k / sum_k count_k,
and doubles the levels, q_{t+1} = min(2 q_t, q_max), when F_t >= F_{t-phi} (the EMA has not
improved over the last phi rounds) and at least phi rounds have passed since the last doubling
(the start counts as one); otherwise q_{t+1} = q_t.

Client-adaptive levels q_{t,i}. With w_i the data share of selected client i,
    a = sum_j w_j^(2/3),   b = sum_j w_j^2 / q_t^2,   q_{t,i} = clip(round(sqrt(a / b) w_i^(2/3)), 1, q_max),
so clients with more data send finer updates; equal shares give q_{t,i} = q_t. The formula is
invariant to scaling all w_j, so the server broadcasts kappa = sqrt(a / b) computed from the raw
example counts n_j, and client i computes q_{t,i} from its own n_i (= the examples it processed,
``stats["count"]``, divided by ``config.local_epochs``) without learning anyone else's share.

Per round:
1. broadcast - the global model in full precision (32 bpp down), q_t (int32) and kappa (float32).
2. local training - E epochs of SGD from w^t (the engine's shared local training).
3. client_finish - per conv/dense kernel, Delta = w_i - w^t is quantized with the unbiased level
   quantizer (`quant.quantize_levels`, s = max|Delta|, integers in [-q_{t,i}, q_{t,i}]) and sent at
       ceil(log2(2 q_{t,i} + 1)) bits per element
   with s (float32) per tensor and q_{t,i} (int32) in the header; biases and BatchNorm statistics
   travel in full precision.
4. aggregate - w^{t+1} = w^t + sum_k p_k (s_k / q_{t,k}) q_k on the kernels; FedAvg on the rest;
   then the time-adaptive update of q above.

Choices (config fields): ``dadaquant.phi`` (>= 1, or 0 for rounds // 10 (at least 1): the
paper suggests rounds / 10; the default 3 fits the default 30 rounds, the paper configs use 0),
``dadaquant.psi`` (EMA factor in [0, 1), default 0.9),
``dadaquant.q_min`` (default 1, as in the paper), ``dadaquant.q_max`` (a cap, at most 32767 so
that integers fit int16, the default; the paper has no cap), ``dadaquant.client_adaptive``
(default True; False sends every client q_t).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from fedbif_jax import pytrees, quant
from fedbif_jax.algorithms import base, updates
from fedbif_jax.errors import check, check_int
from fedbif_jax.pytrees import Bits, is_bits

MAX_LEVELS = 2 ** 15 - 1   # integers in [-q, q] stored as int16


def client_levels(kappa: jax.Array, n: jax.Array, q_max: int) -> jax.Array:
  """q_i = clip(round(kappa * n_i^(2/3)), 1, q_max) as int32 (n_i: float, any shape)."""
  raw = jnp.round(jnp.asarray(kappa, jnp.float32) * jnp.asarray(n, jnp.float32) ** (2.0 / 3.0))
  return jnp.clip(raw, 1, q_max).astype(jnp.int32)


def client_adaptive_scale(num_examples: jax.Array, q: jax.Array) -> jax.Array:
  """kappa = sqrt(a / b), a = sum_j n_j^(2/3), b = sum_j n_j^2 / q^2 (float32 scalar).

  num_examples: float32 [C] (or shares: kappa * n_i^(2/3) is invariant to their scale); q: int.
  """
  n = jnp.asarray(num_examples, jnp.float32)
  a = jnp.sum(n ** (2.0 / 3.0))
  b = jnp.sum(n * n) / jnp.asarray(q, jnp.float32) ** 2
  return jnp.sqrt(a / b)


def init_levels(q_min: int, phi: int) -> dict:
  """The time-adaptive state before round 0."""
  return {"q": jnp.asarray(q_min, jnp.int32), "ema": jnp.zeros((), jnp.float32),
          "history": jnp.zeros((phi,), jnp.float32),   # F_{t-phi} .. F_{t-1}
          "seen": jnp.zeros((), jnp.int32),            # losses observed so far (= t)
          "last_increase": jnp.zeros((), jnp.int32)}


def update_levels(levels: dict, loss: jax.Array, phi: int, psi: float, q_max: int) -> dict:
  """One round of the time-adaptive rule (module docstring) after observing the loss L_t.

  Returns the new state; ``q`` is the level for the next round.
  """
  t = levels["seen"]
  loss = jnp.asarray(loss, jnp.float32)
  ema = jnp.where(t == 0, loss, psi * levels["ema"] + (1.0 - psi) * loss)
  stalled = (t >= phi) & (t - levels["last_increase"] >= phi) & (ema >= levels["history"][0])
  q = jnp.where(stalled, jnp.minimum(2 * levels["q"], q_max), levels["q"]).astype(jnp.int32)
  return {"q": q, "ema": ema,
          "history": jnp.concatenate([levels["history"][1:], ema[None]]),
          "seen": t + 1,
          "last_increase": jnp.where(stalled, t, levels["last_increase"]).astype(jnp.int32)}


def resolve_phi(phi: int, rounds: int) -> int:
  """``dadaquant.phi`` in rounds: phi itself, or for phi = 0 the paper's rounds / 10, floored,
  at least 1. Raises ConfigError for a phi that is not an integer >= 0."""
  check_int("dadaquant.phi", phi, 0, allowed="an integer >= 1 (rounds), or 0 for rounds // 10")
  return phi or max(1, rounds // 10)


def make(predicate=pytrees.is_kernel, *, phi, psi, q_min, q_max, client_adaptive,
         local_epochs, rounds) -> base.Algorithm:
  """DAdaQuant with the module docstring's choices (the defaults are `config.base_config`'s
  ``dadaquant`` section); `local_epochs`, the run's E, turns a client's processed examples into
  its n_i; `rounds`, the run's length, sets phi = 0's rounds // 10. Raises ConfigError naming a
  bad field."""
  phi = resolve_phi(phi, rounds)
  check(isinstance(psi, (int, float)) and not isinstance(psi, bool) and 0 <= psi < 1,
        "dadaquant.psi", "a number in [0, 1)", psi)
  check_int("dadaquant.q_min", q_min, 1, MAX_LEVELS)
  check_int("dadaquant.q_max", q_max, q_min, MAX_LEVELS,
            f"an integer in dadaquant.q_min={q_min}..{MAX_LEVELS}")
  adaptive = bool(client_adaptive)
  epochs = local_epochs

  def init(key, variables):
    del key
    params, model_state = base.split_variables(variables)
    return {"params": params, "model_state": model_state, "levels": init_levels(q_min, phi)}

  def broadcast(state, key, info):
    del key
    q = state["levels"]["q"]
    downlink = updates.full_precision_downlink(state, predicate)
    downlink["levels"] = q
    downlink["kappa"] = client_adaptive_scale(info.num_examples, q)
    return downlink

  def client_finish(downlink, client_state, local, key, stats):
    if adaptive:
      q = client_levels(downlink["kappa"], stats["count"] / epochs, q_max)
    else:
      q = downlink["levels"]
    width = quant.level_width(q)
    delta, other = updates.local_update(downlink["weights"], local.trainable, predicate)
    ints, scale = pytrees.unzip(pytrees.map_with_keys(
        lambda k, d: quant.quantize_levels(d, q, k, "max", jnp.int16), key, delta))
    uplink = {"weights": jax.tree.map(lambda x: Bits(x, width), ints), "scale": scale,
              "levels": q, "other": other, "model_state": local.model_state}
    return uplink, client_state

  def aggregate(state, downlink, uplinks, weights, client_metrics):
    del downlink
    q = uplinks["levels"]   # int32 [C]
    mean_delta = jax.tree.map(
        lambda b, s: pytrees.weighted_sum(
            quant.dequantize_levels(b.values, pytrees.client_axis(q, b.values),
                                    pytrees.client_axis(s, b.values)), weights),
        uplinks["weights"], uplinks["scale"], is_leaf=is_bits)
    params, model_state = updates.apply_mean_update(state, mean_delta, uplinks, weights, predicate)
    loss = jnp.sum(client_metrics["loss_sum"]) / jnp.maximum(jnp.sum(client_metrics["count"]), 1.0)
    return {"params": params, "model_state": model_state,
            "levels": update_levels(state["levels"], loss, phi, psi, q_max)}

  return updates.update_quantizer("dadaquant", predicate, client_finish, aggregate, init=init,
                                  broadcast=broadcast)
