"""The round loop: `train_and_evaluate(config, workdir)`, the one place rounds happen.

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

What a run derives from its config (`build_job`: data, partition, model, algorithm, local
training, initial variables, keys), the plan of round t (`plan_round`: steps 1 and 3's clients,
weights, schedule and keys; `sample_clients`: step 1 alone) and the traffic figures of step 5
(`traffic`) are public so that the Flower deployment (`fedbif_jax/deploy/`) computes the very
same rounds in other processes; so is how a run is resumed (`check_resumable`,
`checkpoint_manager`, `rewind_jsonl`, `write_json_atomic`), so that a deployment's server resumes
the same way.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import sys
import time
from typing import Any, Callable, NamedTuple, Sequence

import logging

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import orbax.checkpoint as ocp

from fedbif_jax import data as data_lib
from fedbif_jax import metrics as metrics_lib
from fedbif_jax import parallel
from fedbif_jax import plots
from fedbif_jax import pytrees
from fedbif_jax import records
from fedbif_jax import wire
from fedbif_jax import xla_options
from fedbif_jax.algorithms import get_algorithm
from fedbif_jax.algorithms.base import Algorithm, RoundInfo
from fedbif_jax.client import LocalTraining, TrainData, make_local_training
from fedbif_jax.errors import ConfigError, check, check_positive_number
from fedbif_jax.models import MODELS, bit_trained_predicate, get_model

log = logging.getLogger("fedbif_jax")

AGGREGATION_WEIGHTS = ("uniform", "data_size")


class TrainingDiverged(RuntimeError):
  """A round produced a NaN or infinite loss; the run stops and keeps its last checkpoint."""


def validate_config(config: ml_collections.ConfigDict) -> None:
  """Checks the engine's fields; raises ConfigError naming the first bad field."""
  def positive_int(field, value, lo=1):
    check(isinstance(value, int) and not isinstance(value, bool) and value >= lo, field,
          f"an integer >= {lo}", value)

  positive_int("rounds", config.rounds)
  positive_int("num_clients", config.num_clients)
  positive_int("local_epochs", config.local_epochs)
  positive_int("batch_size", config.batch_size)
  positive_int("eval_batch_size", config.eval_batch_size)
  positive_int("eval_every", config.eval_every)
  check(isinstance(config.eval_test, bool), "eval_test", "True or False", config.eval_test)
  check(config.eval_test or config.data.validation != 0, "eval_test",
        "True unless data.validation > 0 (a run must evaluate on something)", config.eval_test)
  positive_int("checkpoint_every", config.checkpoint_every, lo=0)
  positive_int("lipschitz_every", config.lipschitz_every, lo=0)
  positive_int("lipschitz_iterations", config.lipschitz_iterations)
  positive_int("unroll", config.unroll)
  positive_int("client_devices", config.client_devices, lo=0)
  positive_int("cpu_devices", config.cpu_devices, lo=0)
  positive_int("wire_check_every", config.wire_check_every, lo=0)
  check(config.wire_codec in wire.CODECS, "wire_codec", f"one of {', '.join(wire.CODECS)}",
        config.wire_codec)
  cpr = config.clients_per_round
  check(isinstance(cpr, int) and (cpr == 0 or 1 <= cpr <= config.num_clients), "clients_per_round",
        f"0 (all) or an integer in 1..num_clients={config.num_clients}", cpr)
  check_positive_number("lr", config.lr)
  check(config.aggregation_weights in AGGREGATION_WEIGHTS, "aggregation_weights",
        f"one of {', '.join(AGGREGATION_WEIGHTS)}", config.aggregation_weights)
  parallel.resolve_backend(config.parallel)
  check(config.data.source in data_lib.SOURCES, "data.source",
        f"one of {', '.join(data_lib.SOURCES)}", config.data.source)
  check(config.model.name in MODELS, "model.name", f"one of {', '.join(sorted(MODELS))}",
        config.model.name)
  check(config.data.augment in data_lib.AUGMENTATIONS, "data.augment",
        f"one of {', '.join(data_lib.AUGMENTATIONS)}", config.data.augment)
  check(config.data.partition in data_lib.PARTITIONS, "data.partition",
        f"one of {', '.join(data_lib.PARTITIONS)}", config.data.partition)
  check(isinstance(config.data.mu, (int, float)) and config.data.mu > 0, "data.mu",
        "a number > 0 (the Dirichlet concentration)", config.data.mu)
  if config.data.source == "npz":
    check(bool(config.data.path), "data.path", "the path of an .npz file (--config.data.path=...)",
          config.data.path)


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


