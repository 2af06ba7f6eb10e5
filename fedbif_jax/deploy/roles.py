"""The server's and a client's part of a round, independent of the transport (no flwr import).

Owns what the Flower apps (`apps.py`) run on each side. Both sides build the simulator's own
pieces from the config (`rounds.build_job`: data, partition, model, algorithm, local training,
keys; a client may read its data set from its SuperNode's cache, `cache.client_role`) and plan
round t with `rounds.plan_round`; the server's half of a round is `rounds.Server`'s, the
simulator's, so a deployment computes the simulator's rounds. What is Flower's is here:

* `Server.open_round(t)`: `rounds.Server.open_round` (the plan: selected client ids, weights,
  schedule, keys; the downlink of ``algorithm.broadcast``) and the downlink's `wire.encode` bytes with the config's ``wire_codec`` (one
  message, sent to every selected client), and the spec of the uplink this round expects
  (`payload.uplink_spec`);
* `Client.train(t, client_id, downlink, state)`: decodes the downlink and runs the library's
  local training (`fedbif_jax/parallel.py`'s runner over this one client, with the plan's batch
  schedule and key), returning the uplink bytes (``wire_codec``), the client's ``loss_sum`` /
  ``count`` and its new persistent state;
* `Server.close_round(round, replies)`: validates every reply (`payload.validate` for the bytes,
  with the config's ``wire_codec``; finite non-negative numbers for the metrics). A client
  whose reply is missing or malformed is dropped with a logged one-line reason; the others are
  aggregated (`rounds.Server.close_round`: ``algorithm.aggregate``, evaluation, divergence
  check, the ledger of `rounds.traffic`) with the plan's weights renormalised over them
  (unchanged when nobody is dropped; with nobody accepted the model stays, and the row's bpp
  are NaN). The round's row is returned: accuracy and losses, who was accepted or dropped and
  why, which clients had lost their state (``state_lost``), the ledger over the accepted
  clients, and the payload bytes actually sent and received.

With every client accepted, the server state after round t equals the simulator's bit for bit on
the same backend (``parallel=sequential``, the CPU default): the same jitted functions see the same
values, only their route differs (encoded, sent, decoded). Other backends agree to float rounding.

Resume. Everything random in round t derives from the config and t (`rounds.plan_round`), so a
round depends only on the state before it: the server's (`Server.save` / `Server.restore`: the
simulator's orbax checkpoints, `train.checkpoint_manager`) and each client's own. A client keeps
its state on its own disk (`StateFiles`, one file per round it trained, under a random key that
identifies the run and is saved in the server's checkpoint), so that a restarted server, which is
a new Flower run, and a restarted client both find the state before the round they are asked to
(re)do. `Client.previous_round` says which round's state that must be.
"""
from __future__ import annotations

import logging
import math
import os
import re
import time
import uuid
from typing import Any, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from fedbif_jax import metrics as metrics_lib
from fedbif_jax import parallel
from fedbif_jax import rounds
from fedbif_jax import wire
from fedbif_jax.client import TrainData
from fedbif_jax.deploy import payload as payload_lib
from fedbif_jax.deploy.payload import PayloadError
from fedbif_jax.errors import check
from fedbif_jax.algorithms.base import RoundInfo

log = logging.getLogger("fedbif_jax")


class Round(NamedTuple):
  """Round t as the server opened it."""
  t: int
  plan: rounds.RoundPlan
  downlink: Any          # the broadcast payload (on the device)
  message: np.ndarray    # uint8, wire.encode(downlink, wire_codec): what every client receives
  spec: Any              # the uplink every client must send (`payload.uplink_spec`)
  started: float         # time.time() when the round opened


class Reply(NamedTuple):
  """What a client sent back, unchecked: its uplink bytes (bytes or a uint8 array) and metrics."""
  data: Any
  metrics: Mapping[str, Any]


def _nbytes(data: Any) -> int:
  if isinstance(data, (bytes, bytearray, memoryview)):
    return len(data)
  return int(data.nbytes) if isinstance(data, np.ndarray) else 0


def _client_metrics(metrics: Any, name: str) -> tuple[float, float]:
  """(loss_sum, count) from a client's reported metrics; PayloadError unless both are finite
  numbers and count >= 0."""
  try:
    loss_sum, count = float(metrics["loss_sum"]), float(metrics["count"])
  except Exception as e:  # noqa: BLE001 - anything unreadable is a malformed reply
    raise PayloadError(f"{name}: metrics need numbers loss_sum and count "
                       f"({type(e).__name__})") from None
  if not (math.isfinite(loss_sum) and math.isfinite(count) and count >= 0 and loss_sum >= 0):
    raise PayloadError(f"{name}: metrics loss_sum={loss_sum}, count={count} (must be finite, >= 0)")
  return loss_sum, count


