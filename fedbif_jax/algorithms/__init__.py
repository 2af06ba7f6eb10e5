"""Federated algorithms by name, all behind `base.Algorithm` (one file per algorithm).

Every factory is ``make(predicate=pytrees.is_kernel, *, <its hyperparameters>)``: the
hyperparameters are keyword-only, without defaults. Their defaults are declared once, in
`fedbif_jax.config.base_config` (the config section named after the algorithm, e.g.
``config.fedpaq``, each field commented there); `get_algorithm` unpacks that section into the
factory, which validates each field (raising a one-line `ConfigError` naming it). A factory that
needs a run-level field (`RUN_FIELDS`: SignSGD's full-participation check, DAdaQuant's epochs
and rounds) names it as a keyword parameter too and gets it from the top of the config; no
factory reads a config, nor another algorithm's section.
"""
from __future__ import annotations

import inspect

from fedbif_jax import pytrees
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

# Run-level config fields a factory receives when it names them as keyword parameters.
RUN_FIELDS = ("num_clients", "clients_per_round", "local_epochs", "rounds")
# Fields of an algorithm's section that the engine reads (not its factory): ``fedbif.
# full_precision_first_last`` picks the compressed kernels (`models.bit_trained_predicate`) for
# every algorithm; it stays in the ``fedbif`` section so that stored configs keep their meaning.
ENGINE_FIELDS = {"fedbif": ("full_precision_first_last",)}


def register_algorithm(name: str, make, *, replace: bool = False) -> None:
  """Adds a user algorithm under `name`, selectable as ``config.algorithm``.

  Args:
    name: the config value that picks it.
    make: ``make(predicate, **hyperparameters) -> base.Algorithm``, as the built-in factories:
      ``predicate(path, leaf)`` says which params leaves are compressed kernels; the keyword
      arguments are the fields of the config section named `name` (add it to the config before
      locking it; none without one) plus any of `RUN_FIELDS` it names. It raises `ConfigError`
      or ValueError naming a bad field.
    replace: allow replacing an algorithm already registered under `name`.
  Registration lives in this process, as for `fedbif_jax.models.register_model`.
  """
  registry.add(ALGORITHMS, "algorithm", name, make, replace)


def hyperparameters(config, name: str, make) -> dict:
  """The keyword arguments of ``make`` for algorithm `name`: its config section (without the
  `ENGINE_FIELDS`) and the `RUN_FIELDS` its signature names. ConfigError for a field of the
  section the factory does not take, or a parameter without default the config lacks."""
  section = config.get(name)
  engine = ENGINE_FIELDS.get(name, ())
  kwargs = {k: v for k, v in (section.items() if section is not None else ())
            if k not in engine}
  params = inspect.signature(make).parameters
  kwargs.update({f: config.get(f) for f in RUN_FIELDS if f in params})
  if not any(p.kind == p.VAR_KEYWORD for p in params.values()):
    for field in sorted(set(kwargs) - set(params)):
      raise ConfigError(f"{name}.{field}: not a hyperparameter of algorithm {name}")
  for field, p in params.items():
    if p.kind == p.KEYWORD_ONLY and p.default is p.empty and field not in kwargs:
      raise ConfigError(f"{name}.{field}: missing from the config (algorithm {name} needs it)")
  return kwargs


def get_algorithm(config, predicate=pytrees.is_kernel) -> base.Algorithm:
  """The algorithm named by `config.algorithm`, built from its config section."""
  name = config.algorithm
  check(name in ALGORITHMS, "algorithm", f"one of {', '.join(sorted(ALGORITHMS))}", name)
  make = ALGORITHMS[name]
  try:
    return make(predicate, **hyperparameters(config, name, make))
  except ConfigError:
    raise
  except ValueError as e:  # validation errors of the core functions, already one line
    raise ConfigError(str(e)) from None
