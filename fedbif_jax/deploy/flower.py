"""Flower (flwr 1.42) glue: the ServerApp and ClientApp of the Flower App that ``pyproject.toml``
declares, which carry our wire-encoded payloads, and a command line that starts a SuperLink,
SuperNodes and a run on one machine.

Needs the optional extra: ``pip install -r requirements-flower.txt``.

The Flower App. The repository is the app: ``[tool.flwr.app]`` in ``pyproject.toml`` names
`server_app` and `client_app` (components), the run config (``[tool.flwr.app.config]``, below)
and what the Flower App Bundle carries (``fab-include``: the ``fedbif_jax`` package, ``configs/``
and what ``configs/cifar10_study.py`` reads). ``flwr run . <connection>`` builds the bundle from
the checkout and submits it; the SuperLink and every SuperNode install it under their
``$FLWR_HOME/apps`` and import the components from there (Flower puts the bundle first on
``sys.path``), so every process runs the code that was submitted, and a node needs no checkout,
only the dependencies (``requirements-flower.txt``; start the SuperLink with
``--disable-runtime-dependency-installation``, else it ``uv sync``s them for every run). Flower
1.42 keeps SuperLink connections in ``$FLWR_HOME/config.toml`` (``[superlink.<name>]``), not in
the app: a ``[tool.flwr.federations]`` table would be moved there by ``flwr run``, which comments
it out of ``pyproject.toml``.

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

Topology (Flower's Deployment Runtime, HTTP): one SuperLink (the server; it starts our
`server_app` in a ``flwr-serverapp`` process for a run) and one SuperNode per client, started as
``flower-supernode --node-config "partition-id=N num-partitions=M"`` (Flower's keys: the client
id whose shard it trains, and ``config.num_clients``, checked when given). A SuperNode starts our
`client_app` in a fresh ``flwr-clientapp`` process for every message, so the ClientApp keeps
what depends on the config alone on disk (``cache-dir`` in the node config, default
``~/.cache/fedbif_jax/flower``, ``''`` for none): the data set and JAX's compiled programs
(`cache`).

A run (`run_server`):

1. registration: a ``query`` message to every connected SuperNode; each answers with its
   ``partition-id`` and ``num-partitions``. The server plans each round by client id and must
   send client c's message to the node that holds shard c, and Flower 1.42 gives a ServerApp
   node ids only (a node's config stays on its SuperNode), so it asks once;
2. round t, for the selected clients (`roles.Server.open_round`): a ``train`` message with the
   downlink as one uint8 `Array` of `wire.encode` bytes (``downlink/payload``; bit-packed, or
   entropy-coded with ``wire_codec=entropy``, the uplinks too), the round, the client id and the
   run key (``round`` ConfigRecord). The client (`roles.Client.train`) decodes it, trains, and
   replies with its uplink as one uint8 `Array` (``uplink/payload``) and its ``loss_sum`` /
   ``count`` (``metrics`` MetricRecord); it keeps its persistent state (FedBiF's virtual bits,
   SignSGD's copy of the kernels; the other algorithms have none) for its next round,
   wire-encoded (see Resume);
3. `roles.Server.close_round` validates every uplink (`payload.validate`); a missing, failed or
   malformed reply is dropped with a logged one-line reason and the round goes on with the
   others. The server never crashes on a client's bytes. Then it appends the round's row to
   ``metrics.jsonl`` and checkpoints its state before the next round starts.

Resume. The server checkpoints its state after every round (``config.checkpoint_every`` is not
used) as the simulator does: orbax, ``<workdir>/checkpoints``, step N = N rounds done, written to a
temporary folder and renamed (`train.checkpoint_manager`; `roles.Server.save`; the checkpoint
holds ``server``, the simulator's server state, and the run key), so `train.load_global` reads a
deployment's workdir too. A server started on a workdir with checkpoints continues after the
newest one, as ``launch.py`` does: it logs ``resumed from <workdir>/checkpoints at round N``,
drops the rows of later rounds from ``metrics.jsonl`` (a torn last line too;
`train.rewind_jsonl`) and does those rounds again. A different config (apart from
`train.RESUMABLE_CHANGES`, e.g. more ``rounds``) is refused with the simulator's one-line error
(`train.check_resumable`). Round t's clients, batches and keys derive from the config and t alone
(`train.plan_round`), so with every client's state intact the resumed run equals an
uninterrupted one bit for bit (``tests/test_flower_resume.py``).

Client state. Flower gives every run a fresh `Context.state`, and a restarted server is a new
run, so the state must outlive it elsewhere: a SuperNode with a ``state-dir`` in its node config
(what ``supernode`` and ``local`` start) keeps its client's state in files there
(`roles.StateFiles`: ``<state-dir>/<run key>/client-<id>/round-<t>.state``, the two newest
rounds, under a random key the server keeps in its checkpoint), on its own machine. It then
survives a restart of the server, of the SuperNode (same ``state-dir``), or of both: a client
asked for round t starts from its state after the last round before t that selected it
(`roles.Client.previous_round`), also when it had already trained round t before the server
died. A SuperNode without a ``state-dir`` keeps the state in `Context.state`, which lasts for one
run only. A client whose state is missing (no ``state-dir``, another ``state-dir``, files
deleted) or unreadable starts from the newest state it has from before round t, or else from its
initial state, and logs why; the server logs it too and lists it in the row's ``state_lost``: the
run goes on but no longer equals an uninterrupted one. For FedBiF that means virtual bits of the
initial magnitudes whose signs are re-inherited from the received integers (as on a client's
first round), so the magnitudes it had learned are lost; a SignSGD client trains from the initial
kernels plus the latest vote instead of the model, for the rest of the run, so restart SignSGD's
SuperNodes only with their state folder. FedAvg, FedPAQ, FedDQ and DAdaQuant clients have no
state. Nothing deletes the state files of a finished run (FedBiF: two copies of m float32 virtual
bits per weight and client); remove the state folders when a run is done.

Bytes: the rows of ``<workdir>/metrics.jsonl`` count the payload bytes that crossed the
transport (``downlink_bytes_sent``: the downlink message length x the clients it went to;
``uplink_bytes_received`` / ``uplink_bytes_accepted``; their running sums are the rows'
``cumulative_*_bytes``, the summary's ``total_*_bytes``) next to the ledger the simulator keeps
(``uplink_bits`` / ``downlink_bits`` from `wire.coded_sizes` over the accepted clients, bpp);
each client also reports the lengths it received and sent. Flower's own framing (the ``.npy``
header of an `Array`, protobuf, HTTP) is not counted in the ledger; ``*_array_bytes`` give the
`Array` sizes with their header.

The server writes ``config.json``, ``metrics.jsonl``, ``checkpoints/`` and ``summary.json``
(the simulator's summary, `train._summary`, plus the transport's counts) to the run's workdir.
Running the same ``local`` (or ``run``) command with the same ``--workdir`` again resumes it;
``local`` keeps the SuperNodes' state folders under ``<workdir>/flower_home``.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any, Mapping, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.app import RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedbif_jax.deploy.payload import PayloadError

# The Flower App's folder: the repository (pyproject.toml), or the installed bundle on a node.
APP_DIR = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
log = logging.getLogger("fedbif_jax")

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
STATE_KEY = "fedbif-client-state"       # Context.state record: the wire-encoded client state
STATE_ROUND_KEY = "fedbif-client-state-round"  # Context.state record: the round it is from
CONNECTION = "local-deployment"         # the SuperLink connection `run` and `local` write


# ----------------------------------------------------------------------------- configs


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


def _log_to_stdout() -> None:
  """Our progress lines on stdout (what ``flwr run --stream`` shows), once per process."""
  # orbax installs a root handler at import; flwr's own (DEBUG) records would print twice.
  logging.getLogger("flwr").propagate = False
  if not log.handlers:
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
    log.addHandler(handler)
    log.setLevel(logging.INFO)
    log.propagate = False


# ----------------------------------------------------------------------------- messages


def _to_flower(data: np.ndarray) -> ArrayRecord:
  return ArrayRecord({"payload": Array(np.ascontiguousarray(data, np.uint8))})


def _npy_uint8(data: bytes) -> np.ndarray:
  """The 1-D uint8 array of .npy bytes (what `Array` holds), read without trusting the header's
  claimed size (`np.load` would allocate it first); ValueError on anything else."""
  buf = io.BytesIO(data)
  version = np.lib.format.read_magic(buf)
  if version == (1, 0):
    shape, fortran, dtype = np.lib.format.read_array_header_1_0(buf)
  elif version == (2, 0):
    shape, fortran, dtype = np.lib.format.read_array_header_2_0(buf)
  else:
    raise ValueError(f".npy version {version}")
  if dtype != np.uint8 or len(shape) != 1 or fortran:
    raise ValueError(f".npy header says {dtype}{list(shape)}, expected 1-D uint8")
  if shape[0] != len(data) - buf.tell():
    raise ValueError(f".npy header says {shape[0]} bytes, it holds {len(data) - buf.tell()}")
  return np.frombuffer(data, np.uint8, offset=buf.tell())


def read_array(content: RecordDict, record: str, name: str) -> tuple[np.ndarray, int]:
  """(the 1-D uint8 array at ``content[record]["payload"]``, the `Array`'s size with its .npy
  header); any other message raises PayloadError."""
  try:
    item = content[record]
    if not isinstance(item, ArrayRecord):
      raise PayloadError(f"{name}: record {record!r} is a {type(item).__name__}, "
                         "not an ArrayRecord")
    array = item["payload"]
    if not isinstance(array, Array):
      raise PayloadError(f"{name}: {record}/payload is not an Array")
    if array.dtype != "uint8" or len(array.shape) != 1 or array.stype != "numpy.ndarray":
      raise PayloadError(f"{name}: {record}/payload must be a 1-D uint8 numpy array, got "
                         f"{array.dtype}{list(array.shape)} ({array.stype})")
    data = _npy_uint8(bytes(array.data))
  except PayloadError:
    raise
  except Exception as e:  # noqa: BLE001 - a message we cannot read is a malformed message
    raise PayloadError(f"{name}: unreadable {record}/payload ({type(e).__name__}: "
                       f"{' '.join(str(e).split())[:120]})") from None
  if data.shape != tuple(array.shape):
    raise PayloadError(f"{name}: {record}/payload holds {data.size} bytes, its Array says "
                       f"{list(array.shape)}")
  return data, len(array.data)


def reply_of(message: Message, client: int) -> tuple[Any, int]:
  """(a `roles.Reply`, or the reason there is none; the uplink `Array`'s size) of a client's
  reply message. Never raises: whatever a client sends ends up as a Reply or a reason."""
  from fedbif_jax.deploy.roles import Reply
  name = f"uplink of client {client}"
  try:
    if message.has_error():
      error = message.error
      return f"client error {error.code}: {' '.join(str(error.reason).split())[:200]}", 0
    data, array_bytes = read_array(message.content, "uplink", name)
    metrics = message.content["metrics"]
    if not isinstance(metrics, MetricRecord):
      raise PayloadError(f"{name}: record 'metrics' is not a MetricRecord")
    return Reply(data, dict(metrics)), array_bytes
  except PayloadError as e:
    return str(e), 0
  except Exception as e:  # noqa: BLE001 - e.g. a record missing from the content
    return f"{name}: unreadable reply ({type(e).__name__}: {' '.join(str(e).split())[:120]})", 0


# ----------------------------------------------------------------------------- server


server_app = ServerApp()


@server_app.main()
def _server_main(grid: Grid, context: Context) -> None:
  _log_to_stdout()
  import fedbif_jax
  from fedbif_jax.deploy import cache
  from fedbif_jax.errors import ConfigError
  run_config = context.run_config
  log.info("fedbif_jax %s from %s", fedbif_jax.__version__, os.path.dirname(fedbif_jax.__file__))
  try:
    config, workdir = config_of(run_config), workdir_of(run_config)
    timeouts = {"round_timeout": seconds_of(run_config, ROUND_TIMEOUT_KEY),
                "node_timeout": seconds_of(run_config, NODE_TIMEOUT_KEY)}
  except ConfigError as e:
    log.error("error: %s", e)
    raise
  cache.use_compilation_cache(cache.DEFAULT_DIR)
  run_server(grid, config, workdir, **timeouts)


def register_nodes(grid: Grid, num_clients: int, timeout: float) -> dict[int, int]:
  """{client id: node id}: asks every connected SuperNode for its ``partition-id`` (and
  ``num-partitions``) until all of 0..num_clients-1 are held; a node without one, with another
  ``num-partitions``, or a duplicate, is ignored with a warning. Raises RuntimeError naming the
  missing clients after `timeout` seconds."""
  nodes: dict[int, int] = {}
  asked: set[int] = set()
  deadline = time.time() + timeout
  while len(nodes) < num_clients and time.time() < deadline:
    new = [n for n in grid.get_node_ids() if n not in asked]
    if not new:
      time.sleep(0.5)
      continue
    asked.update(new)
    queries = [Message(RecordDict({"query": ConfigRecord({"want": PARTITION_KEY})}),
                       dst_node_id=n, message_type=MessageType.QUERY) for n in new]
    for reply in grid.send_and_receive(queries, timeout=max(1.0, deadline - time.time())):
      node = reply.metadata.src_node_id
      try:
        info = reply.content["node"]
        client, total = int(info[PARTITION_KEY]), int(info.get(NUM_PARTITIONS_KEY, num_clients))
      except Exception:  # noqa: BLE001 - an error reply, or no partition-id
        log.warning("node %d: no usable %s; ignored", node, PARTITION_KEY)
        continue
      if total != num_clients:
        log.warning("node %d: %s=%d, the config has num_clients=%d; ignored", node,
                    NUM_PARTITIONS_KEY, total, num_clients)
      elif not 0 <= client < num_clients or client in nodes:
        log.warning("node %d: %s=%d is out of range or taken; ignored", node, PARTITION_KEY, client)
      else:
        nodes[client] = node
  missing = sorted(set(range(num_clients)) - set(nodes))
  if missing:
    raise RuntimeError(f"no SuperNode with {PARTITION_KEY} in {missing} connected within "
                       f"{timeout:.0f}s (start one per client: --node-config "
                       f"\"{PARTITION_KEY}=N {NUM_PARTITIONS_KEY}={num_clients}\")")
  log.info("registered %d clients: %s", len(nodes),
           ", ".join(f"{c}->node {n}" for c, n in sorted(nodes.items())))
  return nodes


def _summary(rows: list[dict], config) -> dict:
  """The simulator's summary of the rows (`train._summary`: accuracy, loss, bpp, total bytes,
  wall time, environment) and what only a deployment measures."""
  from fedbif_jax import train as train_lib
  summary = train_lib._summary(rows, config)  # pylint: disable=protected-access
  summary.update({
      "uplink_bytes_accepted": sum(r["uplink_bytes_accepted"] for r in rows),
      "ledger_downlink_bytes": sum(r["downlink_bits"] // 8 for r in rows),
      "ledger_uplink_bytes": sum(r["uplink_bits"] // 8 for r in rows),
      "downlink_array_bytes": sum(r["downlink_array_bytes"] for r in rows),
      "uplink_array_bytes": sum(r["uplink_array_bytes"] for r in rows),
      "dropped_uplinks": sum(len(r["dropped"]) for r in rows),
  })
  return summary


def run_server(grid: Grid, config, workdir: str, round_timeout: float = 600.0,
               node_timeout: float = 120.0) -> dict:
  """All rounds of `config` over `grid` (see the module docstring); returns the summary.

  Writes config.json, metrics.jsonl (one row per round), an orbax checkpoint after every round
  (``checkpoints/``) and summary.json to `workdir`. A workdir that holds checkpoints of the same
  config is resumed after its newest one, like the simulator's: the rows of later rounds are
  dropped from metrics.jsonl and those rounds are done again.

  Raises:
    ConfigError: `workdir` is not writable or holds a run made with another config
      (`train.check_resumable`).
    RuntimeError: the clients do not all register.
    train.TrainingDiverged: a non-finite loss. A client's bytes never raise.
  """
  from fedbif_jax import train as train_lib
  from fedbif_jax.deploy import roles
  from fedbif_jax.errors import ConfigError
  try:
    os.makedirs(workdir, exist_ok=True)
    train_lib.check_writable(workdir)
    train_lib.check_resumable(workdir, config)
  except (ConfigError, OSError) as e:
    log.error("error: %s", e)
    raise
  with open(os.path.join(workdir, "config.json"), "w") as f:
    f.write(config.to_json_best_effort(indent=2, sort_keys=True))
  server = roles.Server(config)
  manager = train_lib.checkpoint_manager(workdir)
  start = server.restore(manager)
  if start:
    log.info("resumed from %s at round %d", manager.directory, start)
  metrics_path = os.path.join(workdir, "metrics.jsonl")
  rows = train_lib.rewind_jsonl(metrics_path, start)
  nodes = register_nodes(grid, config.num_clients, node_timeout) if start < config.rounds else {}
  client_of = {n: c for c, n in nodes.items()}
  for t in range(start, config.rounds):
    rnd = server.open_round(t)
    downlink = _to_flower(rnd.message)
    messages = [Message(RecordDict({"downlink": downlink,
                                    "round": ConfigRecord({"round": t, "client-id": int(c),
                                                           "run-key": server.run_key})}),
                        dst_node_id=nodes[int(c)], message_type=MessageType.TRAIN)
                for c in rnd.plan.ids]
    replies, array_bytes, client_counts = {}, 0, {}
    for message in grid.send_and_receive(messages, timeout=round_timeout):
      client = client_of.get(message.metadata.src_node_id)
      if client is None or client in replies or client not in rnd.plan.ids:
        continue
      reply, size = reply_of(message, client)
      array_bytes += size
      if not isinstance(reply, str):
        client_counts[str(client)] = {k: reply.metrics.get(k) for k in ("downlink_bytes",
                                                                         "uplink_bytes")}
      replies[client] = reply
    for c in rnd.plan.ids:
      replies.setdefault(int(c), f"no reply within {round_timeout:.0f}s")
    row = server.close_round(rnd, replies)
    # Running totals of the bytes that crossed the transport (the simulator's: of its ledger,
    # which they equal when every client is accepted).
    up = sum(r["uplink_bytes_received"] for r in rows + [row])
    down = sum(r["downlink_bytes_sent"] for r in rows + [row])
    row.update({"downlink_array_bytes": len(downlink["payload"].data) * len(messages),
                "uplink_array_bytes": array_bytes, "client_reported_bytes": client_counts,
                "cumulative_uplink_bytes": up, "cumulative_downlink_bytes": down,
                "cumulative_bytes": up + down})
    rows.append(row)
    with open(metrics_path, "a") as f:
      f.write(json.dumps(row) + "\n")
    server.save(manager, t + 1)  # a kill before this point redoes round t on resume
    log.info("round %d/%d  acc %.4f  loss %.4f  up %.3f bpp  down %.3f bpp  accepted %d/%d  "
             "sent down %d B (%d x %d)  received up %d B (accepted %d, ledger %d)  %.1fs",
             t + 1, config.rounds, row["test_accuracy"], row["test_loss"], row["uplink_bpp"],
             row["downlink_bpp"], len(row["accepted"]), len(rnd.plan.ids),
             row["downlink_bytes_sent"], len(messages), row["downlink_message_bytes"],
             row["uplink_bytes_received"], row["uplink_bytes_accepted"],
             row["uplink_bits"] // 8, row["wall_seconds"])
  summary = _summary(rows, config)
  train_lib.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  log.info("summary: %s", json.dumps(summary))
  return summary


# ----------------------------------------------------------------------------- client


client_app = ClientApp()
_CLIENTS: dict[tuple, Any] = {}   # (config, cache dir) -> (roles.Client, cache note), per process


def cache_dir_of(node_config: Mapping[str, Any]) -> str:
  """The SuperNode's ``cache-dir`` (`cache.DEFAULT_DIR` when it has none; '' turns it off)."""
  from fedbif_jax.deploy import cache
  value = node_config.get(CACHE_DIR_KEY)
  return cache.DEFAULT_DIR if value is None else os.path.expanduser(str(value))


