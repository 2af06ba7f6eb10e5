"""Flower (flwr 1.42) glue: the ServerApp and ClientApp that carry our wire-encoded payloads, and a
command line that starts a SuperLink, SuperNodes and a run on one machine.

Needs the optional extra: ``pip install -r requirements-flower.txt``.

Topology (Flower's Deployment Runtime, everything over HTTP on 127.0.0.1 here): one SuperLink
(the server; it starts our `server_app` in a ``flwr-serverapp`` process for a run), one SuperNode
per client (it starts our `client_app` in a fresh ``flwr-clientapp`` process for every message),
and ``flwr run``, which submits a Flower App Bundle built from a two-line module that imports
`server_app` and `client_app` from here.

A run (`run_server`):

1. registration: a ``query`` message to every connected SuperNode; each answers with its
   ``partition-id`` (``--node-config partition-id=N``), the client id whose shard it trains;
2. round t, for the selected clients (`roles.Server.open_round`): a ``train`` message with the
   downlink as one uint8 `Array` of `wire.encode` bytes (``downlink/payload``; bit-packed, or
   entropy-coded with ``--config.wire_codec=entropy``, the uplinks too), the round, the
   client id and the run key (``round`` ConfigRecord). The client (`roles.Client.train`) decodes
   it, trains, and replies with its uplink as one uint8 `Array` (``uplink/payload``) and its
   ``loss_sum`` / ``count`` (``metrics`` MetricRecord); it keeps its persistent state (FedBiF's
   virtual bits, SignSGD's copy of the kernels; the other algorithms have none) for its next
   round, wire-encoded (see Resume);
3. `roles.Server.close_round` validates every uplink (`payload.validate`); a missing, failed or
   malformed reply is dropped with a logged one-line reason and the round goes on with the
   others. The server never crashes on a client's bytes. Then it appends the round's row to
   ``metrics.jsonl`` and checkpoints its state before the next round starts.

Resume. The server checkpoints its state after every round (``config.checkpoint_every`` is not
used) as the simulator does: orbax, ``<workdir>/checkpoints``, step N = N rounds done, written to a
temporary folder and renamed (`train.checkpoint_manager`; `roles.Server.save`). A server started
on a workdir with checkpoints continues after the newest one, as ``launch.py`` does: it logs
``resumed from <workdir>/checkpoints at round N``, drops the rows of later rounds from
``metrics.jsonl`` (a torn last line too; `train.rewind_jsonl`) and does those rounds again. A
different config (apart from `train.RESUMABLE_CHANGES`, e.g. more ``rounds``) is refused with the
simulator's one-line error (`train.check_resumable`). Round t's clients, batches and keys derive
from the config and t alone (`train.plan_round`), so with every client's state intact the resumed
run equals an uninterrupted one bit for bit (``tests/test_flower_resume.py``).

Client state. Flower gives every run a fresh `Context.state`, and a restarted server is a new
run, so the state must outlive it elsewhere: a SuperNode with a ``state-dir`` in its node config
(what ``supernode`` and ``local`` start) keeps its client's state in files there
(`roles.StateFiles`: ``<state-dir>/<run key>/client-<id>/round-<t>.state``, the two newest
rounds, under a random key the server keeps in its checkpoint), on its own machine. It then
survives a restart of the server, of the SuperNode (same ``--state-dir``), or of both: a client
asked for round t starts from its state after the last round before t that selected it
(`roles.Client.previous_round`), also when it had already trained round t before the server
died. A SuperNode without a
``state-dir`` keeps the state in `Context.state`, which lasts for one run only. A client whose
state is missing (no ``state-dir``, another ``state-dir``, files deleted) or unreadable starts
from the newest state it has from before round t, or else from its initial state, and logs why;
the server logs it too and lists it in the row's ``state_lost``: the run goes on but no longer
equals an uninterrupted one. For FedBiF that means virtual bits of the initial
magnitudes whose signs are re-inherited from the received integers (as on a client's first
round), so the magnitudes it had learned are lost; a SignSGD client trains from the initial
kernels plus the latest vote instead of the model, for the rest of the run, so restart SignSGD's
SuperNodes only with their state folder. FedAvg, FedPAQ, FedDQ and DAdaQuant clients have no
state. Nothing deletes the state files of a finished run (FedBiF: two copies of m float32 virtual
bits per weight and client); remove the state folders when a run is done.

Bytes: the rows of ``<workdir>/metrics.jsonl`` count the payload bytes that crossed the
transport (``downlink_bytes_sent``: the downlink message length x the clients it went to;
``uplink_bytes_received`` / ``uplink_bytes_accepted``) next to the ledger the simulator keeps
(``uplink_bits`` / ``downlink_bits`` from `wire.coded_sizes`, bpp); each client also reports the
lengths it received and sent. Flower's own framing (the ``.npy`` header of an `Array`, protobuf,
HTTP) is not counted in the ledger; ``*_array_bytes`` give the `Array` sizes with their header.

The server writes ``config.json``, ``metrics.jsonl``, ``checkpoints/``, ``summary.json`` and
``final_state.npz`` (the server state, one entry per leaf, named by `jax.tree_util.keystr`) to
the run's workdir. Running the same ``local`` (or ``run``) command with the same ``--workdir``
again resumes it; ``local`` keeps the SuperNodes' state folders under ``<workdir>/flower_home``.

Every Flower message starts a fresh process, so the command line points JAX's persistent
compilation cache (``--jax-cache``) at one directory: only the first round compiles.
"""
from __future__ import annotations