def sample_clients(seed: int, round_index: int, num_clients: int, per_round: int) -> np.ndarray:
  """The ids selected in round `round_index`, ascending (a pure function of its arguments)."""
  if per_round in (0, num_clients):
    return np.arange(num_clients)
  rng = np.random.default_rng([seed, 2, round_index])
  return np.sort(rng.choice(num_clients, per_round, replace=False))



class Job(NamedTuple):
  """Everything a run derives from its config alone, the same in every process that builds it
  (this simulator; the server and each client of `fedbif_jax/deploy/`)."""
  dataset: data_lib.Dataset
  parts: list                 # each client's training indices (int arrays), by client id
  sizes: np.ndarray           # int [num_clients], len(parts[c])
  model: Any                  # the Flax module
  predicate: Any              # which params are compressed ("weights")
  algorithm: Algorithm
  local: LocalTraining        # the shared local training of `fedbif_jax/client.py`
  variables: Any              # the initial Flax variables
  num_weights: int            # number of compressed weights: the bpp denominator
  k_server: jax.Array         # algorithm.init's key
  k_clients: jax.Array        # client c's init_client key is fold_in(k_clients, c)
  k_rounds: jax.Array         # round t's key is fold_in(k_rounds, t)
  max_steps: int              # every round's schedule is padded to this many steps


class RoundPlan(NamedTuple):
  """Round t as the server decides it before broadcasting (steps 1-3 of the module docstring)."""
  ids: np.ndarray             # int [C], the selected client ids, ascending
  info: RoundInfo             # their aggregation weights and example counts (float32 [C])
  round_key: jax.Array        # fold_in(k_rounds, t)
  broadcast_key: jax.Array    # algorithm.broadcast's key
  idx: np.ndarray             # int32 [C, max_steps, B], the padded batch schedule
  mask: np.ndarray            # float32 [C, max_steps, B]
  keys: jax.Array             # PRNG keys [C], client i's local-training key


def build_job(config: ml_collections.ConfigDict) -> Job:
  """Loads the data, partitions it, builds the model, the algorithm and its local training, and
  initialises the variables, all seeded by ``config.seed``. Raises ConfigError on bad input
  before any data is read (the engine's fields, then the algorithm's own section)."""
  validate_config(config)
  get_algorithm(config)  # its fields checked now: a bad one must not wait for a data download
  dataset = data_lib.load_dataset(
      config.data.source, name=config.data.name, path=config.data.path,
      data_dir=config.data.data_dir or None, train_subset=config.data.train_subset,
      subset_seed=config.seed, test_subset=config.data.test_subset,
      normalization=config.data.normalization, validation=config.data.validation)
  parts = data_lib.partition(config.data.partition, dataset.y_train, config.num_clients,
                             np.random.default_rng(config.seed), mu=config.data.mu,
                             min_size=config.data.min_size)
  log.info("data %s: %d train / %d validation / %d test; %s", dataset.name,
           len(dataset.y_train), len(dataset.y_val), len(dataset.y_test),
           data_lib.describe_partition(parts, dataset.y_train, dataset.num_classes))
  model = get_model(config.model.name, dataset.num_classes)
  predicate = bit_trained_predicate(model, (1,) + dataset.x_train.shape[1:],
                                    config.fedbif.full_precision_first_last)
  algorithm = get_algorithm(config, predicate)
  key = jax.random.key(config.seed)
  k_model, k_server, k_clients, k_rounds = jax.random.split(key, 4)
  sample = jnp.zeros((1,) + dataset.x_train.shape[1:], jnp.float32)
  variables = jax.jit(lambda k: model.init(k, sample, train=False))(k_model)
  num_weights = sum(x.size for x in jax.tree.leaves(
      pytrees.split_params(variables["params"], predicate)[0]))
  local = make_local_training(algorithm, model, optax.sgd(config.lr), dataset.mean, dataset.std,
                              augment=config.data.augment)
  sizes = np.array([len(p) for p in parts])
  max_steps = config.local_epochs * data_lib.steps_per_epoch(int(sizes.max()), config.batch_size)
  return Job(dataset, parts, sizes, model, predicate, algorithm, local, variables, num_weights,
             k_server, k_clients, k_rounds, max_steps)


