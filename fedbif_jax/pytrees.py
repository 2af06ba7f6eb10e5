"""The bottom floor of pytree helpers every layer above shares (imports nothing from fedbif_jax).

* `Bits` / `is_bits` - the payload leaf "an integer tensor sent with ``width`` bits per element"
  (an activated bit or a sign at width 1, an m-bit integer, FedDQ's uint16 codes at a per-client
  width) and the ``is_leaf`` of every tree map over payloads. `fedbif_jax.wire` encodes it (its
  byte format names the node by a tag, not by this class's name).
* `Params`, `Path`, `Predicate`, `is_kernel`, `split_params`, `merge_params` - a Flax params
  pytree split into its compressed leaves (conv and dense kernels by default, pruned nested dicts
  with the same keys) and the rest, and back.
* `map_with_keys` - a function over the leaves of nested dicts in sorted path order, leaf i with
  its own PRNG key (``fold_in(key, i)``, or the i-th of ``split(key, n)``), and `unzip`.
* `client_axis`, `weighted_sum`, `weighted_mean` - sums over the leading client axis C weighted
  by the clients' aggregation weights p_k (FedAvg's average; Eq. 6's sum_k p_k).
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Tuple

import flax
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp

Params = Mapping[str, Any]
Path = Tuple[str, ...]
Predicate = Callable[[Path, jax.Array], bool]


@flax.struct.dataclass
class Bits:
  """An integer tensor sent with `width` bits per element.

  values: integer array [*lead, ...] (e.g. int8 m-bit integers, uint8 0/1 bits, uint16 codes);
    signed dtypes are sent in `width`-bit two's complement, unsigned ones as `width`-bit unsigned
    integers.
  width: int32 array [*lead] or scalar: bits per element (per client when stacked over clients).
  """
  values: jax.Array
  width: jax.Array


def is_bits(x: Any) -> bool:
  """Whether `x` is a `Bits` leaf (the ``is_leaf`` of every tree map over payloads)."""
  return isinstance(x, Bits)


def is_kernel(path: Path, leaf: jax.Array) -> bool:
  """The default compression predicate: conv and dense kernels (leaves named 'kernel', ndim >= 2)."""
  return path[-1] == "kernel" and leaf.ndim >= 2


def split_params(params: Params, predicate: Predicate = is_kernel) -> tuple[dict, dict]:
  """Splits params into (leaves where `predicate(path, leaf)`, the others), two pruned nested
  dicts with the keys of `params`."""
  flat = traverse_util.flatten_dict(params)
  chosen = {k: v for k, v in flat.items() if predicate(k, v)}
  rest = {k: v for k, v in flat.items() if not predicate(k, v)}
  return traverse_util.unflatten_dict(chosen), traverse_util.unflatten_dict(rest)


def merge_params(*trees: Params) -> dict:
  """Inverse of `split_params`: the union of disjoint pruned nested dicts."""
  flat = {}
  for tree in trees:
    for key, value in traverse_util.flatten_dict(tree).items():
      if key in flat:
        raise ValueError(f"params: leaf {'/'.join(key)} appears in more than one tree")
      flat[key] = value
  return traverse_util.unflatten_dict(flat)


KEY_RULES = ("fold_in", "split")


def map_with_keys(fn: Callable, key: jax.Array, *trees: Any, rule: str = "fold_in") -> dict:
  """fn(leaf_key, *leaves) over nested dicts in sorted path order, one PRNG key per leaf.

  Leaf i (in sorted path order, which is also `jax.tree.leaves`' order for string-keyed dicts)
  gets ``jax.random.fold_in(key, i)`` (``rule="fold_in"``) or ``jax.random.split(key, n)[i]``
  with n = max(number of leaves, 1) (``rule="split"``). Only dicts are walked: any other node
  (an array, a `Bits`, a tuple) is a leaf. `fn` may return any pytree (e.g. a tuple), kept as
  the new leaf; the result has the nested structure of ``trees[0]``.
  """
  if rule not in KEY_RULES:
    raise ValueError(f"rule: must be one of {', '.join(KEY_RULES)}, got {rule!r}")
  flats = [traverse_util.flatten_dict(t) for t in trees]
  paths = sorted(flats[0])
  if rule == "split":
    keys = jax.random.split(key, max(len(paths), 1))
  else:
    keys = [jax.random.fold_in(key, i) for i in range(len(paths))]
  out = {path: fn(k, *(f[path] for f in flats)) for k, path in zip(keys, paths)}
  return traverse_util.unflatten_dict(out)


def unzip(tree: Any) -> tuple[dict, ...]:
  """A nested dict whose leaves are tuples -> a tuple of nested dicts (one per tuple slot)."""
  flat = traverse_util.flatten_dict(tree)  # tuples are leaves: only dicts are walked
  width = len(next(iter(flat.values()))) if flat else 0
  return tuple(traverse_util.unflatten_dict({k: v[i] for k, v in flat.items()})
               for i in range(width))


def client_axis(x: jax.Array, like: jax.Array) -> jax.Array:
  """Reshapes a per-client [C] array to broadcast against `like` [C, ...]."""
  return jnp.reshape(x, (-1,) + (1,) * (jnp.ndim(like) - 1))


def weighted_sum(per_client: jax.Array, weights: jax.Array) -> jax.Array:
  """sum_k weights[k] * per_client[k] over the leading client axis, in float32.

  Args:
    per_client: float32 [C, ...] (cast to float32 by the caller where it holds other dtypes).
    weights: [C], the clients' aggregation weights p_k.
  Returns:
    float32 [...].
  """
  return jnp.sum(client_axis(weights.astype(jnp.float32), per_client) * per_client, axis=0)


def weighted_mean(stacked: Any, weights: jax.Array) -> Any:
  """`weighted_sum` of every leaf of a pytree stacked over clients (weights summing to 1, so a
  weighted mean), computed in float32 and returned at each leaf's dtype: FedAvg's average."""
  return jax.tree.map(lambda x: weighted_sum(x.astype(jnp.float32), weights).astype(x.dtype),
                      stacked)
