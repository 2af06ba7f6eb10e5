"""Multi-process runs: two CPU processes joined by jax.distributed on localhost (2 host devices
each, so a 4-device global mesh) train the quickstart with clients sharded over all 4 devices;
only process 0 writes, and the result equals one process with 4 devices."""
import json
import os
import socket
import subprocess
import sys

import pytest

from conftest import REPO

ARGS = ["--config=configs/quickstart.py", "--config.rounds=2", "--config.num_clients=4",
        "--config.local_epochs=1", "--config.checkpoint_every=1", "--config.data.train_subset=400",
        "--config.lipschitz_every=1", "--config.lipschitz_iterations=5"]


def _env(devices):
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  env.pop("JAX_COORDINATOR_ADDRESS", None)
  return env


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _run_two_processes(workdir, extra_args, devices_each):
  """launch.py in two processes joined by jax.distributed on localhost; returns their outputs
  (stdout and stderr merged) and return codes, never leaving a process behind."""
  port = _free_port()
  procs = [subprocess.Popen(
      [sys.executable, "launch.py", *ARGS, f"--workdir={workdir}", *extra_args,
       "--config.distributed.enabled=True",
       f"--config.distributed.coordinator_address=127.0.0.1:{port}",
       "--config.distributed.num_processes=2", f"--config.distributed.process_id={i}"],
      cwd=REPO, env=_env(devices_each), stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
      for i in range(2)]
  try:
    logs = [p.communicate(timeout=300)[0] for p in procs]
  finally:
    for p in procs:
      p.kill()
  return logs, [p.returncode for p in procs]


def _metrics(workdir):
  with open(os.path.join(workdir, "metrics.jsonl")) as f:
    return [json.loads(line) for line in f]


@pytest.mark.slow
def test_two_processes_shard_clients_and_match_one_process(tmp_path):
  multi, single = str(tmp_path / "multi"), str(tmp_path / "single")
  logs, codes = _run_two_processes(multi, [], devices_each=2)
  assert codes == [0, 0], logs
  assert "process 0 of 2, 2 local / 4 global devices" in logs[0]
  assert "round 2/2" in logs[0] and "round 2/2" not in logs[1]  # one progress log

  done = subprocess.run([sys.executable, "launch.py", *ARGS, f"--workdir={single}",
                         "--config.parallel=sharded"], cwd=REPO, env=_env(4),
                        capture_output=True, text=True, timeout=300)
  assert done.returncode == 0, done.stderr
  rows_multi, rows_single = _metrics(multi), _metrics(single)
  assert [r["round"] for r in rows_multi] == [0, 1]  # written once, by process 0
  for a, b in zip(rows_multi, rows_single):
    for key in ("test_accuracy", "test_loss", "train_loss", "sparsity", "lipschitz"):
      assert a[key] == pytest.approx(b[key], rel=1e-6, abs=1e-7), key
    assert a["cumulative_bytes"] == b["cumulative_bytes"]
  assert os.path.exists(os.path.join(multi, "summary.json"))
  assert sorted(os.listdir(os.path.join(multi, "checkpoints"))) == ["1", "2"]


def test_distributed_is_requested_by_config_or_environment():
  import launch
  from fedbif_jax.config import base_config
  c = base_config()
  assert not launch.distributed_requested(c, environ={})
  assert launch.distributed_requested(c, environ={"JAX_COORDINATOR_ADDRESS": "10.0.0.1:1234"})
  assert launch.distributed_requested(c, environ={"FEDBIF_DISTRIBUTED": "1"})
  c.distributed.enabled = True
  assert launch.distributed_requested(c, environ={})


def test_a_multi_process_run_refuses_a_single_process_backend(tmp_path):
  logs, codes = _run_two_processes(str(tmp_path), ["--config.parallel=sequential"], devices_each=1)
  assert codes[0] == 2, logs[0]
  assert "error: parallel: must be auto or sharded in a multi-process run (2 processes)" in logs[0]
