"""Every quantizer of the library, on one stochastic rounding, and FedBiF's bit (de)composition.

All are pure functions of arrays (a PRNG key where they draw):

* `stochastic_round` - the unbiased rounding every quantizer shares: floor(y) + 1 with
  probability y - floor(y) (Eq. 2 of FedBiF; QSGD's Bernoulli rounding), one
  ``jax.random.uniform`` draw of y's shape per call; `round_values` rounds to nearest without a
  key.
* FedBiF (Sections 2.2 and 3.1): `step_size` - the per-layer step alpha of Eq. 5,
  ``max|x| / 2^(m-1)``; `quantize` - Eq. 1 with the stochastic rounding of Eq. 2 (nearest
  rounding without a key); `dequantize` - Eq. 3, ``alpha * q``; `to_bits` / `from_bits` - Eq. 4,
  the offset-binary decomposition ``q = sum_i 2^i b_i - 2^(m-1)`` (no sign bit), and the
  sign-magnitude encoding used by the paper's "with a sign bit" ablation (Sec. 4.3).
  Supported bit widths: ``1 <= m <= 8`` for offset binary, ``2 <= m <= 8`` for sign-magnitude
  (one sign bit needs at least one magnitude bit). Integers are carried as ``int8`` (every
  supported width fits), bits as ``uint8`` arrays of 0/1 with the bit axis first.
* QSGD's symmetric level quantizer (Alistarh et al., NeurIPS 2017), which FedPAQ (Reisizadeh et
  al., AISTATS 2020) and DAdaQuant (Hoenig et al., ICML 2022) apply to model updates: with L
  levels per sign and a per-tensor scale s (`tensor_scale`),
      Q(x)_j = s / L * q_j,   q_j = floor(L x_j / s) + Bernoulli(frac(L x_j / s)) in [-L, L],
  unbiased (E[Q(x)] = x) because |x_j| <= s; it costs ceil(log2(2L + 1)) bits per element
  (`level_width`). `quantize_levels` / `dequantize_levels`.
* FedDQ's asymmetric min-max quantizer (Qu et al., GLOBECOM 2022, as in its official code):
  2^b levels spanning [lo, hi], f = (hi - lo) / (2^b - 1), q = round((x - lo) / f), x ~ q f + lo.
  `quantize_minmax` / `dequantize_minmax`.
"""
from __future__ import annotations

from typing import Optional

import jax
import jax.numpy as jnp
import numpy as np

MIN_BITS = 1
MAX_BITS = 8
ENCODINGS = ("offset", "sign_magnitude")


def stochastic_round(y: jax.Array, key: jax.Array) -> jax.Array:
  """Unbiased stochastic rounding (Eq. 2): floor(y) + 1 with probability y - floor(y), else floor(y).

  E[stochastic_round(y)] = y. Draws ``jax.random.uniform(key, y.shape, float32)`` once.

  Args:
    y: float32 array [...].
    key: PRNG key.
  Returns:
    float32 [...] of integers.
  """
  floor = jnp.floor(y)
  u = jax.random.uniform(key, y.shape, jnp.float32)
  return floor + (u < (y - floor)).astype(jnp.float32)


def round_values(y: jax.Array, key: Optional[jax.Array] = None) -> jax.Array:
  """`stochastic_round` with a key; round to nearest (ties to even) with ``key=None``."""
  return jnp.round(y) if key is None else stochastic_round(y, key)


def check_bits(m: int, field: str = "m", encoding: str = "offset") -> int:
  """Validates a bit width; returns it as a Python int or raises a one-line ValueError."""
  check_encoding(encoding)
  lo = MIN_BITS if encoding == "offset" else 2
  if isinstance(m, bool) or not isinstance(m, (int, np.integer)) or not lo <= m <= MAX_BITS:
    raise ValueError(f"{field}: must be an integer in {lo}..{MAX_BITS} for {encoding} encoding, "
                     f"got {m!r}")
  return int(m)


def check_encoding(encoding: str) -> str:
  if encoding not in ENCODINGS:
    raise ValueError(f"encoding: must be one of {', '.join(ENCODINGS)}, got {encoding!r}")
  return encoding


