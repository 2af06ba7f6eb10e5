"""FedDQ (Qu et al., GLOBECOM 2022): descending quantization, the bit width follows the update range.

Round t (FedBiF paper, Sec. 1 and 4.1: "the quantization bitwidth gets smaller as the range of
model updates decreases"; the formulas are those of FedDQ's official code, docs/REFERENCE_NOTES.md):
1. broadcast - the global model w^t in full precision (32 bpp down).
2. local training - E epochs of SGD from w^t (the engine's shared local training).
3. client_finish - per conv/dense kernel, Delta = w_k - w^t, with range r = max(Delta) - min(Delta)
   and the fixed resolution rho (``feddq.resolution``):
       bits = clip(max(ceil(log2(r / rho)), 2), 2, max_bits)       (r = 0 -> 2 bits)
       f = r / (2^bits - 1),   q = round((Delta - min(Delta)) / f) in [0, 2^bits - 1]
   (asymmetric min-max quantization, `quant.quantize_minmax`). The client sends q at `bits` bits
   per element (its own width, per tensor and per round: the per-client bit widths of the
   ledger), min(Delta) and f as float32 per tensor, and its biases and BatchNorm statistics in
   full precision. As the model converges the updates shrink, r falls, and so does the bit width.
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

from fedbif_jax import pytrees, quant
from fedbif_jax.algorithms import base, updates
from fedbif_jax.errors import check_int, check_one_of, check_positive_number
from fedbif_jax.pytrees import Bits, is_bits

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


def make(predicate=pytrees.is_kernel, *, resolution, granularity, rounding, max_bits
         ) -> base.Algorithm:
  """FedDQ with the module docstring's choices (the defaults are `config.base_config`'s
  ``feddq`` section). Raises ConfigError naming a bad field."""
  check_positive_number("feddq.resolution", resolution)
  check_one_of("feddq.granularity", granularity, GRANULARITIES)
  check_one_of("feddq.rounding", rounding, ROUNDINGS)
  check_int("feddq.max_bits", max_bits, 2, MAX_BITS)

  def client_finish(downlink, client_state, local, key, stats):
    del stats
    delta, other = updates.local_update(downlink["weights"], local.trainable, predicate)
    leaves = jax.tree.leaves(delta)
    model_lo = jnp.min(jnp.stack([jnp.min(d) for d in leaves]))
    model_hi = jnp.max(jnp.stack([jnp.max(d) for d in leaves]))

    def one(k, d):
      lo, hi = (jnp.min(d), jnp.max(d)) if granularity == "tensor" else (model_lo, model_hi)
      bits = bit_width(hi - lo, resolution, max_bits)
      q, f = quant.quantize_minmax(d, lo, hi, bits, k if rounding == "stochastic" else None)
      return Bits(q, bits), lo, f

    q, lo, f = pytrees.unzip(pytrees.map_with_keys(one, key, delta))
    uplink = {"weights": q, "min": lo, "step": f, "other": other, "model_state": local.model_state}
    return uplink, client_state

  def aggregate(state, downlink, uplinks, weights, client_metrics):
    del downlink, client_metrics
    mean_delta = jax.tree.map(
        lambda b, lo, f: pytrees.weighted_sum(
            quant.dequantize_minmax(b.values, pytrees.client_axis(f, b.values),
                                    pytrees.client_axis(lo, b.values)), weights),
        uplinks["weights"], uplinks["min"], uplinks["step"], is_leaf=is_bits)
    params, model_state = updates.apply_mean_update(state, mean_delta, uplinks, weights, predicate)
    return {"params": params, "model_state": model_state}

  return updates.update_quantizer("feddq", predicate, client_finish, aggregate)
