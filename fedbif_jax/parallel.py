"""How the clients of a round are run: one switch, identical results.

Backends (``config.parallel``):

* ``sequential`` - clients one after another; each client's local steps are driven from Python
  as jitted chunks of ``config.unroll`` unrolled steps. No `lax.scan`/while loop: on XLA's CPU
  backend a while loop over convolution training steps runs 10-20x slower than the same steps
  unrolled or dispatched from Python (docs/ARCHITECTURE facts), and `vmap` over clients about 3x
  slower than running them in turn. Fully padded steps are skipped on the host (they are no-ops).
* ``vmap`` - one program for all clients of the round: `jax.vmap` over clients of a `lax.scan`
  over steps. Meant for GPU/TPU.
* ``sharded`` - the vmap program split over a 1-D device mesh (axis ``"clients"``) with
  `jax.shard_map`: each device runs its share of the clients. The round's client count is padded
  to a multiple of the device count with fully masked dummy clients, whose outputs are dropped.
  The training set is replicated on every device once (`Runner.place`). The mesh is the
  global one: in a multi-process job (`jax.distributed`, see launch.py) each process runs the
  clients on its own devices and the round's outputs are all-gathered.
* ``auto`` - ``sequential`` on CPU, ``vmap`` elsewhere; ``sharded`` in a multi-process job (the
  only backend allowed there).

Backends agree to float rounding, but a rounding difference can legitimately change a
subgradient where a tie is exact: max-pool near-ties, and ReLU at exactly 0 (FedBiF's integer
kernels can cancel exactly on constant image regions). Past such a tie, runs drift apart, so
backend-equivalence tests use tie-free models and data (tests/test_engine.py).

Every backend takes the round's client states stacked on the host (numpy, leading client axis),
moves the round's schedule to the device once, and returns stacked uplinks (on the device),
the new client states (numpy, on the host) and per-client metrics.
"""
from __future__ import annotations

from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from fedbif_jax.client import Batches, LocalTraining, TrainData
from fedbif_jax.errors import check

BACKENDS = ("auto", "sequential", "vmap", "sharded")
CLIENT_AXIS = "clients"


class Runner(NamedTuple):
  """run(downlink, client_states, idx, mask, keys, data) -> (uplinks, states, metrics);
  place(data) puts the training set where `run` wants it (once per job)."""
  run: Callable[..., tuple]
  place: Callable[[TrainData], TrainData]


def resolve_backend(name: str, platform: str | None = None) -> str:
  """The backend `auto` stands for on `platform` (default: JAX's default backend)."""
  check(name in BACKENDS, "parallel", f"one of {', '.join(BACKENDS)}", name)
  if jax.process_count() > 1:  # a multi-process job: clients over the global device mesh
    check(name in ("auto", "sharded"), "parallel",
          f"auto or sharded in a multi-process run ({jax.process_count()} processes)", name)
    return "sharded"
  if name != "auto":
    return name
  platform = platform or jax.default_backend()
  return "sequential" if platform == "cpu" else "vmap"


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


def _batched(local: LocalTraining):
  """`client_update` over a leading client axis (the downlink and data are shared)."""
  return jax.vmap(local.client_update, in_axes=(None, 0, 0, 0, None))


def _to_host(tree: Any) -> Any:
  return jax.tree.map(np.asarray, jax.device_get(tree))


def _stack(trees: list) -> Any:
  return jax.tree.map(lambda *xs: jnp.stack(xs), *trees)


def _pad_clients(multiple: int, client_states, idx, mask, keys):
  """Pads the client axis to a multiple with copies of client 0 that have all-masked schedules."""
  pad = (-idx.shape[0]) % multiple
  if not pad:
    return client_states, idx, mask, keys
  rep = lambda x: np.concatenate([x, np.repeat(np.asarray(x[:1]), pad, axis=0)], axis=0)
  client_states = jax.tree.map(rep, client_states)
  idx = np.concatenate([idx, np.zeros((pad,) + idx.shape[1:], idx.dtype)])
  mask = np.concatenate([mask, np.zeros((pad,) + mask.shape[1:], mask.dtype)])
  keys = jnp.concatenate([keys, jnp.repeat(keys[:1], pad, axis=0)])
  return client_states, idx, mask, keys


def _global(x, sharding) -> jax.Array:
  """A global array of `sharding` from a host value every process holds in full (each process
  contributes the shards of its own devices): works in one process and across hosts."""
  x = np.asarray(x)
  return jax.make_array_from_callback(x.shape, sharding, lambda index: x[index])