def _client_role(context: Context) -> tuple[Any, str]:
  """(the `roles.Client` of the run's config, a note on where its data set came from), built once
  per process (`cache.client_role`: its data set and compiled programs from the node's cache)."""
  from fedbif_jax.deploy import cache
  cache_dir = cache_dir_of(context.node_config)
  cache.use_compilation_cache(cache_dir)
  key = (str(context.run_config.get(CONFIG_KEY)), *overrides_of(context.run_config), cache_dir)
  if key not in _CLIENTS:
    _CLIENTS[key] = cache.client_role(config_of(context.run_config), cache_dir)
  return _CLIENTS[key]


@client_app.query()
def _query(message: Message, context: Context) -> Message:
  found = {k: int(context.node_config[k]) for k in (PARTITION_KEY, NUM_PARTITIONS_KEY)
           if k in context.node_config}
  return Message(RecordDict({"node": ConfigRecord(found)}), reply_to=message)


def _load_client_state(context: Context, run_key: str, role, t: int, client: int
                       ) -> tuple[Any, bool]:
  """(the state `client` starts round t from, whether that is not its state after its last
  selection before t, as an uninterrupted run's would be). Read from its `roles.StateFiles` when
  the SuperNode has a ``state-dir``, else from `Context.state` (which lasts as long as this Flower
  run and SuperNode process). A state that is missing, from another round than its last selection
  before t, or unreadable is logged; the newest one before t is used if there is one, the initial
  one if not."""
  from fedbif_jax.deploy import payload as payload_lib
  from fedbif_jax.deploy import roles
  expected = role.previous_round(t, client)
  state_dir = context.node_config.get(STATE_DIR_KEY)
  found = None
  if state_dir:
    found = roles.StateFiles(str(state_dir), run_key, client).newest_before(t)
  elif STATE_KEY in context.state and STATE_ROUND_KEY in context.state:
    r = int(context.state[STATE_ROUND_KEY]["round"])
    if r < t:
      found = r, read_array(context.state, STATE_KEY, "stored client state")[0]
  state = None
  if found is not None:
    try:
      state = payload_lib.validate(found[1], role.state_spec, "stored client state")
    except PayloadError as e:
      log.warning("client %d round %d: %s; ignored", client, t, e)
      found = None
  lost = expected is not None and (found is None or found[0] != expected)
  if lost:
    where = f"{STATE_DIR_KEY} {state_dir}" if state_dir else "this SuperNode's Context.state"
    log.warning("client %d round %d: no state from its round %d in %s; it starts from %s (the run "
                "no longer equals an uninterrupted one)", client, t, expected, where,
                f"its state from round {found[0]}" if found else "its initial state")
  if state is None:
    state = role.initial_state(client)
  return state, lost


