"""The CPU study's setup with a method's tuned values: ``--config=configs/cifar10_study.py:METHOD``.

Real CIFAR-10 from an .npz file, the BatchNorm CNN (``cnn_bn``), 6,000 training images of which
1,000 are held out as the validation split and 5,000 go to 10 clients, 2 local epochs of batch
64, 100 rounds, test accuracy every 5 rounds (`experiments.grid.study_config`), IID, seed 0,
and METHOD (default ``fedbif``; ``fedavg``, ``signsgd``, ``fedpaq``, ``feddq``, ``dadaquant``)
at the values the study chose on the validation split, read from ``experiments/tuned.json``.
So a user who runs this config gets the tuned method, not the paper's untuned literal reading.

Command:
  python launch.py --config=configs/cifar10_study.py:fedbif --workdir=/tmp/study_fedbif \
      --config.data.path=../shared/data/cifar10.npz
Tuned values and their validation scores: docs/RESULTS.md ("Tuning"); test accuracy of these
exact runs (seed 0, IID) and of the other seeds and partitions: docs/RESULTS.md ("Table 1").
About 10 minutes a run on the 2-core CPU.
"""
import importlib
import importlib.util
import os
import sys

from fedbif_jax.config import set_fields
from fedbif_jax.errors import ConfigError, check


def _study_grid():
  """This checkout's `experiments.grid` (the study's setup and tuned.json). launch.py puts the
  repository root on the path; from any other folder (the Flower CLI, a notebook) the
  `experiments` package is registered from its folder next to this file."""
  try:
    return importlib.import_module("experiments.grid")
  except ModuleNotFoundError as e:
    if e.name != "experiments":
      raise
  folder = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "experiments")
  spec = importlib.util.spec_from_file_location(
      "experiments", os.path.join(folder, "__init__.py"), submodule_search_locations=[folder])
  package = importlib.util.module_from_spec(spec)
  sys.modules["experiments"] = package
  spec.loader.exec_module(package)
  return importlib.import_module("experiments.grid")


def get_config(arg=None):
  grid = _study_grid()
  method = arg or "fedbif"
  check(method in grid.METHODS, "config", f"one of {', '.join(grid.METHODS)} "
        "(--config=configs/cifar10_study.py:METHOD)", method)
  tuned = grid.read_tuned(grid.DEFAULT_TUNED)["methods"]
  if method not in tuned:
    raise ConfigError(f"config: {method} has no tuned values in experiments/tuned.json yet "
                      f"(tuned: {', '.join(sorted(tuned)) or 'none'}); run python -m experiments.grid")
  c = grid.study_config("")
  c.algorithm = method
  c.data.partition = "iid"
  c.seed = 0
  set_fields(c, tuned[method]["overrides"])
  if method == "fedbif":
    c.aggregation_weights = "uniform"  # Eq. 6 as printed, as in the study's FedBiF rows
  c.lock()
  return c