def plan_round(config: ml_collections.ConfigDict, job: Job, t: int) -> RoundPlan:
  """Round t's clients, weights, padded batch schedule and keys (a pure function of the config,
  the job and t, so a resumed run or another process computes the same plan)."""
  round_key = jax.random.fold_in(job.k_rounds, t)
  ids = sample_clients(config.seed, t, config.num_clients, config.clients_per_round)
  sizes = job.sizes
  if config.aggregation_weights == "uniform":
    weights = np.full(len(ids), 1.0 / len(ids), np.float32)
  else:
    weights = (sizes[ids] / sizes[ids].sum()).astype(np.float32)
  info = RoundInfo(jnp.asarray(weights), jnp.asarray(sizes[ids], jnp.float32))
  idx, mask = data_lib.round_batches([job.parts[c] for c in ids], config.batch_size,
                                     config.local_epochs,
                                     np.random.default_rng([config.seed, 1, t]))
  idx, mask = parallel.pad_steps(idx, mask, job.max_steps)  # fixed shapes: no recompilation
  keys = jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.fold_in(round_key, 1),
                                                         jnp.asarray(ids))
  return RoundPlan(ids, info, round_key, jax.random.fold_in(round_key, 0), idx, mask, keys)


def traffic(downlink: Any, uplinks: Any, num_weights: int, codec: str = "packed") -> dict:
  """The ledger of one round: bytes as ``wire.encode(payload, codec)`` writes the payloads (the
  downlink once per receiving client, each client's uplink) and bits per compressed weight.

  `uplinks` are stacked over the C receiving clients (leading axis), as the runner returns them.
  Returns the ``metrics.jsonl`` fields uplink_bits, downlink_bits (8 x bytes, all clients),
  uplink_bpp, downlink_bpp (weights only, at their packed widths) and uplink_total_bpp,
  downlink_total_bpp (whole messages as coded). With codec entropy (`wire.coded_sizes`: the
  payloads are really encoded) also uplink_coded_bpp, downlink_coded_bpp (the "weights" leaves'
  coded bits, their symbol statistics included) and uplink_entropy_bpp, downlink_entropy_bpp
  (their empirical entropy, `wire.entropy_bits`, the limit of that coding); per compressed weight.
  """
  if codec != "packed":  # sizes and entropy read the values: one device-to-host copy for both
    downlink, uplinks = jax.device_get((downlink, uplinks))
  up = wire.coded_sizes(uplinks, codec, stacked=True)   # one message per client
  down = wire.coded_sizes(downlink, codec)              # one message, sent to each client
  num_clients = len(up.sizes)
  up_bytes, down_bytes = int(up.sizes.sum()), int(down.sizes[0])
  per_up, per_down = num_weights * num_clients, num_weights
  row = {
      "uplink_bits": 8 * up_bytes,
      "downlink_bits": 8 * down_bytes * num_clients,
      "uplink_bpp": wire.weight_bits(uplinks) / per_up,
      "downlink_bpp": wire.weight_bits(downlink) / per_down,
      "uplink_total_bpp": 8 * up_bytes / per_up,
      "downlink_total_bpp": 8 * down_bytes / per_down,
  }
  if codec != "packed":
    row.update({
        "uplink_coded_bpp": up.weight_bits / per_up,
        "downlink_coded_bpp": down.weight_bits / per_down,
        "uplink_entropy_bpp": wire.entropy_bits(uplinks, stacked=True) / per_up,
        "downlink_entropy_bpp": wire.entropy_bits(downlink) / per_down,
    })
  return row


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


def rewind_jsonl(path: str, upto_round: int) -> list[dict]:
  """Keeps the lines of a per-round .jsonl file for rounds < upto_round (a torn last line is
  dropped), rewrites the file with them and returns them: the rounds after a checkpoint are
  redone on resume."""
  rows = _read_metrics(path, upto_round)
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return rows


def _read_metrics(path: str, upto_round: int) -> list[dict]:
  """metrics.jsonl lines for rounds < upto_round (a torn last line is dropped)."""
  return [row for row in records.read_jsonl(path) if row["round"] < upto_round]


