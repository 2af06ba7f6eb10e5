"""The fair study of the paper's claim at CPU scale: tuning on a validation split, then Table 1,
the ablations and a link to the BatchNorm-free CNN, as a resumable runner.

The study config (`study_config`): real CIFAR-10 from an .npz file (``--data_path``), the small
CNN with BatchNorm (``cnn_bn``), a seeded subset of 6,000 training images of which 1,000 are held
out as the validation split (``data.validation``: no client ever trains on them) and 5,000 go to
10 clients (500 each on IID), 2 local epochs of batch 64 (16 local steps per round on IID), plain
SGD, 100 rounds, evaluation every 5 rounds (and the last) on the validation split and all 10,000
test images, a Lipschitz bound and last-layer histogram every 10 rounds, checkpoints every 10.

Grids, in the order the pipeline runs them (the decisive comparisons first):

* ``tune`` - FedAvg over lr, FedBiF-1/4 over lr x ``bit_lr_scale`` x (bit order, per-bit step
  rule) (`FEDBIF_GRID`): IID, seed 0, `TUNE_ROUNDS` rounds, evaluated on the validation split
  only (the test set is never read: ``eval_test=False``).
* ``table1`` - FedAvg vs FedBiF-1/4 at their tuned values, IID / Dir(0.5) / Dir(0.1) x 3 seeds,
  seed-major. FedAvg weights clients by data share p_k (Sec. 2.1, the same as uniform on IID);
  FedBiF runs with the paper's uniform Eq. 6 and, on Dirichlet splits, also with p_k
  (``fedbif-pk``).
* ``tune_baselines`` - each baseline at FedAvg's tuned lr (they are FedAvg with compressed
  updates) over its own knob as the paper describes: FedPAQ's bits and FedDQ's resolution (the
  coarsest setting whose validation score is within `KEEP_ACCURACY` of FedAvg's), SignSGD's
  server step (the best). DAdaQuant is not tuned: phi = rounds / 10 as its paper suggests.
* ``baselines`` - the four baselines at their tuned values: IID and Dir(0.5) x seeds 0, 1 first,
  then Dir(0.1), then seed 2.
* ``ablations`` - Dir(0.5) x 3 seeds at FedBiF's tuned values: FedBiF-1/8, 2/4, 2/8 (Fig. 3;
  100 rounds = 12.5 passes over 8 bits at s = 1) and with a sign bit, without VBI, with the fixed
  (third bit) and the random selector (Fig. 4); then ours, FedBiF-1/8 and 2/8 with the bit step
  matched to the tuned 1/4 (`matched_bit_lr_scale`).
* ``bridge`` - the BatchNorm-free ``cnn`` on IID, seed 0, FedAvg and FedBiF at their tuned
  values: the link to the earlier, BatchNorm-free study.
* ``beyond`` - what the paper leaves open (`BEYOND`), each against table1's default FedBiF
  (uniform Eq. 6): IID and Dir(0.5) x 3 seeds, seed-major.

Tuning: a candidate's score is its mean validation accuracy over its last `SCORE_EVALS`
evaluations. `choose` writes the chosen values of every method whose candidates have all
finished to ``experiments/tuned.json`` (committed; ``--tuned`` names another file); the table
runs read their overrides from it, so a run whose method is not tuned yet is skipped as
"blocked". Changing tuned.json changes those runs' configs, which the runner then refuses to mix
with an existing run directory.

Every run goes through `fedbif_jax.train.train_and_evaluate` in its own directory
``<root>/<grid>/<run>`` (``config.json``, ``metrics.jsonl``, ``histograms.jsonl``,
``summary.json``; checkpoints are git-ignored). A run with a ``summary.json`` is skipped, a
half-finished one resumes from its checkpoint, so a killed pipeline is restarted with the same
command, on this machine or on another with the committed results. A run whose stored
``config.json`` differs from the config it would get now is refused
(`fedbif_jax.train.check_resumable`: the pipeline stops with a one-line error naming the changed
fields; the data file's location may differ). A diverged run is recorded
in ``<run>/failed.json`` (a failed candidate is never chosen) and the pipeline goes on.

  python -m experiments.grid --root=experiments/results --data_path=../shared/data/cifar10.npz
  python -m experiments.grid --root=experiments/results --list        # status of every run
  python -m experiments.grid --root=experiments/results --choose      # only (re)write tuned.json
  python -m experiments.report --root=experiments/results             # docs/RESULTS.md + figures

``--smoke`` swaps in the built-in digits, 2 rounds and shrunken grids, so CI runs the whole
path in about a minute.
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
import time
from typing import Optional

from absl import app
from absl import flags
import ml_collections
import numpy as np


from fedbif_jax.config import base_config, set_fields
from fedbif_jax.records import read_json, read_jsonl, write_json_atomic

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_TUNED = os.path.join(HERE, "tuned.json")

METHODS = ("fedavg", "signsgd", "fedpaq", "feddq", "dadaquant", "fedbif")
BASELINES = ("signsgd", "fedpaq", "feddq", "dadaquant")
PARTITIONS = {"iid": ("iid", 0.5), "dir0.5": ("dirichlet", 0.5), "dir0.1": ("dirichlet", 0.1)}
SEEDS = (0, 1, 2)
STUDY_ROUNDS = 100
TUNE_ROUNDS = 30
SCORE_EVALS = 3          # a candidate's score: mean validation accuracy of its last 3 evaluations
KEEP_ACCURACY = 0.01     # FedPAQ / FedDQ: coarsest setting within 1 point of FedAvg's score

# Tuning spaces: method -> candidate name -> overrides (FedAvg's tuned lr is added to the
# baselines' candidates at run time).
FEDAVG_LRS = (0.02, 0.05, 0.1, 0.2, 0.4)
# FedBiF candidates (lr, bit_lr_scale, per-bit step rule, bit order), run in this order: the
# paper's rule (one step for all bits, MSB first) over lr x scale, extended towards a smaller bit
# step and a larger lr, where the first six runs put the best corner (lr 0.2, scale 1); then
# LSB first; then MSB first with bit i's step scaled by 2^-i.
FEDBIF_GRID = (
    tuple((lr, x, "uniform", "msb_first") for lr in (0.05, 0.2) for x in (1.0, 4.0, 16.0))
    + ((0.2, 0.25, "uniform", "msb_first"), (0.5, 0.25, "uniform", "msb_first"),
       (0.5, 1.0, "uniform", "msb_first"))
    + tuple((lr, x, "uniform", "lsb_first") for lr in (0.05, 0.2) for x in (1.0, 4.0))
    + tuple((lr, x, "inverse_pow2", "msb_first") for lr in (0.05, 0.2) for x in (1.0, 4.0, 16.0)))
FEDPAQ_BITS = (2, 4, 8)                     # coarsest first
FEDDQ_RESOLUTIONS = (0.02, 0.005, 0.001)    # coarsest first
SIGNSGD_SERVER_LRS = (0.0003, 0.001, 0.003, 0.01)


def matched_bit_lr_scale(config: ml_collections.ConfigDict) -> float:
  """The ``bit_lr_scale`` at which a virtual bit steps as far as in the tuned FedBiF-1/4.

  A virtual bit i's straight-through gradient is alpha * 2^i * dL/dw with alpha = max|w| /
  2^(m-1) (Eq. 5). With ``inverse_pow2`` its SGD step is scale * lr * alpha * dL/dw, which at
  m = 8 is 2^(8-4) = 16 times smaller than at m = 4 for the same scale, while its initial
  magnitude (Kaiming, by fan-in) does not depend on m: a bit needs 16 times the gradient to flip.
  So the scale grows by 2^(m-4). With ``uniform`` (the paper's one step) the most significant
  bit steps by scale * lr * max|w| * dL/dw at every m, and the scale stays.
  """
  f = config.fedbif
  return f.bit_lr_scale * (2.0 ** (f.bits - 4) if f.bit_step == "inverse_pow2" else 1.0)


# name -> overrides of the tuned FedBiF-1/4 (Fig. 3 and Fig. 4 of the paper). A callable value is
# computed from the run's config after the tuned values and the plain overrides (`run_config`).
# The "-matched" variants are ours: under the tuned ``inverse_pow2`` rule a virtual bit's step at
# m = 8 is 16 times smaller than at m = 4 (`matched_bit_lr_scale`), so Fig. 3's m = 8 rows are
# run both ways.
ABLATIONS = {
    "fedbif-1-8": {"fedbif.bits": 8},
    "fedbif-2-4": {"fedbif.active_bits": 2},
    "fedbif-2-8": {"fedbif.bits": 8, "fedbif.active_bits": 2},
    "sign_bit": {"fedbif.encoding": "sign_magnitude"},
    "no_vbi": {"fedbif.vbi": False},
    "fixed_selector": {"fedbif.selector": "fixed"},
    "random_selector": {"fedbif.selector": "random"},
    "fedbif-1-8-matched": {"fedbif.bits": 8, "fedbif.bit_lr_scale": matched_bit_lr_scale},
    "fedbif-2-8-matched": {"fedbif.bits": 8, "fedbif.active_bits": 2,
                           "fedbif.bit_lr_scale": matched_bit_lr_scale},
}
# name -> overrides of the tuned FedBiF-1/4: the directions the paper leaves open (Sec. 6).
# The codec changes no value a client or the server computes (its runs must equal table1's
# FedBiF runs), only the bytes: the report compares its bpp with the packed width and the entropy.
BEYOND = {
    "flip_rate": {"fedbif.selector": "flip_rate"},
    "learned_step": {"fedbif.step": "learned"},
    "entropy_codec": {"wire_codec": "entropy"},
}
# BEYOND variants that change only how payloads are encoded, not what is sent.
CODEC_VARIANTS = ("entropy_codec",)
GRIDS = ("tune", "table1", "tune_baselines", "baselines", "ablations", "bridge", "beyond")
TUNE_GRIDS = ("tune", "tune_baselines")


@dataclasses.dataclass(frozen=True)
class Run:
  grid: str
  name: str
  overrides: dict
  method: str = ""           # whose tuned values the run needs ("" : none)


def _fmt(x) -> str:
  return f"{x:g}"


def study_config(data_path: str, smoke: bool = False) -> ml_collections.ConfigDict:
  """The one config every run of the study starts from (unlocked; runs override fields)."""
  c = base_config()
  c.algorithm = "fedbif"
  c.model.name = "cnn_bn"
  c.num_clients = 10
  c.local_epochs = 2
  c.batch_size = 64
  c.lr = 0.05
  c.rounds = STUDY_ROUNDS
  c.eval_every = 5
  c.checkpoint_every = 10
  c.lipschitz_every = 10
  c.lipschitz_iterations = 30
  c.aggregation_weights = "data_size"
  c.data.source = "npz"
  c.data.name = "cifar10"
  c.data.path = data_path
  c.data.train_subset = 6000
  c.data.validation = 1000
  c.dadaquant.phi = STUDY_ROUNDS // 10   # DAdaQuant's paper: phi = rounds / 10
  if smoke:
    c.data.source = "builtin"
    c.data.name = "digits"
    c.data.path = ""
    c.data.train_subset = 600
    c.data.validation = 200
    c.data.test_subset = 200
    c.data.min_size = 5
    c.num_clients = 4
    c.local_epochs = 1
    c.rounds = 4
    c.eval_every = 2
    c.checkpoint_every = 2
    c.client_devices = 1  # mostly compilation, which each device does anew
    c.lipschitz_every = 2
    c.lipschitz_iterations = 5
    c.wire_check_every = 1
    c.dadaquant.phi = 1
  return c


def tune_candidates(method: str, smoke: bool = False) -> dict[str, dict]:
  """Candidate name -> overrides, for one method's tuning (`TUNE_GRIDS`)."""
  if method == "fedavg":
    lrs = (0.05, 0.1) if smoke else FEDAVG_LRS
    return {f"fedavg-lr{_fmt(lr)}": {"lr": lr} for lr in lrs}
  if method == "fedbif":
    grid = ((0.1, 1.0, "uniform", "msb_first"), (0.1, 4.0, "uniform", "msb_first")) if smoke \
        else FEDBIF_GRID
    return {f"fedbif-lr{_fmt(lr)}-x{_fmt(x)}-{step}-{order.split('_')[0]}":
            {"lr": lr, "fedbif.bit_lr_scale": x, "fedbif.bit_step": step, "fedbif.order": order}
            for lr, x, step, order in grid}
  if method == "fedpaq":
    return {f"fedpaq-b{b}": {"fedpaq.bits": b} for b in (FEDPAQ_BITS[:2] if smoke else FEDPAQ_BITS)}
  if method == "feddq":
    res = FEDDQ_RESOLUTIONS[:1] if smoke else FEDDQ_RESOLUTIONS
    return {f"feddq-r{_fmt(r)}": {"feddq.resolution": r} for r in res}
  if method == "signsgd":
    lrs = SIGNSGD_SERVER_LRS[2:3] if smoke else SIGNSGD_SERVER_LRS
    return {f"signsgd-s{_fmt(s)}": {"signsgd.server_lr": s} for s in lrs}
  if method == "dadaquant":
    return {}
  raise ValueError(f"method: must be one of {', '.join(METHODS)}, got {method!r}")


def _tune_overrides(smoke: bool) -> dict:
  return {"rounds": (4 if smoke else TUNE_ROUNDS), "eval_test": False, "lipschitz_every": 0,
          "data.partition": "iid", "seed": 0}


def grid_runs(grid: str, smoke: bool = False) -> list[Run]:
  """The runs of one grid, in the order they are run."""
  seeds = (0, 1) if smoke else SEEDS
  partitions = ["dir0.5"] if smoke else list(PARTITIONS)
  runs = []

  def table_run(grid_name, variant, method, partition, seed, extra=None):
    kind, mu = PARTITIONS[partition]
    runs.append(Run(grid_name, f"{variant}-{partition}-s{seed}",
                    {"algorithm": method, "data.partition": kind, "data.mu": mu, "seed": seed,
                     **(extra or {})}, method))

  if grid in TUNE_GRIDS:
    methods = ("fedavg", "fedbif") if grid == "tune" else BASELINES
    for method in methods:
      for name, overrides in tune_candidates(method, smoke).items():
        runs.append(Run(grid, name, {"algorithm": method, **_tune_overrides(smoke), **overrides},
                        "fedavg" if grid == "tune_baselines" else ""))
  elif grid == "table1":
    for seed in seeds:  # seed-major: a half-finished grid already covers every cell
      for partition in partitions:
        table_run(grid, "fedavg", "fedavg", partition, seed)
        table_run(grid, "fedbif", "fedbif", partition, seed, {"aggregation_weights": "uniform"})
        if partition != "iid":
          table_run(grid, "fedbif-pk", "fedbif", partition, seed)
  elif grid == "baselines":
    methods = ("fedpaq", "dadaquant") if smoke else BASELINES
    first_seeds = seeds[:2]
    order = [(s, p) for s in first_seeds for p in ("iid", "dir0.5")]
    order += [(s, "dir0.1") for s in first_seeds]
    order += [(s, p) for s in seeds[2:] for p in partitions]
    if smoke:
      order = [(0, "dir0.5")]
    for seed, partition in order:
      for method in methods:
        table_run(grid, method, method, partition, seed)
  elif grid == "ablations":
    names = ["no_vbi"] if smoke else list(ABLATIONS)
    for seed in seeds[:1] if smoke else seeds:
      for name in names:
        table_run(grid, name, "fedbif", "dir0.5", seed,
                  {"aggregation_weights": "uniform", **ABLATIONS[name]})
  elif grid == "bridge":
    for method in ("fedavg", "fedbif"):
      table_run(grid, f"{method}-cnn", method, "iid", 0, {"model.name": "cnn"})
  elif grid == "beyond":
    for seed in seeds[:1] if smoke else seeds:
      for partition in ("dir0.5",) if smoke else ("iid", "dir0.5"):
        for name, overrides in BEYOND.items():
          table_run(grid, name, "fedbif", partition, seed,
                    {"aggregation_weights": "uniform", **overrides})
  else:
    raise ValueError(f"grid: must be one of {', '.join(GRIDS)}, got {grid!r}")
  return runs


# ------------------------------------------------------------------------------------- tuning
def read_tuned(path: str) -> dict:
  """The chosen values: {"methods": {method: {"overrides": {...}, ...}}, ...} (empty if none)."""
  return read_json(path) or {"methods": {}}


def run_config(base: ml_collections.ConfigDict, run: Run,
               tuned: Optional[dict] = None) -> ml_collections.ConfigDict:
  """The run's config: the study config, then the tuned values of `run.method` (if it needs
  them: KeyError when they are missing), then the run's own overrides, the plain ones first and
  then those given as a function of the config so far (e.g. `matched_bit_lr_scale`)."""
  config = ml_collections.ConfigDict(base.to_dict())
  if run.method:
    set_fields(config, (tuned or {"methods": {}})["methods"][run.method]["overrides"])
  set_fields(config, {k: v for k, v in run.overrides.items() if not callable(v)})
  set_fields(config, {k: v(config) for k, v in run.overrides.items() if callable(v)})
  config.lock()
  return config


def validation_score(rows: list[dict], evals: int = SCORE_EVALS) -> float:
  """Mean validation accuracy of the last `evals` evaluated rounds of a run's metrics."""
  accs = [r["validation_accuracy"] for r in rows if "validation_accuracy" in r]
  if not accs:
    raise ValueError("metrics: no validation_accuracy in any round (data.validation = 0?)")
  return float(np.mean(accs[-evals:]))


def choose(method: str, scores: dict[str, Optional[float]], candidates: dict[str, dict],
           reference: Optional[float] = None) -> str:
  """The chosen candidate name of `method` from its candidates' validation scores.

  `scores` maps every candidate to its score (None: diverged; never chosen). FedPAQ and FedDQ
  (listed coarsest first) take the coarsest candidate whose score is within `KEEP_ACCURACY` of
  `reference` (FedAvg's chosen score), else the best; the others take the best score (ties: the
  first listed).
  """
  valid = [n for n in candidates if scores.get(n) is not None]
  if not valid:
    raise ValueError(f"{method}: every candidate diverged")
  if method in ("fedpaq", "feddq") and reference is not None:
    keeping = [n for n in valid if scores[n] >= reference - KEEP_ACCURACY]
    if keeping:
      return keeping[0]
  return max(valid, key=lambda n: (scores[n], -list(candidates).index(n)))


def choose_all(root: str, smoke: bool = False) -> dict:
  """Chooses every method whose tuning runs have all finished; returns the tuned.json content."""
  methods = {}
  for method in ("fedavg", "fedbif") + BASELINES:  # FedAvg first: the baselines use its lr
    grid = "tune" if method in ("fedavg", "fedbif") else "tune_baselines"
    candidates = tune_candidates(method, smoke)
    if method in BASELINES and "fedavg" not in methods:
      continue  # the baselines run at FedAvg's tuned lr
    if not candidates:  # DAdaQuant: nothing to tune
      methods[method] = {"overrides": {"lr": methods["fedavg"]["overrides"]["lr"]},
                         "rule": "FedAvg's lr; phi = rounds / 10 (DAdaQuant's paper)"}
      continue
    scores = {}
    for name in candidates:
      d = os.path.join(root, grid, name)
      if os.path.exists(os.path.join(d, "failed.json")):
        scores[name] = None
      elif os.path.exists(os.path.join(d, "summary.json")):
        scores[name] = validation_score(read_jsonl(os.path.join(d, "metrics.jsonl")))
      else:
        break
    else:
      reference = methods.get("fedavg", {}).get("score")
      best = choose(method, scores, candidates, reference)
      overrides = dict(candidates[best])
      if method in BASELINES:
        overrides = {"lr": methods["fedavg"]["overrides"]["lr"], **overrides}
      methods[method] = {"chosen": best, "overrides": overrides, "score": scores[best],
                         "candidates": scores,
                         "rule": ("coarsest within %g of FedAvg's score" % KEEP_ACCURACY
                                  if method in ("fedpaq", "feddq") else "best score")}
  return {"protocol": (f"IID, seed 0, {TUNE_ROUNDS if not smoke else 4} rounds; score = mean "
                       f"validation accuracy of the last {SCORE_EVALS} evaluations; the test set "
                       "is never read while tuning"),
          "methods": methods}


def write_tuned(path: str, tuned: dict) -> bool:
  """Writes tuned.json (atomically) if its content changed; returns whether it did."""
  if read_tuned(path) == tuned:
    return False
  write_json_atomic(path, tuned)
  return True


# ------------------------------------------------------------------------------------- runner
def run_dir(root: str, run: Run) -> str:
  return os.path.join(root, run.grid, run.name)


def run_status(root: str, run: Run, tuned: Optional[dict] = None) -> str:
  """'done', 'failed', 'partial' (has metrics, no summary), 'blocked' (its method is not tuned
  yet) or 'todo'."""
  d = run_dir(root, run)
  if os.path.exists(os.path.join(d, "summary.json")):
    return "done"
  if os.path.exists(os.path.join(d, "failed.json")):
    return "failed"
  if run.method and run.method not in (tuned or {"methods": {}})["methods"]:
    return "blocked"
  if os.path.exists(os.path.join(d, "metrics.jsonl")):
    return "partial"
  return "todo"


def run_grid(root: str, runs: list[Run], base: ml_collections.ConfigDict,
             tuned: Optional[dict] = None) -> dict[str, int]:
  """Runs every run not done yet (resuming partial ones); returns counts by outcome."""
  from fedbif_jax.train import TrainingDiverged, train_and_evaluate
  log = logging.getLogger("fedbif_jax")
  counts = {"done": 0, "ran": 0, "failed": 0, "blocked": 0}
  for i, run in enumerate(runs):
    status = run_status(root, run, tuned)
    if status in ("done", "failed", "blocked"):
      counts[status] += 1
      continue
    workdir = run_dir(root, run)
    config = run_config(base, run, tuned)
    log.info("[%d/%d] %s/%s%s", i + 1, len(runs), run.grid, run.name,
             " (resuming)" if status == "partial" else "")
    t = time.time()
    try:
      train_and_evaluate(config, workdir)
      counts["ran"] += 1
    except TrainingDiverged as e:
      with open(os.path.join(workdir, "failed.json"), "w") as f:
        json.dump({"reason": str(e)}, f)
      counts["failed"] += 1
      log.warning("%s/%s diverged: %s", run.grid, run.name, e)
    log.info("%s/%s finished in %.0f s", run.grid, run.name, time.time() - t)
  return counts


def run_pipeline(root: str, grids: list[str], base: ml_collections.ConfigDict, tuned_path: str,
                 smoke: bool = False, only: str = "") -> dict[str, int]:
  """Runs `grids` in the given order; before each, re-chooses the tuned values from the tuning
  runs that have finished (tuned.json is rewritten when they change)."""
  totals: dict[str, int] = {}
  for grid in grids:
    if write_tuned(tuned_path, choose_all(root, smoke)):
      logging.getLogger("fedbif_jax").info("wrote %s", tuned_path)
    tuned = read_tuned(tuned_path)
    runs = [r for r in grid_runs(grid, smoke) if re.search(only, f"{r.grid}/{r.name}")]
    for k, v in run_grid(root, runs, base, tuned).items():
      totals[k] = totals.get(k, 0) + v
  write_tuned(tuned_path, choose_all(root, smoke))
  return totals


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line (defined only when run as a script, so that tests can import this module)."""
  flags.DEFINE_string("root", None, "Directory holding <grid>/<run>/ run directories.")
  flags.DEFINE_string("data_path", "../shared/data/cifar10.npz", "CIFAR-10 .npz file.")
  flags.DEFINE_list("grids", list(GRIDS), f"Grids to run, in order, from {', '.join(GRIDS)}.")
  flags.DEFINE_string("only", "", "Regex: run only runs whose '<grid>/<name>' matches.")
  flags.DEFINE_string("tuned", DEFAULT_TUNED, "The tuned values file (written from the tuning "
                      "runs, read by the table runs).")
  flags.DEFINE_bool("smoke", False, "Built-in digits, 4 rounds, shrunken grids (CI).")
  flags.DEFINE_bool("list", False, "Print the runs and their status, run nothing.")
  flags.DEFINE_bool("choose", False, "Only (re)write the tuned values file, run nothing.")
  flags.DEFINE_string("compilation_cache", "", "JAX persistent compilation cache directory "
                      "(default <root>/.jax_cache): runs of one grid share their compiled programs.")


def main(argv):
  del argv
  if not FLAGS.root:
    raise app.UsageError("--root is required")
  bad = [g for g in FLAGS.grids if g not in GRIDS]
  if bad:
    print(f"error: --grids: must be from {', '.join(GRIDS)}, got {', '.join(bad)}", file=sys.stderr)
    sys.exit(2)
  if FLAGS.choose:
    changed = write_tuned(FLAGS.tuned, choose_all(FLAGS.root, FLAGS.smoke))
    print(f"{FLAGS.tuned}: {'written' if changed else 'unchanged'}")
    return
  if FLAGS.list:
    tuned = choose_all(FLAGS.root, FLAGS.smoke)
    for g in FLAGS.grids:
      for r in grid_runs(g, FLAGS.smoke):
        if re.search(FLAGS.only, f"{r.grid}/{r.name}"):
          print(f"{run_status(FLAGS.root, r, tuned):8s} {r.grid}/{r.name}")
    return
  if not FLAGS.smoke and not os.path.isfile(FLAGS.data_path):
    print(f"error: --data_path: no such .npz file: {FLAGS.data_path}", file=sys.stderr)
    sys.exit(2)
  base = study_config(os.path.abspath(FLAGS.data_path), FLAGS.smoke)
  from fedbif_jax import devices
  devices.split_cpu(base.cpu_devices)  # as launch.py: one host device per core
  import jax
  jax.config.update("jax_compilation_cache_dir",
                    FLAGS.compilation_cache or os.path.join(FLAGS.root, ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  from launch import configure_logging
  configure_logging()
  from fedbif_jax.errors import ConfigError
  try:
    counts = run_pipeline(FLAGS.root, FLAGS.grids, base, FLAGS.tuned, FLAGS.smoke, FLAGS.only)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  print(json.dumps(counts))


if __name__ == "__main__":
  define_flags()
  app.run(main)
