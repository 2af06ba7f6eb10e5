"""Fixed-shape, masked batch schedules for local training and evaluation.

This module owns the index/mask layouts that let one jitted step function run
over clients of different sizes: every client gets the same number of steps,
padding entries carry index 0 and mask 0 (`round_batches`; `pad_steps` pads a round's schedule
to the job's fixed step count, `compact_schedule` moves each client's real steps first for the
sequential backend). Only indices are produced here; the caller gathers the images.
"""

from typing import Sequence

import numpy as np

from fedbif_jax.errors import check


def steps_per_epoch(n: int, batch_size: int) -> int:
  """``ceil(n / batch_size)``: the last partial batch is kept."""
  return -(-n // batch_size)


def round_batches(client_indices: Sequence[np.ndarray], batch_size: int,
                  epochs: int,
                  rng: np.random.Generator) -> tuple[np.ndarray, np.ndarray]:
  """The padded local-training schedule of one round for the given clients.

  Each epoch of every client occupies ``spe = max_k steps_per_epoch(n_k)``
  steps: a fresh permutation of the client's indices cut into
  ``ceil(n_k / B)`` batches (the last one partial, its tail masked), then fully
  masked padding steps. Permutations are drawn from `rng` client by client,
  epoch by epoch. A client with no samples is fully masked.

  Args:
    client_indices: per client, indices into the full training set.
    batch_size: B, examples per step.
    epochs: E, local epochs.
    rng: source of the per-epoch permutations.

  Returns:
    ``idx`` int32 ``[C, E * spe, B]`` and ``mask`` float32 ``[C, E * spe, B]``
    (1 = real example, 0 = padding with index 0).
  """
  check(batch_size >= 1, "batch_size", "a positive integer", batch_size)
  check(epochs >= 1, "epochs", "a positive integer", epochs)
  clients = [np.asarray(c, np.int64).reshape(-1) for c in client_indices]
  spe = max((steps_per_epoch(len(c), batch_size) for c in clients), default=0)
  slots = spe * batch_size
  idx = np.zeros((len(clients), epochs * slots), np.int32)
  mask = np.zeros((len(clients), epochs * slots), np.float32)
  for k, indices in enumerate(clients):
    for e in range(epochs):
      start = e * slots
      idx[k, start:start + len(indices)] = rng.permutation(indices)
      mask[k, start:start + len(indices)] = 1.0
  shape = (len(clients), epochs * spe, batch_size)
  return idx.reshape(shape), mask.reshape(shape)


def compact_schedule(idx: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
  """Moves each client's real steps (mask not all zero) to the front, keeping their order.

  Masked steps are exact no-ops, so this changes no result; it lets the sequential backend stop
  after a client's last real step. Returns (idx, mask, real_steps int [C]).
  """
  real = mask.sum(axis=-1) > 0                                   # [C, S]
  order = np.argsort(~real, axis=1, kind="stable")
  take = lambda a: np.take_along_axis(a, order[..., None], axis=1)
  return take(idx), take(mask), real.sum(axis=1)


def pad_steps(idx: np.ndarray, mask: np.ndarray, num_steps: int) -> tuple[np.ndarray, np.ndarray]:
  """Pads a [C, S, B] schedule with fully masked steps (exact no-ops) to `num_steps` steps."""
  pad = num_steps - idx.shape[1]
  if pad <= 0:
    return idx, mask
  zeros = lambda a: np.zeros((a.shape[0], pad) + a.shape[2:], a.dtype)
  return np.concatenate([idx, zeros(idx)], axis=1), np.concatenate([mask, zeros(mask)], axis=1)


def eval_batches(num_samples: int,
                 batch_size: int) -> tuple[np.ndarray, np.ndarray]:
  """Indices 0..num_samples-1 in order as ``[K, B]``, K = ceil(n / B).

  Returns ``idx`` int32 and ``mask`` float32; the last batch is padded with
  index 0 and mask 0.
  """
  check(batch_size >= 1, "batch_size", "a positive integer", batch_size)
  check(num_samples >= 0, "num_samples", "a non-negative integer",
        num_samples)
  num_batches = steps_per_epoch(num_samples, batch_size)
  flat = np.arange(num_batches * batch_size)
  mask = (flat < num_samples).astype(np.float32)
  idx = np.where(flat < num_samples, flat, 0).astype(np.int32)
  shape = (num_batches, batch_size)
  return idx.reshape(shape), mask.reshape(shape)
