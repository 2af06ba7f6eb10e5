"""FedDQ (Qu et al., GLOBECOM 2022): descending quantization, the bit width follows the update range.

Round t (FedBiF paper, Sec. 1 and 4.1: "the quantization bitwidth gets smaller as the range of
model updates decreases"; the formulas are those of FedDQ's official code, docs/REFERENCE_NOTES.md):
1. broadcast - the global model w^t in full precision (32 bpp down).
2. local training - E epochs of SGD from w^t (the engine's shared local training).
3. client_finish - per conv/dense kernel, Delta = w_k - w^t, with range r = max(Delta) - min(Delta)
   and the fixed resolution rho (``feddq.resolution``):
       bits = clip(max(ceil(log2(r / rho)), 2), 2, max_bits)       (r = 0 -> 2 bits)
       f = r / (2^bits - 1),   q = round((Delta - min(Delta)) / f) in [0, 2^bits - 1]
   (asymmetric min-max quantization). The client sends q at `bits` bits per element (its own
   width, per tensor and per round: the per-client bit widths of the ledger), min(Delta) and f as
   float32 per tensor, and its biases and BatchNorm statistics in full precision. As the model
   converges the updates shrink, r falls, and so does the bit width.
4. aggregate - w^{t+1} = w^t + sum_k p_k (q_k f_k + min_k) on the kernels; FedAvg on the rest.

Choices (config fields):
* ``feddq.resolution`` (rho > 0): official values 0.001 (small CNN, our default) and 0.005
  (ResNet-18).
* ``feddq.granularity``: "tensor" (default, the official code: one range and width per tensor) or
  "model" (one range and width over all kernels of the client's update).
* ``feddq.rounding``: "nearest" (default, the official code) or "stochastic" (unbiased rounding,
  as in the FedBiF paper's Sec. 2.2 description of update quantization).
* ``feddq.max_bits`` (2..16, default 16): a cap so that codes fit uint16; with r / rho > 2^16 the
  step f grows past rho instead of the width growing.
* The official code also quantizes BatchNorm tensors; here they travel in full precision like the
  biases (the FedBiF authors' framework compresses conv/linear only).
"""
from __future__ import annotations


import jax
import jax.numpy as jnp

from fedbif_jax import bits as bits_lib
from fedbif_jax.algorithms import base, updates
from fedbif_jax.errors import check, check_positive_number
from fedbif_jax.wire import Bits, is_bits

GRANULARITIES = ("tensor", "model")
ROUNDINGS = ("nearest", "stochastic")
MAX_BITS = 16


def bit_width(value_range: jax.Array, resolution: float, max_bits: int = MAX_BITS) -> jax.Array:
  """bits = clip(max(ceil(log2(range / resolution)), 2), 2, max_bits) as int32 (range 0 -> 2).

  value_range: float scalar (or array) >= 0. A non-finite range gets `max_bits`.
  """
  r = jnp.asarray(value_range, jnp.float32)
  raw = jnp.ceil(jnp.log2(r / jnp.float32(resolution)))   # -inf for r = 0
  raw = jnp.where(jnp.isnan(raw) | jnp.isposinf(raw), max_bits, raw)
  return jnp.clip(raw, 2, max_bits).astype(jnp.int32)


def quantize_minmax(x: jax.Array, lo: jax.Array, hi: jax.Array, bits: jax.Array,
                    key: jax.Array | None = None) -> tuple[jax.Array, jax.Array]:
  """Asymmetric min-max quantization of x onto 2^bits levels spanning [lo, hi].

  Args:
    x: float array [...] with lo <= x <= hi.
    lo, hi: float32 scalars; bits: int32 scalar in 2..16 (may be traced).
    key: None rounds to nearest; a key rounds stochastically (unbiased).
  Returns:
    (q uint16 [...] in [0, 2^bits - 1], f float32 scalar); x ~ q * f + lo. f = 1 when hi == lo.
  """
  top = (2.0 ** bits.astype(jnp.float32)) - 1.0
  f = jnp.where(hi > lo, (hi - lo) / top, 1.0).astype(jnp.float32)
  y = jnp.clip((x.astype(jnp.float32) - lo) / f, 0.0, top)
  if key is None:
    q = jnp.round(y)
  else:
    floor = jnp.floor(y)
    q = floor + (jax.random.uniform(key, y.shape, jnp.float32) < (y - floor)).astype(jnp.float32)
  return jnp.clip(q, 0.0, top).astype(jnp.uint16), f


def dequantize_minmax(q: jax.Array, f: jax.Array, lo: jax.Array) -> jax.Array:
  """q * f + lo, float32 with q's shape."""
  return q.astype(jnp.float32) * f + lo


def make(config, predicate=bits_lib.is_kernel) -> base.Algorithm:
  """FedDQ from `config.feddq` (resolution, granularity, rounding, max_bits)."""
  cfg = config.feddq
  resolution = cfg.resolution
  check_positive_number("feddq.resolution", resolution)
  granularity = cfg.get("granularity", "tensor")
  check(granularity in GRANULARITIES, "feddq.granularity", f"one of {', '.join(GRANULARITIES)}",
        granularity)
  rounding = cfg.get("rounding", "nearest")
  check(rounding in ROUNDINGS, "feddq.rounding", f"one of {', '.join(ROUNDINGS)}", rounding)
  max_bits = cfg.get("max_bits", MAX_BITS)
  check(isinstance(max_bits, int) and not isinstance(max_bits, bool) and 2 <= max_bits <= MAX_BITS,
        "feddq.max_bits", f"an integer in 2..{MAX_BITS}", max_bits)

  def client_finish(downlink, client_state, local, key, stats):
    del stats
    delta, other = updates.local_update(downlink["weights"], local.trainable, predicate)
    leaves = jax.tree.leaves(delta)
    model_lo = jnp.min(jnp.stack([jnp.min(d) for d in leaves]))
    model_hi = jnp.max(jnp.stack([jnp.max(d) for d in leaves]))

    def one(k, d):
      lo, hi = (jnp.min(d), jnp.max(d)) if granularity == "tensor" else (model_lo, model_hi)
      bits = bit_width(hi - lo, resolution, max_bits)
      q, f = quantize_minmax(d, lo, hi, bits, k if rounding == "stochastic" else None)
      return Bits(q, bits), lo, f

    q, lo, f = updates.unzip(updates.map_with_keys(one, key, delta))
    uplink = {"weights": q, "min": lo, "step": f, "other": other, "model_state": local.model_state}
    return uplink, client_state

  def aggregate(state, downlink, uplinks, weights, client_metrics):
    del downlink, client_metrics
    mean_delta = jax.tree.map(
        lambda b, lo, f: updates.weighted_sum_over_clients(
            dequantize_minmax(b.values, updates.client_axis(f, b.values),
                              updates.client_axis(lo, b.values)), weights),
        uplinks["weights"], uplinks["min"], uplinks["step"], is_leaf=is_bits)
    params, model_state = updates.apply_mean_update(state, mean_delta, uplinks, weights, predicate)
    return {"params": params, "model_state": model_state}

  return updates.update_quantizer("feddq", predicate, client_finish, aggregate)
