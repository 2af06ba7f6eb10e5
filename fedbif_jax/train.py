"""The simulator's round loop: `train_and_evaluate(config, workdir)`.

Per round t (all randomness derived from ``config.seed`` and t, so a resumed run replays the
exact same rounds):

1. sample clients (all of them, or ``clients_per_round`` uniformly without replacement);
2. ``downlink = algorithm.broadcast(server_state, key_t, info)``;
3. build the round's padded schedule on the host and run the clients with the backend of
   `fedbif_jax/parallel.py`; client states persist per client id on the host;
4. ``server_state = algorithm.aggregate(...)`` with uniform or data-size client weights;
5. evaluate the global model on the whole test set; count the bytes of the payloads that were
   actually produced, as `wire.encode` would write them with ``wire_codec`` (`wire.coded_sizes`:
   the downlink, sent to every selected client, and each client's uplink; from shapes alone when
   packed), and the bpp over the compressed weights (`wire.weight_bits`; with the entropy codec
   also the coded and the empirical-entropy bpp); every ``wire_check_every`` rounds really
   encode and decode them (`wire.verify`); append a line to ``metrics.jsonl``;
6. every ``checkpoint_every`` rounds, write an orbax checkpoint (atomic: written to a temporary
   directory and renamed), so a killed run resumes from its last complete checkpoint.

The workdir holds ``config.json``, ``metrics.jsonl``, ``summary.json``, ``curves.png`` and
``checkpoints/``. In a multi-process job (`jax.distributed`, started by launch.py) every process
runs this loop; clients are sharded over the global device mesh, and only process 0 writes.

The round itself is `fedbif_jax/rounds.py`'s (`build_job`, `plan_round`, `rounds.Server`: steps
1, 2, 4 and the ledger of 5), shared with the Flower deployment (`fedbif_jax/deploy/`) and the
benchmarks; the rows and the summary are written with `fedbif_jax/records.py`. This module owns
the simulator's loop (client states on the host, evaluation schedule, Lipschitz probe, wire
checks, checkpoints, progress lines) and how a run's workdir is resumed; public for the
deployment's server, which resumes the same way: `check_resumable` (and `RESUMABLE_CHANGES`),
`check_writable`, `checkpoint_manager`; and for users: `train_and_evaluate`, `load_global`,
`TrainingDiverged` (defined in `rounds`).
"""
from __future__ import annotations

import contextlib
import json
import os
import sys
import time
from typing import Any, Callable, NamedTuple, Sequence

import logging

import jax
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

from fedbif_jax import metrics as metrics_lib
from fedbif_jax import parallel
from fedbif_jax import plots
from fedbif_jax import records
from fedbif_jax import rounds
from fedbif_jax import wire
from fedbif_jax.algorithms import get_algorithm
from fedbif_jax.client import TrainData
from fedbif_jax.errors import ConfigError
from fedbif_jax.rounds import TrainingDiverged  # noqa: F401 - raised by train_and_evaluate

log = logging.getLogger("fedbif_jax")

# Fields a resumed run may change: where things are and how they run, and `rounds` (extending
# a finished or interrupted run); every other change would mix two runs in one metrics.jsonl.
RESUMABLE_CHANGES = frozenset({
    "rounds", "checkpoint_every", "wire_check_every", "eval_batch_size", "parallel", "unroll",
    "client_devices", "cpu_devices", "data.path", "data.data_dir", "distributed.enabled",
    "distributed.coordinator_address", "distributed.num_processes", "distributed.process_id"})


def config_changes(stored: dict, now: dict, prefix: str = "") -> list[str]:
  """Dotted names of the fields that differ between two config dicts (nested), sorted."""
  changed = []
  for k in sorted(set(stored) | set(now)):
    a, b = stored.get(k), now.get(k)
    if isinstance(a, dict) and isinstance(b, dict):
      changed += config_changes(a, b, f"{prefix}{k}.")
    elif a != b:
      changed.append(prefix + k)
  return changed


def _with_defaults(stored: dict, default: dict) -> dict:
  """`stored` (a config.json) with every field it lacks taken from `default` (base_config's):
  a field added to the library after a run was made was used by that run at its default."""
  merged = dict(default)
  for key, value in stored.items():
    merged[key] = (_with_defaults(value, default[key])
                   if isinstance(value, dict) and isinstance(default.get(key), dict) else value)
  return merged