def int_range(m: int, encoding: str = "offset") -> tuple[int, int]:
  """The representable integers [lo, hi] of an m-bit encoding.

  Offset binary: [-2^(m-1), 2^(m-1) - 1] (Eq. 1). Sign-magnitude: [-(2^(m-1) - 1), 2^(m-1) - 1].
  """
  m = check_bits(m, encoding=encoding)
  hi = 2 ** (m - 1) - 1
  return (-(2 ** (m - 1)) if encoding == "offset" else -hi), hi


def _check_alpha(alpha) -> None:
  """alpha must be positive; checked whenever its value is known (not under jit)."""
  if isinstance(alpha, jax.core.Tracer):
    return
  values = np.asarray(alpha)
  if not np.all(np.isfinite(values)) or np.any(values <= 0):
    raise ValueError(f"alpha: must be a finite step size > 0, got {values.min() if values.size else values!r}")


def step_size(x: jax.Array, m: int) -> jax.Array:
  """Eq. 5: alpha = ||x||_inf / 2^(m-1).

  Args:
    x: float array of any shape (one layer's weights).
    m: bit width, 1..8.
  Returns:
    float32 scalar > 0. An all-zero tensor gets ``1 / 2^(m-1)`` (it quantizes to zeros), so the
    step is never 0, NaN or inf.
  """
  m = check_bits(m)
  amax = jnp.max(jnp.abs(x)).astype(jnp.float32)
  amax = jnp.where(amax > 0, amax, 1.0)
  return amax / (2.0 ** (m - 1))


def quantize(x: jax.Array, alpha: jax.Array, m: int, key: Optional[jax.Array] = None,
             encoding: str = "offset") -> jax.Array:
  """Eq. 1 with Eq. 2: round(clamp(x / alpha, lo, hi)).

  Args:
    x: float array [...].
    alpha: float scalar (or broadcastable array) > 0, the step size.
    m: bit width.
    key: PRNG key for the unbiased stochastic rounding of Eq. 2 (floor(y) + 1 with probability
      y - floor(y)); ``None`` rounds to nearest (ties to even).
    encoding: "offset" (range [-2^(m-1), 2^(m-1)-1]) or "sign_magnitude" (symmetric range).
  Returns:
    int8 array [...] with values in `int_range(m, encoding)`.
  """
  lo, hi = int_range(m, encoding)
  _check_alpha(alpha)
  y = jnp.clip(jnp.asarray(x, jnp.float32) / alpha, lo, hi)
  return jnp.clip(round_values(y, key), lo, hi).astype(jnp.int8)


def dequantize(q: jax.Array, alpha: jax.Array) -> jax.Array:
  """Eq. 3: x_hat = alpha * q. Returns float32 with q's shape."""
  _check_alpha(alpha)
  return jnp.asarray(alpha, jnp.float32) * q.astype(jnp.float32)


def to_bits(q: jax.Array, m: int, encoding: str = "offset") -> jax.Array:
  """Eq. 4 inverse: decomposes integers into m bits.

  Offset binary (the paper's choice): u = q + 2^(m-1) in [0, 2^m - 1]; bits[i] = (u >> i) & 1 is
  the bit of weight 2^i. Sign-magnitude: bits[i] for i < m-1 are |q|'s magnitude bits and
  bits[m-1] is the sign (1 = negative).

  Args:
    q: integer array [...] inside `int_range(m, encoding)`.
  Returns:
    uint8 array [m, ...] of 0/1.
  """
  m = check_bits(m, encoding=encoding)
  q = jnp.asarray(q).astype(jnp.int32)
  shifts = jnp.arange(m, dtype=jnp.int32).reshape((m,) + (1,) * q.ndim)
  if encoding == "offset":
    return ((q[None] + 2 ** (m - 1)) >> shifts & 1).astype(jnp.uint8)
  magnitude = (jnp.abs(q)[None] >> shifts[:-1]) & 1
  sign = (q < 0).astype(jnp.int32)[None]
  return jnp.concatenate([magnitude, sign], axis=0).astype(jnp.uint8)


