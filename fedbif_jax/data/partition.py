"""Splitting a training set across federated clients.

This module owns the client partitions: IID shards and Dirichlet label skew as
implemented by NIID-Bench (Li et al., "Federated Learning on Non-IID Data
Silos: An Experimental Study", ICDE 2022), plus a one-line summary for logs.

Every partition is a list with one int64 index array (into the training set)
per client, and is drawn only from the `np.random.Generator` passed in, so the
same generator state gives the same partition.
"""

from typing import Sequence

import numpy as np

from fedbif_jax.errors import ConfigError, check

PARTITIONS = ("iid", "dirichlet")
_LIST_LIMIT = 20  # describe_partition lists per-client labels up to this many.


def iid_partition(num_samples: int, num_clients: int,
                  rng: np.random.Generator) -> list[np.ndarray]:
  """Equal random shards of ``num_samples // num_clients`` samples each.

  The shards are consecutive slices of ``rng.permutation(num_samples)``, so each
  shard is in (random) permutation order, not sorted. The remainder of
  ``num_samples % num_clients`` samples is dropped.
  """
  _check_num_clients(num_clients, num_samples)
  shard = num_samples // num_clients
  perm = rng.permutation(num_samples).astype(np.int64)
  return [perm[j * shard:(j + 1) * shard] for j in range(num_clients)]


def dirichlet_partition(labels: np.ndarray, num_clients: int, mu: float,
                        rng: np.random.Generator, min_size: int = 10,
                        max_tries: int = 1000) -> list[np.ndarray]:
  """Dirichlet(mu) label skew, exactly as NIID-Bench's ``noniid-labeldir``.

  The whole draw is repeated until every client holds at least `min_size`
  samples. In each draw, for every class k = 0..K-1 (K = max label + 1): the
  class's indices are shuffled, ``p ~ Dir(mu * ones(num_clients))`` is drawn,
  ``p_j`` is zeroed for every client already holding ``>= N / num_clients``
  samples, p is renormalised and the class is split at
  ``(cumsum(p) * n_k).astype(int)[:-1]``. Every sample is assigned. At the end
  each client's indices are shuffled. As in NIID-Bench, when the last client is
  capped, float rounding of ``cumsum(p)`` (just below 1) can still hand it one
  sample of the class; this is kept for exact parity.

  Deviation from NIID-Bench: if the renormalisation would divide by zero (only
  possible when float underflow zeroes all uncapped ``p_j`` for tiny mu),
  NIID-Bench produces NaNs; here that draw is discarded and retried instead.

  Raises:
    ConfigError: mu <= 0, bad num_clients / min_size, or no valid draw within
      `max_tries` attempts.
  """
  labels = np.asarray(labels)
  num_samples = len(labels)
  check(mu > 0, "data.mu", "a positive float", mu)
  _check_num_clients(num_clients, num_samples)
  check(0 <= min_size * num_clients <= num_samples, "data.min_size",
        f"in 0..{num_samples // num_clients} (= {num_samples} samples // "
        f"{num_clients} clients)", min_size)
  for _ in range(max_tries):
    parts = _dirichlet_draw(labels, num_clients, mu, rng)
    if parts is not None and min(len(p) for p in parts) >= min_size:
      for part in parts:
        rng.shuffle(part)
      return parts
  raise ConfigError(
      f"data.min_size: no Dirichlet(data.mu={mu}) partition gave every one of "
      f"{num_clients} clients >= {min_size} samples in {max_tries} tries; use "
      "fewer clients, a larger data.mu or a smaller data.min_size")


def _dirichlet_draw(labels: np.ndarray, num_clients: int, mu: float,
                    rng: np.random.Generator) -> list[np.ndarray] | None:
  """One NIID-Bench draw; None if the capped proportions are all zero."""
  num_samples = len(labels)
  num_classes = int(labels.max()) + 1 if num_samples else 0
  parts = [[] for _ in range(num_clients)]
  sizes = np.zeros(num_clients, np.int64)
  for k in range(num_classes):
    idx_k = np.flatnonzero(labels == k)
    rng.shuffle(idx_k)
    p = rng.dirichlet(np.repeat(mu, num_clients))
    p = p * (sizes < num_samples / num_clients)
    if p.sum() <= 0:
      return None
    p = p / p.sum()
    cuts = (np.cumsum(p) * len(idx_k)).astype(int)[:-1]
    for j, chunk in enumerate(np.split(idx_k, cuts)):
      parts[j].append(chunk)
      sizes[j] += len(chunk)
  return [np.concatenate(p).astype(np.int64) if p else np.zeros(0, np.int64)
          for p in parts]


def partition(kind: str, labels: np.ndarray, num_clients: int,
              rng: np.random.Generator, mu: float = 0.5,
              min_size: int = 10) -> list[np.ndarray]:
  """Dispatches to `iid_partition` or `dirichlet_partition` by `kind`."""
  check(kind in PARTITIONS, "data.partition",
        f"one of {', '.join(PARTITIONS)}", kind)
  if kind == "iid":
    return iid_partition(len(labels), num_clients, rng)
  return dirichlet_partition(labels, num_clients, mu, rng, min_size=min_size)


def describe_partition(parts: Sequence[np.ndarray], labels: np.ndarray,
                       num_classes: int) -> str:
  """One log line: client count, size min/median/max and label spread.

  Up to 20 clients the per-client label counts are listed
  (``c0 [14 15 ...]``); beyond that the number of distinct labels per client
  is summarised (mean/min/max).
  """
  labels = np.asarray(labels)
  sizes = np.array([len(p) for p in parts], np.int64)
  counts = np.array([np.bincount(labels[p], minlength=num_classes)
                     for p in parts], np.int64).reshape(len(parts), -1)
  low, mid, high = (sizes.min(), np.median(sizes), sizes.max()) if len(
      sizes) else (0, 0, 0)
  head = (f"{len(parts)} clients, sizes min {low} / median {mid:g} / max "
          f"{high}")
  if len(parts) <= _LIST_LIMIT:
    listed = " ".join(f"c{j} [{' '.join(map(str, row))}]"
                      for j, row in enumerate(counts))
    return f"{head}; labels per client: {listed}"
  distinct = (counts > 0).sum(axis=1)
  return (f"{head}; distinct labels per client mean {distinct.mean():.2f} / "
          f"min {distinct.min()} / max {distinct.max()} (of {num_classes})")


def _check_num_clients(num_clients: int, num_samples: int) -> None:
  """num_clients must be in 1..num_samples."""
  check(1 <= num_clients <= num_samples, "data.num_clients",
        f"an integer in 1..{num_samples} (there are {num_samples} samples)",
        num_clients)
