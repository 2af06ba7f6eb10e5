"""One round of federated training, without a transport: what a run derives from its config
(`build_job`), the plan of round t (`plan_round`, `sample_clients`), the server's half of a round
(`Server`) and the round's ledger (`traffic`).

Every program that runs rounds uses these, so they all compute the same rounds: the simulator's
loop (`fedbif_jax/train.py`, clients through `fedbif_jax/parallel.py`), the Flower deployment's
server and clients (`fedbif_jax/deploy/roles.py`, which adds what is Flower's: encoding the
downlink message, validating replies, dropping and renormalising) and the benchmarks.

`Server` holds the global state, committed to this process's first local device (so its placement
is the same before and after the first aggregation: a changed placement would recompile), with
``algorithm.broadcast`` / ``aggregate`` jitted under the ``server`` XLA options
(`xla_options.jit`):

* ``open_round(t)``: round t's plan (clients, weights, schedule, keys; a pure function of the
  config and t) and its downlink, ``broadcast(state, plan.broadcast_key, plan.info)``;
* ``close_round(rnd, uplinks, weights, client_metrics)``: ``aggregate``, the evaluation of the new
  state (the caller's), the divergence check (a non-finite train or evaluation loss raises
  `TrainingDiverged` and keeps the old state), then the new state is committed; returns the
  train loss, the ledger of the round's payloads (`traffic`) and the downlink's sparsity.

No file I/O here: the callers write the rows, checkpoints and summaries (`fedbif_jax/records.py`).
"""
from __future__ import annotations

import logging
import math
import time
from typing import Any, Callable, Mapping, NamedTuple

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax

from fedbif_jax import data as data_lib
from fedbif_jax import metrics as metrics_lib
from fedbif_jax import parallel
from fedbif_jax import pytrees
from fedbif_jax import wire
from fedbif_jax import xla_options
from fedbif_jax.algorithms import get_algorithm
from fedbif_jax.algorithms.base import Algorithm, RoundInfo
from fedbif_jax.client import LocalTraining, make_local_training
from fedbif_jax.errors import check, check_positive_number
from fedbif_jax.models import MODELS, bit_trained_predicate, get_model

log = logging.getLogger("fedbif_jax")

# uniform: 1/|C^t| (Eq. 6 as printed); data_size: p_k (Sec. 2.1); paper: each as the paper has
# it, uniform for FedBiF and p_k for FedAvg and the baselines (`aggregation_rule`).
AGGREGATION_WEIGHTS = ("uniform", "data_size", "paper")


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


def aggregation_rule(config: ml_collections.ConfigDict) -> str:
  """The client weights a run uses, "uniform" or "data_size": ``aggregation_weights`` itself, or
  for "paper" the paper's own rule per algorithm: FedBiF's Eq. 6 averages the clients' bits
  uniformly (1/|C^t|), while FedAvg and the baselines weight by data share p_k (Sec. 2.1)."""
  if config.aggregation_weights == "paper":
    return "uniform" if config.algorithm == "fedbif" else "data_size"
  return config.aggregation_weights


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
  """Round t as the server decides it before broadcasting (steps 1-3 of `fedbif_jax/train.py`)."""
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
  if aggregation_rule(config) == "uniform":
    weights = np.full(len(ids), 1.0 / len(ids), np.float32)
  else:
    weights = (sizes[ids] / sizes[ids].sum()).astype(np.float32)
  info = RoundInfo(jnp.asarray(weights), jnp.asarray(sizes[ids], jnp.float32))
  idx, mask = data_lib.round_batches([job.parts[c] for c in ids], config.batch_size,
                                     config.local_epochs,
                                     np.random.default_rng([config.seed, 1, t]))
  idx, mask = data_lib.pad_steps(idx, mask, job.max_steps)  # fixed shapes: no recompilation
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


def diverged(t: int, losses: Mapping[str, float]) -> "TrainingDiverged":
  """The error of round t whose `losses` ({"train": ..., "test": ...}) are not all finite."""
  return TrainingDiverged(
      f"round {t}: non-finite loss ({', '.join(f'{k} {v}' for k, v in losses.items())}); stopped")


class OpenRound(NamedTuple):
  """Round t as `Server.open_round` opened it."""
  t: int
  plan: RoundPlan
  downlink: Any          # the broadcast payload (on the server's device)
  started: float         # time.time() when the round opened


