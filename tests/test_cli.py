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

from conftest import REPO, without_wall_clock


def _launch(workdir, *overrides, wait=True):
  cmd = [sys.executable, os.path.join(REPO, "launch.py"),
         f"--config={os.path.join(REPO, 'configs', 'quickstart.py')}", f"--workdir={workdir}",
         *overrides]
  if not wait:
    return subprocess.Popen(cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
  return subprocess.run(cmd, cwd=REPO, capture_output=True, text=True, timeout=600)


@pytest.mark.slow  # launch.py's error path stays in the fast tier through the workdir test
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


@pytest.mark.slow
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
  assert without_wall_clock(json.loads((workdir / "summary.json").read_text())) == (
      without_wall_clock(expected))
  rows = [json.loads(l) for l in metrics.read_text().splitlines()]
  assert [r["round"] for r in rows] == list(range(12))


def _one_error_line(result, *fragments):
  assert result.returncode == 2, result.stderr
  assert "Traceback" not in result.stderr
  errors = [l for l in result.stderr.splitlines() if l.startswith("error:")]
  assert len(errors) == 1 and all(f in errors[0] for f in fragments), result.stderr


@pytest.mark.slow
def test_resume_with_a_changed_config_is_refused(tmp_path):
  workdir = tmp_path / "run"
  first = _launch(workdir, "--config.rounds=2", "--config.checkpoint_every=1")
  assert first.returncode == 0, first.stderr
  changed = _launch(workdir, "--config.rounds=4", "--config.checkpoint_every=1",
                    "--config.lr=0.3", "--config.local_epochs=1")
  _one_error_line(changed, "workdir:", "another config (changed: local_epochs, lr)")
  rows = (workdir / "metrics.jsonl").read_text().splitlines()
  assert len(rows) == 2  # nothing was trained on or appended
  # Extending the same run is allowed: rounds may change.
  longer = _launch(workdir, "--config.rounds=3", "--config.checkpoint_every=1")
  assert longer.returncode == 0 and "resumed from" in longer.stderr, longer.stderr
  assert [json.loads(l)["round"] for l in (workdir / "metrics.jsonl").read_text().splitlines()] \
      == [0, 1, 2]


def test_a_run_from_before_a_new_field_resumes_only_at_its_default(tmp_path):
  """A config.json written before a field existed (here wire_codec and fedbif.bits dropped from
  it) resumes while the field holds base_config's default; another value is a change."""
  from fedbif_jax.config import base_config
  from fedbif_jax.errors import ConfigError
  from fedbif_jax.train import check_resumable
  config = base_config()
  stored = json.loads(config.to_json_best_effort())
  del stored["wire_codec"], stored["fedbif"]["bits"]
  (tmp_path / "config.json").write_text(json.dumps(stored))
  check_resumable(str(tmp_path), config)
  config.wire_codec, config.fedbif.bits = "entropy", 8
  with pytest.raises(ConfigError, match=r"another config \(changed: fedbif\.bits, wire_codec\)"):
    check_resumable(str(tmp_path), config)


def test_a_workdir_under_a_file_is_one_line(tmp_path):
  (tmp_path / "file").write_text("x")
  _one_error_line(_launch(tmp_path / "file" / "run"), "workdir: must be a directory")


def test_disjoint_train_and_test_labels_are_refused(tmp_path):
  import numpy as np
  rng = np.random.default_rng(0)
  path = tmp_path / "shifted.npz"
  np.savez(path, x_train=rng.integers(0, 255, (60, 8, 8, 1), dtype=np.uint8),
           y_train=rng.integers(100, 110, 60), x_test=rng.integers(0, 255, (20, 8, 8, 1),
                                                                     dtype=np.uint8),
           y_test=np.arange(20) % 10)
  result = _launch(tmp_path / "run", "--config.data.source=npz", f"--config.data.path={path}")
  _one_error_line(result, f"data.path: {path}: no test label occurs in the training set",
                  "train labels 100..109", "test labels 0..9")


def test_a_label_space_that_is_not_zero_based_is_refused(tmp_path):
  import numpy as np
  rng = np.random.default_rng(0)
  path = tmp_path / "one_based.npz"
  np.savez(path, x_train=rng.integers(0, 255, (60, 8, 8, 1), dtype=np.uint8),
           y_train=np.arange(60) % 10 + 1, x_test=rng.integers(0, 255, (20, 8, 8, 1),
                                                               dtype=np.uint8),
           y_test=np.arange(20) % 10 + 1)
  result = _launch(tmp_path / "run", "--config.data.source=npz", f"--config.data.path={path}")
  _one_error_line(result, f"data.path: {path}: labels must be 0..K-1 with every class present",
                  "10 distinct labels 1..10 (missing 0)", "remap them to 0..9")
  assert not (tmp_path / "run" / "metrics.jsonl").exists()