def _number(metrics: Any, key: str) -> float:
  """metrics[key] as a float; 0.0 when it is missing or not a finite number."""
  try:
    value = float(metrics.get(key, 0.0))
  except Exception:  # noqa: BLE001 - a client's metrics are untrusted
    return 0.0
  return value if math.isfinite(value) else 0.0


def _stack(payloads: list) -> Any:
  return jax.tree.map(lambda *xs: np.stack(xs), *payloads)


class Server:
  """The global model of a deployment and the two halves of its rounds."""

  def __init__(self, config: ml_collections.ConfigDict):
    # A deployment evaluates the test set every round (no validation split, no schedule).
    check(config.eval_every == 1, "eval_every", "1 in a Flower deployment (it evaluates every "
          "round)", config.eval_every)
    check(config.eval_test, "eval_test", "True in a Flower deployment", config.eval_test)
    self.config = config
    self.job = job = rounds.build_job(config)
    # The simulator's server: the same jitted functions, the same placement of the state.
    self.core = rounds.Server.of_job(config, job)
    self._evaluate = metrics_lib.make_evaluator(job.model, job.algorithm.eval_variables,
                                                job.dataset, config.eval_batch_size)
    self._client_state = jax.eval_shape(job.algorithm.init_client, job.k_clients, job.variables)
    # Names this run to the clients (their state files); a resumed run keeps its checkpoint's.
    self.run_key = uuid.uuid4().hex

  def save(self, manager, done: int) -> None:
    """Checkpoints the state after `done` rounds (orbax step `done`, with the run key) and
    waits until it is on disk: the next round starts only then, so a client is never more than
    one round ahead of the newest checkpoint (`StateFiles` keeps what a resume needs)."""
    import orbax.checkpoint as ocp
    key = np.frombuffer(bytes.fromhex(self.run_key), np.uint8)
    manager.save(done, args=ocp.args.StandardSave({"server": self.core.state, "run_key": key}))
    manager.wait_until_finished()

  def restore(self, manager) -> int:
    """Loads the newest checkpoint of `manager`, if any, as `save` wrote it (the state, on the
    device the state lives on, and the run key); returns the rounds it holds, 0 without one."""
    import orbax.checkpoint as ocp
    step = manager.latest_step()
    if step is None:
      return 0
    restored = manager.restore(step, args=ocp.args.StandardRestore())
    self.core.restore(restored["server"])
    self.run_key = np.asarray(restored["run_key"], np.uint8).tobytes().hex()
    return int(step)

  @property
  def state(self) -> Any:
    """The global state (`rounds.Server.state`)."""
    return self.core.state

  def open_round(self, t: int) -> Round:
    opened = self.core.open_round(t)
    spec = payload_lib.uplink_spec(self.job.local, opened.downlink, self._client_state,
                                   opened.plan.keys[0])
    return Round(t, opened.plan, opened.downlink,
                 payload_lib.to_array(opened.downlink, self.config.wire_codec), spec,
                 opened.started)

  def close_round(self, rnd: Round, replies: Mapping[int, Reply | str]) -> dict:
    """Validates, aggregates the accepted clients and evaluates; returns the round's row.

    Args:
      rnd: the round as `open_round` returned it.
      replies: by client id, a `Reply` or a reason why there is none (e.g. a transport error);
        a selected client absent from the mapping counts as "no reply".
    Raises:
      rounds.TrainingDiverged: the aggregated model has a non-finite loss.
    """
    t, ids = rnd.t, [int(c) for c in rnd.plan.ids]
    evaluate = lambda state: dict(zip(("test_accuracy", "test_loss"), self._evaluate(state)))
    accepted, uplinks, loss_sums, counts, dropped, state_lost = [], [], [], [], {}, []
    received = accepted_bytes = 0
    for i, c in enumerate(ids):
      reply = replies.get(c, "no reply")
      if isinstance(reply, Reply):
        received += _nbytes(reply.data)
        if _number(reply.metrics, "state_lost"):
          state_lost.append(c)
          log.warning("round %d: client %d had lost its state after its previous round (see its "
                      "log); the run no longer equals an uninterrupted one", t, c)
      name = f"uplink of client {c}"
      try:
        if not isinstance(reply, Reply):
          raise PayloadError(f"{name}: {reply}")
        uplink = payload_lib.validate(reply.data, rnd.spec, name, self.config.wire_codec)
        loss_sum, count = _client_metrics(reply.metrics, name)
      except PayloadError as e:
        dropped[c] = str(e)
        log.warning("round %d: dropped client %d: %s", t, c, e)
        continue
      accepted.append(i)
      uplinks.append(uplink)
      loss_sums.append(loss_sum)
      counts.append(count)
      accepted_bytes += _nbytes(reply.data)

    row = {"round": t, "selected": ids, "accepted": [ids[i] for i in accepted],
           "dropped": {str(c): r for c, r in dropped.items()}, "state_lost": state_lost}
    if accepted:
      weights = rnd.plan.info.weights
      if len(accepted) < len(ids):  # renormalise over the clients that made it
        kept = np.asarray(weights, np.float64)[accepted]
        weights = jnp.asarray(kept / kept.sum(), jnp.float32)
      stacked = _stack(uplinks)
      client_metrics = {"loss_sum": jnp.asarray(np.array(loss_sums, np.float32)),
                        "count": jnp.asarray(np.array(counts, np.float32))}
      train_loss = float(np.sum(loss_sums) / max(np.sum(counts), 1.0))
      opened = rounds.OpenRound(t, rnd.plan, rnd.downlink, rnd.started)
      closed = self.core.close_round(opened, stacked, weights, client_metrics, evaluate,
                                     train_loss=train_loss)
      row.update(closed.traffic)
      row.update(closed.stats)
      evaluated, sparsity = closed.evaluated, closed.sparsity
    else:
      log.error("round %d: no client's uplink was accepted; the global model is unchanged", t)
      train_loss = float("nan")
      # The ledger counts accepted clients only, so here no bits either way (the downlink that
      # was broadcast is in downlink_bytes_sent) and bits per weight are undefined: NaN, left
      # out of the summary's bpp means (`records.summary`).
      row.update({"uplink_bits": 0, "downlink_bits": 0,
                  **{f"{d}_{k}bpp": float("nan") for d in ("uplink", "downlink")
                     for k in ("", "total_")}})
      evaluated, sparsity = evaluate(self.state), metrics_lib.sparsity(rnd.downlink)
      if not math.isfinite(evaluated["test_loss"]):
        raise rounds.diverged(t, {"train": train_loss, "test": evaluated["test_loss"]})
    row.update({
        **evaluated,
        "train_loss": train_loss,
        # Payload bytes that crossed the transport (wire.encode output, no transport framing).
        "downlink_message_bytes": int(rnd.message.size),
        "downlink_bytes_sent": int(rnd.message.size) * len(ids),
        "uplink_bytes_received": received,
        "uplink_bytes_accepted": accepted_bytes,
        "sparsity": sparsity,
        "wall_seconds": time.time() - rnd.started,
    })
    return row

  def eval_variables(self) -> Any:
    return self.core.eval_variables()


