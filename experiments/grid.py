"""The paper's study at CPU scale: the run grids, and a resumable runner over them.

Three grids, each a list of named runs (config overrides of one study config):

* ``table1``: {FedAvg, SignSGD, FedPAQ, FedDQ, DAdaQuant, FedBiF-1/4} x {IID, Dirichlet 0.5,
  Dirichlet 0.1} x 3 seeds (Table 1);
* ``ablations`` on Dirichlet 0.5 x 3 seeds: FedBiF-1/8, 2/4, 2/8 (Fig. 3; FedBiF-1/4 is
  table1's run) and FedBiF-1/4 with a sign bit, without VBI, with the fixed (third bit) and the
  random selector (Fig. 4);
* ``long``: one run per method, IID, seed 0, ten times table1's rounds (does FedBiF catch up?).

The study config (`study_config`): CIFAR-10 from an .npz file (``--data_path``), the small CNN,
10 clients on a seeded subset of 1,600 training images (160 a client on average), 1 local epoch
of batch 32, plain SGD lr 0.05, 10 rounds (100 for ``long``), evaluation on a seeded subset of
1,000 test images, Lipschitz bound and last-layer histogram every 3 rounds. On the 2-core CPU a
run takes 40-60 s (a long run 4-5 min), the three grids together about 100 minutes. ``--smoke``
swaps in the built-in digits, 2 rounds (6 for ``long``) and a shrunken grid, so CI can run the
whole path in a minute.

Every run goes through `fedbif_jax.train.train_and_evaluate` in its own directory
``<root>/<grid>/<run>``. A run with a complete ``summary.json`` is skipped, a half-finished one
resumes from its checkpoint, so a killed grid is restarted with the same command. A run whose
stored ``config.json`` differs from the config it would get now is refused (use a fresh
``--root``). A diverged run is recorded in ``<run>/failed.json`` and the grid goes on.

  python experiments/grid.py --root=/tmp/study --data_path=../shared/data/cifar10.npz
  python experiments/grid.py --root=/tmp/study --grids=long --data_path=...
  python experiments/report.py --root=/tmp/study        # writes docs/RESULTS.md + figures
"""
from __future__ import annotations

import dataclasses
import json
import logging
import os
import re
import sys
import time

from absl import app
from absl import flags
import ml_collections

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from fedbif_jax.config import base_config, set_fields  # noqa: E402

METHODS = ("fedavg", "signsgd", "fedpaq", "feddq", "dadaquant", "fedbif")
PARTITIONS = {"iid": ("iid", 0.5), "dir0.5": ("dirichlet", 0.5), "dir0.1": ("dirichlet", 0.1)}
SEEDS = (0, 1, 2)
# name -> overrides of the FedBiF-1/4 study config (Fig. 3 and Fig. 4 of the paper).
ABLATIONS = {
    "fedbif-1-8": {"fedbif.bits": 8},
    "fedbif-2-4": {"fedbif.active_bits": 2},
    "fedbif-2-8": {"fedbif.bits": 8, "fedbif.active_bits": 2},
    "sign_bit": {"fedbif.encoding": "sign_magnitude"},
    "no_vbi": {"fedbif.vbi": False},
    "fixed_selector": {"fedbif.selector": "fixed"},
    "random_selector": {"fedbif.selector": "random"},
}
GRIDS = ("table1", "ablations", "long")
LONG_ROUNDS_FACTOR = 10
LONG_ORDER = ("fedbif", "fedavg", "signsgd", "fedpaq", "feddq", "dadaquant")


@dataclasses.dataclass(frozen=True)
class Run:
  grid: str
  name: str
  overrides: dict


def study_config(data_path: str, smoke: bool = False) -> ml_collections.ConfigDict:
  """The one config every run of the study starts from (unlocked; runs override fields)."""
  c = base_config()
  c.algorithm = "fedbif"
  c.model.name = "cnn"
  c.num_clients = 10
  c.local_epochs = 1
  c.batch_size = 32
  c.lr = 0.05
  c.rounds = 10
  c.checkpoint_every = 5
  c.lipschitz_every = 3
  c.lipschitz_iterations = 30
  c.data.source = "npz"
  c.data.name = "cifar10"
  c.data.path = data_path
  c.data.train_subset = 1600
  c.data.test_subset = 1000
  if smoke:
    c.data.source = "builtin"
    c.data.name = "digits"
    c.data.path = ""
    c.data.train_subset = 400
    c.data.test_subset = 200
    c.data.min_size = 5
    c.num_clients = 4
    c.rounds = 2
    c.checkpoint_every = 1
    c.client_devices = 1  # mostly compilation, which each device does anew
    c.lipschitz_every = 1
    c.lipschitz_iterations = 5
    c.wire_check_every = 1
  return c