def check_resumable(workdir: str, config: ml_collections.ConfigDict) -> None:
  """Refuses to continue a run in `workdir` that was made with another config (apart from
  `RESUMABLE_CHANGES`, and fields added to the library since, at their defaults); a workdir
  without a config.json is new. Raises ConfigError naming the changed fields."""
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    stored = json.load(f)
  from fedbif_jax.config import base_config  # pylint: disable=import-outside-toplevel
  stored = _with_defaults(stored, json.loads(base_config().to_json_best_effort()))
  changed = [k for k in config_changes(stored, json.loads(config.to_json_best_effort()))
             if k not in RESUMABLE_CHANGES]
  if changed:
    raise ConfigError(f"workdir: {workdir} holds a run made with another config (changed: "
                      f"{', '.join(changed)}); use a fresh --workdir, or the same config to "
                      "resume it")


class _Store:
  """Persistent client states on the host, keyed by client id, created on first selection."""

  def __init__(self, init_client, variables, key):
    self._init = jax.jit(init_client)
    self._variables = variables
    self._key = key
    self.states: dict[int, Any] = {}

  def gather(self, ids) -> Any:
    for c in ids:
      if int(c) not in self.states:
        state = self._init(jax.random.fold_in(self._key, int(c)), self._variables)
        self.states[int(c)] = jax.tree.map(np.asarray, jax.device_get(state))
    return jax.tree.map(lambda *xs: np.stack(xs), *[self.states[int(c)] for c in ids])

  def scatter(self, ids, stacked) -> None:
    for i, c in enumerate(ids):
      self.states[int(c)] = jax.tree.map(lambda x: x[i], stacked)

  def nbytes(self) -> int:
    """Host memory held by the client states."""
    return int(sum(x.nbytes for s in self.states.values() for x in jax.tree.leaves(s)))

  def to_checkpoint(self) -> dict:
    """All states stacked leaf-wise with their ids: a few large arrays, not one per client."""
    ids = sorted(c for c, s in self.states.items() if jax.tree.leaves(s))
    if not ids:
      return {}
    return {"ids": np.asarray(ids, np.int64), "states": self.gather(ids)}

  def from_checkpoint(self, saved: dict) -> None:
    self.states = {}
    if saved:
      self.scatter(np.asarray(saved["ids"]), saved["states"])


def checkpoint_manager(workdir: str, read_only: bool = False) -> ocp.CheckpointManager:
  """The orbax manager of ``<workdir>/checkpoints``: step N holds the state after N rounds; orbax
  writes each step to a temporary directory and renames it when complete (a killed writer
  leaves no half checkpoint), and the last 2 steps are kept. `read_only`: for readers, it
  neither creates the directory nor deletes old steps."""
  return ocp.CheckpointManager(
      os.path.join(os.path.abspath(workdir), "checkpoints"),
      options=ocp.CheckpointManagerOptions(max_to_keep=2, create=not read_only,
                                           read_only=read_only))


def check_writable(workdir: str) -> None:
  """Raises a one-line ConfigError unless a file can be created in `workdir` (read-only mount,
  no permission, full disk), before any work is done."""
  probe = os.path.join(workdir, f".write_probe_{os.getpid()}")
  try:
    with open(probe, "w") as f:
      f.write("x")
    os.remove(probe)
  except OSError as e:
    raise ConfigError(f"workdir: must be writable, cannot create a file in {workdir!r} "
                      f"({e.strerror})") from None


def _os_error(error: BaseException) -> OSError | None:
  """The OSError behind `error` (itself, or its cause/context chain: orbax wraps I/O errors)."""
  seen = set()
  while error is not None and id(error) not in seen:
    if isinstance(error, OSError):
      return error
    seen.add(id(error))
    error = error.__cause__ or error.__context__
  return None


