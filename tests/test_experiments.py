"""experiments/: the study grids run through train_and_evaluate in smoke mode, resume, refuse a
changed config, and the report is generated from the run directories."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from experiments import grid as grid_lib
from experiments import report as report_lib


def test_full_grids_have_the_issue_shape():
  table = grid_lib.grid_runs("table1")
  assert len(table) == 6 * 3 * 3
  assert len({r.name for r in table}) == len(table)
  assert {r.overrides["algorithm"] for r in table} == set(grid_lib.METHODS)
  assert {(r.overrides["data.partition"], r.overrides["data.mu"]) for r in table} == {
      ("iid", 0.5), ("dirichlet", 0.5), ("dirichlet", 0.1)}
  ablations = grid_lib.grid_runs("ablations")
  assert len(ablations) == 7 * 3
  assert all(r.overrides["data.mu"] == 0.5 and r.overrides["data.partition"] == "dirichlet"
             for r in ablations)
  long = grid_lib.grid_runs("long")
  assert sorted(r.overrides["algorithm"] for r in long) == sorted(grid_lib.METHODS)
  base = grid_lib.study_config("x.npz")
  assert all(grid_lib.run_config(base, r).rounds == 10 * base.rounds for r in long)
  # Each run's config is valid for the engine.
  from fedbif_jax.train import validate_config
  for r in table + ablations + long:
    validate_config(grid_lib.run_config(base, r))
  c = grid_lib.run_config(base, next(r for r in ablations if r.name.startswith("fedbif-2-8")))
  assert (c.fedbif.bits, c.fedbif.active_bits) == (8, 2)
  with pytest.raises(ValueError, match="grid: must be one of"):
    grid_lib.grid_runs("tabel1")


def test_smoke_grid_runs_resumes_and_reports(tmp_path):
  root = str(tmp_path / "study")
  base = grid_lib.study_config("", smoke=True)
  runs = [r for g in grid_lib.GRIDS for r in grid_lib.grid_runs(g, smoke=True)]
  counts = grid_lib.run_grid(root, runs, base)
  assert counts == {"done": 0, "ran": len(runs), "failed": 0}
  assert all(grid_lib.run_status(root, r) == "done" for r in runs)

  # A rerun does nothing; a run without its summary (killed after its last checkpoint) resumes.
  first = next(r for r in runs if r.grid == "table1")
  summary_path = os.path.join(grid_lib.run_dir(root, first), "summary.json")
  before = json.load(open(summary_path))
  os.remove(summary_path)
  assert grid_lib.run_status(root, first) == "partial"
  counts = grid_lib.run_grid(root, runs, base)
  assert counts == {"done": len(runs) - 1, "ran": 1, "failed": 0}
  assert json.load(open(summary_path)) == before

  # A run directory made with another config is refused, naming the changed field.
  os.remove(summary_path)
  other = grid_lib.study_config("", smoke=True)
  other.lr = 0.01
  with pytest.raises(SystemExit, match="fields lr"):
    grid_lib.run_grid(root, [first], other)

  out = str(tmp_path / "docs" / "RESULTS.md")
  report_lib.write_report(root, out)
  text = open(out).read()
  assert "| FedAvg | 32.000 | 32.000 |" in text
  assert "| FedBiF-1/4 | 1.000 | 4.000 |" in text
  assert "± " in text  # two seeds: mean ± std
  assert "without VBI" in text and "## Long runs" in text
  assert "holds**" in text  # claims are decided (either way) with numbers
  for fig in ("convergence", "sparsity", "lipschitz", "histograms", "ablation_bits",
              "ablation_variants", "long"):
    path = tmp_path / "docs" / "figures" / f"{fig}.png"
    assert path.exists() and path.stat().st_size > 1000, fig


def test_report_statistics_match_hand_computation(tmp_path):
  run_dirs = {}
  for seed, acc in ((0, 0.5), (1, 0.7)):
    d = tmp_path / "table1" / f"fedavg-iid-s{seed}"
    d.mkdir(parents=True)
    rows = [{"round": t, "test_accuracy": acc * (t + 1) / 2, "cumulative_bytes": 1e6 * (t + 1),
             "sparsity": 0.0, "lipschitz": 10.0 + seed} for t in range(2)]
    (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (d / "summary.json").write_text(json.dumps({
        "final_accuracy": acc, "mean_uplink_bpp": 32.0, "mean_downlink_bpp": 32.0,
        "total_bytes": 2e6, "final_sparsity": 0.0}))
    run_dirs[seed] = d
  out = tmp_path / "R.md"
  report_lib.write_report(str(tmp_path), str(out))
  text = out.read_text()
  # mean 60.0, sample std sqrt(2 * 0.1^2 / 1) = 14.1 over the two seeds; 2 MB.
  assert "| FedAvg | 32.000 | 32.000 | 60.0 ± 14.1 | 2.0 | 2 |" in text
  rounds, mean = report_lib._curve(report_lib.load_runs(str(tmp_path))["table1"][("fedavg", "iid")],
                                   "test_accuracy")
  assert list(rounds) == [0, 1] and list(mean) == pytest.approx([0.3, 0.6])


def test_grid_cli_lists_and_rejects_bad_flags(tmp_path):
  run = lambda *a: subprocess.run([sys.executable, "experiments/grid.py", *a], cwd=REPO,
                                  capture_output=True, text=True, timeout=120)
  listed = run(f"--root={tmp_path}", "--smoke", "--list")
  assert listed.returncode == 0, listed.stderr
  assert "todo     table1/fedbif-dir0.5-s0" in listed.stdout
  bad = run(f"--root={tmp_path}", "--grids=table2")
  assert bad.returncode == 2 and "--grids: must be from table1, ablations, long" in bad.stderr
  missing = run(f"--root={tmp_path}", "--data_path=/nonexistent.npz")
  assert missing.returncode == 2 and "--data_path: no such .npz file" in missing.stderr
  report = subprocess.run([sys.executable, "experiments/report.py", "--root=/nonexistent"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert report.returncode == 2 and "--root: no such directory" in report.stderr
