"""Resume of a Flower deployment: a server (or the whole deployment) that dies after a round was
checkpointed starts again from that checkpoint and ends with the model of an uninterrupted run,
bit for bit, and metrics.jsonl with one row per round.

The config: the quickstart with 3 clients, 2 selected a round (seed 0: {0, 1}, {1, 2}, {0, 2}),
one local epoch, and FedBiF's fixed selector, which trains the same bit every round, so that a
client's state (its virtual bits) changes what it sends the next time it is selected: a lost or
wrong client state shows in the model.

* In one process (`apps.run_server` over a Grid that hands each message to the real ClientApp,
  each client with its own ``state-dir``), 3 rounds: the server dies in round 1 after the clients
  trained it, metrics.jsonl gets a row past the checkpoint and a torn line, and new SuperNodes
  (fresh Contexts, as in a new Flower run) resume it; client 0's state in round 2 comes from round
  0. The final model and the rows equal an uninterrupted run's. The same resume with clients
  that lost their state (no ``state-dir``) finishes too, with another model, and says which
  clients lost it (``state_lost``); a changed config is refused with the simulator's one-line
  error.
* Real processes, 2 rounds: ``python -m fedbif_jax.deploy.flower local`` (a SuperLink, 3
  SuperNodes and ``flwr run``) is SIGKILLed with everything it started once its first round is
  checkpointed; the same command with another ``lr`` is refused (one ``error:`` line, exit 2);
  the same command run again logs "resumed from <workdir>/checkpoints at round 1" and does the
  second round, in which client 1 starts from the state its SuperNode kept on disk. The final
  model equals the simulator's (``launch.py``; `test_flower_loopback.py` shows that an
  uninterrupted deployment equals it) bit for bit. The simulator runs first and fills the JAX
  compilation cache the deployments share.

The rounds (done when killed, resumed at, finished) are printed to the terminal even when the
tests pass (so CI's log shows them), and are in every assertion message. Both tests take more
than 20 s (``slow``): about 15 s in one process and 2 minutes over processes on the busy 2-core
CPU.
"""
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

pytest.importorskip("flwr")

from test_flower_loopback import REPO, _alive, _server_state  # noqa: E402

CONFIG = "configs/quickstart.py"
# 3 clients, 2 a round (seed 0: {0, 1}, {1, 2}, {0, 2}). The fixed selector trains the same bit
# every round, so that a client's state (its virtual bits) changes what it sends the next time it
# is selected: a lost or wrong state shows in the model.
COMMON = ["--config.num_clients=3", "--config.clients_per_round=2", "--config.local_epochs=1",
          "--config.fedbif.selector=fixed"]
ROUNDS = 3            # in one process
DEPLOYED_ROUNDS = 2   # over real processes: client 1 needs its state from round 0 in round 1
OVERRIDES = COMMON + [f"--config.rounds={ROUNDS}"]
RUN_TIMEOUT = 240  # seconds for one Flower deployment (start, rounds, stop)


# ----------------------------------------------------------------------------- in one process


class _Killed(Exception):
  """The server process dying (raised out of the Grid)."""


class _Grid:
  """An in-process Flower Grid: every message goes to `apps.client_app` with its node's own
  Context (a SuperNode); with `kill_round`, the server dies once the clients trained that round."""

  def __init__(self, run_config, cache_dir, state_dir=None, kill_round=None):
    from flwr.app import Context, RecordDict
    self.contexts = {}
    for c in range(3):
      node_config = {"partition-id": c, "num-partitions": 3, "cache-dir": cache_dir}
      if state_dir:
        node_config["state-dir"] = os.path.join(state_dir, f"supernode-{c}")
      self.contexts[100 + c] = Context(run_id=1, node_id=100 + c, node_config=node_config,
                                       state=RecordDict(), run_config=run_config)
    self.kill_round = kill_round

  def get_node_ids(self):
    return list(self.contexts)

  def send_and_receive(self, messages, *, timeout=None):
    from fedbif_jax.deploy import apps
    replies = [apps.client_app(m, self.contexts[m.metadata.dst_node_id]) for m in messages]
    if (messages[0].metadata.message_type == "train"
        and int(messages[0].content["round"]["round"]) == self.kill_round):
      raise _Killed
    return replies