def checkpoint_manager(workdir: str) -> ocp.CheckpointManager:
  """The orbax manager of ``<workdir>/checkpoints``: step N holds the state after N rounds; orbax
  writes each step to a temporary directory and renames it when complete (a killed writer
  leaves no half checkpoint), and the last 2 steps are kept."""
  return ocp.CheckpointManager(os.path.join(os.path.abspath(workdir), "checkpoints"),
                               options=ocp.CheckpointManagerOptions(max_to_keep=2))


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


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes JSON through a temporary file and a rename: readers never see half a file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
  os.replace(tmp, path)


def _summary(rows: list[dict], config) -> dict:
  """The run's summary: accuracy (final, best and its round) on each split that was evaluated
  (``final_accuracy``/``best_accuracy`` are the test set's, ``*_validation_accuracy`` the
  held-out validation split's), mean bpp and total bytes."""
  summary = {"algorithm": config.algorithm, "rounds": len(rows)}
  for key, prefix in (("test_accuracy", ""), ("validation_accuracy", "validation_")):
    evaluated = [r for r in rows if key in r]
    if evaluated:
      accs = [r[key] for r in evaluated]
      best = int(np.argmax(accs))
      summary.update({f"final_{prefix}accuracy": accs[-1], f"best_{prefix}accuracy": accs[best],
                      f"best_{prefix}round": evaluated[best]["round"]})
      loss_key = key.replace("accuracy", "loss")
      if loss_key in evaluated[-1]:
        summary[f"final_{prefix}loss"] = evaluated[-1][loss_key]
  summary.update({
      "final_sparsity": rows[-1]["sparsity"],
      "mean_uplink_bpp": float(np.mean([r["uplink_bpp"] for r in rows])),
      "mean_downlink_bpp": float(np.mean([r["downlink_bpp"] for r in rows])),
      "mean_uplink_total_bpp": float(np.mean([r["uplink_total_bpp"] for r in rows])),
      "mean_downlink_total_bpp": float(np.mean([r["downlink_total_bpp"] for r in rows])),
      "total_bytes": int(rows[-1]["cumulative_bytes"]),
      "total_uplink_bytes": int(rows[-1]["cumulative_uplink_bytes"]),
      "total_downlink_bytes": int(rows[-1]["cumulative_downlink_bytes"]),
      "wall_seconds": float(sum(r.get("wall_seconds", 0.0) for r in rows)),
      "environment": environment(),
  })
  summary.update(mean_coded_bpp(rows))
  return summary


def environment() -> dict:
  """What ran the job (summary.json's ``environment``): versions and devices."""
  import platform  # pylint: disable=import-outside-toplevel
  import flax  # pylint: disable=import-outside-toplevel
  from fedbif_jax import __version__  # pylint: disable=import-outside-toplevel
  devices = jax.devices()
  return {"fedbif_jax": __version__, "jax": jax.__version__, "jaxlib": jax.lib.__version__,
          "flax": flax.__version__, "python": platform.python_version(),
          "backend": jax.default_backend(), "device_kind": devices[0].device_kind,
          "devices": len(devices), "processes": jax.process_count()}


CODED_BPP_FIELDS = ("uplink_coded_bpp", "downlink_coded_bpp", "uplink_entropy_bpp",
                    "downlink_entropy_bpp")