class ClosedRound(NamedTuple):
  """What `Server.close_round` measured of a round (the state is committed to the server)."""
  train_loss: float      # the clients' summed loss over their summed example count
  evaluated: dict        # what the caller's evaluate returned, e.g. test_accuracy, test_loss
  traffic: dict          # `traffic` of the round's payloads
  sparsity: float        # of the downlink (`metrics.sparsity`)
  stats: dict            # ``algorithm.round_stats`` as plain numbers and lists ({} without one)


class Server:
  """The server's half of rounds (see the module docstring), independent of any transport.

  Args:
    algorithm: the `Algorithm`; its ``init(key, variables)`` is the initial state.
    key, variables: ``algorithm.init``'s arguments.
    planner: t -> the `RoundPlan` of round t (`Server.of_job`: `plan_round`).
    num_weights: the bpp denominator of `traffic`.
    wire_codec: the codec `traffic` counts bytes with.
  """

  def __init__(self, algorithm: Algorithm, key: jax.Array, variables: Any,
               planner: Callable[[int], RoundPlan], num_weights: int = 0,
               wire_codec: str = "packed"):
    self.algorithm = algorithm
    self.planner = planner
    self.num_weights = num_weights
    self.wire_codec = wire_codec
    # Committed to the first device, so that its placement is the same before and after the first
    # aggregation (a changed placement would recompile broadcast/aggregate). In a multi-process
    # job every process computes it, identically.
    self.device = jax.local_devices()[0]
    self.state = jax.device_put(algorithm.init(key, variables), self.device)
    self._broadcast = xla_options.jit(algorithm.broadcast, "server")
    self._aggregate = xla_options.jit(algorithm.aggregate, "server")
    self._round_stats = (xla_options.jit(algorithm.round_stats, "server")
                         if algorithm.round_stats is not None else None)

  @classmethod
  def of_job(cls, config: ml_collections.ConfigDict, job: Job) -> "Server":
    """The server of a run: `job`'s initial state, rounds planned by `plan_round`."""
    return cls(job.algorithm, job.k_server, job.variables, lambda t: plan_round(config, job, t),
               job.num_weights, config.wire_codec)

  def restore(self, state: Any) -> None:
    """Replaces the state (e.g. a checkpoint's), placed as the initial one."""
    self.state = jax.device_put(state, self.device)

  def open_round(self, t: int) -> OpenRound:
    """Round t's plan and downlink."""
    started = time.time()
    plan = self.planner(t)
    return OpenRound(t, plan, self._broadcast(self.state, plan.broadcast_key, plan.info), started)

  def close_round(self, rnd: OpenRound, uplinks: Any, weights: jax.Array, client_metrics: Any,
                  evaluate: Callable[[Any], dict] | None = None, train_loss: float | None = None,
                  account: bool = True) -> ClosedRound | None:
    """Aggregates the round and commits the new state, unless a loss is not finite.

    Args:
      rnd: the round as `open_round` returned it.
      uplinks: the clients' uplinks, stacked (leading client axis), on the server's device.
      weights: float32 [C], the aggregation weights of those clients.
      client_metrics: {"loss_sum", "count"} float32 [C], as the runner returns them.
      evaluate: new state -> {"<split>_accuracy", "<split>_loss", ...} (None: nothing); its
        ``*_loss`` values are checked with the train loss.
      train_loss: the train loss when the caller computed it otherwise (default: the float32 sums
        of `client_metrics`).
      account: False skips the host-side figures (train loss, divergence check, ledger, sparsity)
        and returns None: the round's computation alone (benchmarks).
    Raises:
      TrainingDiverged: a non-finite loss; the state is left as it was.
    """
    new_state = self._aggregate(self.state, rnd.downlink, uplinks, weights, client_metrics)
    if not account:
      self.state = new_state
      return None
    evaluated = evaluate(new_state) if evaluate is not None else {}
    if train_loss is None:
      host = jax.device_get(client_metrics)
      train_loss = float(host["loss_sum"].sum() / max(host["count"].sum(), 1.0))
    losses = {"train": train_loss,
              **{k[:-5]: v for k, v in evaluated.items() if k.endswith("_loss")}}
    if not all(math.isfinite(v) for v in losses.values()):
      raise diverged(rnd.t, losses)
    self.state = new_state
    stats = ({} if self._round_stats is None else
             {k: np.asarray(v).tolist()
              for k, v in jax.device_get(self._round_stats(rnd.downlink, uplinks, weights)).items()})
    return ClosedRound(train_loss, evaluated,
                       traffic(rnd.downlink, uplinks, self.num_weights, self.wire_codec),
                       metrics_lib.sparsity(rnd.downlink), stats)

  def eval_variables(self) -> Any:
    """The global model's Flax variables."""
    return self.algorithm.eval_variables(self.state)
