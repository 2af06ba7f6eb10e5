"""Bit selectors: which of the m bits are activated (trained and uploaded) in round t (Sec. 3.2).

A selector returns a bool mask of shape [m] shared by every client and every layer of a round.

* `sequential` - the paper's default: traverses all bits without overlap, s at a time. For m=4,
  s=2 it alternates between '1100' and '0011' (the paper's example). The paper does not say where
  the traversal starts; we start at the most significant bit (``order="msb_first"``: bits 3,2 then
  1,0 for m=4, s=2) and offer ``order="lsb_first"``.
* `fixed` - always the same bits. The paper's ablation "always activates the third bit"; counting
  from the most significant bit (the paper calls the MSB "the first one", Sec. 4.4) the third bit
  is bit index m-3, which `fixed_third_bit` returns.
* `random` - s distinct bits drawn uniformly from the round's key.

Bit index i is the bit of weight 2^i (see `quant.to_bits`).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedbif_jax import quant

SELECTORS = ("sequential", "fixed", "random")
ORDERS = ("msb_first", "lsb_first")


def check_active_bits(m: int, s: int, field: str = "s") -> int:
  """Validates 1 <= s <= m; returns s or raises a one-line ValueError naming `field`."""
  m = quant.check_bits(m)
  if isinstance(s, bool) or not isinstance(s, (int, np.integer)) or not 1 <= s <= m:
    raise ValueError(f"{field}: must be an integer in 1..{m} (the bit width m), got {s!r}")
  return int(s)


def sequential(round_index, m: int, s: int, order: str = "msb_first") -> jax.Array:
  """The paper's sequential selector: group g = t mod (m / s) of s consecutive bits.

  Args:
    round_index: int (or traced int32 scalar) t.
    m: bit width; s: active bits per round, must divide m so that the groups do not overlap.
    order: "msb_first" starts at the most significant bits, "lsb_first" at bit 0.
  Returns:
    bool [m] with exactly s True entries.
  """
  check_active_bits(m, s)
  if m % s:
    raise ValueError(f"s: must divide the bit width m={m} for the sequential selector, got {s}")
  if order not in ORDERS:
    raise ValueError(f"order: must be one of {', '.join(ORDERS)}, got {order!r}")
  group = jnp.asarray(round_index, jnp.int32) % (m // s)
  idx = jnp.arange(m, dtype=jnp.int32)
  if order == "lsb_first":
    lo = group * s
  else:
    lo = m - (group + 1) * s
  return (idx >= lo) & (idx < lo + s)


def fixed(m: int, fixed_bits: Sequence[int]) -> jax.Array:
  """A mask with exactly `fixed_bits` active every round. Returns bool [m]."""
  m = quant.check_bits(m)
  fixed_bits = [int(b) for b in fixed_bits]
  if (not fixed_bits or len(set(fixed_bits)) != len(fixed_bits)
      or any(not 0 <= b < m for b in fixed_bits)):
    raise ValueError(f"fixed_bits: must be distinct bit indices in 0..{m - 1}, got {fixed_bits!r}")
  return jnp.zeros((m,), bool).at[jnp.asarray(fixed_bits)].set(True)


def fixed_third_bit(m: int) -> int:
  """The bit index the paper's fixed-selector ablation trains: the third from the MSB, m - 3."""
  if m < 3:
    raise ValueError(f"m: the fixed third-bit selector needs m >= 3, got {m}")
  return m - 3


def random(key: jax.Array, m: int, s: int) -> jax.Array:
  """s distinct bits drawn uniformly at random from `key` (deterministic given the key).

  Returns bool [m] with exactly s True entries.
  """
  check_active_bits(m, s)
  chosen = jax.random.permutation(key, m)[:s]
  return jnp.zeros((m,), bool).at[chosen].set(True)


def active_indices(mask: jax.Array, s: int) -> jax.Array:
  """The s active bit indices of a mask, ascending: int32 [s] (static size, jit-friendly)."""
  return jnp.nonzero(mask, size=s)[0].astype(jnp.int32)


def make_selector(name: str, m: int, s: int, order: str = "msb_first",
                  fixed_bits: Optional[Sequence[int]] = None
                  ) -> Callable[[jax.Array, jax.Array], jax.Array]:
  """Returns select(round_index, key) -> bool [m] for a selector named in `SELECTORS`.

  For "fixed", `fixed_bits` defaults to s consecutive bits starting at the paper's third bit
  (index m - 3 downwards), e.g. bit 1 for m=4, s=1.
  """
  check_active_bits(m, s)
  if name == "sequential":
    sequential(0, m, s, order)  # validates s | m and order eagerly
    return lambda t, key: sequential(t, m, s, order)
  if name == "fixed":
    if fixed_bits is None:
      third = fixed_third_bit(m)
      if s > third + 1:
        raise ValueError(f"s: the fixed selector's default (bits {third} down to 0) has "
                         f"{third + 1} bits for m={m}, got s={s}; pass fixed_bits")
      fixed_bits = [third - j for j in range(s)]
    mask = fixed(m, fixed_bits)
    if int(mask.sum()) != s:
      raise ValueError(f"fixed_bits: must name exactly s={s} bits, got {list(fixed_bits)!r}")
    return lambda t, key: mask
  if name == "random":
    return lambda t, key: random(key, m, s)
  raise ValueError(f"selector: must be one of {', '.join(SELECTORS)}, got {name!r}")