def _save_client_state(context: Context, run_key: str, t: int, client: int,
                       data: np.ndarray) -> None:
  """Keeps `client`'s state after round t where `_load_client_state` looks for it."""
  from fedbif_jax.deploy import roles
  state_dir = context.node_config.get(STATE_DIR_KEY)
  if state_dir:
    roles.StateFiles(str(state_dir), run_key, client).save(t, data)
  else:
    context.state[STATE_KEY] = _to_flower(data)
    context.state[STATE_ROUND_KEY] = ConfigRecord({"round": int(t)})


@client_app.train()
def _train(message: Message, context: Context) -> Message:
  _log_to_stdout()
  from fedbif_jax.deploy import payload as payload_lib
  round_info = message.content["round"]
  t, client = int(round_info["round"]), int(round_info["client-id"])
  own = context.node_config.get(PARTITION_KEY)
  if own is None or int(own) != client:
    raise ValueError(f"this SuperNode trains client {own}, the server asked for client {client}")
  started = time.time()
  role, note = _client_role(context)
  setup = time.time() - started
  downlink, _ = read_array(message.content, "downlink", "downlink")
  run_key = str(round_info.get("run-key", ""))
  state, lost = _load_client_state(context, run_key, role, t, client)
  uplink, metrics, new_state = role.train(t, client, downlink, state)
  _save_client_state(context, run_key, t, client, payload_lib.to_array(new_state))
  log.info("client %d round %d: received %d B, sent %d B, loss %.4f, %.1fs (setup %.1fs: %s)",
           client, t, downlink.size, uplink.size,
           metrics["loss_sum"] / max(metrics["count"], 1.0), time.time() - started, setup, note)
  metrics = MetricRecord({**metrics, "downlink_bytes": int(downlink.size),
                          "uplink_bytes": int(uplink.size), "state_lost": int(lost)})
  return Message(RecordDict({"uplink": _to_flower(uplink), "metrics": metrics}), reply_to=message)


