"""The Flower App's processes on one machine, and their command line
(``python -m fedbif_jax.deploy.flower superlink | supernode | run | local``): a SuperLink (the
server), one SuperNode per client and a run through ``flwr run`` of the app that ``pyproject.toml``
declares (`apps.py`: the ServerApp and ClientApp; `runconfig.py`: its run config). Every process
is started in its own session, so that `stop_processes` ends it with everything it started.

Needs the optional extra: ``pip install -r requirements-flower.txt``.

Running the same ``local`` (or ``run``) command with the same ``--workdir`` again resumes the run;
``local`` keeps the SuperNodes' state folders under ``<workdir>/flower_home``.
"""
from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from typing import Any, Mapping, Sequence

from fedbif_jax.deploy.runconfig import (APP_DIR, CACHE_DIR_KEY, NUM_PARTITIONS_KEY,
                                         PARTITION_KEY, STATE_DIR_KEY, config_of,
                                         launcher_run_config)

CONNECTION = "local-deployment"         # the SuperLink connection `run` and `local` write


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
    from fedbif_jax.rounds import validate_config
    from fedbif_jax.train import check_resumable
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
