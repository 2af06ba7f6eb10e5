"""experiments/: the study grids (tuning on the validation split, then the tuned table runs), the
choice rules, a resumable smoke pipeline that refuses a changed config, and the report built
from the run directories."""
import json
import os
import subprocess
import sys

import pytest

from conftest import REPO
from experiments import grid as grid_lib
from experiments import report as report_lib
from fedbif_jax import records
from fedbif_jax.errors import ConfigError


def _tuned(**methods):
  return {"methods": {m: {"overrides": o} for m, o in methods.items()}}


def test_full_grids_have_the_issue_shape():
  tune = grid_lib.grid_runs("tune")
  assert len(tune) == len(grid_lib.FEDAVG_LRS) + len(grid_lib.FEDBIF_GRID)
  assert all(r.overrides["eval_test"] is False and r.overrides["seed"] == 0
             and r.overrides["data.partition"] == "iid" for r in tune)
  table = grid_lib.grid_runs("table1")
  # FedAvg + FedBiF on 3 partitions, FedBiF also with p_k on the two Dirichlet ones, 3 seeds.
  assert len(table) == (2 * 3 + 2) * 3 and len({r.name for r in table}) == len(table)
  assert [r.name for r in table[:3]] == ["fedavg-iid-s0", "fedbif-iid-s0", "fedavg-dir0.5-s0"]
  baselines = grid_lib.grid_runs("baselines")
  assert len(baselines) == 4 * 3 * 3
  assert {r.overrides["algorithm"] for r in baselines[:8]} == set(grid_lib.BASELINES)
  assert all(r.overrides["data.partition"] == "iid" for r in baselines[:4])
  ablations = grid_lib.grid_runs("ablations")
  assert len(ablations) == 9 * 3 and all(r.overrides["data.mu"] == 0.5 for r in ablations)
  assert [r.name for r in ablations[:9]][-2:] == ["fedbif-1-8-matched-dir0.5-s0",
                                                  "fedbif-2-8-matched-dir0.5-s0"]
  base = grid_lib.study_config("x.npz")
  assert (base.model.name, base.local_epochs, base.batch_size, base.rounds) == ("cnn_bn", 2, 64, 100)
  assert base.data.train_subset - base.data.validation == 5000  # 500 images a client on IID
  tuned = _tuned(fedavg={"lr": 0.1}, fedbif={"lr": 0.2, "fedbif.bit_lr_scale": 4.0},
                 **{m: {"lr": 0.1} for m in grid_lib.BASELINES})
  from fedbif_jax.rounds import validate_config
  for g in grid_lib.GRIDS:
    for r in grid_lib.grid_runs(g):
      validate_config(grid_lib.run_config(base, r, tuned))
  c = grid_lib.run_config(base, next(r for r in ablations if r.name.startswith("fedbif-2-8")),
                          tuned)
  assert (c.fedbif.bits, c.fedbif.active_bits, c.fedbif.bit_lr_scale, c.lr) == (8, 2, 4.0, 0.2)
  # 100 rounds at s = 1 of m = 8: at least 12 passes over the bits.
  assert c.rounds // (8 // 1) >= 12
  # The matched m = 8 runs: under inverse_pow2, alpha = max|w| / 2^(m-1) is 2^4 = 16 times
  # smaller at m = 8, so the tuned scale 4 becomes 64; under the paper's uniform step it stays 4.
  matched = next(r for r in ablations if r.name.startswith("fedbif-2-8-matched"))
  c = grid_lib.run_config(base, matched, tuned)
  assert (c.fedbif.bits, c.fedbif.active_bits, c.fedbif.bit_lr_scale) == (8, 2, 4.0)
  tuned_pow2 = _tuned(fedbif={"lr": 0.2, "fedbif.bit_lr_scale": 4.0,
                              "fedbif.bit_step": "inverse_pow2"})
  c = grid_lib.run_config(base, matched, tuned_pow2)
  assert (c.fedbif.bits, c.fedbif.bit_lr_scale, c.lr) == (8, 64.0, 0.2)
  plain = next(r for r in ablations if r.name.startswith("fedbif-1-8-dir"))
  assert grid_lib.run_config(base, plain, tuned_pow2).fedbif.bit_lr_scale == 4.0
  with pytest.raises(ValueError, match="grid: must be one of"):
    grid_lib.grid_runs("tabel1")