class Client:
  """One process's client side: local training of whichever client id a message names."""

  def __init__(self, config: ml_collections.ConfigDict, job: rounds.Job | None = None):
    """`job`: `rounds.build_job` of a config that differs from `config` in where its data set is
    read from only (`cache.data_config`); built from `config` when None."""
    # A deployment evaluates the test set every round (no validation split, no schedule).
    check(config.eval_every == 1, "eval_every", "1 in a Flower deployment (it evaluates every "
          "round)", config.eval_every)
    check(config.eval_test, "eval_test", "True in a Flower deployment", config.eval_test)
    self.config = config
    self.job = job = rounds.build_job(config) if job is None else job
    # One client per message: its steps run on this process's first device only.
    self._runner = parallel.make_runner(config.parallel, job.local, config.unroll, client_devices=1)
    self._data = self._runner.place(TrainData(job.dataset.x_train, job.dataset.y_train))
    self._init = jax.jit(job.algorithm.init_client)
    self.state_spec = payload_lib.spec_of(
        jax.eval_shape(job.algorithm.init_client, job.k_clients, job.variables))
    # What a downlink may claim in all: the elements of the broadcast's shapes (traced, not run).
    selected = jax.ShapeDtypeStruct((config.clients_per_round or config.num_clients,), jnp.float32)
    server = jax.eval_shape(job.algorithm.init, job.k_server, job.variables)
    self.downlink_elements = payload_lib.num_elements(payload_lib.spec_of(jax.eval_shape(
        job.algorithm.broadcast, server, job.k_rounds, RoundInfo(selected, selected))))

  def previous_round(self, t: int, client_id: int) -> int | None:
    """The last round before t that selected `client_id` (whose state it starts round t from);
    None when round t is its first."""
    c = self.config
    for r in range(t - 1, -1, -1):
      if int(client_id) in rounds.sample_clients(c.seed, r, c.num_clients, c.clients_per_round):
        return r
    return None

  def initial_state(self, client_id: int) -> Any:
    """Client `client_id`'s state before its first round, as the simulator creates it."""
    state = self._init(jax.random.fold_in(self.job.k_clients, int(client_id)), self.job.variables)
    return jax.tree.map(np.asarray, jax.device_get(state))

  def train(self, t: int, client_id: int, downlink: Any, state: Any
            ) -> tuple[np.ndarray, dict, Any]:
    """Client `client_id`'s round t from the downlink's bytes (or uint8 array).

    Returns (uplink as a uint8 array, {"loss_sum", "count"} as floats, new state on the host).
    Raises PayloadError for a downlink that does not decode, ValueError when the client is not
    selected in round t.
    """
    plan = rounds.plan_round(self.config, self.job, t)
    where = np.flatnonzero(plan.ids == int(client_id))
    if not where.size:
      raise ValueError(f"client {client_id} is not selected in round {t} "
                       f"(selected: {plan.ids.tolist()})")
    i = int(where[0])
    # On device 0, committed, as the simulator's broadcast leaves it: the same placement, so the
    # same compiled programs (and entries of JAX's persistent compilation cache).
    decoded = jax.device_put(payload_lib.from_array(downlink, "downlink",
                                                    max_elements=self.downlink_elements),
                             jax.local_devices()[0])
    stacked = jax.tree.map(lambda x: np.asarray(x)[None], state)
    uplinks, states, metrics = self._runner.run(decoded, stacked, plan.idx[i:i + 1],
                                                plan.mask[i:i + 1], plan.keys[i:i + 1], self._data)
    metrics = jax.device_get(metrics)
    new_state = jax.tree.map(lambda x: np.asarray(x[0]), states)
    return (payload_lib.to_array(wire.unstack(uplinks, 0), self.config.wire_codec),
            {"loss_sum": float(metrics["loss_sum"][0]), "count": float(metrics["count"][0])},
            new_state)


