"""Federated algorithms by name, all behind `base.Algorithm` (one file per algorithm)."""
from __future__ import annotations

from fedbif_jax import bits as bits_lib
from fedbif_jax import registry
from fedbif_jax.algorithms import base, dadaquant, fedavg, fedbif, feddq, fedpaq, signsgd
from fedbif_jax.errors import ConfigError, check

ALGORITHMS = {
    "fedavg": fedavg.make,
    "fedbif": fedbif.make,
    "signsgd": signsgd.make,
    "fedpaq": fedpaq.make,
    "feddq": feddq.make,
    "dadaquant": dadaquant.make,
}


def register_algorithm(name: str, make, *, replace: bool = False) -> None:
  """Adds a user algorithm under `name`, selectable as ``config.algorithm``.

  Args:
    name: the config value that picks it.
    make: ``make(config, predicate) -> base.Algorithm``, as the built-in factories; it reads its
      own hyperparameters from the config (add a section for them to the config before locking
      it) and raises `ConfigError` or ValueError naming a bad field. ``predicate(path, leaf)``
      says which params leaves are compressed kernels.
    replace: allow replacing an algorithm already registered under `name`.
  Registration lives in this process, as for `fedbif_jax.models.register_model`.
  """
  registry.add(ALGORITHMS, "algorithm", name, make, replace)


def get_algorithm(config, predicate=bits_lib.is_kernel) -> base.Algorithm:
  """The algorithm named by `config.algorithm`, built from its config section."""
  name = config.algorithm
  check(name in ALGORITHMS, "algorithm", f"one of {', '.join(sorted(ALGORITHMS))}", name)
  try:
    return ALGORITHMS[name](config, predicate)
  except ConfigError:
    raise
  except ValueError as e:  # validation errors of the core functions, already one line
    raise ConfigError(str(e)) from None