import argparse
import contextlib
import io
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any, Sequence

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.app import RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedbif_jax.deploy.payload import PayloadError

REPO = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
log = logging.getLogger("fedbif_jax")

# Run config keys (the Flower App's [tool.flwr.app.config], written by `write_app`).
CONFIG_KEY, OVERRIDES_KEY, WORKDIR_KEY = "fedbif-config", "fedbif-overrides", "workdir"
ROUND_TIMEOUT_KEY, NODE_TIMEOUT_KEY = "round-timeout", "node-timeout"
PARTITION_KEY = "partition-id"          # node config of a SuperNode: the client id it trains
STATE_DIR_KEY = "state-dir"             # node config of a SuperNode: where it keeps client states
STATE_KEY = "fedbif-client-state"       # Context.state record: the wire-encoded client state
STATE_ROUND_KEY = "fedbif-client-state-round"  # Context.state record: the round it is from
APP_MODULE = "fedbif_flower_app"
CONNECTION = "fedbif"                   # the SuperLink connection name `run` writes


# ----------------------------------------------------------------------------- configs


def load_config(path: str, overrides: Sequence[str] = ()):
  """The locked config of a config file (``configs/x.py`` or ``configs/x.py:arg``, relative to
  the working directory or the repository) with ``--config.a.b=v`` overrides, exactly as
  ``launch.py`` reads them. Raises ConfigError (one line) on a bad file, field or value."""
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
  """`path` relative to the repository when it lies inside it (every machine that runs an app
  has the repository, maybe elsewhere), else absolute."""
  resolved = resolve_config_path(path)
  file, sep, arg = resolved.partition(":")
  relative = os.path.relpath(file, REPO)
  return (relative if not relative.startswith(os.pardir) else file) + sep + arg


def resolve_config_path(path: str) -> str:
  """An absolute config path (``file`` or ``file:arg``): relative to the working directory if the
  file is there, else to the repository."""
  file, sep, arg = path.partition(":")
  if not os.path.isabs(file) and not os.path.exists(file):
    file = os.path.join(REPO, file)
  return os.path.abspath(file) + sep + arg


def _config_from(run_config) -> Any:
  """The config a run carries (its path relative to this machine's repository, or absolute)."""
  path = str(run_config[CONFIG_KEY])
  if not os.path.isabs(path):
    path = os.path.join(REPO, path)
  return load_config(path, json.loads(str(run_config[OVERRIDES_KEY])))


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
  run_config = context.run_config
  run_server(grid, _config_from(run_config), str(run_config[WORKDIR_KEY]),
             round_timeout=float(run_config[ROUND_TIMEOUT_KEY]),
             node_timeout=float(run_config[NODE_TIMEOUT_KEY]))