def _make_sharded(local: LocalTraining) -> Runner:
  """Clients split over all (global) devices. In a multi-process job (`jax.distributed`) every
  process runs this same code on the same host inputs; each computes the clients on its own
  devices, and the results are all-gathered so that every process holds the round's outputs."""
  devices = jax.devices()
  multi_process = jax.process_count() > 1
  mesh = jax.sharding.Mesh(np.array(devices), (CLIENT_AXIS,))
  spec, replicated = jax.sharding.PartitionSpec(CLIENT_AXIS), jax.sharding.PartitionSpec()
  batched = _batched(local)

  def per_shard(downlink, client_states, batches, key_data, data):
    return batched(downlink, client_states, batches, jax.random.wrap_key_data(key_data), data)

  update = jax.jit(jax.shard_map(per_shard, mesh=mesh,
                                 in_specs=(replicated, spec, spec, spec, replicated),
                                 out_specs=(spec, spec, spec), check_vma=False))
  on_mesh = jax.sharding.NamedSharding(mesh, spec)
  everywhere = jax.sharding.NamedSharding(mesh, replicated)
  server = jax.local_devices()[0]

  def run(downlink, client_states, idx, mask, keys, data: TrainData):
    num_clients = idx.shape[0]
    client_states, idx, mask, keys = _pad_clients(len(devices), client_states, idx, mask, keys)
    put = lambda x: _global(x, on_mesh)
    batches = Batches(put(idx), put(mask))
    key_data = put(jax.device_get(jax.random.key_data(keys)))
    if multi_process:  # the broadcast itself
      downlink = jax.tree.map(lambda x: _global(jax.device_get(x), everywhere), downlink)
    else:
      downlink = jax.device_put(downlink, everywhere)
    uplinks, states, metrics = update(downlink, jax.tree.map(put, client_states), batches,
                                      key_data, data)
    if multi_process:
      from jax.experimental import multihost_utils
      uplinks, states, metrics = multihost_utils.process_allgather((uplinks, states, metrics),
                                                                   tiled=True)
    real = lambda tree: jax.tree.map(lambda x: x[:num_clients], tree)  # drop the dummy clients
    # The uplinks reach the server (this process's first device), so that server-side code sees
    # the same placement every round and is never recompiled.
    to_server = lambda tree: jax.device_put(real(tree), server)
    return to_server(uplinks), _to_host(real(states)), to_server(metrics)

  def place(data: TrainData) -> TrainData:
    if multi_process:
      return jax.tree.map(lambda x: _global(x, everywhere), data)
    return jax.device_put(data, everywhere)

  return Runner(run, place)


def make_runner(backend: str, local: LocalTraining, unroll: int = 1) -> Runner:
  """The `Runner` of a backend.

  Args of its ``run``:
    downlink: the round's downlink pytree (on the device).
    client_states: host pytree, leaves [C, ...] (the selected clients' states, stacked).
    idx, mask: numpy int32 / float32 [C, S, B], the padded schedule.
    keys: PRNG keys [C], one per client.
    data: TrainData on the device.
  """
  backend = resolve_backend(backend)
  check(isinstance(unroll, int) and unroll >= 1, "unroll", "an integer >= 1", unroll)
  place = lambda data: jax.tree.map(jnp.asarray, data)
  if backend == "sharded":
    return _make_sharded(local)

  if backend == "vmap":
    update = jax.jit(_batched(local))

    def run_vmap(downlink, client_states, idx, mask, keys, data: TrainData):
      batches = Batches(jnp.asarray(idx), jnp.asarray(mask))
      uplinks, states, metrics = update(downlink, jax.tree.map(jnp.asarray, client_states),
                                        batches, keys, data)
      return uplinks, _to_host(states), metrics

    return Runner(run_vmap, place)

  start = jax.jit(local.start)
  steps = jax.jit(local.steps, static_argnames="num_steps")
  finish = jax.jit(local.finish)

  def run_sequential(downlink, client_states, idx, mask, keys, data: TrainData):
    idx, mask, real_steps = compact_schedule(idx, mask)
    # Whole chunks of `unroll` steps only: the trailing all-masked steps are no-ops.
    idx, mask = pad_steps(idx, mask, -(-idx.shape[1] // unroll) * unroll)
    idx_dev, mask_dev = jnp.asarray(idx), jnp.asarray(mask)  # the round's schedule, sent once
    uplinks, states, metrics = [], [], []
    for c in range(idx.shape[0]):
      state = jax.tree.map(lambda x: jnp.asarray(x[c]), client_states)
      batches = Batches(idx_dev[c], mask_dev[c])
      carry = start(downlink, state, keys[c])
      for _ in range(-(-int(real_steps[c]) // unroll)):
        carry = steps(downlink, carry, data, batches, keys[c], num_steps=unroll)
      uplink, new_state, metric = finish(downlink, state, carry, keys[c])
      uplinks.append(uplink)
      states.append(new_state)
      metrics.append(metric)
    host_states = _to_host(_stack(states)) if states else client_states
    return _stack(uplinks), host_states, _stack(metrics)

  return Runner(run_sequential, place)