# ----------------------------------------------------------------------------- processes


def _bin(name: str) -> str:
  """A console script of this Python environment (flwr's commands)."""
  here = os.path.join(os.path.dirname(sys.executable), name)
  found = here if os.path.exists(here) else shutil.which(name)
  if not found:
    raise FileNotFoundError(f"{name} not found: pip install -r requirements-flower.txt")
  return found


def process_env(home: str, jax_cache: str | None) -> dict:
  """Environment of a SuperLink, SuperNode or ``flwr run``: its own FLWR_HOME, this Python's
  scripts on PATH, no update check or telemetry (offline), and JAX's persistent compilation cache
  at `jax_cache` (if given). The apps need no PYTHONPATH: they run from the installed bundle."""
  env = dict(os.environ)
  env["FLWR_HOME"] = home
  env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
  env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
  env["FLWR_TELEMETRY_ENABLED"] = "0"
  env["PYTHONUNBUFFERED"] = "1"
  if jax_cache:
    env.setdefault("JAX_COMPILATION_CACHE_DIR", jax_cache)
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  return env


def superlink_command(port: int, host: str = "127.0.0.1") -> list[str]:
  """``flower-superlink`` (HTTP on host:port, no TLS) with the app's dependencies taken from this
  environment (no ``uv sync`` per run)."""
  return [_bin("flower-superlink"), "--insecure", "--host", host, "--port", str(port),
          "--disable-runtime-dependency-installation"]