@contextlib.contextmanager
def _workdir_io(workdir: str, doing: str, manager: ocp.CheckpointManager | None):
  """Turns an I/O failure while `doing` (a full disk, a vanished or read-only workdir) into one
  ConfigError line saying which checkpoint is intact and how to go on: orbax renames a step into
  place only when it is complete, so the previous one survives a failed write."""
  try:
    yield
  except Exception as e:  # pylint: disable=broad-except
    cause = _os_error(e)
    if cause is None:
      raise
    latest = None
    if manager is not None:
      try:
        latest = manager.latest_step()
      except Exception:  # pylint: disable=broad-except
        latest = None
    kept = (f"the round-{latest} checkpoint in {manager.directory} is intact; "
            "free space and rerun the same command to resume from it" if latest is not None
            else "no checkpoint was written yet")
    raise ConfigError(f"workdir: {doing} in {workdir!r} failed ({cause.strerror or cause}); "
                      f"{kept}") from None


def _format_eta(seconds: float) -> str:
  seconds = int(round(seconds))
  return f"{seconds // 60}m{seconds % 60:02d}s"


class TrainResult(NamedTuple):
  """What `train_and_evaluate` returns: the summary (as in summary.json) and the final global
  model's variables (host numpy arrays: ``{"params": ..., "batch_stats": ...}``, what
  ``model.apply`` takes)."""
  summary: dict
  variables: Any


class GlobalModel(NamedTuple):
  """`load_global`'s answer: the run's config and its global model's variables after `round`
  rounds. The module they belong to is ``models.get_model(config.model.name, num_classes)``."""
  config: ml_collections.ConfigDict
  variables: Any
  round: int


def load_global(workdir: str, step: int | None = None) -> GlobalModel:
  """The global model of a run's workdir, from its newest checkpoint (or the one after `step`
  rounds), with the config it was trained with (``config.json``), without loading its data.

  Raises:
    ConfigError: no config.json or no checkpoint in `workdir` (one line).
  """
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    raise ConfigError(f"workdir: {workdir!r} holds no config.json (not a run's workdir)")
  with open(path) as f:
    config = ml_collections.ConfigDict(json.load(f))
  if not os.path.isdir(os.path.join(workdir, "checkpoints")):
    raise ConfigError(f"workdir: {workdir!r} has no checkpoints/ (checkpoint_every was 0?)")
  manager = checkpoint_manager(workdir, read_only=True)
  steps = manager.all_steps()
  if not steps or (step is not None and step not in steps):
    raise ConfigError(f"workdir: {manager.directory} has no checkpoint"
                      + (f" after round {step} (kept: {sorted(steps)})" if steps and step else "")
                      + (" (checkpoint_every was 0?)" if not steps else ""))
  step = max(steps) if step is None else step
  restored = manager.restore(step, args=ocp.args.StandardRestore())
  if "server" not in restored:
    raise ConfigError(f"workdir: {manager.directory} holds another kind of checkpoint")
  variables = get_algorithm(config).eval_variables(restored["server"])
  return GlobalModel(config, jax.device_get(variables), int(step))


@contextlib.contextmanager
def progress_logging():
  """Makes the round lines (INFO on the ``fedbif_jax`` logger) visible when the caller has not
  set logging up: from a notebook or a script, as from launch.py. A level the caller set on the
  logger is kept; without any handler up the logger tree (a bare Python process), one that
  prints to stdout is attached for the call. Restored afterwards."""
  added = None
  level = log.level
  if level == logging.NOTSET:
    log.setLevel(logging.INFO)
  if not log.hasHandlers():
    added = logging.StreamHandler(sys.stdout)
    added.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(added)
  try:
    yield
  finally:
    log.setLevel(level)
    if added is not None:
      log.removeHandler(added)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str,
                       callbacks: Sequence[Callable[[dict], None]] = ()) -> TrainResult:
  """Runs (or resumes) a federated training job.

  Args:
    config: a config from ``configs/`` or `fedbif_jax.config.base_config` (validated before any
      data is read).
    workdir: where config.json, metrics.jsonl, summary.json, curves.png and checkpoints/ go; a
      workdir with a run of the same config resumes it.
    callbacks: each called with every round's metrics.jsonl row (a dict) after it is written,
      on process 0 (e.g. a TensorBoard or W&B writer, or a list's append).
  Returns:
    `TrainResult`: the summary and the final global model's variables.
  Raises:
    ConfigError: bad configuration (message names the field).
    TrainingDiverged: a NaN/inf loss; the last good checkpoint is kept.
  """
  with progress_logging():
    return _train_and_evaluate(config, workdir, tuple(callbacks))