def mean_coded_bpp(rows: list[dict]) -> dict:
  """``mean_<field>`` of the entropy codec's bpp fields (`traffic`) over the rows that have them
  (no field for a packed run, whose summary keeps exactly its fields)."""
  return {f"mean_{key}": float(np.mean(values)) for key in CODED_BPP_FIELDS
          if (values := [r[key] for r in rows if key in r])}


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
  manager = checkpoint_manager(workdir)
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
  job = build_job(config)  # validates the config first
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

  # The server's state lives on this process's first device, committed, so that its placement is
  # the same before and after the first aggregation (a changed placement would recompile
  # broadcast/aggregate). In a multi-process job every process computes it, identically.
  server_device = jax.local_devices()[0]
  server_state = jax.device_put(algorithm.init(job.k_server, job.variables), server_device)
  store = _Store(algorithm.init_client, job.variables, job.k_clients)

  runner = parallel.make_runner(config.parallel, job.local, config.unroll,
                                  config.client_devices)
  broadcast = xla_options.jit(algorithm.broadcast, "server")
  aggregate = xla_options.jit(algorithm.aggregate, "server")
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
    server_state = jax.device_put(restored["server"], server_device)
    store.from_checkpoint(restored["clients"])
    start_round = int(manager.latest_step())
    log.info("resumed from %s at round %d", ckpt_dir, start_round)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  histograms_path = os.path.join(workdir, "histograms.jsonl")
  if writer:
    rows = rewind_jsonl(metrics_path, start_round)
    if os.path.exists(histograms_path):
      rewind_jsonl(histograms_path, start_round)
  else:
    rows = _read_metrics(metrics_path, start_round)

  # The untrained global model's bound, the reference that learned bounds are compared with.
  untrained_lipschitz = (probe(server_state, jax.random.fold_in(job.k_server, 1))[0]
                         if probe and start_round == 0 else None)
  cum_up = int(rows[-1]["cumulative_uplink_bytes"]) if rows else 0
  cum_down = int(rows[-1]["cumulative_downlink_bytes"]) if rows else 0
  t_first_done = None  # the end of this process's first round, which includes the compiles
  for t in range(start_round, config.rounds):
    t_round = time.time()
    plan = plan_round(config, job, t)
    ids = plan.ids
    downlink = broadcast(server_state, plan.broadcast_key, plan.info)
    uplinks, new_states, client_metrics = runner.run(downlink, store.gather(ids), plan.idx,
                                                      plan.mask, plan.keys, train_data)
    new_server_state = aggregate(server_state, downlink, uplinks, plan.info.weights,
                                 client_metrics)
    evaluated = {}
    if (t + 1) % config.eval_every == 0 or t + 1 == config.rounds:
      for split, evaluate in evaluators.items():
        evaluated[f"{split}_accuracy"], evaluated[f"{split}_loss"] = evaluate(new_server_state)
    host_metrics = jax.device_get(client_metrics)
    train_loss = float(host_metrics["loss_sum"].sum() / max(host_metrics["count"].sum(), 1.0))
    losses = {"train": train_loss,
              **{k[:-5]: v for k, v in evaluated.items() if k.endswith("_loss")}}
    if not all(math.isfinite(v) for v in losses.values()):
      manager.wait_until_finished()
      raise TrainingDiverged(
          f"round {t}: non-finite loss ({', '.join(f'{k} {v}' for k, v in losses.items())}); "
          + (f"stopped, the last checkpoint (round {manager.latest_step()}) in {ckpt_dir} is "
             "intact; " if manager.latest_step() is not None else
             "stopped before any checkpoint was written; ") + "try a smaller lr")
    server_state = new_server_state
    store.scatter(ids, new_states)

    sent = traffic(downlink, uplinks, job.num_weights, config.wire_codec)
    if config.wire_check_every and t % config.wire_check_every == 0:
      wire.verify(downlink, "downlink", config.wire_codec)
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
        "sparsity": metrics_lib.sparsity(downlink),
        "client_state_bytes": store.nbytes(),
        "wall_seconds": time.time() - t_round,
    }
    if t == 0 and untrained_lipschitz is not None:
      row["lipschitz_untrained"] = untrained_lipschitz
    if probe and (t % config.lipschitz_every == 0 or t + 1 == config.rounds):
      row["lipschitz"], histogram = probe(server_state, jax.random.fold_in(plan.round_key, 2))
      if writer:
        with open(histograms_path, "a") as f:
          f.write(json.dumps({"round": t, **histogram}) + "\n")
    rows.append(row)
    if writer:
      with _workdir_io(workdir, f"appending round {t} to metrics.jsonl", manager):
        with open(metrics_path, "a") as f:
          f.write(json.dumps(row) + "\n")
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
      server_saved = jax.device_get(server_state) if multi_process else server_state
      with _workdir_io(workdir, f"writing the round-{t + 1} checkpoint", manager):
        manager.save(t + 1, args=ocp.args.StandardSave({"server": server_saved,
                                                         "clients": store.to_checkpoint()}))
  with _workdir_io(workdir, "finishing the last checkpoint", manager):
    manager.wait_until_finished()

  summary = _summary(rows, config)
  if writer:
    with _workdir_io(workdir, "writing summary.json", manager):
      write_json_atomic(os.path.join(workdir, "summary.json"), summary)
    plots.plot_runs({config.algorithm: rows}, os.path.join(workdir, "curves.png"),
                    title=plots.run_title(config))
  log.info("summary: %s", json.dumps(summary))
  return TrainResult(summary, jax.device_get(algorithm.eval_variables(server_state)))