def grid_runs(grid: str, smoke: bool = False) -> list[Run]:
  """The runs of one grid, in the order they are run."""
  methods, partitions, seeds = METHODS, list(PARTITIONS), SEEDS
  ablations = list(ABLATIONS)
  ablation_seeds = seeds
  if smoke:
    methods, partitions, seeds, ablation_seeds = ("fedavg", "fedbif"), ["dir0.5"], (0, 1), (0,)
    ablations = ["no_vbi"]
  runs = []
  if grid == "table1":
    for seed in seeds:  # seed-major: a half-finished grid already covers every cell
      for partition in partitions:
        for method in methods:
          kind, mu = PARTITIONS[partition]
          runs.append(Run(grid, f"{method}-{partition}-s{seed}",
                          {"algorithm": method, "data.partition": kind, "data.mu": mu,
                           "seed": seed}))
  elif grid == "ablations":
    for seed in ablation_seeds:
      for name in ablations:
        runs.append(Run(grid, f"{name}-dir0.5-s{seed}",
                        {"algorithm": "fedbif", "data.partition": "dirichlet", "data.mu": 0.5,
                         "seed": seed, **ABLATIONS[name]}))
  elif grid == "long":
    for method in (("fedavg", "fedbif") if smoke else LONG_ORDER):
      runs.append(Run(grid, f"{method}-iid-s0",
                      {"algorithm": method, "data.partition": "iid", "seed": 0,
                       "rounds": (3 if smoke else LONG_ROUNDS_FACTOR) * study_config("", smoke).rounds,
                       "checkpoint_every": 2 if smoke else 10}))
  else:
    raise ValueError(f"grid: must be one of {', '.join(GRIDS)}, got {grid!r}")
  return runs


def run_config(base: ml_collections.ConfigDict, run: Run) -> ml_collections.ConfigDict:
  config = ml_collections.ConfigDict(base.to_dict())
  set_fields(config, run.overrides)
  config.lock()
  return config


def run_dir(root: str, run: Run) -> str:
  return os.path.join(root, run.grid, run.name)


def run_status(root: str, run: Run) -> str:
  """'done', 'failed', 'partial' (has metrics, no summary) or 'todo'."""
  d = run_dir(root, run)
  if os.path.exists(os.path.join(d, "summary.json")):
    return "done"
  if os.path.exists(os.path.join(d, "failed.json")):
    return "failed"
  if os.path.exists(os.path.join(d, "metrics.jsonl")):
    return "partial"
  return "todo"


def _check_same_config(workdir: str, config: ml_collections.ConfigDict) -> None:
  path = os.path.join(workdir, "config.json")
  if not os.path.exists(path):
    return
  with open(path) as f:
    stored = json.load(f)
  now = json.loads(config.to_json_best_effort())
  if stored != now:
    changed = sorted(_diff(stored, now))
    raise SystemExit(f"error: {workdir} was made with another config (fields {', '.join(changed)});"
                     " use a fresh --root or delete that run")


def _diff(a, b, prefix=""):
  for k in set(a) | set(b):
    va, vb = a.get(k), b.get(k)
    if isinstance(va, dict) and isinstance(vb, dict):
      yield from _diff(va, vb, prefix + k + ".")
    elif va != vb:
      yield prefix + k


def run_grid(root: str, runs: list[Run], base: ml_collections.ConfigDict) -> dict[str, int]:
  """Runs every run not done yet (resuming partial ones); returns counts by outcome."""
  from fedbif_jax.train import TrainingDiverged, train_and_evaluate
  log = logging.getLogger("fedbif_jax")
  counts = {"done": 0, "ran": 0, "failed": 0}
  for i, run in enumerate(runs):
    status = run_status(root, run)
    if status in ("done", "failed"):
      counts["done" if status == "done" else "failed"] += 1
      continue
    workdir = run_dir(root, run)
    config = run_config(base, run)
    _check_same_config(workdir, config)
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


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line (defined only when run as a script, so that tests can import this module)."""
  flags.DEFINE_string("root", None, "Directory holding <grid>/<run>/ run directories.")
  flags.DEFINE_string("data_path", "../shared/data/cifar10.npz", "CIFAR-10 .npz file.")
  flags.DEFINE_list("grids", list(GRIDS), f"Grids to run, from {', '.join(GRIDS)}.")
  flags.DEFINE_string("only", "", "Regex: run only runs whose '<grid>/<name>' matches.")
  flags.DEFINE_bool("smoke", False, "Built-in digits, 2 rounds, a shrunken grid (CI).")
  flags.DEFINE_bool("list", False, "Print the runs and their status, run nothing.")
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
  if not FLAGS.smoke and not os.path.isfile(FLAGS.data_path):
    print(f"error: --data_path: no such .npz file: {FLAGS.data_path}", file=sys.stderr)
    sys.exit(2)
  runs = [r for g in FLAGS.grids for r in grid_runs(g, FLAGS.smoke)
          if re.search(FLAGS.only, f"{r.grid}/{r.name}")]
  if FLAGS.list:
    for r in runs:
      print(f"{run_status(FLAGS.root, r):8s} {r.grid}/{r.name}")
    return
  import jax
  jax.config.update("jax_compilation_cache_dir",
                    FLAGS.compilation_cache or os.path.join(FLAGS.root, ".jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.5)
  from launch import configure_logging
  configure_logging()
  base = study_config(os.path.abspath(FLAGS.data_path), FLAGS.smoke)
  counts = run_grid(FLAGS.root, runs, base)
  print(json.dumps({"runs": len(runs), **counts}))


if __name__ == "__main__":
  define_flags()
  app.run(main)