def _train_and_evaluate(config, workdir: str, callbacks: tuple) -> TrainResult:
  job = rounds.build_job(config)  # validates the config first
  try:
    os.makedirs(workdir, exist_ok=True)
  except OSError as e:
    raise ConfigError(f"workdir: must be a directory that exists or can be made, got {workdir!r} "
                      f"({e.strerror})") from None
  check_writable(workdir)
  check_resumable(workdir, config)
  algorithm, dataset = job.algorithm, job.dataset
  # Multi-process jobs (jax.distributed): every process runs this loop on the same inputs; only
  # process 0 writes files (orbax coordinates the checkpoint writes itself).
  writer = jax.process_index() == 0
  multi_process = jax.process_count() > 1
  if writer:
    with _workdir_io(workdir, "writing config.json", None):
      with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2, sort_keys=True))

  server = rounds.Server.of_job(config, job)  # its state on this process's first device
  store = _Store(algorithm.init_client, job.variables, job.k_clients)

  runner = parallel.make_runner(config.parallel, job.local, config.unroll,
                                  config.client_devices)
  probe = (metrics_lib.make_lipschitz_probe(job.model, algorithm.eval_variables,
                                            dataset.x_train.shape[1:], config.lipschitz_iterations)
           if config.lipschitz_every else None)
  evaluators = {}  # metrics.jsonl key prefix -> evaluate(server_state)
  if config.eval_test:
    evaluators["test"] = metrics_lib.make_evaluator(job.model, algorithm.eval_variables, dataset,
                                                    config.eval_batch_size)
  if len(dataset.y_val):
    evaluators["validation"] = metrics_lib.make_evaluator(
        job.model, algorithm.eval_variables, dataset, config.eval_batch_size, "validation")
  train_data = runner.place(TrainData(dataset.x_train, dataset.y_train))

  def evaluate(state) -> dict:
    evaluated = {}
    for split, evaluator in evaluators.items():
      evaluated[f"{split}_accuracy"], evaluated[f"{split}_loss"] = evaluator(state)
    return evaluated

  # Resume from the last complete checkpoint, if any.
  manager = checkpoint_manager(workdir)
  ckpt_dir = str(manager.directory)
  start_round = 0
  if manager.latest_step() is not None:
    restored = manager.restore(manager.latest_step(), args=ocp.args.StandardRestore())
    if set(restored) != {"server", "clients"}:
      raise ConfigError(f"workdir: {ckpt_dir} holds another kind of checkpoint (entries "
                        f"{', '.join(sorted(restored))}; a Flower deployment's?): resume it with "
                        "the program that wrote it, or use another workdir")
    server.restore(restored["server"])
    store.from_checkpoint(restored["clients"])
    start_round = int(manager.latest_step())
    log.info("resumed from %s at round %d", ckpt_dir, start_round)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  histograms_path = os.path.join(workdir, "histograms.jsonl")
  if writer:
    rows = records.rewind_jsonl(metrics_path, start_round)
    if os.path.exists(histograms_path):
      records.rewind_jsonl(histograms_path, start_round)
  else:
    rows = records.read_rounds(metrics_path, start_round)

  # The untrained global model's bound, the reference that learned bounds are compared with.
  untrained_lipschitz = (probe(server.state, jax.random.fold_in(job.k_server, 1))[0]
                         if probe and start_round == 0 else None)
  cum_up = int(rows[-1]["cumulative_uplink_bytes"]) if rows else 0
  cum_down = int(rows[-1]["cumulative_downlink_bytes"]) if rows else 0
  t_first_done = None  # the end of this process's first round, which includes the compiles
  for t in range(start_round, config.rounds):
    rnd = server.open_round(t)
    ids = rnd.plan.ids
    uplinks, new_states, client_metrics = runner.run(rnd.downlink, store.gather(ids),
                                                      rnd.plan.idx, rnd.plan.mask, rnd.plan.keys,
                                                      train_data)
    due = (t + 1) % config.eval_every == 0 or t + 1 == config.rounds
    try:
      closed = server.close_round(rnd, uplinks, rnd.plan.info.weights, client_metrics,
                                  evaluate if due else None)
    except TrainingDiverged as e:
      manager.wait_until_finished()
      raise TrainingDiverged(
          f"{e}" + (f", the last checkpoint (round {manager.latest_step()}) in {ckpt_dir} is "
                    "intact; " if manager.latest_step() is not None else
                    " before any checkpoint was written; ") + "try a smaller lr") from None
    evaluated, train_loss, sent = closed.evaluated, closed.train_loss, closed.traffic
    store.scatter(ids, new_states)

    if config.wire_check_every and t % config.wire_check_every == 0:
      wire.verify(rnd.downlink, "downlink", config.wire_codec)
      for i in range(len(ids)):
        wire.verify(wire.unstack(uplinks, i), f"uplink of client {int(ids[i])}", config.wire_codec)
    cum_down += sent["downlink_bits"] // 8
    cum_up += sent["uplink_bits"] // 8
    row = {
        "round": t,
        **evaluated,
        "train_loss": train_loss,
        **sent,
        "cumulative_uplink_bytes": cum_up,
        "cumulative_downlink_bytes": cum_down,
        "cumulative_bytes": cum_up + cum_down,
        "sparsity": closed.sparsity,
        **closed.stats,
        "client_state_bytes": store.nbytes(),
        "wall_seconds": time.time() - rnd.started,
    }
    if t == 0 and untrained_lipschitz is not None:
      row["lipschitz_untrained"] = untrained_lipschitz
    if probe and (t % config.lipschitz_every == 0 or t + 1 == config.rounds):
      row["lipschitz"], histogram = probe(server.state, jax.random.fold_in(rnd.plan.round_key, 2))
      if writer:
        records.append_jsonl(histograms_path, {"round": t, **histogram})
    rows.append(row)
    if writer:
      with _workdir_io(workdir, f"appending round {t} to metrics.jsonl", manager):
        records.append_jsonl(metrics_path, row)
    for callback in callbacks:
      callback(row)
    done = t + 1 - start_round
    if t_first_done is None:  # its compile time would inflate every estimate: none yet
      t_first_done, eta = time.time(), "-"
    else:
      eta = _format_eta((time.time() - t_first_done) / (done - 1) * (config.rounds - t - 1))
    shown = "".join(f"  {name} {evaluated[key]:.4f}" for name, key in (
        ("acc", "test_accuracy"), ("loss", "test_loss"), ("val acc", "validation_accuracy"))
        if key in evaluated)
    coded = ("  coded up %.3f down %.3f bpp (entropy %.3f / %.3f)" % tuple(
        row[f"{d}_{k}_bpp"] for k in ("coded", "entropy") for d in ("uplink", "downlink"))
             if "uplink_coded_bpp" in row else "")
    log.info("round %d/%d%s  train %.4f  up %.3f bpp  down %.3f bpp%s  sent %.2f MB  "
             "sparsity %.3f  %.1fs  eta %s", t + 1, config.rounds, shown, train_loss,
             row["uplink_bpp"], row["downlink_bpp"], coded, (cum_up + cum_down) / 1e6,
             row["sparsity"], row["wall_seconds"], eta)
    last = t + 1 == config.rounds
    if config.checkpoint_every and ((t + 1) % config.checkpoint_every == 0 or last):
      # Across processes, host copies: every process holds the same values, process 0 writes.
      server_saved = jax.device_get(server.state) if multi_process else server.state
      with _workdir_io(workdir, f"writing the round-{t + 1} checkpoint", manager):
        manager.save(t + 1, args=ocp.args.StandardSave({"server": server_saved,
                                                         "clients": store.to_checkpoint()}))
  with _workdir_io(workdir, "finishing the last checkpoint", manager):
    manager.wait_until_finished()

  summary = records.summary(rows, config)
  if writer:
    with _workdir_io(workdir, "writing summary.json", manager):
      records.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
    plots.plot_runs({config.algorithm: rows}, os.path.join(workdir, "curves.png"),
                    title=plots.run_title(config))
  log.info("summary: %s", json.dumps(summary))
  return TrainResult(summary, jax.device_get(server.eval_variables()))
