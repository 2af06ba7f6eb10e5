"""Local training on one client: masked SGD steps between `client_start` and `client_finish`.

Owns the step every algorithm shares: gather a batch from the device-resident training set by
index, augment it (``data.augment``, `fedbif_jax/data/augment.py`, with the step's own key),
normalise it, apply the Flax model to ``algorithm.model_params(trainable, downlink)`` in train
mode, take the masked mean cross-entropy, and apply an optax update to ``LocalState.trainable``.

BatchNorm: the model runs in train mode on the batch's own statistics, computed over the real
examples only (the model receives the step's mask); the updated running statistics are the new
``LocalState.model_state``, which the algorithm uploads and the server averages.

Padding: every client of a round runs the same number of steps S over a padded schedule
(``idx`` int32 [S, B], ``mask`` float32 [S, B]). Padded examples get zero weight in the loss, and
a step whose mask is all zero changes nothing: the whole carry (weights, optimizer and model
state, loss sums) is selected back to its old value. A step's randomness (augmentation) is keyed
by the number of real steps before it, so skipping masked steps (the sequential backend) or
running them (vmap) gives the same draws.

`LocalTraining` exposes the pieces so that `fedbif_jax/parallel.py` can drive them either as one
traced program (`client_update`, a `lax.scan` over steps, for vmap/sharding on GPU/TPU) or from
Python one jitted chunk of steps at a time (the CPU path, which avoids XLA's slow while loops).
Both run the same arithmetic.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
import optax

from fedbif_jax.algorithms.base import Algorithm, LocalState
from fedbif_jax.data import augment as augment_lib


class TrainData(NamedTuple):
  """The training set, put on the device once: x uint8 [N, H, W, C], y int32 [N]."""
  x: jax.Array
  y: jax.Array


class Batches(NamedTuple):
  """A client's padded schedule: idx int32 [S, B] into TrainData, mask float32 [S, B]."""
  idx: jax.Array
  mask: jax.Array


class Carry(NamedTuple):
  local: LocalState
  opt_state: Any
  step: jax.Array      # int32 scalar, the next step to run
  loss_sum: jax.Array  # float32, sum of per-example losses over real examples
  count: jax.Array     # float32, number of real examples seen
  real_steps: jax.Array  # int32 scalar, steps taken that were not fully masked


class LocalTraining(NamedTuple):
  start: Callable[..., Carry]           # (downlink, client_state, key) -> Carry
  steps: Callable[..., Carry]           # (downlink, carry, data, batches, key, num_steps) -> Carry
  finish: Callable[..., tuple]          # (downlink, client_state, carry, key) -> (uplink, state, metrics)
  client_update: Callable[..., tuple]   # (downlink, client_state, batches, key, data) -> same


def _step_key(step_key, carry: Carry):
  """The key of the next step: folded with the number of *real* steps taken so far, so that a
  step draws the same augmentation whether or not fully masked steps ran before it (the
  sequential backend skips them, vmap runs them)."""
  return jax.random.fold_in(step_key, carry.real_steps)


def _where_tree(pred, new, old):
  return jax.tree.map(lambda a, b: jnp.where(pred, a, b), new, old)


