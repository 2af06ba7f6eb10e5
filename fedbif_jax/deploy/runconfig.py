"""The run config of the Flower App (``[tool.flwr.app.config]`` in ``pyproject.toml``) and the
node config of its SuperNodes: their keys, and the library config a run config describes
(`config_of`, read exactly as ``launch.py`` reads its flags). Shared by the apps (`apps.py`) and
the command line (`flower.py`); no flwr import.

Run config (``flwr run --run-config "key=value ..."`` or a .toml file; `config_of`):

* ``config``: the config file, ``file`` or ``file:arg`` as for ``launch.py --config``, relative
  to the working directory or to the app (the bundle on each node), or absolute;
* ``overrides``: space-separated ``field=value`` pairs (shell quoting), each exactly
  ``launch.py``'s ``--config.field=value`` (the ``--config.`` prefix may be written too);
* ``num-server-rounds``, ``local-epochs``: ``config.rounds`` and ``config.local_epochs`` when > 0
  (0: the config file's); setting one in ``overrides`` too is an error;
* ``workdir``: the server's output folder, on the SuperLink's machine (``~`` expanded);
* ``round-timeout``, ``node-timeout``: seconds the server waits for a round's replies and for
  every client's SuperNode to register.

Node config (``flower-supernode --node-config "key=value ..."``): ``partition-id`` (the client id
the SuperNode trains), ``num-partitions`` (``config.num_clients``, checked when given),
``state-dir`` (where its client keeps its state, `roles.StateFiles`) and ``cache-dir`` (its data
and compilation cache, `cache`; ``''`` for none).
"""
from __future__ import annotations

import os
import shlex
from typing import Any, Mapping, Sequence

# The Flower App's folder: the repository (pyproject.toml), or the installed bundle on a node.
APP_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Run config keys ([tool.flwr.app.config] in pyproject.toml; see the module docstring).
CONFIG_KEY, OVERRIDES_KEY, WORKDIR_KEY = "config", "overrides", "workdir"
ROUNDS_KEY, EPOCHS_KEY = "num-server-rounds", "local-epochs"
ROUND_TIMEOUT_KEY, NODE_TIMEOUT_KEY = "round-timeout", "node-timeout"
NAMED_FIELDS = {ROUNDS_KEY: "rounds", EPOCHS_KEY: "local_epochs"}  # run config key -> config field
# Node config keys of a SuperNode (flower-supernode --node-config).
PARTITION_KEY = "partition-id"          # the client id it trains (Flower's key)
NUM_PARTITIONS_KEY = "num-partitions"   # config.num_clients, checked when given (Flower's key)
STATE_DIR_KEY = "state-dir"             # where it keeps client states (default: Context.state)
CACHE_DIR_KEY = "cache-dir"             # its data and compilation cache ('': none)


def load_config(path: str, overrides: Sequence[str] = ()):
  """The locked config of a config file (``configs/x.py`` or ``configs/x.py:arg``, relative to
  the working directory or the app) with ``--config.a.b=v`` overrides, exactly as ``launch.py``
  reads them. Raises ConfigError (one line) on a bad file, field or value."""
  from absl import flags
  from ml_collections import config_flags

  from fedbif_jax.errors import ConfigError
  bad = [o for o in overrides if not o.startswith("--config.")]
  if bad:
    raise ConfigError(f"overrides: must look like --config.a.b=value, got {bad[0]!r}")
  argv = ["fedbif", f"--config={resolve_config_path(path)}", *overrides]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, flag_values=values, lock_config=True,
                                  sys_argv=argv)
  try:
    values(argv)
    values.config.get("seed")  # surfaces a config file that failed to load
  except (flags.Error, AttributeError, KeyError, TypeError, ValueError, OSError) as e:
    text = " ".join(str(e).replace("\\n", " ").split()).replace("\\'", "'").strip("'\"")
    if isinstance(e, (AttributeError, KeyError)):  # a misspelt field of the locked config
      field, _, hint = text.partition("'")
      text = f"unknown config field {field!r};{hint}"
    raise ConfigError(f"config {' '.join([path, *overrides])}: {text}") from None
  return values.config