def register_nodes(grid: Grid, num_clients: int, timeout: float) -> dict[int, int]:
  """{client id: node id}: asks every connected SuperNode for its ``partition-id`` until all of
  0..num_clients-1 are held (a node without one, or a duplicate, is ignored with a warning).
  Raises RuntimeError naming the missing clients after `timeout` seconds."""
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
        client = int(reply.content["node"][PARTITION_KEY])
      except Exception:  # noqa: BLE001 - an error reply, or no partition-id
        log.warning("node %d: no usable %s; ignored", node, PARTITION_KEY)
        continue
      if not 0 <= client < num_clients or client in nodes:
        log.warning("node %d: %s=%d is out of range or taken; ignored", node, PARTITION_KEY, client)
        continue
      nodes[client] = node
  missing = sorted(set(range(num_clients)) - set(nodes))
  if missing:
    raise RuntimeError(f"no SuperNode with {PARTITION_KEY} in {missing} connected within "
                       f"{timeout:.0f}s (start one per client: --partition-id N)")
  log.info("registered %d clients: %s", len(nodes),
           ", ".join(f"{c}->node {n}" for c, n in sorted(nodes.items())))
  return nodes


def save_state(path: str, state: Any) -> None:
  """The server state as an .npz, one entry per leaf named by `jax.tree_util.keystr` (written to
  a temporary file and renamed)."""
  import jax
  leaves = jax.tree_util.tree_flatten_with_path(jax.device_get(state))[0]
  tmp = path + ".tmp.npz"
  np.savez(tmp, **{jax.tree_util.keystr(p): np.asarray(v) for p, v in leaves})
  os.replace(tmp, path)


