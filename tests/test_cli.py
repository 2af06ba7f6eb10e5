"""launch.py as users run it: one-line errors with exit 2, and resume after SIGKILL.

These tests start real processes (each pays JAX's import and compile time, ~10 s).
"""
import json
import os
import signal
import subprocess
import sys
import time

import pytest

from conftest import REPO


def _launch(workdir, *overrides, wait=True):
  cmd = [sys.executable, os.path.join(REPO, "launch.py"),
         f"--config={os.path.join(REPO, 'configs', 'quickstart.py')}", f"--workdir={workdir}",
         *overrides]
  if not wait:
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.parametrize("override, field", [
    ("--config.fedbif.bits=9", "fedbif.bits"),
    ("--config.algorithm=fedprox", "algorithm"),
    ("--config.data.mu=-1", "data.mu"),
    ("--config.fedbif.bitz=8", "bitz"),
    ("--config.cpu_devices=-2", "cpu_devices"),
])
def test_bad_input_is_one_line_and_exit_2(tmp_path, override, field):
  result = _launch(tmp_path / "run", override)
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and field in errors[0], result.stderr


def test_sigkill_then_rerun_resumes_to_the_same_summary(tmp_path):
  args = ("--config.rounds=12", "--config.checkpoint_every=2")
  reference = _launch(tmp_path / "uninterrupted", *args)
  assert reference.returncode == 0, reference.stderr

  workdir = tmp_path / "killed"
  proc = _launch(workdir, *args, wait=False)
  metrics = workdir / "metrics.jsonl"
  deadline = time.time() + 300
  while time.time() < deadline:
    if metrics.exists() and len(metrics.read_text().splitlines()) >= 5:
      break
    time.sleep(0.05)
  proc.send_signal(signal.SIGKILL)
  proc.wait()
  rows_at_kill = len(metrics.read_text().splitlines())
  assert rows_at_kill < 12, "the run finished before it could be killed"
  assert not (workdir / "summary.json").exists()

  resumed = _launch(workdir, *args)
  assert resumed.returncode == 0, resumed.stderr
  assert "resumed from" in resumed.stderr
  expected = json.loads((tmp_path / "uninterrupted" / "summary.json").read_text())
  assert json.loads((workdir / "summary.json").read_text()) == expected
  rows = [json.loads(l) for l in metrics.read_text().splitlines()]
  assert [r["round"] for r in rows] == list(range(12))