def test_choose_rules_by_hand():
  cands = {"fedpaq-b2": {}, "fedpaq-b4": {}, "fedpaq-b8": {}}
  # Coarsest within 1 point of FedAvg's 0.60: b2 is 1.5 points below, b4 0.5 points.
  assert grid_lib.choose("fedpaq", {"fedpaq-b2": 0.585, "fedpaq-b4": 0.595, "fedpaq-b8": 0.61},
                         cands, reference=0.60) == "fedpaq-b4"
  # None keeps accuracy: the best.
  assert grid_lib.choose("fedpaq", {"fedpaq-b2": 0.4, "fedpaq-b4": 0.5, "fedpaq-b8": 0.45},
                         cands, reference=0.60) == "fedpaq-b4"
  lrs = {"a": {}, "b": {}, "c": {}}
  assert grid_lib.choose("fedavg", {"a": 0.5, "b": None, "c": 0.5}, lrs) == "a"  # tie: first
  assert grid_lib.choose("fedavg", {"a": 0.5, "b": 0.7, "c": None}, lrs) == "b"
  with pytest.raises(ValueError, match="every candidate diverged"):
    grid_lib.choose("fedavg", {"a": None, "b": None, "c": None}, lrs)
  rows = [{"round": t, "validation_accuracy": a} for t, a in enumerate([0.1, 0.3, 0.5, 0.7])]
  rows.insert(2, {"round": 9})  # a round without evaluation
  assert grid_lib.validation_score(rows) == pytest.approx((0.3 + 0.5 + 0.7) / 3)


@pytest.mark.slow
def test_smoke_pipeline_tunes_runs_resumes_and_reports(tmp_path):
  root, tuned_path = str(tmp_path / "study"), str(tmp_path / "tuned.json")
  base = grid_lib.study_config("", smoke=True)
  counts = grid_lib.run_pipeline(root, list(grid_lib.GRIDS), base, tuned_path, smoke=True)
  planned = sum(len(grid_lib.grid_runs(g, smoke=True)) for g in grid_lib.GRIDS)
  assert counts["ran"] + counts["failed"] == planned and counts["blocked"] == 0
  tuned = grid_lib.read_tuned(tuned_path)
  assert set(tuned["methods"]) == set(grid_lib.METHODS)
  fedavg = tuned["methods"]["fedavg"]
  assert fedavg["score"] == max(v for v in fedavg["candidates"].values() if v is not None)
  # Tuning never reads the test set; the table runs use the chosen values.
  for name in grid_lib.tune_candidates("fedavg", smoke=True):
    rows = records.read_jsonl(os.path.join(root, "tune", name, "metrics.jsonl"))
    assert rows and not any("test_accuracy" in r for r in rows)
  run = next(r for r in grid_lib.grid_runs("table1", smoke=True) if r.name == "fedbif-dir0.5-s0")
  stored = json.load(open(os.path.join(grid_lib.run_dir(root, run), "config.json")))
  for field, value in tuned["methods"]["fedbif"]["overrides"].items():
    section, _, key = field.rpartition(".")
    assert (stored[section] if section else stored)[key] == value

  # A rerun does nothing; a run without its summary (killed after its last checkpoint) resumes.
  summary_path = os.path.join(grid_lib.run_dir(root, run), "summary.json")
  before = json.load(open(summary_path))
  # The entropy codec changes bytes only: its beyond run trains exactly as table1's FedBiF run.
  coded = json.load(open(os.path.join(root, "beyond", "entropy_codec-dir0.5-s0", "summary.json")))
  for key in ("final_accuracy", "best_accuracy", "final_sparsity", "mean_downlink_bpp"):
    assert coded[key] == before[key], key
  assert coded["total_bytes"] <= before["total_bytes"]
  assert coded["mean_downlink_entropy_bpp"] <= coded["mean_downlink_coded_bpp"] <= 4.0
  os.remove(summary_path)
  assert grid_lib.run_status(root, run, tuned) == "partial"
  counts = grid_lib.run_pipeline(root, list(grid_lib.GRIDS), base, tuned_path, smoke=True)
  assert counts["ran"] == 1
  assert json.load(open(summary_path)) == before

  # A run directory made with another config is refused, naming the changed field.
  os.remove(summary_path)
  other = grid_lib.study_config("", smoke=True)
  other.local_epochs = 3
  with pytest.raises(ConfigError, match=r"another config \(changed: local_epochs\)"):
    grid_lib.run_grid(root, [run], other, tuned)

  out = str(tmp_path / "docs" / "RESULTS.md")
  report_lib.write_report(root, out, tuned_path, smoke=True)
  text = open(out).read()
  assert "## Tuning (validation split only)" in text and "**fedavg-lr" in text
  assert "| FedAvg | 2 |" in text and "| 32.000 | 32.000 |" in text
  assert "| FedBiF-1/4 (uniform Eq. 6) | 1 |" in text and "| 1.000 | 4.000 |" in text
  assert "| FedBiF-1/4 (p_k) | 2 |" in text
  assert "± " in text and "without VBI" in text and "BatchNorm-free" in text
  assert "holds**" in text  # claims are decided (either way) with numbers
  assert "table1/fedbif Dir(0.5): 1 of 2 seeds" in text  # the removed summary
  assert "FedBiF-1/4, learned step (ours)" in text and "flip_rate selector" in text
  assert "| FedBiF-1/4, entropy-coded payloads (ours) | 1 |" in text
  assert "| downlink | 4.000 | " in text and "| uplink | 1.000 | " in text  # packed widths
  for fig in ("tuning", "convergence", "sparsity", "lipschitz", "histograms", "ablation_bits",
              "ablation_variants"):
    path = tmp_path / "docs" / "figures" / f"{fig}.png"
    assert path.exists() and path.stat().st_size > 1000, fig


