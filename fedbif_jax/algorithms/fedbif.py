"""FedBiF: Federated Bits Freezing (Algorithm 1 of the paper).

Round t:
1. broadcast - the server picks the round's active-bit mask S^t with the selector (Sec. 3.2),
   quantizes every bit-trained leaf theta_l to m-bit integers with the step of Eq. 5 (or the
   learned step, ``step="learned"``, below) and the stochastic rounding of Eq. 1-2, and sends the
   integers (m bpp), the step sizes, the mask and the full-precision leaves (biases, BatchNorm).
2. client_start - the client decomposes the integers into bits (Eq. 4) and applies virtual bits
   inheritance once (VBI: keep its own |v|, take the sign from the received bit). Algorithm 1 as
   extracted prints VBI inside the epoch loop; Sec. 3.2's prose applies it once on receipt, the
   only reading under which later epochs keep what earlier epochs learned, so we apply it once.
   With ``vbi=False`` (the ablation of Sec. 4.3) the magnitudes are drawn afresh each round.
3. local training (shared engine) - SGD on the s activated virtual bits only (the trainable
   pytree holds just them, so each step's work on the bits is O(s), not O(m), per weight); the
   weights are rebuilt from them and the received integers' frozen bits (Eq. 4, `model_params`),
   equal to `bits.weights_from_bits` over all m virtual bits.
4. client_finish - the client uploads the s activated bits per weight (s bpp) plus its
   full-precision leaves, and keeps all its virtual bits for the next time it is selected.
5. aggregate - Eq. 6 (`aggregate_bits`): the weighted mean of the clients' activated bits plus
   the frozen bits the server already knows. Client weights are the paper's uniform 1/|C^t| or the
   data shares p_k (Sec. 2.1), chosen by the engine. Full-precision leaves are averaged as FedAvg.
6. round_stats - for metrics.jsonl, the round's activated planes and how often the clients
   flipped each (the weighted share of uploaded bits that differ from the broadcast bit); the
   ``flip_rate`` selector feeds the same rates into its state.

The virtual bits' step (an open choice the paper leaves: it tunes one lr for everything). A
virtual bit i receives lr * alpha * 2^i * dL/dw per SGD step (straight-through), while its
magnitude is Kaiming-normal by the kernel's fan-in, so bits learn at a rate set by lr, alpha, the
bit's significance and the initial scale together. Three fields make that explicit:
``bit_lr_scale`` (c) multiplies the step of every activated bit (biases and BatchNorm keep lr);
``bit_step="inverse_pow2"`` further scales bit i's step by 2^-i (forward unchanged), so every bit
moves its weight by the same c * lr * alpha * dL/dw per step and the most significant bit no
longer moves 2^(m-1) times faster than the least; ``bit_init`` picks the initial scale
(`bits.init_std`: the kernel's fan-in, or fan-in as PyTorch computes it on the stacked bit
tensor). Both step fields are implemented as a gradient scale on the activated bits
(`bits.scale_gradient`), which for plain SGD, the engine's optimizer, is exactly a step scale;
with the defaults (1, ``uniform``) the program is unchanged.

With ``encoding="sign_magnitude"`` (the "with a sign bit" ablation) bit m-1 is a sign bit; Eq. 6
no longer holds (the integer is not linear in the bits), so the server recovers each client's
integers and averages them, the recovery the paper describes in Fig. 1 step 5.

The learned step size (``step="learned"``; Sec. 6 leaves "the step size can be designed to be
learnable" to future work). The default ``step="max_abs"`` is Eq. 5, recomputed by the server
every round. With ``learned`` every client trains one step size per bit-trained layer together
with its activated bits, and the server keeps the aggregated step in its state:

* Gradient. The client's weights are w = alpha * z with the integer z = sum_i 2^i h(v_i) - 2^(m-1)
  (Eq. 3-4; sign-magnitude: its integer) rebuilt from the bits, so given the bits
  dL/dalpha = sum_j dL/dw_j * z_j, exactly: z is the forward's integer, not the straight-through
  approximation -w/s + round(w/s) of LSQ (Esser et al. 2020), whose w/s is rounded. The bits'
  straight-through gradient (alpha * 2^i * dL/dw) uses the current alpha.
* Scaling. LSQ's gradient scale g = 1 / sqrt(N * Q_P), N the layer's number of weights and
  Q_P = 2^(m-1), the largest |z| of offset binary (LSQ's 2^(m-1) - 1 would be 0 for m = 1 and
  is not Eq. 5's divisor; sign-magnitude: 2^(m-1) - 1, its largest |z|), times
  ``step_lr_scale`` (default 1): c = step_lr_scale * g. It balances the step's update against
  the weights' (dL/dalpha sums N terms of size up to Q_P * |dL/dw|).
* Positivity: log alpha is learned. The client trains beta = log(alpha / alpha_received),
  starting at 0 each round, so alpha = alpha_received * exp(beta) > 0 always and equals the
  received step exactly at the start (exp(0) = 1: the first forward pass is the model the server
  sent, alpha * z). The gradient changes by the chain rule: the gradient beta receives is
  c * dL/dbeta = c * alpha * dL/dalpha = c * sum_j dL/dw_j w_j (g applied with
  `bits.scale_gradient`, forward unchanged), the derivative along the layer's own direction,
  which does not depend on how the layer's scale is split between alpha and z. To first order an
  SGD step moves alpha by -lr * c * alpha^2 * dL/dalpha, alpha^2 times LSQ's step on alpha
  itself. Why not LSQ's step on alpha (with a floor): at the lr FedBiF trains with (0.05 to 0.1)
  from a random initialisation it is far too large: in the quickstart's first local step it
  moves the last layer's alpha = 0.050 by 0.042 (measured; one more such step crosses 0), a floor
  would need a constant the paper does not give and zero the gradient once hit. Compensating the
  alpha^2 (scaling beta's gradient by c / alpha^2, an exponentiated LSQ step) keeps alpha > 0 but
  not the size problem: the same alpha fell to 0.004 in 3 steps, the loss stalled at chance
  (2.3) and the quickstart's round 0 ended with a NaN loss (measured).
* Uplink. Each client sends its final alpha_k = alpha_received * exp(beta_k), a float32 per layer
  (``uplink["alpha"]``: in the total bytes, not in the bpp, which counts ``"weights"`` only).
* Aggregation. The exact weighted mean of the client models w_k = alpha_k * z_k is Eq. 6 with
  per-client steps (`mean_step`):

    theta^{t+1} = sum_k p_k alpha_k (sum_{i in S} 2^i b_{i,k} + sum_{j not in S} 2^j b_j - 2^(m-1))
                = abar * (sum_k p'_k sum_{i in S} 2^i b_{i,k} + sum_{j not in S} 2^j b_j - 2^(m-1)),
    abar = sum_k p_k alpha_k,   p'_k = p_k alpha_k / abar   (sum_k p'_k = 1),

  i.e. Eq. 6 with the step abar and the client weights p'_k (`aggregate_ints`; sign-magnitude:
  `aggregate_by_recovery`). With equal alphas abar = alpha and p'_k = p_k, Eq. 6 itself (to the
  bit: `mean_step` forms abar as alpha_0 + sum_k p_k (alpha_k - alpha_0)). The server keeps abar
  (state ``"alpha"``) and the next broadcast quantizes with it (Eq. 1-2) instead of Eq. 5; round 0
  uses Eq. 5's value. theta is abar times a convex combination of m-bit integers, so it lies in
  Eq. 1's range [-2^(m-1) abar, (2^(m-1) - 1) abar] and the clamp of Eq. 1 does not bind (beyond
  float rounding): the stochastic rounding stays unbiased.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedbif_jax import bits as bits_lib
from fedbif_jax import pytrees
from fedbif_jax import quant
from fedbif_jax import selectors
from fedbif_jax.algorithms import base
from fedbif_jax.errors import ConfigError, check, check_one_of, check_positive_number
from fedbif_jax.pytrees import Bits, is_bits


# Per-bit step rules: every activated bit at the same scale, or bit i's step scaled by 2^-i.
BIT_STEPS = ("uniform", "inverse_pow2")
# Each layer's step size alpha: Eq. 5 every round, or learned by the clients (module docstring).
STEPS = ("max_abs", "learned")


def lsq_gradient_scale(num_weights: int, m: int, encoding: str = "offset") -> float:
  """LSQ's gradient scale g = 1 / sqrt(N * Q_P) of a layer of N weights (Esser et al. 2020).

  Q_P is the largest |integer| of the m-bit encoding: 2^(m-1) for offset binary (Eq. 4, also
  Eq. 5's divisor), 2^(m-1) - 1 for sign-magnitude.
  """
  lo, hi = quant.int_range(m, encoding)
  return 1.0 / math.sqrt(num_weights * max(-lo, hi))


def learned_step(alpha_received: jax.Array, beta: jax.Array, scale: float) -> jax.Array:
  """alpha = alpha_received * exp(beta) > 0, with beta's gradient scaled by `scale`.

  Forward: exactly alpha_received at beta = 0 (exp(0) = 1). Backward:
  dL/dbeta = scale * alpha * dL/dalpha = scale * sum_j dL/dw_j w_j (module docstring).
  """
  return alpha_received * jnp.exp(bits_lib.scale_gradient(beta, scale))


def mean_step(alphas: jax.Array, weights: jax.Array) -> tuple[jax.Array, jax.Array]:
  """Eq. 6 with per-client steps alpha_k: (abar, p'), abar = sum_k p_k alpha_k and
  p'_k = p_k alpha_k / abar, so that abar * sum_k p'_k z_k = sum_k p_k alpha_k z_k.

  abar is formed as alpha_0 + sum_k p_k (alpha_k - alpha_0) (equal as the weights sum to 1), so
  with equal alphas abar = alpha_0 and p' = p to the bit, and Eq. 6 is unchanged.

  Args:
    alphas: float32 [C] > 0, the clients' steps of one layer.
    weights: float32 [C], client weights p_k summing to 1.
  Returns:
    (float32 scalar abar > 0, float32 [C] p').
  """
  _check_client_weights(weights, jnp.shape(alphas)[0])
  alphas = jnp.asarray(alphas, jnp.float32)
  weights = jnp.asarray(weights, jnp.float32)
  abar = alphas[0] + jnp.sum(weights * (alphas - alphas[0]))
  return abar, weights * (alphas / abar)


def bit_step_scales(active_indices: jax.Array, bit_lr_scale: float, bit_step: str) -> jax.Array:
  """The step multiplier of each activated bit: float32 [s].

  ``uniform``: bit_lr_scale for each; ``inverse_pow2``: bit_lr_scale * 2^-i for bit i, which
  cancels the 2^i of Eq. 4 in the bit's straight-through gradient alpha * 2^i * dL/dw.
  """
  if bit_step not in BIT_STEPS:
    raise ValueError(f"fedbif.bit_step: must be one of {', '.join(BIT_STEPS)}, got {bit_step!r}")
  scales = jnp.full(jnp.shape(active_indices), bit_lr_scale, jnp.float32)
  if bit_step == "inverse_pow2":
    scales = scales * 2.0 ** (-jnp.asarray(active_indices, jnp.float32))
  return scales


def _check_client_weights(weights: jax.Array, num_clients: int) -> None:
  if tuple(jnp.shape(weights)) != (num_clients,):
    raise ValueError(f"weights: must have shape ({num_clients},) (one per client), "
                     f"got {jnp.shape(weights)}")


def _check_mask_count(active: jax.Array, s: int) -> None:
  """The mask must mark exactly s bits (checked when its value is known, i.e. not under jit)."""
  if not isinstance(active, jax.core.Tracer) and int(jnp.sum(active)) != s:
    raise ValueError(f"active: must mark exactly s={s} bits (one per uploaded bit), "
                     f"got {int(jnp.sum(active))}")


def recover_client_bits(active_bits: jax.Array, frozen_bits: jax.Array,
                        active: jax.Array) -> jax.Array:
  """Each client's full bit tensor: its activated bits where active, the frozen bits elsewhere.

  Args:
    active_bits: [C, s, ...] 0/1, the clients' uploaded bits in ascending bit-index order.
    frozen_bits: [m, ...] 0/1, the bits the server sent.
    active: bool [m] with s True entries.
  Returns:
    [C, m, ...] float32 0/1.
  """
  s, m = active_bits.shape[1], frozen_bits.shape[0]
  if active_bits.shape[2:] != frozen_bits.shape[1:]:
    raise ValueError(f"active_bits: per-bit shape {active_bits.shape[2:]} does not match "
                     f"frozen_bits {frozen_bits.shape[1:]}")
  _check_mask_count(active, s)
  idx = selectors.active_indices(active, s)
  num_clients = active_bits.shape[0]
  full = jnp.broadcast_to(frozen_bits.astype(jnp.float32)[None], (num_clients, m) + frozen_bits.shape[1:])
  return full.at[:, idx].set(active_bits.astype(jnp.float32))


def aggregate_bits(active_bits: jax.Array, frozen_bits: jax.Array, active: jax.Array,
                   alpha: jax.Array, weights: jax.Array, m: int) -> jax.Array:
  """Eq. 6: theta = alpha * (sum_k p_k sum_{i in S} 2^i b_{i,k} + sum_{j not in S} 2^j b_j - 2^(m-1)).

  The paper prints p_k = 1/|C^t|; pass data shares for the weighted form of Sec. 2.1.

  Args:
    active_bits: [C, s, ...] 0/1 (any numeric dtype), client k's activated bits in ascending
      bit-index order (as `selectors.active_indices` lists them).
    frozen_bits: [m, ...] 0/1, the server's bits of the broadcast integers (offset binary, Eq. 4).
    active: bool [m], the round's mask (s True entries).
    alpha: float32 scalar > 0, the layer's step size.
    weights: float32 [C], client weights summing to 1.
    m: bit width.
  Returns:
    float32 [...], the aggregated layer.
  """
  m = quant.check_bits(m)
  if frozen_bits.shape[0] != m:
    raise ValueError(f"frozen_bits: leading axis must be m={m}, got shape {frozen_bits.shape}")
  active_part = _mean_active_part(active_bits, active, alpha, weights)
  frozen_pow2 = jnp.where(active, 0.0, 2.0 ** jnp.arange(m, dtype=jnp.float32))
  frozen_part = jnp.tensordot(frozen_pow2, frozen_bits.astype(jnp.float32), axes=1)
  return alpha * (active_part + frozen_part - 2.0 ** (m - 1))


def _mean_active_part(active_bits, active, alpha, weights) -> jax.Array:
  """Validates Eq. 6's inputs; returns sum_k p_k sum_{i in S} 2^i b_{i,k}, float32 [...]."""
  _check_client_weights(weights, active_bits.shape[0])
  quant._check_alpha(alpha)
  s = active_bits.shape[1]
  _check_mask_count(active, s)
  idx = selectors.active_indices(active, s)
  mean_active = pytrees.weighted_sum(active_bits.astype(jnp.float32), weights)   # [s, ...]
  return jnp.tensordot(2.0 ** idx.astype(jnp.float32), mean_active, axes=1)


def aggregate_ints(active_bits: jax.Array, ints: jax.Array, active: jax.Array, alpha: jax.Array,
                   weights: jax.Array, m: int) -> jax.Array:
  """Eq. 6 with the frozen bits read off the broadcast offset-binary integers: `aggregate_bits`
  with frozen_bits = the bits of `ints`, to the bit, without building the m bit planes.

  The frozen sum sum_{j not in S} 2^j b_j is `frozen_sum` of the integers, as in the clients'
  `model_params`, so the server never holds the m float bit planes of a layer.

  Args:
    ints: int [...], the layer's broadcast integers q in [-2^(m-1), 2^(m-1)) (offset binary).
    Other arguments as in `aggregate_bits`.
  """
  m = quant.check_bits(m)
  active_part = _mean_active_part(active_bits, active, alpha, weights)
  frozen_part = frozen_sum(ints, active, m)
  return alpha * (active_part + frozen_part.astype(jnp.float32) - 2.0 ** (m - 1))


def frozen_sum(ints: jax.Array, active: jax.Array, m: int) -> jax.Array:
  """sum_{j not in S} 2^j b_j of offset-binary integers (Eq. 4), exact: int32 [...].

  q + 2^(m-1) = sum_j 2^j b_j, so this is q + 2^(m-1) with the activated bits (`active`, bool
  [m]) cleared by one bitwise AND.
  """
  active_word = jnp.sum(jnp.where(active, 2 ** jnp.arange(m, dtype=jnp.int32), 0))
  return (ints.astype(jnp.int32) + 2 ** (m - 1)) & ~active_word


def aggregate_by_recovery(active_bits: jax.Array, frozen_bits: jax.Array, active: jax.Array,
                          alpha: jax.Array, weights: jax.Array, m: int,
                          encoding: str = "offset") -> jax.Array:
  """Recover every client's integers (Fig. 1 step 5), dequantize and average (step 6).

  Equal to `aggregate_bits` for offset binary (Eq. 6 is this, rearranged); the only way for
  sign-magnitude. Shapes as in `aggregate_bits`.
  """
  _check_client_weights(weights, active_bits.shape[0])
  full = recover_client_bits(active_bits, frozen_bits, active)
  ints = jax.vmap(lambda b: quant.from_bits(b, m, encoding))(full).astype(jnp.float32)
  return alpha * pytrees.weighted_sum(ints, weights)


def make(predicate=pytrees.is_kernel, *, bits, active_bits, selector, order, fixed_bits,
         encoding, vbi, bit_lr_scale, bit_step, bit_init, step, step_lr_scale) -> base.Algorithm:
  """FedBiF with m = `bits`, s = `active_bits` and the module docstring's choices (the defaults,
  each field commented, are `config.base_config`'s ``fedbif`` section). Validates every field
  eagerly; raises ValueError (ConfigError) naming the field."""
  check_one_of("fedbif.encoding", encoding, quant.ENCODINGS)
  m = quant.check_bits(bits, "fedbif.bits", encoding)
  s = selectors.check_active_bits(m, active_bits, "fedbif.active_bits")
  check_one_of("fedbif.selector", selector, selectors.SELECTORS)
  check_one_of("fedbif.order", order, selectors.ORDERS)
  if selector == "sequential":
    check(m % s == 0, "fedbif.active_bits",
          f"a divisor of fedbif.bits={m} for the sequential selector", s)
  fixed_bits = tuple(fixed_bits) or None
  stateful_selector = selector in selectors.STATEFUL_SELECTORS
  try:
    select = (None if stateful_selector else
              selectors.make_selector(selector, m, s, order, fixed_bits))
  except ValueError as e:  # the fixed selector's bits
    raise ConfigError(f"fedbif.{'fixed_bits' if fixed_bits else 'active_bits'}: "
                      f"{str(e).split(': ', 1)[1]}") from None
  use_vbi = bool(vbi)
  check_positive_number("fedbif.bit_lr_scale", bit_lr_scale)
  check_one_of("fedbif.bit_step", bit_step, BIT_STEPS)
  check_one_of("fedbif.bit_init", bit_init, bits_lib.BIT_INITS)
  scaled_steps = bit_lr_scale != 1.0 or bit_step != "uniform"
  check_one_of("fedbif.step", step, STEPS)
  learned = step == "learned"
  check_positive_number("fedbif.step_lr_scale", step_lr_scale)
  check(learned or step_lr_scale == 1.0, "fedbif.step_lr_scale",
        "1.0 unless fedbif.step=learned (it scales the learned step's gradient)", step_lr_scale)

  def max_abs_steps(weights):
    """Eq. 5 for every bit-trained leaf (`weights`, the pruned tree): float32 scalars."""
    return jax.tree.map(lambda w: quant.step_size(w, m), weights)

  def init(key, variables):
    del key
    params, model_state = base.split_variables(variables)
    state = {"params": params, "model_state": model_state, "round": jnp.zeros((), jnp.int32)}
    if stateful_selector:  # the flip_rate selector's per-plane statistics (server only)
      state["selector"] = selectors.flip_rate_init(m)
    if learned:  # the aggregated step sizes; round 0 broadcasts Eq. 5's
      state["alpha"] = max_abs_steps(pytrees.split_params(params, predicate)[0])
    return state

  def select_bits(state, key):
    if stateful_selector:
      return selectors.flip_rate_select(state["selector"], s, order)
    return select(state["round"], key)

  def init_client(key, variables):
    return {"virtual_bits": bits_lib.init_virtual_bits(key, variables["params"], m, predicate,
                                                       bit_init)}

  def broadcast(state, key, info):
    del info
    k_select, k_round = jax.random.split(key)
    weights, other = pytrees.split_params(state["params"], predicate)
    alphas = state["alpha"] if learned else max_abs_steps(weights)
    ints = pytrees.map_with_keys(   # leaf i (sorted paths) rounds with fold_in(k_round, i)
        lambda k, w, alpha: Bits(quant.quantize(w, alpha, m, k, encoding),
                                 jnp.asarray(m, jnp.int32)), k_round, weights, alphas)
    return {"weights": ints, "alpha": alphas,
            "other": other, "model_state": state["model_state"],
            "active": select_bits(state, k_select)}

  def received_bits(downlink):
    return jax.tree.map(lambda b: quant.to_bits(b.values, m, encoding), downlink["weights"],
                        is_leaf=is_bits)

  def client_start(downlink, client_state, key):
    received = received_bits(downlink)
    own = client_state["virtual_bits"]
    virtual = (bits_lib.inherit(own, received) if use_vbi
               else bits_lib.reinitialize(key, own, received, bit_init))
    # Only the s activated bits are trained (and stepped by SGD each local step); the whole
    # inherited virtual bits ride along untouched in `frozen` until client_finish.
    idx = selectors.active_indices(downlink["active"], s)
    active_bits = jax.tree.map(lambda v: v[idx], virtual)
    trainable = {"active_bits": active_bits, "other": downlink["other"]}
    if learned:  # beta = log(alpha / alpha_received) per layer, 0 on receipt
      trainable["log_step"] = jax.tree.map(jnp.zeros_like, downlink["alpha"])
    return base.LocalState(trainable=trainable, model_state=downlink["model_state"],
                           frozen=virtual)

  def client_steps(trainable, downlink):
    """Each layer's step size on the client: the received alpha (Eq. 5 or the server's
    aggregate), or with ``learned`` alpha_received * exp(beta) (`learned_step`)."""
    if not learned:
      return downlink["alpha"]
    return jax.tree.map(
        lambda alpha, beta, q: learned_step(
            alpha, beta, step_lr_scale * lsq_gradient_scale(q.values.size, m, encoding)),
        downlink["alpha"], trainable["log_step"], downlink["weights"])

  def model_params(trainable, downlink):
    """Eq. 4 with the frozen bits read off the received integers: per step, O(s) work per weight.

    Offset binary: q + 2^(m-1) = sum_j 2^j b_j, so the frozen bits contribute
    (q + 2^(m-1)) with the activated bits cleared (`frozen_sum`), an exact integer; the
    activated bits contribute sum_{i in S} 2^i h(v_i) through the straight-through step. The
    same weights, to the bit, as
    `bits.weights_from_bits` over all m virtual bits (whose frozen bits equal the received ones
    after inheritance), with the same gradients.
    """
    idx = selectors.active_indices(downlink["active"], s)
    scales = bit_step_scales(idx, bit_lr_scale, bit_step)

    def leaf(v_active, alpha, q):
      if scaled_steps:  # the activated bits' step (module docstring); forward unchanged
        v_active = bits_lib.scale_gradient(
            v_active, scales.reshape((s,) + (1,) * (v_active.ndim - 1)))
      if encoding != "offset":  # sign-magnitude is not linear in the bits: rebuild all m
        full = quant.to_bits(q.values, m, encoding).astype(jnp.float32)
        return bits_lib.leaf_from_bits(full.at[idx].set(v_active), alpha, downlink["active"], m,
                                       encoding)
      frozen_part = frozen_sum(q.values, downlink["active"], m)            # exact integer
      pow2 = (2 ** idx.astype(jnp.int32)).reshape((s,) + (1,) * q.values.ndim)  # 2^i, i in S
      active_part = jnp.sum(pow2.astype(jnp.float32) * bits_lib.ste_step(v_active), axis=0)
      return alpha * (frozen_part.astype(jnp.float32) + active_part - 2.0 ** (m - 1))

    weights = jax.tree.map(leaf, trainable["active_bits"], client_steps(trainable, downlink),
                           downlink["weights"], is_leaf=is_bits)
    return pytrees.merge_params(weights, trainable["other"])

  def client_finish(downlink, client_state, local, key, stats):
    del client_state, key, stats
    idx = selectors.active_indices(downlink["active"], s)
    trained = local.trainable["active_bits"]
    uplink_bits = jax.tree.map(lambda b: Bits(b, jnp.asarray(1, jnp.int32)),
                               bits_lib.hard_bits(trained))
    uplink = {"weights": uplink_bits, "other": local.trainable["other"],
              "model_state": local.model_state}
    if learned:  # the client's step sizes: a float32 per layer, outside the bpp
      uplink["alpha"] = client_steps(local.trainable, downlink)
    virtual = jax.tree.map(lambda full, v: full.at[idx].set(v), local.frozen, trained)
    return uplink, {"virtual_bits": virtual}

  def aggregate(state, downlink, uplinks, weights, client_metrics):
    del client_metrics

    def fold(up, q, alpha, p):
      if encoding == "offset":  # Eq. 6 straight from the broadcast integers
        return aggregate_ints(up.values, q.values, downlink["active"], alpha, p, m)
      return aggregate_by_recovery(up.values, quant.to_bits(q.values, m, encoding),
                                   downlink["active"], alpha, p, m, encoding=encoding)

    if learned:  # Eq. 6 with the clients' steps: abar and p'_k (`mean_step`) per layer
      steps = jax.tree.map(lambda a: mean_step(a, weights), uplinks["alpha"])
      is_pair = lambda x: isinstance(x, tuple)
      alphas = jax.tree.map(lambda pair: pair[0], steps, is_leaf=is_pair)
      client_weights = jax.tree.map(lambda pair: pair[1], steps, is_leaf=is_pair)
    else:
      alphas = downlink["alpha"]
      client_weights = jax.tree.map(lambda _: weights, alphas)
    new_weights = jax.tree.map(fold, uplinks["weights"], downlink["weights"], alphas,
                               client_weights, is_leaf=is_bits)
    other = pytrees.weighted_mean(uplinks["other"], weights)
    new_state = {"params": pytrees.merge_params(new_weights, other),
                 "model_state": pytrees.weighted_mean(uplinks["model_state"], weights),
                 "round": state["round"] + 1}
    if learned:
      new_state["alpha"] = alphas
    if stateful_selector:
      new_state["selector"] = selectors.flip_rate_update(
          state["selector"], downlink["active"], plane_flip_rates(uplinks, downlink, weights))
    return new_state

  def active_flip_rates(uplinks, downlink, weights):
    """Per activated plane, in `selectors.active_indices` order (float32 [s]): the
    client-weighted share of uploaded bits that differ from the broadcast bit, over every
    bit-trained weight."""
    idx = selectors.active_indices(downlink["active"], s)
    counts = [(selectors.disagreements(up.values, quant.to_bits(q.values, m, encoding)[idx],
                                       weights), q.values.size)
              for up, q in zip(jax.tree.leaves(uplinks["weights"], is_leaf=is_bits),
                               jax.tree.leaves(downlink["weights"], is_leaf=is_bits))]
    return sum(c for c, _ in counts) / sum(n for _, n in counts)

  def plane_flip_rates(uplinks, downlink, weights):
    """`active_flip_rates` per bit plane: float32 [m], 0 where inactive."""
    idx = selectors.active_indices(downlink["active"], s)
    return jnp.zeros((m,), jnp.float32).at[idx].set(active_flip_rates(uplinks, downlink, weights))

  def round_stats(downlink, uplinks, weights):
    """The round's activated bit planes (ascending bit index, int32 [s]) and how often the
    clients flipped each (`active_flip_rates`, float32 [s]), for metrics.jsonl."""
    return {"active_bits": selectors.active_indices(downlink["active"], s),
            "bit_flip_rate": active_flip_rates(uplinks, downlink, weights)}

  def eval_variables(state):
    return {"params": state["params"], **state["model_state"]}

  return base.Algorithm("fedbif", init, init_client, broadcast, client_start, model_params,
                        client_finish, aggregate, eval_variables, round_stats)
