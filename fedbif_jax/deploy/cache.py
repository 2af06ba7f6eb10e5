"""A SuperNode's on-disk cache, so that a ClientApp does not redo for every message what depends on
the config alone. Flower 1.42 runs a ClientApp in a fresh ``flwr-clientapp`` process for every
message (in both ``--isolation`` modes), so nothing in a process's memory outlives its message.

* The client's data set: the training and test sets as `rounds.build_job` loads them (after the
  subsets and the validation hold-out), written once to ``<cache-dir>/data-<key>.npz`` and then
  read through the ordinary ``npz`` source (`data_config`). That skips the original source
  (scikit-learn's import for the digits, a large .npz file, tfds) and the subsetting; the
  partition, model, algorithm and keys are still built from the config by `rounds.build_job`,
  so the client's job is the one the server and the simulator build. The key hashes
  ``config.data`` and the seed (and, for an npz source, the file's size and modification time).
  The file also holds the data set's name, mean and std; a job built from it whose data set
  differs in those (or in its classes) is not used. A data set whose classes the npz source
  would infer differently (a class in neither split) is not cached.
* JAX's compiled programs: JAX's persistent compilation cache under ``<cache-dir>/jax``, unless
  the process already has one (``JAX_COMPILATION_CACHE_DIR``), so that only a SuperNode's first
  message compiles.

The SuperNodes of one machine may share a cache folder (the default, `DEFAULT_DIR`): files are
written to a temporary name and renamed, and a missing or unreadable one is rebuilt. Nothing
here is needed for correctness. No flwr import.
"""
from __future__ import annotations

import hashlib
import json
import logging
import os

import numpy as np

DEFAULT_DIR = os.path.join(os.path.expanduser("~"), ".cache", "fedbif_jax", "flower")
log = logging.getLogger("fedbif_jax")


def data_path(cache_dir: str, config) -> str:
  """Where the data set of `config` is cached in `cache_dir`."""
  key = {"data": config.data.to_dict(), "seed": config.seed}
  if config.data.source == "npz" and os.path.isfile(config.data.path):
    stat = os.stat(config.data.path)
    key["file"] = [os.path.abspath(config.data.path), stat.st_size, stat.st_mtime_ns]
  digest = hashlib.sha256(json.dumps(key, sort_keys=True, default=str).encode()).hexdigest()
  return os.path.join(os.path.abspath(cache_dir), f"data-{digest[:20]}.npz")


def data_config(config, path: str, name: str):
  """A copy of `config` that reads the data set cached at `path` (the ``npz`` source, no subset,
  no hold-out: they are in the file already); every other field is unchanged."""
  copy = config.copy_and_resolve_references()
  data = copy.data
  data.source, data.path, data.name, data.data_dir = "npz", path, name, ""
  data.train_subset = data.test_subset = data.validation = 0
  copy.lock()
  return copy


def save_dataset(path: str, dataset) -> bool:
  """Writes `dataset` where `data_config` reads it; False (nothing written) when the npz source
  would not read it back as the same data set."""
  labels = np.concatenate([dataset.y_train, dataset.y_test])
  if not np.array_equal(np.unique(labels), np.arange(dataset.num_classes)):
    return False  # the npz source infers the classes from the labels
  os.makedirs(os.path.dirname(path), exist_ok=True)
  tmp = f"{path}.tmp{os.getpid()}.npz"
  np.savez(tmp, x_train=dataset.x_train, y_train=dataset.y_train, x_test=dataset.x_test,
           y_test=dataset.y_test, name=np.array(dataset.name), mean=dataset.mean, std=dataset.std)
  os.replace(tmp, path)
  return True


def _cached_job(config, path: str):
  """`rounds.build_job` over the data set cached at `path`; ValueError when it is not the data set
  that was cached."""
  from fedbif_jax import rounds
  with np.load(path, allow_pickle=False) as archive:
    name, mean, std = str(archive["name"]), archive["mean"], archive["std"]
  job = rounds.build_job(data_config(config, path, name))
  dataset = job.dataset
  if not (dataset.name == name and np.array_equal(dataset.mean, mean)
          and np.array_equal(dataset.std, std)):
    raise ValueError(f"it reads as {dataset.name} with mean {dataset.mean}, std {dataset.std}; "
                     f"cached: {name}, {mean}, {std}")
  return job


def client_role(config, cache_dir: str):
  """(`roles.Client` of `config`, what the data cache did: a one-line note). With a `cache_dir`,
  the data set comes from its cache file, which is written on a miss; without, it is loaded
  from its source."""
  from fedbif_jax.deploy import roles
  from fedbif_jax.errors import ConfigError
  if not cache_dir:
    return roles.Client(config), "no data cache"
  path = data_path(cache_dir, config)
  if os.path.exists(path):
    try:
      return roles.Client(config, job=_cached_job(config, path)), f"data set from {path}"
    except (ConfigError, OSError, ValueError, KeyError) as e:
      log.warning("data cache %s not used (%s); loading the data set from its source", path,
                  " ".join(str(e).split())[:200])
  client = roles.Client(config)
  try:
    saved = save_dataset(path, client.job.dataset)
  except OSError as e:
    return client, f"data set not cached ({e.strerror or e})"
  return client, f"data set cached in {path}" if saved else "data set not cacheable"


def use_compilation_cache(cache_dir: str) -> None:
  """Points JAX's persistent compilation cache at ``<cache_dir>/jax`` (every program, however
  short its compile) unless this process already has one or `cache_dir` is empty."""
  import jax
  if not cache_dir or jax.config.jax_compilation_cache_dir:
    return
  jax.config.update("jax_compilation_cache_dir", os.path.join(os.path.abspath(cache_dir), "jax"))
  if "JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS" not in os.environ:
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