def check_quote_free(path: str, field: str, why: str = "") -> str:
  """Returns `path`; raises ValueError naming `field` if it holds a single quote (a path goes into
  Flower's node config as a TOML literal string, which cannot contain one)."""
  if "'" in path:
    raise ValueError(f"{field}: must not contain a single quote{why}, got {path!r}")
  return path


def supernode_command(superlink: str, partition_id: int, num_partitions: int, port: int,
                      state_dir: str | None = None, cache_dir: str | None = None) -> list[str]:
  """``flower-supernode`` for client `partition_id` of `num_partitions`; with `state_dir`, the
  client keeps its state in files there (`roles.StateFiles`), else in the SuperNode's memory for
  one run only; `cache_dir` ('' for none) replaces `cache.DEFAULT_DIR`."""
  node_config = f"{PARTITION_KEY}={int(partition_id)} {NUM_PARTITIONS_KEY}={int(num_partitions)}"
  for key, path in ((STATE_DIR_KEY, state_dir), (CACHE_DIR_KEY, cache_dir)):
    if path is not None:
      path = check_quote_free(os.path.abspath(path) if path else "", f"--{key}")
      node_config += f" {key}='{path}'"
  return [_bin("flower-supernode"), "--insecure", "--superlink", superlink, "--host", "127.0.0.1",
          "--port", str(port), "--node-config", node_config]


