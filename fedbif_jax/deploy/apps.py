"""The Flower (flwr 1.42) apps of the Flower App that ``pyproject.toml`` declares: `server_app`
and `client_app`, which carry our wire-encoded payloads between `roles.Server` and
`roles.Client`. ``python -m fedbif_jax.deploy.flower`` (`flower.py`) starts a SuperLink,
SuperNodes and a run of them on one machine.

Needs the optional extra: ``pip install -r requirements-flower.txt``.

The Flower App. The repository is the app: ``[tool.flwr.app]`` in ``pyproject.toml`` names
`server_app` and `client_app` (components), the run config (``[tool.flwr.app.config]``, `runconfig`)
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
`records.rewind_jsonl`) and does those rounds again. A different config (apart from
`train.RESUMABLE_CHANGES`, e.g. more ``rounds``) is refused with the simulator's one-line error
(`train.check_resumable`). Round t's clients, batches and keys derive from the config and t alone
(`rounds.plan_round`), so with every client's state intact the resumed run equals an
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
(the simulator's summary, `records.summary`, plus the transport's counts) to the run's workdir.
Running the same ``local`` (or ``run``) command with the same ``--workdir`` again resumes it;
``local`` keeps the SuperNodes' state folders under ``<workdir>/flower_home``."""
from __future__ import annotations

import io
import json
import logging
import os
import sys
import time
from typing import Any, Mapping

import numpy as np
from flwr.app import Array, ArrayRecord, ConfigRecord, Context, Message, MessageType, MetricRecord
from flwr.app import RecordDict
from flwr.clientapp import ClientApp
from flwr.serverapp import Grid, ServerApp

from fedbif_jax.deploy.payload import PayloadError
from fedbif_jax.deploy.runconfig import (CACHE_DIR_KEY, CONFIG_KEY, NODE_TIMEOUT_KEY,
                                         NUM_PARTITIONS_KEY, PARTITION_KEY, ROUND_TIMEOUT_KEY,
                                         STATE_DIR_KEY, config_of, overrides_of, seconds_of,
                                         workdir_of)

log = logging.getLogger("fedbif_jax")

STATE_KEY = "fedbif-client-state"       # Context.state record: the wire-encoded client state
STATE_ROUND_KEY = "fedbif-client-state-round"  # Context.state record: the round it is from


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
  """The simulator's summary of the rows (`records.summary`: accuracy, loss, bpp, total bytes,
  wall time, environment) and what only a deployment measures."""
  from fedbif_jax import records
  summary = records.summary(rows, config)
  summary.update({
      "uplink_bytes_accepted": sum(r["uplink_bytes_accepted"] for r in rows),
      "ledger_downlink_bytes": sum(r["downlink_bits"] // 8 for r in rows),
      "ledger_uplink_bytes": sum(r["uplink_bits"] // 8 for r in rows),
      "downlink_array_bytes": sum(r["downlink_array_bytes"] for r in rows),
      "uplink_array_bytes": sum(r["uplink_array_bytes"] for r in rows),
      "dropped_uplinks": sum(len(r["dropped"]) for r in rows),
      # Rounds in which no uplink was accepted (the model stayed; left out of the bpp means).
      "rounds_without_uplink": sum(not r["accepted"] for r in rows),
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
    rounds.TrainingDiverged: a non-finite loss. A client's bytes never raise.
  """
  from fedbif_jax import records
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
  rows = records.rewind_jsonl(metrics_path, start)
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
    records.append_jsonl(metrics_path, row)
    server.save(manager, t + 1)  # a kill before this point redoes round t on resume
    log.info("round %d/%d  acc %.4f  loss %.4f  up %.3f bpp  down %.3f bpp  accepted %d/%d  "
             "sent down %d B (%d x %d)  received up %d B (accepted %d, ledger %d)  %.1fs",
             t + 1, config.rounds, row["test_accuracy"], row["test_loss"], row["uplink_bpp"],
             row["downlink_bpp"], len(row["accepted"]), len(rnd.plan.ids),
             row["downlink_bytes_sent"], len(messages), row["downlink_message_bytes"],
             row["uplink_bytes_received"], row["uplink_bytes_accepted"],
             row["uplink_bits"] // 8, row["wall_seconds"])
  summary = _summary(rows, config)
  records.write_json_atomic(os.path.join(workdir, "summary.json"), summary)
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