def _rows(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


def _same_model(a, b):
  return sorted(a) == sorted(b) and all(np.array_equal(a[k], b[k]) for k in a)


@pytest.mark.slow
def test_a_resumed_server_in_process_equals_an_uninterrupted_one(tmp_path, serverapp, capsys):
  from fedbif_jax.deploy import apps, runconfig
  from fedbif_jax.errors import ConfigError
  run_config = runconfig.launcher_run_config(CONFIG, OVERRIDES, "", 60, 10)
  config = runconfig.config_of(run_config)
  run = lambda grid, workdir, c=config: apps.run_server(grid, c, str(workdir), round_timeout=60,
                                                          node_timeout=10)
  grid = lambda *args, **kwargs: _Grid(run_config, str(tmp_path / "cache"), *args, **kwargs)
  run(grid(str(tmp_path / "states_ref")), tmp_path / "uninterrupted")
  reference = _server_state(tmp_path / "uninterrupted")

  workdir, states = tmp_path / "killed", str(tmp_path / "states")
  with pytest.raises(_Killed):
    run(grid(states, kill_round=1), workdir)
  killed_after = len(_rows(workdir))
  # As if killed between the row of round 1 and its checkpoint, in the middle of a write.
  with open(workdir / "metrics.jsonl", "a") as f:
    f.write(json.dumps(dict(_rows(workdir)[-1], round=1)) + "\n" + '{"round": 2, "test_acc')
  lost_copy = tmp_path / "killed_lost"
  shutil.copytree(workdir, lost_copy)

  # A changed config is refused, with the simulator's one-line error; nothing is touched.
  changed = runconfig.load_config(CONFIG, OVERRIDES + ["--config.lr=0.3"])
  with pytest.raises(ConfigError, match=r"another config \(changed: lr\)"):
    run(grid(states), workdir, changed)

  del serverapp[:]
  summary = run(grid(states), workdir)  # new SuperNodes, same state dirs
  resumed = [m for m in serverapp if m.startswith("resumed from")]
  rows = _rows(workdir)
  where = (f"killed with {killed_after} of {ROUNDS} rounds in metrics.jsonl (+1 row past the "
           f"checkpoint, +1 torn line), {resumed}, finished with rounds "
           f"{[r['round'] for r in rows]}")
  with capsys.disabled():  # in CI's output even when the test passes
    print(f"\n[flower resume] in process: {where}")
  assert killed_after == 1 and resumed == [
      f"resumed from {workdir / 'checkpoints'} at round 1"], where
  assert [r["round"] for r in rows] == list(range(ROUNDS)), where
  assert [r["selected"] for r in rows] == [[0, 1], [1, 2], [0, 2]], where
  assert all(r["state_lost"] == [] and not r["dropped"] for r in rows), where
  assert summary["rounds"] == ROUNDS, where
  assert _same_model(_server_state(workdir), reference), where
  assert rows == [dict(r, wall_seconds=s["wall_seconds"]) for r, s in
                  zip(_rows(tmp_path / "uninterrupted"), rows)], where

  # SuperNodes that lost their state (no state-dir: Flower's Context.state, one run only): the
  # run finishes and says so; client 1 (round 1) and client 0 (round 2) started afresh.
  del serverapp[:]
  run(grid(), lost_copy)
  lost = [r["state_lost"] for r in _rows(lost_copy)]
  assert lost == [[], [1], [0]], lost
  assert any("client 1 had lost its state" in m for m in serverapp), serverapp
  assert not _same_model(_server_state(lost_copy), reference)


# ----------------------------------------------------------------------------- processes


def _kill_all(process):
  """SIGKILL to `process`, everything it started and their process groups (all started by this
  test, each in its own session), as a crash would; returns their pids."""
  from fedbif_jax.deploy import flower
  pids = [process.pid] + flower.descendants(process.pid)
  groups = set()
  for pid in pids:
    try:
      groups.add(os.getpgid(pid))
    except OSError:
      pass
  for group in groups - {os.getpgid(0)}:
    try:
      os.killpg(group, signal.SIGKILL)
    except OSError:
      pass
  for pid in pids:
    try:
      os.kill(pid, signal.SIGKILL)
    except OSError:
      pass
  process.wait(timeout=30)
  deadline = time.time() + 30
  while time.time() < deadline and any(_alive(p) for p in pids):
    time.sleep(0.1)
  return pids


@pytest.mark.slow
def test_sigkill_of_the_whole_deployment_then_the_same_command_resumes(tmp_path, capsys):
  from fedbif_jax.deploy import flower
  overrides = COMMON + [f"--config.rounds={DEPLOYED_ROUNDS}"]
  cache = str(tmp_path / "jax_cache")
  env = dict(os.environ)  # no PYTHONPATH: the apps run from the bundle `flwr run` submits
  sim_env = dict(env, JAX_COMPILATION_CACHE_DIR=cache,
                 JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0")
  sim = subprocess.run([sys.executable, os.path.join(REPO, "launch.py"), f"--config={CONFIG}",
                        f"--workdir={tmp_path / 'sim'}",
                        f"--config.checkpoint_every={DEPLOYED_ROUNDS}"] + overrides,
                       env=sim_env, cwd=REPO, capture_output=True, text=True, timeout=RUN_TIMEOUT)
  assert sim.returncode == 0, sim.stderr[-3000:]

  workdir = tmp_path / "run"
  command = [sys.executable, "-m", "fedbif_jax.deploy.flower", "local", "--config", CONFIG,
             "--workdir", str(workdir), "--round-timeout", "150", "--node-timeout", "60",
             "--jax-cache", cache, "--cache-dir", str(tmp_path / "node_cache")] + overrides
  processes, started = [], []
  try:
    processes.append(flower.start(command, env, str(tmp_path / "first.log")))
    deadline = time.time() + RUN_TIMEOUT
    while time.time() < deadline and processes[0].poll() is None:
      if (workdir / "checkpoints" / "1").is_dir():  # orbax renames a step's folder when complete
        break
      time.sleep(0.2)
    assert processes[0].poll() is None, open(tmp_path / "first.log").read()[-4000:]
    started += _kill_all(processes[0])
    done_at_kill = len(_rows(workdir))
    assert done_at_kill >= 1 and not (workdir / "summary.json").exists()
    # Each SuperNode keeps its client's state in files under <workdir>/flower_home.
    state_files = sorted(os.path.relpath(p, workdir / "flower_home") for p in glob.glob(
        str(workdir / "flower_home" / "supernode-*" / "client-state" / "*" / "client-*" / "*")))
    assert any(p.endswith(os.path.join("client-1", "round-0.state")) for p in state_files), \
        state_files

    # The same command with another config is refused before anything starts.
    changed = subprocess.run(command + ["--config.lr=0.3"], env=env, cwd=REPO,
                             capture_output=True, text=True, timeout=120)
    errors = [line for line in changed.stderr.splitlines() if line.startswith("error:")]
    assert changed.returncode == 2 and len(errors) == 1 and "Traceback" not in changed.stderr, \
        changed.stderr[-3000:]
    assert "another config (changed: lr)" in errors[0], errors

    processes.append(flower.start(command, env, str(tmp_path / "second.log")))
    returncode = processes[1].wait(timeout=RUN_TIMEOUT)
  finally:
    for p in processes:
      started += [p.pid] + flower.descendants(p.pid)
    flower.stop_processes(processes)
  leftovers = [pid for pid in set(started) if _alive(pid)]
  with open(tmp_path / "second.log") as f:
    log = f.read()
  resumed = [line.split(" ", 1)[1] for line in log.splitlines() if " resumed from " in line]
  resumed_at = int(resumed[0].rsplit(" ", 1)[1]) if len(resumed) == 1 else None
  rows = _rows(workdir)
  where = (f"killed with {done_at_kill} of {DEPLOYED_ROUNDS} rounds in metrics.jsonl, resumed at "
           f"round {resumed_at}, finished with rounds {[r['round'] for r in rows]}")
  with capsys.disabled():
    print(f"\n[flower resume] deployment: {where}")
  assert not leftovers, f"processes left running: {leftovers}"
  assert returncode == 0, f"{where}\n{log[-4000:]}"
  assert resumed == [f"resumed from {workdir / 'checkpoints'} at round {resumed_at}"], \
      f"{where}\n{log[-4000:]}"
  assert 1 <= resumed_at < DEPLOYED_ROUNDS, where
  assert [r["round"] for r in rows] == list(range(DEPLOYED_ROUNDS)), where
  assert all(r["state_lost"] == [] and not r["dropped"] for r in rows), where
  simulated = _server_state(str(tmp_path / "sim"))
  deployed = _server_state(workdir)
  assert _same_model(deployed, simulated), where
  with open(tmp_path / "sim" / "metrics.jsonl") as f:
    sim_rows = [json.loads(line) for line in f]
  assert [r["test_accuracy"] for r in rows] == [r["test_accuracy"] for r in sim_rows], where