def make_local_training(algorithm: Algorithm, model: nn.Module, optimizer: optax.GradientTransformation,
                        mean, std, scan_unroll: int = 1, augment: str = "none") -> LocalTraining:
  """Builds the local-training functions of `algorithm` for `model`.

  Args:
    algorithm: the federated algorithm (its client_start / model_params / client_finish).
    model: Flax module called as ``model.apply(variables, x, train=True, mask=mask)``.
    optimizer: optax transformation applied to `LocalState.trainable` (SGD in the paper).
    mean, std: float32 [C] per-channel normalisation of the images.
    scan_unroll: `lax.scan` unroll factor used by `client_update`.
    augment: one of `fedbif_jax.data.AUGMENTATIONS` (``none`` or ``crop_flip``), applied to each
      batch with the step's key (per client and step, identical on every backend).
  """
  augment_lib.check_augment(augment)
  mean = jnp.asarray(mean, jnp.float32)
  std = jnp.asarray(std, jnp.float32)

  def apply_train(params, model_state, x, mask):
    variables = {"params": params, **model_state}
    if model_state:
      logits, new_state = model.apply(variables, x, train=True, mask=mask,
                                      mutable=list(model_state.keys()))
      return logits, dict(new_state)
    return model.apply(variables, x, train=True, mask=mask), model_state

  def one_step(downlink, carry: Carry, data: TrainData, batches: Batches, key) -> Carry:
    idx = jax.lax.dynamic_index_in_dim(batches.idx, carry.step, keepdims=False)
    mask = jax.lax.dynamic_index_in_dim(batches.mask, carry.step, keepdims=False)
    x = augment_lib.normalize(augment_lib.augment_batch(augment, key, data.x[idx]), mean, std)
    y = data.y[idx]
    n = jnp.sum(mask)

    def loss_fn(trainable):
      params = algorithm.model_params(trainable, downlink)
      logits, new_model_state = apply_train(params, carry.local.model_state, x, mask)
      per_example = optax.softmax_cross_entropy_with_integer_labels(logits, y)
      loss_sum = jnp.sum(per_example * mask)
      return loss_sum / jnp.maximum(n, 1.0), (new_model_state, loss_sum)

    grads, (new_model_state, loss_sum) = jax.grad(loss_fn, has_aux=True)(carry.local.trainable)
    updates, opt_state = optimizer.update(grads, carry.opt_state, carry.local.trainable)
    trainable = optax.apply_updates(carry.local.trainable, updates)
    # A fully masked step keeps everything (LocalState.frozen is never touched).
    stepped = (trainable, new_model_state, opt_state, carry.loss_sum + loss_sum, carry.count + n,
               carry.real_steps + 1)
    kept = (carry.local.trainable, carry.local.model_state, carry.opt_state, carry.loss_sum,
            carry.count, carry.real_steps)
    trainable, model_state, opt_state, loss_total, count, real_steps = _where_tree(n > 0, stepped, kept)
    local = carry.local._replace(trainable=trainable, model_state=model_state)
    return Carry(local, opt_state, carry.step + 1, loss_total, count, real_steps)

  def start(downlink, client_state, key) -> Carry:
    local = algorithm.client_start(downlink, client_state, jax.random.fold_in(key, 0))
    return Carry(local, optimizer.init(local.trainable), jnp.zeros((), jnp.int32),
                 jnp.zeros((), jnp.float32), jnp.zeros((), jnp.float32), jnp.zeros((), jnp.int32))

  def steps(downlink, carry, data, batches, key, num_steps: int) -> Carry:
    """`num_steps` consecutive steps from carry.step, unrolled in Python (no while loop)."""
    step_key = jax.random.fold_in(key, 1)
    for _ in range(num_steps):
      carry = one_step(downlink, carry, data, batches, _step_key(step_key, carry))
    return carry

  def finish(downlink, client_state, carry: Carry, key):
    metrics = {"loss_sum": carry.loss_sum, "count": carry.count}
    uplink, new_state = algorithm.client_finish(downlink, client_state, carry.local,
                                                jax.random.fold_in(key, 2), metrics)
    return uplink, new_state, metrics

  def client_update(downlink, client_state, batches: Batches, key, data: TrainData):
    """One client's whole round: start, all S steps in a `lax.scan`, finish."""
    step_key = jax.random.fold_in(key, 1)

    def body(carry, _):
      return one_step(downlink, carry, data, batches, _step_key(step_key, carry)), None

    carry = start(downlink, client_state, key)
    carry, _ = jax.lax.scan(body, carry, None, length=batches.idx.shape[0], unroll=scan_unroll)
    return finish(downlink, client_state, carry, key)

  return LocalTraining(start, steps, finish, client_update)