def check_app() -> str:
  """The Flower App's folder (``pyproject.toml`` with ``[tool.flwr.app]``); FileNotFoundError
  when this package is not a checkout's (a non-editable install)."""
  path = os.path.join(APP_DIR, "pyproject.toml")
  if not os.path.isfile(path) or "[tool.flwr.app]" not in open(path, encoding="utf-8").read():
    raise FileNotFoundError(f"no Flower App at {APP_DIR} (pyproject.toml with [tool.flwr.app]): "
                            "run from a checkout installed with pip install -e .")
  return APP_DIR


def launcher_run_config(config_path: str, overrides: Sequence[str], workdir: str,
                        round_timeout: float, node_timeout: float) -> dict:
  """The run config of launch.py-style arguments (``--config.a.b=value`` overrides)."""
  return {CONFIG_KEY: portable_config_path(config_path),
          OVERRIDES_KEY: " ".join(shlex.quote(o.removeprefix("--config.")) for o in overrides),
          WORKDIR_KEY: os.path.abspath(workdir), ROUND_TIMEOUT_KEY: float(round_timeout),
          NODE_TIMEOUT_KEY: float(node_timeout)}


def run_command(workdir: str, superlink: str, run_config: Mapping[str, Any]) -> tuple[list, str]:
  """(``flwr run <app> local-deployment --stream --run-config <file>``, its FLWR_HOME): writes the
  run config as a .toml file and a Flower configuration whose connection ``local-deployment`` is
  the SuperLink at `superlink` (insecure), both under `workdir`."""
  import tomli_w
  home = os.path.join(workdir, "flower_cli")
  os.makedirs(home, exist_ok=True)
  with open(os.path.join(home, "config.toml"), "wb") as f:
    tomli_w.dump({"superlink": {"default": CONNECTION,
                                CONNECTION: {"address": superlink, "insecure": True}}}, f)
  path = os.path.join(home, "run_config.toml")
  with open(path, "wb") as f:
    tomli_w.dump(dict(run_config), f)
  return [_bin("flwr"), "run", check_app(), CONNECTION, "--stream", "--run-config", path], home


