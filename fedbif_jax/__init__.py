"""fedbif_jax: communication-efficient federated learning with FedBiF (Federated Bits Freezing).

The public API (imported on first use, so ``import fedbif_jax`` starts no JAX backend and
launch.py can still split the CPU into devices first):

  config = fedbif_jax.base_config()              # every field, its default; change, then lock
  result = fedbif_jax.train_and_evaluate(config, workdir)   # logs each round; resumes a workdir
  result.summary, result.variables               # summary.json and the final global model
  fedbif_jax.load_global(workdir)                # config + global model from a workdir
  fedbif_jax.TrainingDiverged                    # raised by a NaN/inf loss (last checkpoint kept)
  fedbif_jax.register_model(name, factory)       # config.model.name = name
  fedbif_jax.register_algorithm(name, make)      # config.algorithm = name

``launch.py`` is the command line over the same `train_and_evaluate`.
"""
import importlib

__version__ = "0.1.0"

_EXPORTS = {
    "train_and_evaluate": "fedbif_jax.train",
    "TrainResult": "fedbif_jax.train",
    "load_global": "fedbif_jax.train",
    "GlobalModel": "fedbif_jax.train",
    "TrainingDiverged": "fedbif_jax.rounds",
    "base_config": "fedbif_jax.config",
    "set_fields": "fedbif_jax.config",
    "register_model": "fedbif_jax.models",
    "get_model": "fedbif_jax.models",
    "register_algorithm": "fedbif_jax.algorithms",
    "get_algorithm": "fedbif_jax.algorithms",
    "ConfigError": "fedbif_jax.errors",
}
__all__ = ["__version__", *_EXPORTS]


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(_EXPORTS[name]), name)
  raise AttributeError(f"module 'fedbif_jax' has no attribute {name!r}")


def __dir__():
  return sorted(list(globals()) + list(_EXPORTS))
