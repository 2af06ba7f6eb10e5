"""FedPAQ (Reisizadeh et al., AISTATS 2020): stochastically quantized model updates, b bits up.

Round t (FedBiF paper, Sec. 4.1 "Baseline Methods"; Table 1 runs FedPAQ at 4 bpp up, 32 down):
1. broadcast - the global model w^t in full precision (32 bpp down).
2. local training - E epochs of SGD from w^t (the engine's shared local training).
3. client_finish - per conv/dense kernel, Delta_k = w_k - w^t is quantized with the unbiased
   level quantizer of QSGD (`quant.quantize_levels`),
       q = floor(L Delta / s) + Bernoulli(frac(L Delta / s)) in [-L, L],  L = 2^(b-1) - 1,
   with s = max|Delta| (``fedpaq.norm="max"``, the default) or s = ||Delta||_2 (``"l2"``, the
   quantizer as printed in the FedPAQ paper). The client sends q at b bits per element
   (b-bit two's complement; L = 2^(b-1) - 1 uses 2^b - 1 of the 2^b codes so the grid is
   symmetric and rounding is unbiased), the scale s (float32) per tensor, and its biases and
   BatchNorm statistics in full precision.
4. aggregate - w^{t+1} = w^t + sum_k p_k (s_k / L) q_k on the kernels; FedAvg on the rest.

Choices (the FedPAQ paper leaves them open or our Table-1 target fixes them):
* ``fedpaq.bits`` (b, 2..8, default 4 as in FedBiF's Table 1). b = 1 would leave no level for
  zero in a symmetric grid.
* ``fedpaq.norm`` default "max": FedBiF's Sec. 2.2 states it quantizes model updates following
  FedPAQ with a max-based step (Eq. 5); the l2 scale of QSGD is unbiased too, but with L = 7 it
  rounds almost every element of a large tensor to 0 (|Delta_j| / ||Delta||_2 ~ 1/sqrt(d)), a far
  noisier update.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp

from fedbif_jax import pytrees, quant
from fedbif_jax.algorithms import base, updates
from fedbif_jax.errors import check_int, check_one_of
from fedbif_jax.pytrees import Bits, is_bits


def levels_for_bits(b: int) -> int:
  """L = 2^(b-1) - 1 levels per sign: the symmetric grid [-L, L] in b-bit two's complement."""
  return 2 ** (b - 1) - 1


def make(predicate=pytrees.is_kernel, *, bits, norm) -> base.Algorithm:
  """FedPAQ with b = `bits` and the scale `norm` (module docstring; the defaults are
  `config.base_config`'s ``fedpaq`` section). Raises ConfigError naming a bad field."""
  check_int("fedpaq.bits", bits, 2, 8)
  check_one_of("fedpaq.norm", norm, quant.NORMS)
  b = bits
  levels = levels_for_bits(b)
  assert math.ceil(math.log2(2 * levels + 1)) == b

  def client_finish(downlink, client_state, local, key, stats):
    del stats
    delta, other = updates.local_update(downlink["weights"], local.trainable, predicate)
    quantized = pytrees.map_with_keys(
        lambda k, d: quant.quantize_levels(d, levels, k, norm, jnp.int8), key, delta)
    ints, scale = pytrees.unzip(quantized)
    q = jax.tree.map(lambda x: Bits(x, jnp.asarray(b, jnp.int32)), ints)
    uplink = {"weights": q, "scale": scale, "other": other, "model_state": local.model_state}
    return uplink, client_state

  def aggregate(state, downlink, uplinks, weights, client_metrics):
    del downlink, client_metrics
    mean_delta = jax.tree.map(
        lambda q, s: pytrees.weighted_sum(
            quant.dequantize_levels(q.values, levels, pytrees.client_axis(s, q.values)),
            weights),
        uplinks["weights"], uplinks["scale"], is_leaf=is_bits)
    params, model_state = updates.apply_mean_update(state, mean_delta, uplinks, weights, predicate)
    return {"params": params, "model_state": model_state}

  return updates.update_quantizer("fedpaq", predicate, client_finish, aggregate)