def portable_config_path(path: str) -> str:
  """`path` as a run config's ``config``: relative to the app when it lies in the app's
  ``configs/`` (which the bundle carries to every node), else absolute."""
  resolved = resolve_config_path(path)
  file, sep, arg = resolved.partition(":")
  relative = os.path.relpath(file, APP_DIR)
  inside = relative.split(os.sep)[0] == "configs"
  return (relative if inside else file) + sep + arg


def resolve_config_path(path: str) -> str:
  """An absolute config path (``file`` or ``file:arg``): relative to the working directory if the
  file is there, else to the app."""
  file, sep, arg = path.partition(":")
  file = os.path.expanduser(file)
  if not os.path.isabs(file) and not os.path.exists(file):
    file = os.path.join(APP_DIR, file)
  return os.path.abspath(file) + sep + arg


def overrides_of(run_config: Mapping[str, Any]) -> list[str]:
  """The ``--config.field=value`` flags a run config asks for: its ``overrides``, then
  ``num-server-rounds`` and ``local-epochs`` when > 0. Raises ConfigError naming the run config
  key on a malformed value."""
  from fedbif_jax.errors import ConfigError
  try:
    items = shlex.split(str(run_config.get(OVERRIDES_KEY, "")))
  except ValueError as e:
    raise ConfigError(f"{OVERRIDES_KEY}: {e}") from None
  flags = []
  for item in items:
    field, sep, value = item.removeprefix("--config.").partition("=")
    if not sep or not field:
      raise ConfigError(f"{OVERRIDES_KEY}: must be space-separated field=value pairs, "
                        f"got {item!r}")
    flags.append(f"--config.{field}={value}")
  for key, field in NAMED_FIELDS.items():
    value = run_config.get(key, 0)
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
      raise ConfigError(f"{key}: must be an integer >= 0 (0: the config file's {field}), "
                        f"got {value!r}")
    if value:
      if any(f.startswith(f"--config.{field}=") for f in flags):
        raise ConfigError(f"{key}: {field} is set in {OVERRIDES_KEY} too; set it in one place")
      flags.append(f"--config.{field}={value}")
  return flags


def config_of(run_config: Mapping[str, Any]):
  """The config a run config describes (see the module docstring); ConfigError (one line) on a
  bad file, field or value."""
  from fedbif_jax.errors import ConfigError
  path = str(run_config.get(CONFIG_KEY, ""))
  if not path:
    raise ConfigError(f"{CONFIG_KEY}: must name a config file, e.g. configs/quickstart.py")
  return load_config(path, overrides_of(run_config))


def workdir_of(run_config: Mapping[str, Any]) -> str:
  """The run config's ``workdir``, absolute; ConfigError when it is empty."""
  from fedbif_jax.errors import ConfigError
  workdir = str(run_config.get(WORKDIR_KEY, ""))
  if not workdir:
    raise ConfigError(f"{WORKDIR_KEY}: must be the server's output folder, got ''")
  return os.path.abspath(os.path.expanduser(workdir))


def seconds_of(run_config: Mapping[str, Any], key: str) -> float:
  """A positive number of seconds from the run config; ConfigError naming `key` otherwise."""
  from fedbif_jax.errors import ConfigError
  value = run_config.get(key)
  if isinstance(value, bool) or not isinstance(value, (int, float)) or not value > 0:
    raise ConfigError(f"{key}: must be a number of seconds > 0, got {value!r}")
  return float(value)


def launcher_run_config(config_path: str, overrides: Sequence[str], workdir: str,
                        round_timeout: float, node_timeout: float) -> dict:
  """The run config of launch.py-style arguments (``--config.a.b=value`` overrides)."""
  return {CONFIG_KEY: portable_config_path(config_path),
          OVERRIDES_KEY: " ".join(shlex.quote(o.removeprefix("--config.")) for o in overrides),
          WORKDIR_KEY: os.path.abspath(workdir), ROUND_TIMEOUT_KEY: float(round_timeout),
          NODE_TIMEOUT_KEY: float(node_timeout)}
