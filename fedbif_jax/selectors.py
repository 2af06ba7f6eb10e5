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
* `flip_rate` - ours, beyond the paper (Sec. 6 leaves "better bit selection strategies" open):
  adaptive, from what the server already holds after a round, so no extra uplink. Aggregation
  sees, for each activated bit plane, the share of the clients' uploaded bits that disagree with
  the bit it broadcast (the plane's *flip rate*: how much the clients want that plane to change).
  The selector keeps an exponential average of each plane's flip rate (updated only when the
  plane was active; a plane's first observation replaces nothing, it starts the average), how
  many rounds each plane has been idle and which planes have been tried. Untried planes come
  first (in `order`); then it activates the s planes with the highest score
  (rate / mean rate + FLIP_RATE_FLOOR) * (1 + idle), the mean taken over the tried planes, ties
  broken by `order`. Planes that the clients keep flipping come back sooner; a plane nobody flips
  still returns, as its idle count grows. The score is scale-free: flip rates are small (0.05-0.3%
  of a plane's bits per round on the quickstart, 0.6-1.4% on the study CNN), and only their
  ratios matter. With equal rates the score is the idle count alone and the selector reduces to the
  sequential one: `flip_rate_select` from `flip_rate_init` reproduces `sequential`'s cycle.
  (A first version added an absolute floor of 0.01 to the raw rate; at such rates the floor
  dominated and the selector never left the sequential cycle.) Measured in the CPU study
  (docs/RESULTS.md, 3 seeds, tuned FedBiF-1/4 with ``inverse_pow2``): the clients flip the MSB
  least (0.6% against 0.9-1.4% for the lower planes), so the selector trains it in 20-22 of 100
  rounds instead of 25, and ends 0.4 (IID) and 0.5 (Dir(0.5)) points below the sequential
  selector's best accuracy: not an improvement there.

Bit index i is the bit of weight 2^i (see `quant.to_bits`).
"""
from __future__ import annotations

from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from fedbif_jax import quant

SELECTORS = ("sequential", "fixed", "random", "flip_rate")
# Selectors whose mask depends on state the server updates after each round (not on t and a key).
STATEFUL_SELECTORS = ("flip_rate",)
# flip_rate: added to a plane's rate relative to the mean, so a plane that never flips keeps a
# score and its idle count brings it back (within about m * (m + floor) / floor rounds, m/s=1).
FLIP_RATE_FLOOR = 0.1
# flip_rate: weight of the previous average in the exponential average of a plane's flip rate.
FLIP_RATE_DECAY = 0.5
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


def _order_rank(m: int, order: str) -> jax.Array:
  """Tie-break rank of each bit (0 = first): msb_first prefers high bits, lsb_first low ones."""
  idx = jnp.arange(m, dtype=jnp.int32)
  return (m - 1 - idx) if order == "msb_first" else idx


def flip_rate_init(m: int) -> dict:
  """The `flip_rate` selector's state before round 0: no plane tried, none idle.

  ``{"rate": float32 [m] (the average flip rate, read only where tried), "idle": int32 [m],
  "tried": bool [m]}``.
  """
  m = quant.check_bits(m)
  return {"rate": jnp.zeros((m,), jnp.float32), "idle": jnp.zeros((m,), jnp.int32),
          "tried": jnp.zeros((m,), bool)}


def flip_rate_scores(stats: dict) -> jax.Array:
  """Each plane's score, float32 [m]: +inf for an untried plane, else
  (rate / mean rate of the tried planes + FLIP_RATE_FLOOR) * (1 + idle). With no flips at all
  (a mean of 0) every relative rate is 0 and the idle count alone decides."""
  rate, tried = stats["rate"].astype(jnp.float32), stats["tried"]
  mean = jnp.sum(jnp.where(tried, rate, 0.0)) / jnp.maximum(jnp.sum(tried), 1)
  relative = rate / jnp.maximum(mean, jnp.finfo(jnp.float32).tiny)   # tried rates >= 0
  score = (relative + FLIP_RATE_FLOOR) * (1.0 + stats["idle"].astype(jnp.float32))
  return jnp.where(tried, score, jnp.inf)


def flip_rate_select(stats: dict, s: int, order: str = "msb_first") -> jax.Array:
  """The s bits of highest `flip_rate_scores` (untried planes first); ties go by `order`.

  Returns bool [m] with exactly s True entries.
  """
  m = stats["rate"].shape[0]
  check_active_bits(m, s)
  if order not in ORDERS:
    raise ValueError(f"order: must be one of {', '.join(ORDERS)}, got {order!r}")
  score = flip_rate_scores(stats)
  by_rank = jnp.argsort(_order_rank(m, order))          # bits in tie-break order
  best = by_rank[jnp.argsort(-score[by_rank], stable=True)][:s]
  return jnp.zeros((m,), bool).at[best].set(True)


def flip_rate_update(stats: dict, active: jax.Array, rates: jax.Array,
                     decay: float = FLIP_RATE_DECAY) -> dict:
  """The state after a round with mask `active` whose planes flipped at `rates` (float [m], read
  only where active): an active plane's observed rate starts its average (first time) or is
  averaged in (decay * old + (1 - decay) * observed), its idle count reset and it is marked
  tried; the other planes keep their rate and age by one round."""
  averaged = jnp.where(stats["tried"], decay * stats["rate"] + (1.0 - decay) * rates, rates)
  rate = jnp.where(active, averaged, stats["rate"])
  idle = jnp.where(active, 0, stats["idle"] + 1)
  return {"rate": rate.astype(jnp.float32), "idle": idle.astype(jnp.int32),
          "tried": stats["tried"] | active}


def disagreements(uploaded_bits: jax.Array, broadcast_bits: jax.Array,
                  weights: jax.Array) -> jax.Array:
  """Per activated plane, the client-weighted count of uploaded bits that differ from the
  broadcast bit: sum_k p_k sum_w |b_k,i(w) - b_i(w)|, float32 [s].

  Args:
    uploaded_bits: [C, s, ...] 0/1, the clients' activated bits.
    broadcast_bits: [s, ...] 0/1, the same planes of the integers the server sent.
    weights: float [C], the aggregation weights (summing to 1).
  Divide by the plane's size to get the flip rate.
  """
  differ = jnp.abs(uploaded_bits.astype(jnp.float32) - broadcast_bits.astype(jnp.float32)[None])
  per_client = jnp.sum(differ.reshape(differ.shape[:2] + (-1,)), axis=-1)   # [C, s]
  return jnp.tensordot(weights.astype(jnp.float32), per_client, axes=1)


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
  if name in STATEFUL_SELECTORS:
    raise ValueError(f"selector: {name!r} reads the server's state; use flip_rate_select")
  raise ValueError(f"selector: must be one of {', '.join(SELECTORS)}, got {name!r}")