class StateFiles:
  """One client's persistent state on its own disk, so that it outlives the process that trained
  it, the SuperNode and the Flower run (a restarted server is a new run, and Flower gives every
  run a fresh ``Context.state``).

  ``<directory>/<run_key>/client-<id>/round-<t>.state`` holds the `wire.encode` bytes of the state
  after the client's round t, written to a temporary file and renamed (a killed writer leaves the
  previous file). The newest `KEEP` are kept: the server checkpoints every round before it starts
  the next, so it resumes at most one round behind the newest round a client trained, and the
  state before any round it can ask for again is among them.
  """

  KEEP = 2
  _NAME = re.compile(r"round-(\d+)\.state")

  def __init__(self, directory: str, run_key: str, client_id: int):
    if not re.fullmatch(r"[0-9a-f]{32}", run_key):
      raise ValueError(f"run-key: must be 32 lowercase hex digits, got {run_key[:40]!r}")
    self.directory = os.path.join(os.path.abspath(directory), run_key, f"client-{int(client_id)}")

  def rounds(self) -> list[int]:
    """The rounds whose state is on disk, ascending."""
    if not os.path.isdir(self.directory):
      return []
    found = (self._NAME.fullmatch(name) for name in os.listdir(self.directory))
    return sorted(int(m.group(1)) for m in found if m)

  def newest_before(self, t: int) -> tuple[int, np.ndarray] | None:
    """(r, the state bytes after round r) for the newest stored r < t, or None."""
    for r in reversed(self.rounds()):
      if r < t:
        return r, np.fromfile(self._path(r), np.uint8)
    return None

  def save(self, t: int, data: np.ndarray) -> None:
    """Stores the state after round t (a uint8 array) and drops all but the newest `KEEP`."""
    os.makedirs(self.directory, exist_ok=True)
    tmp = f"{self._path(t)}.tmp{os.getpid()}"
    np.ascontiguousarray(data, np.uint8).tofile(tmp)
    os.replace(tmp, self._path(t))
    for r in self.rounds()[:-self.KEEP]:
      try:
        os.remove(self._path(r))
      except FileNotFoundError:  # another process of this client removed it first
        pass

  def _path(self, t: int) -> str:
    return os.path.join(self.directory, f"round-{int(t)}.state")