def free_port() -> int:
  with contextlib.closing(socket.socket(socket.AF_INET, socket.SOCK_STREAM)) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def wait_for_superlink(port: int, timeout: float = 60.0, process=None) -> None:
  """Returns once the SuperLink at 127.0.0.1:port answers /health; RuntimeError otherwise."""
  deadline = time.time() + timeout
  while time.time() < deadline:
    if process is not None and process.poll() is not None:
      raise RuntimeError(f"flower-superlink exited with code {process.returncode}")
    try:
      with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
        if r.status == 200:
          return
    except OSError:
      time.sleep(0.3)
  raise RuntimeError(f"the SuperLink on 127.0.0.1:{port} did not answer within {timeout:.0f}s")


def descendants(pid: int) -> list[int]:
  """All live descendants of `pid` (children first), from /proc; [] where /proc is missing."""
  children: dict[int, list[int]] = {}
  try:
    entries = os.listdir("/proc")
  except OSError:
    return []
  for entry in entries:
    if entry.isdigit():
      try:
        with open(f"/proc/{entry}/stat") as f:
          ppid = int(f.read().rsplit(")", 1)[1].split()[1])
      except (OSError, ValueError, IndexError):
        continue
      children.setdefault(ppid, []).append(int(entry))
  out, todo = [], [pid]
  while todo:
    for child in children.get(todo.pop(), []):
      out.append(child)
      todo.append(child)
  return out


def _signal(processes: Sequence[subprocess.Popen], pids, sig) -> None:
  """`sig` to each started process's group and to each pid, ignoring those already gone."""
  for p in processes:
    with contextlib.suppress(OSError):
      os.killpg(p.pid, sig)
  for pid in pids:
    with contextlib.suppress(OSError):
      os.kill(pid, sig)


def stop_processes(processes: Sequence[subprocess.Popen], timeout: float = 10.0) -> None:
  """Stops processes this code started (each in its own session) and everything they started:
  SIGTERM to each one's process group and to its descendants (the SuperLink starts its
  ``flower-superexec`` in a new session), SIGKILL whatever is left after `timeout` seconds,
  and reaps the direct children."""
  targets = set()
  for p in processes:
    if p.poll() is None:
      targets.add(p.pid)
    targets.update(descendants(p.pid))
  _signal(processes, targets, signal.SIGTERM)
  deadline = time.time() + timeout
  for p in processes:
    with contextlib.suppress(subprocess.TimeoutExpired):
      p.wait(timeout=max(0.1, deadline - time.time()))
  for pid in targets:
    while time.time() < deadline and os.path.exists(f"/proc/{pid}") and not _zombie(pid):
      time.sleep(0.1)
  _signal(processes, targets, signal.SIGKILL)
  for p in processes:
    with contextlib.suppress(subprocess.TimeoutExpired):
      p.wait(timeout=5)


def _zombie(pid: int) -> bool:
  try:
    with open(f"/proc/{pid}/stat") as f:
      return f.read().rsplit(")", 1)[1].split()[0] == "Z"
  except (OSError, IndexError):
    return True


def start(command: list[str], env: dict, log_path: str) -> subprocess.Popen:
  """Starts a process in its own session (so `stop_processes` can end its whole group), with
  stdout and stderr to `log_path`."""
  with open(log_path, "ab") as out:
    return subprocess.Popen(command, env=env, stdout=out, stderr=subprocess.STDOUT,
                            stdin=subprocess.DEVNULL, start_new_session=True)


# ----------------------------------------------------------------------------- command line


def _parser() -> argparse.ArgumentParser:
  parser = argparse.ArgumentParser(
      prog="python -m fedbif_jax.deploy.flower",
      description="Run the Flower App of this repository (pyproject.toml [tool.flwr.app]): a "
                  "SuperLink (server), one SuperNode per client, and a run through `flwr run`. "
                  "Config flags are launch.py's: --config=FILE --config.a.b=value ...")
  sub = parser.add_subparsers(dest="command", required=True)
  home = os.path.join(os.path.expanduser("~"), ".cache", "fedbif_jax", "flower")
  jax_cache = os.path.join(os.path.expanduser("~"), ".cache", "fedbif_jax", "jax")

  def common(p, with_home=True):
    if with_home:
      p.add_argument("--home", default=home,
                     help="base directory of its FLWR_HOME (default %(default)s)")
    p.add_argument("--jax-cache", default=jax_cache,
                   help="JAX persistent compilation cache, shared by the app processes; '' "
                        "disables it (default %(default)s)")

  def cache_dir(p):
    p.add_argument("--cache-dir", default=None,
                   help="where the clients cache their data set (and compiled programs without "
                        "--jax-cache); '' for no cache (default ~/.cache/fedbif_jax/flower)")

  p = sub.add_parser("superlink", help="start the SuperLink (the server) in the foreground")
  p.add_argument("--port", type=int, default=8000, help="its HTTP port (default %(default)s)")
  p.add_argument("--host", default="127.0.0.1",
                 help="address it listens on; 0.0.0.0 for SuperNodes on other machines")
  common(p)
  p = sub.add_parser("supernode", help="start one client's SuperNode in the foreground")
  p.add_argument("--superlink", default="127.0.0.1:8000", help="the SuperLink's host:port")
  p.add_argument("--partition-id", type=int, required=True, help="the client id it trains")
  p.add_argument("--num-partitions", type=int, required=True, help="config.num_clients")
  p.add_argument("--port", type=int, default=0, help="its runtime API port (default: free)")
  p.add_argument("--state-dir", default=None,
                 help="where the client keeps its state between rounds, so that it survives a "
                      "restart of the server or of this SuperNode (default: "
                      "<home>/client-state-<partition-id>)")
  cache_dir(p)
  common(p)
  for name, text in (("run", "submit a run to a running SuperLink and stream its log"),
                     ("local", "start a SuperLink and config.num_clients SuperNodes on "
                               "127.0.0.1, run, and stop them")):
    p = sub.add_parser(name, help=text)
    p.add_argument("--config", required=True, help="config file, e.g. configs/quickstart.py")
    p.add_argument("--workdir", required=True, help="metrics.jsonl, summary.json, ...")
    p.add_argument("--round-timeout", type=float, default=600.0,
                   help="seconds the server waits for a round's replies")
    p.add_argument("--node-timeout", type=float, default=120.0,
                   help="seconds the server waits for every client's SuperNode to connect")
    if name == "run":
      p.add_argument("--superlink", default="127.0.0.1:8000")
    else:
      cache_dir(p)
    common(p, with_home=False)  # FLWR_HOMEs under --workdir
  return parser