def from_bits(bits: jax.Array, m: int, encoding: str = "offset") -> jax.Array:
  """Eq. 4: rebuilds integers from bits.

  Offset binary: q = sum_i 2^i bits[i] - 2^(m-1). Sign-magnitude:
  q = (1 - 2 bits[m-1]) * sum_{i<m-1} 2^i bits[i].

  Args:
    bits: array [m, ...] of 0/1 (any numeric dtype).
  Returns:
    int32 array [...].
  """
  m = check_bits(m, encoding=encoding)
  if bits.shape[0] != m:
    raise ValueError(f"bits: leading axis must have length m={m}, got shape {tuple(bits.shape)}")
  b = jnp.asarray(bits).astype(jnp.int32)
  weights = (2 ** jnp.arange(m, dtype=jnp.int32)).reshape((m,) + (1,) * (b.ndim - 1))
  if encoding == "offset":
    return jnp.sum(weights * b, axis=0) - 2 ** (m - 1)
  magnitude = jnp.sum(weights[:-1] * b[:-1], axis=0)
  return (1 - 2 * b[-1]) * magnitude


# ----------------------------------------------------------------------------- QSGD levels

NORMS = ("max", "l2")


def level_width(levels: jax.Array) -> jax.Array:
  """ceil(log2(2L + 1)) for integer L >= 1, exactly: 2L+1 is odd, so it equals bit_length(L) + 1.

  levels: int32 array (any shape). Returns int32, same shape. L=1 -> 2, 2..3 -> 3, 4..7 -> 4.
  """
  levels = jnp.asarray(levels, jnp.int32)
  return (32 - jax.lax.clz(levels) + 1).astype(jnp.int32)


def tensor_scale(x: jax.Array, norm: str = "max") -> jax.Array:
  """The level quantizer's scale s: max|x| ("max") or ||x||_2 ("l2", QSGD as printed in FedPAQ).

  float32 scalar > 0 (an all-zero tensor gets 1; it quantizes to zeros).
  """
  x = x.astype(jnp.float32)
  s = jnp.max(jnp.abs(x)) if norm == "max" else jnp.sqrt(jnp.sum(x * x))
  return jnp.where(s > 0, s, 1.0)


def quantize_levels(x: jax.Array, levels: jax.Array, key: jax.Array, norm: str = "max",
                    dtype=jnp.int16) -> tuple[jax.Array, jax.Array]:
  """QSGD's unbiased stochastic quantization to integers in [-L, L] (module docstring).

  Args:
    x: float array [...], one tensor's update.
    levels: L >= 1, int scalar (may be traced).
    key: PRNG key for the stochastic rounding.
    norm: "max" or "l2", see `tensor_scale`.
    dtype: integer storage dtype; must hold [-L, L].
  Returns:
    (q, s): q `dtype` [...] in [-L, L]; s float32 scalar. Dequantize with `dequantize_levels`.
  """
  s = tensor_scale(x, norm)
  lv = jnp.asarray(levels, jnp.float32)
  y = jnp.clip(x.astype(jnp.float32) / s * lv, -lv, lv)
  return jnp.clip(stochastic_round(y, key), -lv, lv).astype(dtype), s


def dequantize_levels(q: jax.Array, levels: jax.Array, scale: jax.Array) -> jax.Array:
  """Q(x) = s / L * q, float32 with q's shape."""
  return q.astype(jnp.float32) * (jnp.asarray(scale, jnp.float32) /
                                  jnp.asarray(levels, jnp.float32))


# ----------------------------------------------------------------------------- FedDQ min-max


def quantize_minmax(x: jax.Array, lo: jax.Array, hi: jax.Array, bits: jax.Array,
                    key: Optional[jax.Array] = None) -> tuple[jax.Array, jax.Array]:
  """FedDQ's asymmetric min-max quantization of x onto 2^bits levels spanning [lo, hi].

  Args:
    x: float array [...] with lo <= x <= hi.
    lo, hi: float32 scalars; bits: int32 scalar in 2..16 (may be traced).
    key: None rounds to nearest (FedDQ's official code); a key rounds stochastically (unbiased).
  Returns:
    (q uint16 [...] in [0, 2^bits - 1], f float32 scalar); x ~ q * f + lo. f = 1 when hi == lo.
  """
  top = (2.0 ** bits.astype(jnp.float32)) - 1.0
  f = jnp.where(hi > lo, (hi - lo) / top, 1.0).astype(jnp.float32)
  y = jnp.clip((x.astype(jnp.float32) - lo) / f, 0.0, top)
  return jnp.clip(round_values(y, key), 0.0, top).astype(jnp.uint16), f


def dequantize_minmax(q: jax.Array, f: jax.Array, lo: jax.Array) -> jax.Array:
  """q * f + lo, float32 with q's shape."""
  return q.astype(jnp.float32) * f + lo
