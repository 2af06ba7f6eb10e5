"""How the clients of a round are run: one switch, identical results. This module holds the
backends only: `BACKENDS` maps each name to its factory, `make_runner` builds one; the batch
schedules they run are `fedbif_jax/data/batching.py`'s, the CPU split into host devices
`fedbif_jax/devices.py`'s.

Backends (``config.parallel``):

* ``sequential`` - clients one after another on each local device (client c on device c % D,
  ``config.client_devices``; all devices dispatched asynchronously, so they work at once); each
  client's local steps are driven from Python as jitted chunks of ``config.unroll`` unrolled
  steps, then single steps for the remainder (`chunk_plan`). No `lax.scan`/while loop: on XLA's
  CPU backend a convolution's weight gradient inside a while loop runs 100x slower or more than
  the same step unrolled or dispatched from Python (`fedbif_jax/models/conv.py`), and XLA's own
  weight gradients are the fastest outside one. Fully padded steps are skipped on the host (they
  are no-ops). On CPU, launch.py splits the machine into one host device per core
  (`fedbif_jax/devices.py`), so that two small clients' programs keep 2 cores busier than one does.
* ``vmap`` - one program for all clients of the round: `jax.vmap` over clients of a `lax.scan`
  over steps. Meant for GPU/TPU; on CPU the models' convolutions compute their vmapped weight
  gradients as matrix products (`models/conv.py`), which keeps the scan usable (2-3x the
  sequential round, docs/PERFORMANCE.md).
* ``sharded`` - the vmap program split over a 1-D device mesh (axis ``"clients"``) with
  `jax.shard_map`: each device runs its share of the clients. The round's client count is padded
  to a multiple of the device count with fully masked dummy clients, whose outputs are dropped.
  The training set is replicated on every device once (`Runner.place`). The mesh is the
  global one: in a multi-process job (`jax.distributed`, see launch.py) each process runs the
  clients on its own devices and the round's outputs are all-gathered.
* ``auto`` - ``sequential`` on CPU, ``vmap`` elsewhere; ``sharded`` in a multi-process job (the
  only backend allowed there).

Every backend's programs are jitted through `fedbif_jax.xla_options.jit` (on CPU: convolutions on
all intra-op threads).

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
from fedbif_jax.data.batching import compact_schedule
from fedbif_jax.devices import cores
from fedbif_jax.errors import check
from fedbif_jax import xla_options

CLIENT_AXIS = "clients"


class Runner(NamedTuple):
  """run(downlink, client_states, idx, mask, keys, data) -> (uplinks, states, metrics);
  place(data) puts the training set where `run` wants it (once per job)."""
  run: Callable[..., tuple]
  place: Callable[[TrainData], TrainData]


def backend_names() -> tuple[str, ...]:
  """What ``config.parallel`` may say: ``auto`` and the names in `BACKENDS`."""
  return ("auto", *BACKENDS)


def resolve_backend(name: str, platform: str | None = None) -> str:
  """The backend `auto` stands for on `platform` (default: JAX's default backend); ConfigError
  naming ``parallel`` and the allowed values for an unknown name."""
  check(name in backend_names(), "parallel", f"one of {', '.join(backend_names())}", name)
  if jax.process_count() > 1:  # a multi-process job: clients over the global device mesh
    check(name in ("auto", "sharded"), "parallel",
          f"auto or sharded in a multi-process run ({jax.process_count()} processes)", name)
    return "sharded"
  if name != "auto":
    return name
  return AUTO.get(platform or jax.default_backend(), AUTO_ELSEWHERE)


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


def _make_sharded(local: LocalTraining, unroll: int = 1, client_devices: int = 0) -> Runner:
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

  update = xla_options.jit(jax.shard_map(per_shard, mesh=mesh,
                                         in_specs=(replicated, spec, spec, spec, replicated),
                                         out_specs=(spec, spec, spec), check_vma=False),
                           platform=devices[0].platform)
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


def make_runner(backend: str, local: LocalTraining, unroll: int = 1,
                client_devices: int = 0) -> Runner:
  """The `Runner` of a backend.

  Args:
    backend: ``auto`` or a name in `BACKENDS`.
    local: the jitted-to-be local-training functions (`client.make_local_training`).
    unroll: steps per jitted call of the sequential backend (see `_make_sequential`).
    client_devices: how many of this process's devices the sequential backend spreads a round's
      clients over; 0: all of them, at most one per core on CPU (`sequential_devices`).

  Args of its ``run``:
    downlink: the round's downlink pytree (on the device).
    client_states: host pytree, leaves [C, ...] (the selected clients' states, stacked).
    idx, mask: numpy int32 / float32 [C, S, B], the padded schedule.
    keys: PRNG keys [C], one per client.
    data: what ``place`` returned for the training set.
  """
  backend = resolve_backend(backend)
  check(isinstance(unroll, int) and not isinstance(unroll, bool) and unroll >= 1, "unroll",
        "an integer >= 1", unroll)
  check(isinstance(client_devices, int) and not isinstance(client_devices, bool)
        and client_devices >= 0, "client_devices",
        f"0 (all) or an integer >= 1 (this process has {jax.local_device_count()} devices)",
        client_devices)
  return BACKENDS[backend](local, unroll, client_devices)


def sequential_devices(client_devices: int = 0) -> list:
  """The devices the sequential backend spreads clients over: the first `client_devices` local
  devices; 0: all of them, but on CPU at most one per core (more concurrent clients than cores
  only adds compilations: each device compiles its own copy of the step programs)."""
  devices = jax.local_devices()
  if client_devices:
    return devices[:client_devices]
  return devices[:cores()] if devices[0].platform == "cpu" else devices


def _make_vmap(local: LocalTraining, unroll: int = 1, client_devices: int = 0) -> Runner:
  update = xla_options.jit(_batched(local))

  def run(downlink, client_states, idx, mask, keys, data: TrainData):
    batches = Batches(jnp.asarray(idx), jnp.asarray(mask))
    uplinks, states, metrics = update(downlink, jax.tree.map(jnp.asarray, client_states),
                                      batches, keys, data)
    return uplinks, _to_host(states), metrics

  return Runner(run, lambda data: jax.tree.map(jnp.asarray, data))


def chunk_plan(real_steps: int, unroll: int) -> list[int]:
  """The jitted calls that run `real_steps` local steps: whole chunks of `unroll` steps, then
  single steps for the remainder (no padded step is ever computed), e.g. (10, 4) -> [4, 4, 1, 1].
  So a job compiles at most two step programs: `unroll` steps and 1 step."""
  whole, rest = divmod(int(real_steps), unroll)
  return [unroll] * whole + [1] * rest


def _make_sequential(local: LocalTraining, unroll: int = 1, client_devices: int = 0) -> Runner:
  """Clients one after another on each of ``devices = sequential_devices(client_devices)``,
  client c on ``devices[c % D]``.

  Every call is dispatched asynchronously, so the D devices' chains of clients run at the same
  time; with one device this is the plain sequential loop. On a CPU split into several host
  devices (launch.py's ``cpu_devices``), two concurrent single-client programs keep the cores
  busier than one client's small convolutions do (benchmarks/throughput.py). Each device runs the
  same compiled program on the same inputs, so results do not depend on D. The training set is
  copied to every device once (`place`); uplinks and metrics are gathered on ``devices[0]`` (the
  server's device) and client states on the host.
  """
  devices = sequential_devices(client_devices)
  platform = devices[0].platform
  start = xla_options.jit(local.start, platform=platform)
  steps = xla_options.jit(local.steps, platform=platform, static_argnames="num_steps")
  finish = xla_options.jit(local.finish, platform=platform)
  server = devices[0]

  compiled_on = set()  # devices whose two step programs exist

  def place(data: TrainData) -> tuple:
    return tuple(jax.device_put(data, d) for d in devices)

  def compile_both(d, plan, downlink_d, carry, data_d, client_batches, key):
    """A device's first client also runs (and discards) whichever of the two step programs its
    own plan lacks, so that both are compiled in the first round: a client whose step count
    needs the other program may first appear on this device in a later round, which must not
    compile anything (tests/test_engine.py counts compilations)."""
    if d not in compiled_on:
      compiled_on.add(d)
      for num_steps in sorted({unroll, 1} - set(plan)):
        steps(downlink_d, carry, data_d, client_batches, key, num_steps=num_steps)

  def run(downlink, client_states, idx, mask, keys, data: tuple):
    idx, mask, real_steps = compact_schedule(idx, mask)
    # The round's schedule and downlink reach each device once.
    on = [jax.device_put((downlink, Batches(idx, mask), keys), d) for d in devices]
    uplinks, states, metrics = [], [], []
    for c in range(idx.shape[0]):
      d = c % len(devices)
      downlink_d, batches, keys_d = on[d]
      client_batches = Batches(batches.idx[c], batches.mask[c])
      state = jax.device_put(jax.tree.map(lambda x: x[c], client_states), devices[d])
      carry = start(downlink_d, state, keys_d[c])
      plan = chunk_plan(real_steps[c], unroll)
      compile_both(d, plan, downlink_d, carry, data[d], client_batches, keys_d[c])
      for num_steps in plan:
        carry = steps(downlink_d, carry, data[d], client_batches, keys_d[c], num_steps=num_steps)
      uplink, new_state, metric = finish(downlink_d, state, carry, keys_d[c])
      uplinks.append(jax.device_put(uplink, server))
      metrics.append(jax.device_put(metric, server))
      states.append(new_state)
    host_states = jax.tree.map(lambda *xs: np.stack(xs), *_to_host(states))
    return _stack(uplinks), host_states, _stack(metrics)

  return Runner(run, place)


# Backend name -> factory(local, unroll, client_devices) -> Runner (``config.parallel``); the
# factories ignore what they do not use (only the sequential backend unrolls or picks devices).
BACKENDS = {"sequential": _make_sequential, "vmap": _make_vmap, "sharded": _make_sharded}
# What ``auto`` stands for in one process, by JAX platform (anything else: AUTO_ELSEWHERE).
AUTO = {"cpu": "sequential"}
AUTO_ELSEWHERE = "vmap"
