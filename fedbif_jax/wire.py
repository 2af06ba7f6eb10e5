"""What crosses the network: payload leaf types and exact bit counts for the ledger.

A payload (downlink or uplink) is a pytree of arrays. Its ``"weights"`` entry holds the model's
bit-trained tensors (conv and dense kernels): the paper's bits-per-parameter (bpp) column is
``bits under "weights" / number of those weights``. Everything else in a payload (biases,
BatchNorm leaves, step sizes, masks) is counted in the honest total at its own width.

Leaves are counted at their dtype's width (float32 -> 32 bits per element, int32 -> 32, bool -> 1)
unless they are wrapped in `Bits`, which carries the width an encoder would spend per element
(e.g. 1 for an activated bit, m for an m-bit integer, a per-client width for adaptive baselines).
The counts come from the payload the algorithm actually produced (its shapes and widths), so a
payload that grows or shrinks changes the ledger with it.
"""
from __future__ import annotations

from typing import Any, NamedTuple

import flax
import jax
import numpy as np


@flax.struct.dataclass
class Bits:
  """An integer tensor sent with `width` bits per element.

  values: integer array [*lead, ...] (e.g. int8 m-bit integers or uint8 0/1 bits).
  width: int32 array [*lead] or scalar: bits per element (per client when stacked over clients).
  """
  values: jax.Array
  width: jax.Array


def _is_bits(x: Any) -> bool:
  return isinstance(x, Bits)


def _leaf_bits(leaf: Any) -> float:
  if isinstance(leaf, Bits):
    width = np.asarray(leaf.width, np.float64)
    per_width_entry = leaf.values.size / max(width.size, 1)
    return float(width.sum() * per_width_entry)
  dtype = np.dtype(leaf.dtype)
  per_element = 1 if dtype == np.bool_ else dtype.itemsize * 8
  return float(leaf.size * per_element)


class BitCount(NamedTuple):
  weight_bits: float  # bits spent on the "weights" entry
  total_bits: float   # every leaf of the payload


def count_bits(payload: Any) -> BitCount:
  """Bits a payload occupies, from its leaves' shapes and widths (no device-to-host copy of data).

  For uplinks stacked over clients (leading axis C) this is the sum over the clients.
  """
  weights = payload.get("weights", {}) if isinstance(payload, dict) else {}
  leaves = jax.tree.leaves(payload, is_leaf=_is_bits)
  weight_leaves = jax.tree.leaves(weights, is_leaf=_is_bits)
  return BitCount(sum(map(_leaf_bits, weight_leaves)), sum(map(_leaf_bits, leaves)))