def _summary(rows: list[dict], config) -> dict:
  from fedbif_jax import train as train_lib
  with_uplinks = [r for r in rows if r.get("accepted")]
  mean = lambda key: (float(np.mean([r[key] for r in with_uplinks])) if with_uplinks
                      else float("nan"))
  return {
      "algorithm": config.algorithm,
      "rounds": len(rows),
      "final_accuracy": rows[-1]["test_accuracy"],
      "best_accuracy": max(r["test_accuracy"] for r in rows),
      "mean_uplink_bpp": mean("uplink_bpp"),
      "mean_downlink_bpp": mean("downlink_bpp"),
      **train_lib.mean_coded_bpp(with_uplinks),
      "downlink_bytes_sent": sum(r["downlink_bytes_sent"] for r in rows),
      "uplink_bytes_received": sum(r["uplink_bytes_received"] for r in rows),
      "uplink_bytes_accepted": sum(r["uplink_bytes_accepted"] for r in rows),
      "ledger_downlink_bytes": sum(r.get("downlink_bits", 0) // 8 for r in rows),
      "ledger_uplink_bytes": sum(r.get("uplink_bits", 0) // 8 for r in rows),
      "downlink_array_bytes": sum(r["downlink_array_bytes"] for r in rows),
      "uplink_array_bytes": sum(r["uplink_array_bytes"] for r in rows),
      "dropped_uplinks": sum(len(r["dropped"]) for r in rows),
  }


def run_server(grid: Grid, config, workdir: str, round_timeout: float = 600.0,
               node_timeout: float = 120.0) -> dict:
  """All rounds of `config` over `grid` (see the module docstring); returns the summary.

  Writes config.json, metrics.jsonl (one row per round), an orbax checkpoint after every round
  (``checkpoints/``), summary.json and final_state.npz to `workdir`. A workdir that holds
  checkpoints of the same config is resumed after its newest one, like the simulator's: the rows
  of later rounds are dropped from metrics.jsonl and those rounds are done again.

  Raises:
    ConfigError: `workdir` holds a run made with another config (`train.check_resumable`).
    RuntimeError: the clients do not all register.
    train.TrainingDiverged: a non-finite loss. A client's bytes never raise.
  """
  from fedbif_jax import train as train_lib
  from fedbif_jax.deploy import roles
  from fedbif_jax.errors import ConfigError
  os.makedirs(workdir, exist_ok=True)
  try:
    train_lib.check_resumable(workdir, config)
  except ConfigError as e:
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
    row.update({"downlink_array_bytes": len(downlink["payload"].data) * len(messages),
                "uplink_array_bytes": array_bytes, "client_reported_bytes": client_counts})
    rows.append(row)
    with open(metrics_path, "a") as f:
      f.write(json.dumps(row) + "\n")
    server.save(manager, t + 1)  # a kill before this point redoes round t on resume
    log.info("round %d/%d  acc %.4f  loss %.4f  up %.3f bpp  down %.3f bpp  accepted %d/%d  "
             "sent down %d B (%d x %d)  received up %d B (accepted %d, ledger %d)  %.1fs",
             t + 1, config.rounds, row["test_accuracy"], row["test_loss"],
             row.get("uplink_bpp", float("nan")), row.get("downlink_bpp", float("nan")),
             len(row["accepted"]), len(rnd.plan.ids), row["downlink_bytes_sent"], len(messages),
             row["downlink_message_bytes"], row["uplink_bytes_received"],
             row["uplink_bytes_accepted"], row.get("uplink_bits", 0) // 8, row["wall_seconds"])
  summary = _summary(rows, config)
  save_state(os.path.join(workdir, "final_state.npz"), server.state)
  train_lib.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
  log.info("summary: %s", json.dumps(summary))
  return summary


# ----------------------------------------------------------------------------- client


client_app = ClientApp()
_CLIENTS: dict[str, Any] = {}   # one roles.Client per config in this process


def _client_role(run_config):
  from fedbif_jax.deploy import roles
  key = json.dumps([str(run_config[CONFIG_KEY]), str(run_config[OVERRIDES_KEY])])
  if key not in _CLIENTS:
    _CLIENTS[key] = roles.Client(_config_from(run_config))
  return _CLIENTS[key]


@client_app.query()
def _query(message: Message, context: Context) -> Message:
  client = context.node_config.get(PARTITION_KEY)
  content = ConfigRecord({PARTITION_KEY: int(client)} if client is not None else {})
  return Message(RecordDict({"node": content}), reply_to=message)


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
  role = _client_role(context.run_config)
  setup = time.time() - started
  downlink, _ = read_array(message.content, "downlink", "downlink")
  run_key = str(round_info.get("run-key", ""))
  state, lost = _load_client_state(context, run_key, role, t, client)
  uplink, metrics, new_state = role.train(t, client, downlink, state)
  _save_client_state(context, run_key, t, client, payload_lib.to_array(new_state))
  log.info("client %d round %d: received %d B, sent %d B, loss %.4f, %.1fs (setup %.1fs)", client,
           t, downlink.size, uplink.size, metrics["loss_sum"] / max(metrics["count"], 1.0),
           time.time() - started, setup)
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
  """Environment of a SuperLink, SuperNode or ``flwr run``: its own FLWR_HOME, the repository on
  PYTHONPATH (the apps import fedbif_jax), this Python's scripts on PATH, no update check or
  telemetry (offline), and JAX's persistent compilation cache at `jax_cache` (if given)."""
  env = dict(os.environ)
  env["FLWR_HOME"] = home
  env["PYTHONPATH"] = os.pathsep.join([REPO] + [p for p in [env.get("PYTHONPATH")] if p])
  env["PATH"] = os.pathsep.join([os.path.dirname(sys.executable), env.get("PATH", "")])
  env["FLWR_DISABLE_UPDATE_CHECK"] = "1"
  env["FLWR_TELEMETRY_ENABLED"] = "0"
  env["PYTHONUNBUFFERED"] = "1"
  if jax_cache:
    env.setdefault("JAX_COMPILATION_CACHE_DIR", jax_cache)
    env.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
  return env


def superlink_command(port: int) -> list[str]:
  return [_bin("flower-superlink"), "--insecure", "--host", "127.0.0.1", "--port", str(port),
          "--disable-runtime-dependency-installation"]


def check_quote_free(path: str, field: str, why: str = "") -> str:
  """Returns `path`; raises ValueError naming `field` if it holds a single quote (a path goes into
  Flower's node config as a TOML literal string, which cannot contain one)."""
  if "'" in path:
    raise ValueError(f"{field}: must not contain a single quote{why}, got {path!r}")
  return path


def supernode_command(superlink: str, partition_id: int, port: int,
                      state_dir: str | None = None) -> list[str]:
  """``flower-supernode`` for client `partition_id`; with `state_dir`, the client keeps its state
  in files there (`roles.StateFiles`), else in the SuperNode's memory for one run only."""
  node_config = f"{PARTITION_KEY}={int(partition_id)}"
  if state_dir:
    state_dir = check_quote_free(os.path.abspath(state_dir), "--state-dir")
    node_config += f" {STATE_DIR_KEY}='{state_dir}'"
  return [_bin("flower-supernode"), "--insecure", "--superlink", superlink, "--host", "127.0.0.1",
          "--port", str(port), "--node-config", node_config]


def write_app(workdir: str, config_path: str, overrides: Sequence[str],
              round_timeout: float = 600.0, node_timeout: float = 120.0) -> str:
  """Writes the Flower App (pyproject.toml + a two-line module) for one run under
  ``<workdir>/flower_app`` and returns its directory. The run config carries the config file
  (relative to the repository when it is in it), the overrides and the server's workdir."""
  import tomli_w
  app = os.path.join(workdir, "flower_app")
  os.makedirs(app, exist_ok=True)
  project = {
      "build-system": {"requires": ["hatchling"], "build-backend": "hatchling.build"},
      "project": {"name": "fedbif-flower", "version": "1.0.0",
                  "description": "fedbif_jax algorithms over Flower", "license": "Apache-2.0",
                  "dependencies": ["flwr==1.42.0"]},
      "tool": {"flwr": {"app": {
          "publisher": "fedbif",
          "components": {"serverapp": f"{APP_MODULE}:server_app",
                         "clientapp": f"{APP_MODULE}:client_app"},
          "config": {CONFIG_KEY: portable_config_path(config_path),
                     OVERRIDES_KEY: json.dumps(list(overrides)),
                     WORKDIR_KEY: os.path.abspath(workdir),
                     ROUND_TIMEOUT_KEY: float(round_timeout),
                     NODE_TIMEOUT_KEY: float(node_timeout)}}}},
  }
  with open(os.path.join(app, "pyproject.toml"), "wb") as f:
    tomli_w.dump(project, f)
  with open(os.path.join(app, f"{APP_MODULE}.py"), "w") as f:
    f.write('"""Flower App entry points; the code is fedbif_jax.deploy.flower."""\n'
            "from fedbif_jax.deploy import flower\n\n"
            "server_app = flower.server_app\n"
            "client_app = flower.client_app\n")
  return app


def run_command(workdir: str, superlink: str, config_path: str, overrides: Sequence[str],
                round_timeout: float = 600.0, node_timeout: float = 120.0) -> tuple[list, str]:
  """(``flwr run`` command, its FLWR_HOME): writes the app and a Flower configuration whose
  default connection is the SuperLink at `superlink` (insecure)."""
  app = write_app(workdir, config_path, overrides, round_timeout, node_timeout)
  home = os.path.join(workdir, "flower_cli")
  os.makedirs(home, exist_ok=True)
  with open(os.path.join(home, "config.toml"), "w") as f:
    f.write(f'[superlink]\ndefault = "{CONNECTION}"\n\n[superlink.{CONNECTION}]\n'
            f'address = "{superlink}"\ninsecure = true\n')
  return [_bin("flwr"), "run", app, CONNECTION, "--stream"], home


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
      description="Run fedbif_jax algorithms over Flower: a SuperLink (server), one SuperNode "
                  "per client, and a run. Config flags are launch.py's: --config=FILE "
                  "--config.a.b=value ...")
  sub = parser.add_subparsers(dest="command", required=True)
  home = os.path.join(os.path.expanduser("~"), ".cache", "fedbif_jax", "flower")
  cache = os.path.join(os.path.expanduser("~"), ".cache", "fedbif_jax", "jax")

  def common(p, with_home=True):
    if with_home:
      p.add_argument("--home", default=home,
                     help="base directory of its FLWR_HOME (default %(default)s)")
    p.add_argument("--jax-cache", default=cache,
                   help="JAX persistent compilation cache, shared by the app processes; '' "
                        "disables it (default %(default)s)")

  p = sub.add_parser("superlink", help="start the SuperLink (the server) in the foreground")
  p.add_argument("--port", type=int, default=9093)
  common(p)
  p = sub.add_parser("supernode", help="start one client's SuperNode in the foreground")
  p.add_argument("--superlink", default="127.0.0.1:9093", help="the SuperLink's host:port")
  p.add_argument("--partition-id", type=int, required=True, help="the client id it trains")
  p.add_argument("--port", type=int, default=0, help="its runtime API port (default: free)")
  p.add_argument("--state-dir", default=None,
                 help="where the client keeps its state between rounds, so that it survives a "
                      "restart of the server or of this SuperNode (default: "
                      "<home>/client-state-<partition-id>)")
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
      p.add_argument("--superlink", default="127.0.0.1:9093")
    common(p, with_home=False)  # FLWR_HOMEs under --workdir
  return parser


def _check_config(path: str, overrides: Sequence[str], workdir: str):
  """The config, checked, and that `workdir` holds no run of another config (the server checks
  it again on its machine); prints the one-line error and exits with 2 otherwise."""
  from fedbif_jax.errors import ConfigError
  from fedbif_jax.train import check_resumable, validate_config
  try:
    config = load_config(path, overrides)
    validate_config(config)
    check_resumable(workdir, config)
  except ConfigError as e:
    print(f"error: {e}", file=sys.stderr)
    sys.exit(2)
  return config


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
  argv = list(sys.argv[1:] if argv is None else argv)
  overrides = [a for a in argv if a.startswith("--config.")]
  args = _parser().parse_args([a for a in argv if not a.startswith("--config.")])
  jax_cache = args.jax_cache or None
  if args.command == "superlink":
    home = os.path.join(args.home, f"superlink-{args.port}")
    os.makedirs(home, exist_ok=True)
    env = process_env(home, jax_cache)
    os.execve(superlink_command(args.port)[0], superlink_command(args.port), env)
  if args.command == "supernode":
    port = args.port or free_port()
    home = os.path.join(args.home, f"supernode-{args.partition_id}-{port}")
    state_dir = args.state_dir or os.path.join(args.home, f"client-state-{args.partition_id}")
    try:
      command = supernode_command(args.superlink, args.partition_id, port, state_dir)
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
    os.makedirs(home, exist_ok=True)
    os.execve(command[0], command, process_env(home, jax_cache))

  workdir = os.path.abspath(args.workdir)
  config = _check_config(args.config, overrides, workdir)
  if args.command == "local":  # checked before anything starts: it holds the state folders
    try:
      check_quote_free(workdir, "--workdir", " (it holds the SuperNodes' state folders)")
    except ValueError as e:
      print(f"error: {e}", file=sys.stderr)
      return 2
  os.makedirs(os.path.join(workdir, "logs"), exist_ok=True)
  if args.command == "run":
    command, home = run_command(workdir, args.superlink, args.config, overrides,
                                args.round_timeout, args.node_timeout)
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
      command = supernode_command(f"127.0.0.1:{port}", c, free_port(),
                                  os.path.join(base, f"supernode-{c}", "client-state"))
      processes.append(start(command, env, os.path.join(workdir, "logs", f"supernode-{c}.log")))
    print(f"SuperLink on 127.0.0.1:{port}, {config.num_clients} SuperNodes; logs in "
          f"{workdir}/logs", flush=True)
    command, home = run_command(workdir, f"127.0.0.1:{port}", args.config, overrides,
                                args.round_timeout, args.node_timeout)
    returncode = subprocess.run(command, env=process_env(home, jax_cache)).returncode
  finally:
    stop_processes(processes)
  return _finish(workdir, returncode)


if __name__ == "__main__":
  sys.exit(main())