def _error(message: str) -> int:
  print(f"error: {message}", file=sys.stderr)
  return 2


def _finish(workdir: str, returncode: int) -> int:
  path = os.path.join(workdir, "summary.json")
  if returncode == 0 and os.path.exists(path):
    with open(path) as f:
      print(f"summary ({path}): {f.read()}")
    return 0
  print(f"error: the run did not finish (flwr run exit code {returncode}, no {path}); see the "
        f"log above and {workdir}/logs", file=sys.stderr)
  return 1


def main(argv: Sequence[str] | None = None) -> int:
  from fedbif_jax.errors import ConfigError
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a for a in argv if a.startswith("--config.")]
  args = _parser().parse_args([a for a in argv if not a.startswith("--config.")])
  jax_cache = args.jax_cache or None
  if args.command == "superlink":
    home = os.path.join(args.home, f"superlink-{args.port}")
    os.makedirs(home, exist_ok=True)
    command = superlink_command(args.port, args.host)
    os.execve(command[0], command, process_env(home, jax_cache))
  if args.command == "supernode":
    port = args.port or free_port()
    home = os.path.join(args.home, f"supernode-{args.partition_id}-{port}")
    state_dir = args.state_dir or os.path.join(args.home, f"client-state-{args.partition_id}")
    try:
      command = supernode_command(args.superlink, args.partition_id, args.num_partitions, port,
                                  state_dir, args.cache_dir)
    except ValueError as e:
      return _error(str(e))
    os.makedirs(home, exist_ok=True)
    os.execve(command[0], command, process_env(home, jax_cache))

  # run / local: the config is checked here first (the server checks it again on its machine).
  workdir = os.path.abspath(args.workdir)
  run_config = launcher_run_config(args.config, overrides, workdir, args.round_timeout,
                                   args.node_timeout)
  try:
    check_app()
    config = config_of(run_config)
    from fedbif_jax.train import check_resumable, validate_config
    validate_config(config)
    check_resumable(workdir, config)
    if args.command == "local":  # it holds the SuperNodes' state folders
      check_quote_free(workdir, "--workdir", " (it holds the SuperNodes' state folders)")
  except (ConfigError, FileNotFoundError, ValueError) as e:
    return _error(str(e))
  os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
  if args.command == "run":
    command, home = run_command(workdir, args.superlink, run_config)
    return _finish(workdir, subprocess.run(command, env=process_env(home, jax_cache)).returncode)

  # local: everything on 127.0.0.1, free ports, logs under <workdir>/logs; each SuperNode keeps
  # its client's state under its FLWR_HOME, so that running this command again resumes the run.
  base = os.path.join(workdir, "flower_home")
  port = free_port()
  processes = []
  try:
    env = process_env(os.path.join(base, "superlink"), jax_cache)
    processes.append(start(superlink_command(port), env,
                           os.path.join(workdir, "logs", "superlink.log")))
    wait_for_superlink(port, process=processes[0])
    for c in range(config.num_clients):
      env = process_env(os.path.join(base, f"supernode-{c}"), jax_cache)
      command = supernode_command(f"127.0.0.1:{port}", c, config.num_clients, free_port(),
                                  os.path.join(base, f"supernode-{c}", "client-state"),
                                  args.cache_dir)
      processes.append(start(command, env, os.path.join(workdir, "logs", f"supernode-{c}.log")))
    print(f"SuperLink on 127.0.0.1:{port}, {config.num_clients} SuperNodes; logs in "
          f"{workdir}/logs", flush=True)
    command, home = run_command(workdir, f"127.0.0.1:{port}", run_config)
    returncode = subprocess.run(command, env=process_env(home, jax_cache)).returncode
  finally:
    stop_processes(processes)
  return _finish(workdir, returncode)


if __name__ == "__main__":
  sys.exit(main())