def _write_run(d, rows, summary):
  d.mkdir(parents=True)
  (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (d / "summary.json").write_text(json.dumps(summary))


def test_report_statistics_match_hand_computation(tmp_path):
  for seed, acc in ((0, 0.5), (1, 0.7)):
    rows = [{"round": t, "test_accuracy": acc * (t + 1) / 2, "cumulative_bytes": 1e6 * (t + 1),
             "sparsity": 0.0} for t in range(2)]
    _write_run(tmp_path / "table1" / f"fedavg-iid-s{seed}", rows, {
        "final_accuracy": acc, "best_accuracy": acc, "mean_uplink_bpp": 32.0,
        "mean_downlink_bpp": 32.0, "total_bytes": 2e6, "final_sparsity": 0.0})
  # FedBiF: 0.55 at round 1 then 0.6; bytes 0.1 MB a round.
  rows = [{"round": t, "test_accuracy": a, "cumulative_bytes": 1e5 * (t + 1), "sparsity": s}
          for t, (a, s) in enumerate([(0.55, 0.2), (0.6, 0.3)])]
  _write_run(tmp_path / "table1" / "fedbif-iid-s0", rows, {
      "final_accuracy": 0.6, "best_accuracy": 0.6, "mean_uplink_bpp": 1.0,
      "mean_downlink_bpp": 4.0, "total_bytes": 2e5, "final_sparsity": 0.3})
  out = tmp_path / "R.md"
  report_lib.write_report(str(tmp_path), str(out), str(tmp_path / "none.json"))
  text = out.read_text()
  # FedAvg: mean 60.0, sample std sqrt(2 * 0.1^2 / 1) = 14.1; target 0.9 * 0.6 = 54.0%, which
  # seed 0 (0.25, 0.5) never reaches and seed 1 (0.35, 0.7) reaches at round 2 (2 MB).
  assert "### IID (target 54.0%)" in text
  # Last-5 (here both evaluations): seed 0 0.375, seed 1 0.525: 45.0 ± 10.6; FedBiF 57.5.
  assert ("| FedAvg | 2 | 60.0 ± 14.1 | 60.0 ± 14.1 | 45.0 ± 10.6 | 32.000 | 32.000 | 2.0 | "
          "2 (1/2) | 2.0 |") in text
  assert ("| FedBiF-1/4 (uniform Eq. 6) | 1 | 60.0 | 60.0 | 57.5 | 1.000 | 4.000 | 0.2 | "
          "1 (1/1) | 0.1 |") in text
  assert "IID 20.0 → 30.0%" in text  # untrained -> final sparsity
  # On the seed both have (0): FedBiF 0.6 vs FedAvg 0.5; FedAvg's seed 1 is left out and named.
  assert "FedBiF minus FedAvg (points): IID best +10.0 (seeds 0), IID final +10.0 (seeds 0)" in text
  rounds, mean = report_lib._curve(report_lib.load_runs(str(tmp_path))["table1"][("fedavg", "iid")],
                                   "test_accuracy")
  assert list(rounds) == [0, 1] and list(mean) == pytest.approx([0.3, 0.6])


def test_ablation_claims_compare_on_the_seeds_the_ablation_has(tmp_path):
  """Dir(0.5): FedBiF seeds 0/1 best 0.5/0.9, FedAvg 0.4/0.6, without VBI only seed 0 at 0.45.
  On seed 0, FedBiF 50.0 > 45.0 >= FedAvg 40.0: the claim holds. (Over every seed of the
  references, 70.0 > 45.0 < 50.0, it would not: an artefact of the missing seed.)"""
  def run(grid, name, best):
    rows = [{"round": 0, "test_accuracy": best, "cumulative_bytes": 1e6, "sparsity": 0.0}]
    _write_run(tmp_path / grid / name, rows, {
        "final_accuracy": best, "best_accuracy": best, "mean_uplink_bpp": 1.0,
        "mean_downlink_bpp": 4.0, "total_bytes": 1e6, "final_sparsity": 0.0})
  for seed, (fedbif, fedavg) in enumerate(((0.5, 0.4), (0.9, 0.6))):
    run("table1", f"fedbif-dir0.5-s{seed}", fedbif)
    run("table1", f"fedavg-dir0.5-s{seed}", fedavg)
  run("ablations", "no_vbi-dir0.5-s0", 0.45)
  out = tmp_path / "R.md"
  report_lib.write_report(str(tmp_path), str(out), str(tmp_path / "none.json"))
  text = out.read_text()
  assert ("*Without VBI accuracy is lower, but still reaches FedAvg's*: **holds** on the best and "
          "the final accuracy. best: without VBI 45.0, FedBiF 50.0, FedAvg 40.0; final: without "
          "VBI 45.0, FedBiF 50.0, FedAvg 40.0 (Dir(0.5), mean over 1 seed (0)).") in text
  assert "| without VBI | 1 | 45.0 | 45.0 | 45.0 | 1.000 | 4.000 | 1.0 | 1 (1/1) | 1.0 | 0.0 |" in text
  assert ("- without VBI, Dir(0.5): one seed so far, no verdict: best -5.0; final "
          "-5.0 points against default FedBiF-1/4 of the same seed.") in text


def test_ablation_claims_read_only_seeds_every_cell_has():
  """Fixed selector seeds 0/1/2 at 0.35/0.35/0.20, SignSGD seeds 0/1 at 0.30, FedAvg seeds 0/1/2
  at 0.60: on seeds 0 and 1, SignSGD 30.0 < fixed 35.0 < FedAvg 60.0 holds (with seed 2 on
  the fixed side only, 30.0 < 30.0 would not)."""
  abl = {("fixed_selector", "dir0.5"): [_paired_run(s, [a]) for s, a in enumerate((0.35, 0.35, 0.2))]}
  table = {("fedavg", "dir0.5"): [_paired_run(s, [0.6]) for s in range(3)],
           ("signsgd", "dir0.5"): [_paired_run(s, [0.3]) for s in range(2)]}
  found = [c for c in report_lib.claims(table, abl, ["dir0.5"], {}) if "fixed selector" in c]
  assert found == ["- *The fixed selector is worse than FedAvg but better than SignSGD*: "
                   "**holds** on the best and the final accuracy. best: fixed 35.0 ± 0.0, FedAvg "
                   "60.0 ± 0.0, SignSGD 30.0 ± 0.0; final: fixed 35.0 ± 0.0, FedAvg 60.0 ± 0.0, "
                   "SignSGD 30.0 ± 0.0 (Dir(0.5), mean over 2 seeds (0, 1))."]


def test_ablation_claim_says_when_best_and_final_disagree():
  """With a sign bit: best 0.31 at round 1, then chance (0.10); FedBiF 0.50. Half of FedBiF is
  25.0: the best (31.0) is above it, the final (10.0) below."""
  abl = {("sign_bit", "dir0.5"): [_paired_run(0, [0.2, 0.31, 0.10])]}
  table = {("fedbif", "dir0.5"): [_paired_run(0, [0.4, 0.5])]}
  found = [c for c in report_lib.claims(table, abl, ["dir0.5"], {}) if "sign bit" in c]
  assert found == ["- *With a sign bit FedBiF fails to train a usable model*: **does not hold** "
                   "on the best accuracy, **holds** on the final (read as: below half of FedBiF's "
                   "accuracy). best: with sign bit 31.0, FedBiF 50.0; final: with sign bit 10.0, "
                   "FedBiF 50.0 (Dir(0.5), mean over 1 seed (0))."]


def test_ablation_text_reads_the_bit_step_from_the_runs_configs():
  """The sentence on the m = 8 step follows the runs' configs, not a hard-coded rule: reference
  at inverse_pow2, scale 4, m = 4 and a matched run at scale 64 give "16 times" and "16 x";
  reference at m = 5 gives 2^3 = 8; under uniform the m = 8 rows keep the tuned scale."""
  def cfg_run(**fedbif):
    return {"config": {"fedbif": fedbif}}
  ref = [cfg_run(bit_step="inverse_pow2", bit_lr_scale=4.0, bits=4)]
  abl = {("fedbif-2-8-matched", "dir0.5"): [cfg_run(bit_step="inverse_pow2", bit_lr_scale=64.0,
                                                    bits=8)]}
  text = report_lib._bit_step_note(ref, abl)
  assert "(`inverse_pow2`, `bit_lr_scale` 4 at m = 4)" in text
  assert "is 16 times smaller at m = 8" in text and "need 16 times the gradient" in text
  assert "run at `bit_lr_scale` 64 (16 x the tuned scale" in text
  assert "matched" not in report_lib._bit_step_note(ref, {})
  ref5 = [cfg_run(bit_step="inverse_pow2", bit_lr_scale=2.0, bits=5)]
  assert "is 8 times smaller at m = 8" in report_lib._bit_step_note(ref5, {})
  uniform_abl = {("fedbif-1-8-matched", "dir0.5"): [cfg_run(bit_step="uniform", bit_lr_scale=1.0,
                                                            bits=8)]}
  uniform = report_lib._bit_step_note([cfg_run(bit_step="uniform", bit_lr_scale=1.0, bits=4)],
                                      uniform_abl)
  assert "`uniform`" in uniform and "keep the tuned scale" in uniform and "16" not in uniform
  assert uniform.endswith("(the rows \"bit step matched to 1/4\" run at 1).")
  assert report_lib._bit_step_note([{"config": None}], abl) == ""


def test_grid_cli_lists_and_rejects_bad_flags(tmp_path):
  run = lambda *a: subprocess.run([sys.executable, "-m", "experiments.grid", *a], cwd=REPO,
                                  capture_output=True, text=True, timeout=120)
  listed = run(f"--root={tmp_path}", "--smoke", "--list", f"--tuned={tmp_path}/t.json")
  assert listed.returncode == 0, listed.stderr
  assert "todo     tune/fedavg-lr0.1" in listed.stdout
  assert "blocked  table1/fedbif-dir0.5-s0" in listed.stdout  # FedBiF is not tuned yet
  bad = run(f"--root={tmp_path}", "--grids=table2")
  assert bad.returncode == 2 and "--grids: must be from tune, table1" in bad.stderr
  missing = run(f"--root={tmp_path}", "--data_path=/nonexistent.npz")
  assert missing.returncode == 2 and "--data_path: no such .npz file" in missing.stderr
  report = subprocess.run([sys.executable, "-m", "experiments.report", "--root=/nonexistent"],
                          cwd=REPO, capture_output=True, text=True, timeout=120)
  assert report.returncode == 2 and "--root: no such directory" in report.stderr


def _paired_run(seed: int, curve: list[float]) -> dict:
  """A finished run as report.load_runs gives it: its seed, rows and summary."""
  rows = [{"round": t, "test_accuracy": a} for t, a in enumerate(curve)]
  return {"seed": seed, "config": {"seed": seed}, "metrics": rows, "failed": None,
          "summary": {"best_accuracy": max(curve), "final_accuracy": curve[-1]}}


def test_paired_verdict_compares_seed_by_seed():
  reference = [_paired_run(s, [0.40, 0.50]) for s in range(3)]
  verdict = lambda runs: report_lib.paired_verdict("V", "IID", runs, reference)
  # The same curve in every seed: the variant trained the same model.
  assert "**no different**" in verdict([_paired_run(s, [0.40, 0.50]) for s in range(2)])
  assert "2 of 2 seeds" in verdict([_paired_run(s, [0.40, 0.50]) for s in range(2)])
  # One seed: its gap, no verdict (best +2.0, final +1.0 points).
  assert ("one seed so far, no verdict: best +2.0; final +1.0 points"
          in verdict([_paired_run(1, [0.52, 0.51])]))
  # Gaps +2, +3, +4 (mean 3, std 1): consistent and >= 2 std.
  better = verdict([_paired_run(s, [0.40, 0.52 + 0.01 * s]) for s in range(3)])
  assert "**better** on best and final" in better and "best +3.0 ± 1.0" in better
  assert "over 3 seeds" in better
  # Gaps -1, +1, -3 (mean -1, std 2): signs differ, so within noise.
  mixed = verdict([_paired_run(s, [0.40, 0.50 + g]) for s, g in enumerate((-0.01, 0.01, -0.03))])
  assert "**within noise** on best and final" in mixed and "best -1.0 ± 2.0" in mixed
  # Best gaps +2, +3 (better), final gaps -2, +1 (signs differ): judged apart.
  split = verdict([_paired_run(s, [0.40, 0.52 + 0.01 * s, f]) for s, f in ((0, 0.48), (1, 0.51))])
  assert "**better** on best, **within noise** on final: best +2.5 ± 0.7; final -0.5 ± 2.1" in split
  # A variant seed with no default run of the same seed is left out.
  assert "no default FedBiF-1/4 run of the same seed" in verdict([_paired_run(7, [0.9])])


def test_accuracy_gaps_are_over_the_seeds_both_cells_have():
  """FedBiF seeds 0/1/2 best 0.50/0.60/0.70 (mean 60.0), FedAvg the same seeds 0.55/0.65/0.75,
  SignSGD only seed 2 at 0.65: FedAvg's gap is -5.0 over all three seeds; SignSGD's is
  0.70 - 0.65 = +5.0 on seed 2 (over every FedBiF seed it would be -5.0)."""
  table = {("fedbif", "iid"): [_paired_run(s, [a]) for s, a in enumerate((0.5, 0.6, 0.7))],
           ("fedavg", "iid"): [_paired_run(s, [a]) for s, a in enumerate((0.55, 0.65, 0.75))],
           ("signsgd", "iid"): [_paired_run(2, [0.65])]}
  mine, gaps = report_lib._gaps_to_fedbif(table, "iid", report_lib._best_stat)
  assert mine[0] == pytest.approx(0.6) and mine[2] == 3
  assert [(v, round(g, 6), noise, note) for v, g, noise, note in gaps] == [
      ("fedavg", -5.0, True, ""), ("signsgd", 5.0, False, "seeds 2")]
  # FedAvg: -5.0 against sample stds of 10.0 each: within noise; one seed has no std.
  assert report_lib._gap_list(gaps) == "FedAvg -5.0 (within noise), SignSGD +5.0 (seeds 2)"
  # A baseline that shares no seed with FedBiF is listed, and the claim cannot hold without it.
  table = {("fedbif", "iid"): [_paired_run(0, [0.5])], ("fedavg", "iid"): [_paired_run(0, [0.4])],
           ("signsgd", "iid"): [_paired_run(1, [0.9])]}
  _, gaps = report_lib._gaps_to_fedbif(table, "iid", report_lib._best_stat)
  assert report_lib._gap_list(gaps) == "FedAvg +10.0, SignSGD - (no seed in common)"
  claim = report_lib.claims(table, {}, ["iid"], {})[0]
  assert "beats FedAvg and every quantization baseline* (IID, best accuracy): **does not hold**" in claim


def test_last_k_column_averages_each_runs_last_evaluations_by_hand():
  # A run that swings between 0.56 and 0.46 (SignSGD's limit cycle): best 0.56 and final 0.46
  # pick a phase; the last 5 evaluations (0.56, 0.46, 0.56, 0.46, 0.46) average 0.50. Rows
  # without test accuracy are not evaluations.
  swing = _paired_run(0, [0.30, 0.56, 0.46, 0.56, 0.46, 0.46])
  swing["metrics"].insert(3, {"round": 99, "train_loss": 1.0})
  assert report_lib.last_mean(swing) == pytest.approx(0.50)
  assert report_lib.last_mean(_paired_run(0, [0.2, 0.4])) == pytest.approx(0.30)   # fewer rows
  steady = _paired_run(1, [0.30, 0.50, 0.52, 0.54, 0.56, 0.58])                    # mean 0.54
  # Over the two seeds: best 57.0 ± 1.4 (0.56, 0.58), final 52.0 ± 8.5, last-5 52.0 ± 2.8.
  cells = report_lib._result_cells([swing, steady], None).split(" | ")
  assert cells[:4] == ["2", "57.0 ± 1.4", "52.0 ± 8.5", "52.0 ± 2.8"]
  # The claim's last-k comparison on seed 0: FedBiF steady (0.54) vs SignSGD swinging (0.50):
  # +4.0 points.
  gaps = report_lib._last_k_gaps({("fedbif", "iid"): [dict(steady, seed=0)],
                                  ("signsgd", "iid"): [swing]}, "iid")
  assert gaps == " On the last-5 mean: FedBiF 54.0%; minus each: SignSGD +4.0; ahead of SignSGD."
  # FedAvg two seeds at 0.55 / 0.55 (last-5 55.0 ± 0.0) against FedBiF 0.54 / 0.54: -1.0, behind;
  # FedPAQ 0.50 / 0.60 (55.0 ± 7.1): -1.0, within noise.
  two = [dict(steady, seed=s) for s in (0, 1)]
  table = {("fedbif", "iid"): two,
           ("fedavg", "iid"): [_paired_run(s, [0.55]) for s in (0, 1)],
           ("fedpaq", "iid"): [_paired_run(0, [0.50]), _paired_run(1, [0.60])]}
  assert report_lib._last_k_gaps(table, "iid") == (
      " On the last-5 mean: FedBiF 54.0%; minus each: FedAvg -1.0, FedPAQ -1.0 (within noise); "
      "within noise of FedPAQ; behind FedAvg.")


def test_planes_section_counts_rounds_and_averages_flip_rates_by_hand():
  # Run A trains bit 3, 2, 3 (rates 0.02, 0.01, 0.04); run B bit 3, 1 (0.06, 0.03); a run from
  # before the fields were logged is left out of both.
  a = _paired_run(0, [0.4, 0.5, 0.6])
  for row, bit, rate in zip(a["metrics"], (3, 2, 3), (0.02, 0.01, 0.04)):
    row.update(active_bits=[bit], bit_flip_rate=[rate])
  b = _paired_run(1, [0.4, 0.5])
  for row, bit, rate in zip(b["metrics"], (3, 1), (0.06, 0.03)):
    row.update(active_bits=[bit], bit_flip_rate=[rate])
  assert report_lib.plane_usage(a) == {2: (1, pytest.approx(0.01)), 3: (2, pytest.approx(0.03))}
  lines = report_lib.planes_section([("V", "IID", [a, b, _paired_run(2, [0.5])]),
                                     ("W", "IID", [_paired_run(0, [0.5])])])
  # Rounds per plane, MSB first (3, 2, 1): A (2, 1, 0), B (1, 0, 1) -> 1.5, 0.5, 0.5.
  # Flip rates over the runs that trained the plane: bit 3 (3% + 6%) / 2, bit 2 1%, bit 1 3%.
  assert "| V | IID | 2 | 1.5, 0.5, 0.5 | 4.50, 1.00, 3.00 |" in lines
  assert not any(line.startswith("| W ") for line in lines)   # no run of W logs planes
  assert report_lib.planes_section([("W", "IID", [_paired_run(0, [0.5])])]) == []


def _bytes_run(curve: list[float], mb_per_round: float, seed: int = 0) -> dict:
  rows = [{"round": t, "test_accuracy": a, "cumulative_bytes": 1e6 * mb_per_round * (t + 1)}
          for t, a in enumerate(curve)]
  return {"config": {"seed": seed}, "seed": seed, "metrics": rows, "failed": None,
          "summary": {"best_accuracy": max(curve), "final_accuracy": curve[-1]}}


def test_bytes_claim_weighs_fedbif_against_every_method_by_hand():
  # Target 0.5. FedBiF reaches it at round 3 (3 x 1 MB); FedAvg at round 1 (10 MB), SignSGD at
  # round 2 (2 x 0.5 = 1 MB), FedPAQ never.
  table = {("fedbif", "iid"): [_bytes_run([0.3, 0.4, 0.5], 1.0)],
           ("fedavg", "iid"): [_bytes_run([0.5, 0.6, 0.6], 10.0)],
           ("signsgd", "iid"): [_bytes_run([0.4, 0.55, 0.6], 0.5)],
           ("fedpaq", "iid"): [_bytes_run([0.1, 0.2, 0.3], 2.0)]}
  line = report_lib.bytes_claim(table, "iid", 0.5)
  assert ("**does not hold** (holds against FedAvg, FedPAQ; not against SignSGD: FedBiF needs "
          "no fewer MB where both reach it)") in line
  assert ("MB to target: FedBiF 3.0 (1/1 seeds, round 3); FedAvg 10.0 (1/1 seeds, round 1); "
          "SignSGD 1.0 (1/1 seeds, round 2); FedPAQ never (0/1 seeds).") in line
  del table[("signsgd", "iid")]
  assert "**holds**. MB to target: FedBiF 3.0" in report_lib.bytes_claim(table, "iid", 0.5)
  table[("fedbif", "iid")] = [_bytes_run([0.3, 0.4, 0.45], 1.0)]
  assert ("**does not hold**. FedBiF never reaches the target (0/1 seeds); MB to target: FedAvg"
          in report_lib.bytes_claim(table, "iid", 0.5))


def test_bytes_claim_compares_each_method_on_the_seeds_it_shares_with_fedbif():
  """Target 0.5. FedBiF seed 0 reaches it at round 3 (3 MB), seed 1 at round 1 (1 MB): 2.0 over
  both. FedAvg has seed 1 only, at round 1 with 1.5 MB per round (1.5 MB). Over FedBiF's own
  seeds 2.0 > 1.5 would fail the claim; on seed 1, 1.0 < 1.5, it holds. A method with no seed
  in common counts against the claim."""
  fedbif = [_bytes_run([0.3, 0.4, 0.5], 1.0, seed=0), _bytes_run([0.5, 0.6, 0.6], 1.0, seed=1)]
  table = {("fedbif", "iid"): fedbif, ("fedavg", "iid"): [_bytes_run([0.5, 0.6], 1.5, seed=1)]}
  line = report_lib.bytes_claim(table, "iid", 0.5)
  assert line.endswith("**holds**. MB to target: FedBiF 2.0 (2/2 seeds, round 2); FedAvg 1.5 "
                       "(1/1 seeds, round 1) [seeds 1, where FedBiF 1.0 (1/1 seeds, round 1)].")
  table[("fedpaq", "iid")] = [_bytes_run([0.1, 0.2], 2.0, seed=5)]
  line = report_lib.bytes_claim(table, "iid", 0.5)
  assert "**does not hold** (holds against FedAvg; not against FedPAQ: no seed in common)" in line
  assert line.endswith("; FedPAQ: no seed in common.")


def test_bytes_claim_needs_fedbif_to_reach_the_target_on_as_many_seeds():
  """Target 0.5. FedBiF reaches it on seed 0 only (round 1, 1 MB), FedAvg on seeds 0 and 1
  (round 1, 10 MB): fewer MB where it reaches it, but FedBiF misses seed 1, so it is not ahead.
  SignSGD never reaches it: FedBiF, reaching it once, is ahead."""
  table = {("fedbif", "iid"): [_bytes_run([0.5, 0.5], 1.0, seed=0),
                               _bytes_run([0.3, 0.4], 1.0, seed=1)],
           ("fedavg", "iid"): [_bytes_run([0.6, 0.6], 10.0, seed=s) for s in (0, 1)],
           ("signsgd", "iid"): [_bytes_run([0.2, 0.3], 0.1, seed=s) for s in (0, 1)]}
  line = report_lib.bytes_claim(table, "iid", 0.5)
  assert ("**does not hold** (holds against SignSGD; not against FedAvg: FedBiF reaches it on "
          "fewer seeds)") in line
  assert ("MB to target: FedBiF 1.0 (1/2 seeds, round 1); FedAvg 10.0 (2/2 seeds, round 1) "
          "[on the 1 seed both reach it: FedBiF 1.0, FedAvg 10.0]; SignSGD never (0/2 seeds).") in line


def test_bytes_claim_compares_mb_on_the_seeds_both_reach_and_counts_diverged_runs():
  """Target 0.5, 1 MB per round unless said.
  (a) FedBiF reaches it on seeds 0, 1, 2 at rounds 1, 1, 10 (mean 4.0 MB); FedAvg only on seed
  0, at 2 MB. Over each side's own hits 4.0 > 2.0, but on seed 0, where both reach it, 1 < 2.
  (b) FedBiF reaches it on seed 0 only, FedPAQ has seed 1 only and never: on the shared seed 1
  FedBiF never reaches it.
  (c) FedBiF diverges on seed 2 (after round 1, below the target) where FedDQ reaches it: it
  reaches it on 2 of 3 against 3 of 3, so it is not ahead (dropping the diverged seed would
  make it so)."""
  never = [0.1] * 10
  fedbif = [_bytes_run([0.5] + never[1:], 1.0, seed=0), _bytes_run([0.5] + never[1:], 1.0, seed=1),
            _bytes_run(never[:9] + [0.5], 1.0, seed=2)]
  fedavg = [_bytes_run([0.6] * 10, 2.0, seed=0)] + [_bytes_run(never, 2.0, seed=s) for s in (1, 2)]
  line = report_lib.bytes_claim({("fedbif", "iid"): fedbif, ("fedavg", "iid"): fedavg}, "iid", 0.5)
  assert ("**holds**. MB to target: FedBiF 4.0 (3/3 seeds, round 4); FedAvg 2.0 (1/3 seeds, "
          "round 1) [on the 1 seed both reach it: FedBiF 1.0, FedAvg 2.0].") in line
  only_seed_0 = [_bytes_run([0.5] + never[1:], 1.0, seed=0), _bytes_run(never, 1.0, seed=1)]
  table = {("fedbif", "iid"): only_seed_0, ("fedpaq", "iid"): [_bytes_run(never, 1.0, seed=1)]}
  line = report_lib.bytes_claim(table, "iid", 0.5)
  assert "not against FedPAQ: FedBiF never reaches it on their shared seeds)" in line
  assert "FedPAQ never (0/1 seeds) [seeds 1, where FedBiF never (0/1 seeds)]" in line
  diverged = dict(_bytes_run([0.3], 1.0, seed=2), summary=None, failed={"round": 1})
  table = {("fedbif", "iid"): fedbif[:2] + [diverged],
           ("feddq", "iid"): [_bytes_run([0.6] * 10, 2.0, seed=s) for s in range(3)]}
  line = report_lib.bytes_claim(table, "iid", 0.5)
  assert "not against FedDQ: FedBiF reaches it on fewer seeds)" in line
  assert "MB to target: FedBiF 1.0 (2/3 seeds, 1 diverged, round 1)" in line
  table[("fedbif", "iid")] = [diverged]
  line = report_lib.bytes_claim(table, "iid", 0.5)
  assert "FedBiF never reaches the target (0/1 seeds, 1 diverged); MB to target: FedDQ" in line
