"""docs/RESULTS.md and its figures, generated from the run directories of experiments/grid.py.

Reads ``<root>/<grid>/<run>/{config.json, metrics.jsonl, summary.json, histograms.jsonl,
failed.json}`` and the tuned values file, and writes:

* the tuning: every candidate's validation score and the chosen values, with the validation
  curves of the sweep (a figure);
* Table 1, one table per partition: best and final test accuracy (mean ± sample std over
  seeds), bpp up and down over the compressed weights, total MB, and the rounds and MB to reach
  the target accuracy (`TARGET_FRACTION` of FedAvg's mean best accuracy on that partition);
  convergence figures against round and against MB;
* sparsity and the Lipschitz bound next to the untrained model's values (Sec. 4.4, Fig. 5, 6);
* the ablations (Fig. 3 and Fig. 4) and the BatchNorm-free link runs;
* the paper's claims re-judged one by one with the numbers that decide them, and which cells
  have fewer seeds than planned.

Nothing in the report is typed by hand: rerunning this script on the same runs rewrites it.

  python -m experiments.report --root=experiments/results [--out=docs/RESULTS.md]
"""
from __future__ import annotations

import datetime
import os
import platform
import re
import sys
from collections import defaultdict

from absl import app
from absl import flags
import numpy as np


from experiments.grid import (ABLATIONS, BASELINES, BEYOND, CODEC_VARIANTS, DEFAULT_TUNED,
                              PARTITIONS, grid_runs, read_tuned, tune_candidates)
from fedbif_jax.records import read_json, read_jsonl

LABELS = {"fedavg": "FedAvg", "signsgd": "SignSGD", "fedpaq": "FedPAQ", "feddq": "FedDQ",
          "dadaquant": "DAdaQuant", "fedbif": "FedBiF-1/4 (uniform Eq. 6)",
          "fedbif-pk": "FedBiF-1/4 (p_k)", "fedbif-1-8": "FedBiF-1/8",
          "fedbif-2-4": "FedBiF-2/4", "fedbif-2-8": "FedBiF-2/8",
          "fedbif-1-8-matched": "FedBiF-1/8, bit step matched to 1/4 (ours)",
          "fedbif-2-8-matched": "FedBiF-2/8, bit step matched to 1/4 (ours)",
          "sign_bit": "with sign bit",
          "no_vbi": "without VBI", "fixed_selector": "fixed selector (3rd bit)",
          "random_selector": "random selector", "fedavg-cnn": "FedAvg, BN-free CNN",
          "fedbif-cnn": "FedBiF-1/4, BN-free CNN",
          "flip_rate": "FedBiF-1/4, flip_rate selector (ours)",
          "learned_step": "FedBiF-1/4, learned step (ours)",
          "entropy_codec": "FedBiF-1/4, entropy-coded payloads (ours)"}
TABLE_VARIANTS = ("fedavg",) + BASELINES + ("fedbif", "fedbif-pk")
PARTITION_LABELS = {"iid": "IID", "dir0.5": "Dir(0.5)", "dir0.1": "Dir(0.1)"}
RUN_NAME = re.compile(r"^(?P<variant>.+)-(?P<partition>iid|dir0\.5|dir0\.1)-s(?P<seed>\d+)$")
TARGET_FRACTION = 0.9
# The "last-k" column: mean test accuracy of a run's last k evaluations (the last 25 rounds at the
# study's eval_every = 5), robust to a method whose accuracy swings between evaluations, where
# "best" picks a high phase and "final" a random one.
LAST_EVALS = 5
TABLE_GRIDS = ("table1", "baselines")


# ----------------------------------------------------------------------------------- loading
def _load_run(d: str, name: str) -> dict | None:
  run = {"name": name, "dir": d, "metrics": read_jsonl(os.path.join(d, "metrics.jsonl")),
         "histograms": read_jsonl(os.path.join(d, "histograms.jsonl"))}
  for key in ("summary", "config", "failed"):
    run[key] = read_json(os.path.join(d, f"{key}.json"))
  return run if (run["summary"] or run["failed"]) else None  # unfinished: left out


def load_runs(root: str) -> dict:
  """{grid: {(variant, partition): [run, ...]}} for the table-shaped grids, and
  {"tune": {name: run}} for the tuning grids; a run is a dict of its files' contents."""
  runs = defaultdict(lambda: defaultdict(list))
  for grid in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    gdir = os.path.join(root, grid)
    if grid.startswith(".") or not os.path.isdir(gdir):
      continue
    for name in sorted(os.listdir(gdir)):
      d = os.path.join(gdir, name)
      if not os.path.isdir(d):
        continue
      run = _load_run(d, name)
      if run is None:
        continue
      if grid.startswith("tune"):
        runs["tune"][name] = run
        continue
      m = RUN_NAME.match(name)
      if m:
        run["seed"] = int(m["seed"])
        runs[grid][(m["variant"], m["partition"])].append(run)
  return runs


def _evaluated(run: dict, key: str) -> list[dict]:
  return [r for r in run["metrics"] if key in r]


def _curve(runs: list[dict], key: str):
  """Rounds and the per-round mean over the finished runs, at the rounds that log `key`."""
  series = [_evaluated(run, key) for run in runs if run["summary"]]
  series = [s for s in series if s]
  if not series:
    return None, None
  n = min(len(s) for s in series)
  rounds = np.asarray([r["round"] for r in series[0][:n]])
  return rounds, np.mean([[r[key] for r in s[:n]] for s in series], axis=0)


def _stat(values):
  values = [v for v in values if v is not None]
  if not values:
    return None, None, 0
  std = float(np.std(values, ddof=1)) if len(values) > 1 else 0.0
  return float(np.mean(values)), std, len(values)


def _summary_stat(runs, key):
  return _stat([run["summary"].get(key) for run in runs if run["summary"]])


def _pct(mean, std=None, n=1, failed=0) -> str:
  if mean is None:
    return "diverged" if failed else "-"
  note = f" ({failed} diverged)" if failed else ""
  return (f"{100 * mean:.1f} ± {100 * std:.1f}{note}" if n > 1 else f"{100 * mean:.1f}{note}")


def reach(run: dict, target: float):
  """(round, MB) at which the run's test accuracy first reaches `target` (1-based round), or
  None when it never does."""
  for r in _evaluated(run, "test_accuracy"):
    if r["test_accuracy"] >= target:
      return r["round"] + 1, r["cumulative_bytes"] / 1e6
  return None


def last_mean(run: dict, k: int = LAST_EVALS):
  """Mean test accuracy of the run's last `k` evaluations (fewer if it has fewer), or None."""
  rows = _evaluated(run, "test_accuracy")[-k:]
  return float(np.mean([r["test_accuracy"] for r in rows])) if rows else None


def _first(run: dict, key: str):
  rows = _evaluated(run, key)
  return rows[0][key] if rows else None


def _last(run: dict, key: str):
  rows = _evaluated(run, key)
  return rows[-1][key] if rows else None


def _machine() -> str:
  cpu = platform.processor() or "unknown CPU"
  try:
    with open("/proc/cpuinfo") as f:
      cpu = next(line.split(":", 1)[1].strip() for line in f if line.startswith("model name"))
  except (OSError, StopIteration):
    pass
  return f"{cpu}, {os.cpu_count()} cores"


# ----------------------------------------------------------------------------------- figures
def _plt():
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt
  return plt


def figure_tuning(tune: dict, smoke: bool, path: str) -> None:
  """Validation accuracy against round of every tuning candidate, one panel per method."""
  plt = _plt()
  methods = [m for m in ("fedavg", "fedbif") + BASELINES
             if any(n in tune for n in tune_candidates(m, smoke))]
  cols = min(3, max(len(methods), 1))
  rows = -(-max(len(methods), 1) // cols)
  fig, axes = plt.subplots(rows, cols, figsize=(7.5 * cols, 4.5 * rows), squeeze=False)
  for ax in axes.ravel()[len(methods):]:
    ax.axis("off")
  for ax, method in zip(axes.ravel(), methods):
    seen: dict[str, int] = {}
    for name in tune_candidates(method, smoke):
      run = tune.get(name)
      rows = _evaluated(run, "validation_accuracy") if run else []
      if rows:
        # FedBiF: one line style per (step rule, order), colours within it.
        rule = name.split("-", 3)[-1] if method == "fedbif" else ""
        style = {"inverse_pow2-msb": ":", "uniform-lsb": "--"}.get(rule, "-")
        seen[rule] = seen.get(rule, -1) + 1
        ax.plot([r["round"] + 1 for r in rows], [r["validation_accuracy"] for r in rows],
                style, color=f"C{seen[rule]}", label=name.split("-", 1)[1], lw=1.2)
    ax.set(title=LABELS.get(method, method).split(" (")[0], xlabel="round",
           ylabel="validation accuracy")
    ax.legend(fontsize=6, loc="upper left", bbox_to_anchor=(1.0, 1.0))
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def figure_convergence(table, partitions, variants, path):
  plt = _plt()
  fig, axes = plt.subplots(2, len(partitions), figsize=(5 * len(partitions), 8), squeeze=False)
  for j, p in enumerate(partitions):
    for v in variants:
      runs = table.get((v, p), [])
      rounds, acc = _curve(runs, "test_accuracy")
      if rounds is None:
        continue
      # cumulative_bytes is logged every round; take it at the evaluated rounds.
      mb_at = dict(zip(*(x.tolist() for x in _curve(runs, "cumulative_bytes"))))
      axes[0, j].plot(rounds + 1, acc, label=LABELS.get(v, v))
      axes[1, j].plot([mb_at[int(r)] / 1e6 for r in rounds], acc, label=LABELS.get(v, v))
    axes[0, j].set(title=PARTITION_LABELS[p], xlabel="round", ylabel="test accuracy")
    axes[1, j].set(xlabel="MB sent (up + down, cumulative)", ylabel="test accuracy", xscale="log")
  if axes[0, 0].get_legend_handles_labels()[0]:
    axes[0, 0].legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def figure_curves(groups: list[tuple[str, list[dict]]], key: str, ylabel: str, title: str, path,
                  logy=False):
  plt = _plt()
  fig, ax = plt.subplots(figsize=(6.5, 4.5))
  for label, runs in groups:
    rounds, y = _curve(runs, key)
    if rounds is not None:
      ax.plot(rounds + 1, y, marker="." if len(rounds) < 30 else None, label=label)
  ax.set(xlabel="round", ylabel=ylabel, title=title)
  if logy:
    ax.set_yscale("log")
  if ax.get_legend_handles_labels()[0]:
    ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def figure_histograms(runs: list[tuple[str, dict]], path):
  """Fig. 5: the last layer's weight histogram (rows: rounds), one panel per run."""
  plt = _plt()
  fig, axes = plt.subplots(1, len(runs), figsize=(4.5 * len(runs), 4), squeeze=False)
  for ax, (label, run) in zip(axes[0], runs):
    hists = run["histograms"]
    counts = np.array([h["counts"] for h in hists], float)
    counts /= np.maximum(counts.sum(1, keepdims=True), 1)
    edges = hists[0]["edges"]
    ax.imshow(counts, aspect="auto", origin="lower", cmap="viridis",
              extent=(edges[0], edges[-1], -0.5, len(hists) - 0.5))
    ax.set_yticks(range(len(hists)), [str(h["round"] + 1) for h in hists], fontsize=7)
    ax.set(title=label, xlabel=f"weight ({hists[0]['layer']})", ylabel="round")
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


# ----------------------------------------------------------------------------------- sections
def _fmt_overrides(overrides: dict) -> str:
  return ", ".join(f"`{k}={v}`" for k, v in sorted(overrides.items()))


def tuning_section(tune: dict, tuned: dict, smoke: bool, rel, fig_dir) -> list[str]:
  methods = tuned.get("methods", {})
  lines = ["## Tuning (validation split only)", "",
           f"Protocol: {tuned.get('protocol', '-')}. FedPAQ and FedDQ take the coarsest setting "
           "whose score stays within 1 point of FedAvg's (\"the highest compression without "
           "sacrificing accuracy\", Sec. 4.1); the others the best score. Chosen values "
           "(`experiments/tuned.json`, read by every table run):", "",
           "| method | chosen | validation score (%) |", "|---|---|---|"]
  for method in ("fedavg", "fedbif") + BASELINES:
    if method in methods:
      m = methods[method]
      score = f"{100 * m['score']:.1f}" if "score" in m else "- (not tuned: " + m["rule"] + ")"
      lines.append(f"| {LABELS[method].split(' (')[0]} | {_fmt_overrides(m['overrides'])} | "
                   f"{score} |")
    else:
      lines.append(f"| {LABELS[method].split(' (')[0]} | not chosen yet | - |")
  lines += ["", "Every candidate (score = mean validation accuracy of the last evaluations; "
            "**bold** = chosen):", "", "| candidate | score (%) | best validation (%) |",
            "|---|---|---|"]
  chosen = {m.get("chosen") for m in methods.values()}
  for method in ("fedavg", "fedbif") + BASELINES:
    for name in tune_candidates(method, smoke):
      run = tune.get(name)
      if run is None:
        lines.append(f"| {name} | (not run yet) | - |")
        continue
      score = methods.get(method, {}).get("candidates", {}).get(name)
      if run["failed"]:
        cell, best = "diverged", "-"
      else:
        accs = [r["validation_accuracy"] for r in _evaluated(run, "validation_accuracy")]
        cell = f"{100 * score:.1f}" if score is not None else "-"
        best = f"{100 * max(accs):.1f}" if accs else "-"
      bold = "**" if name in chosen else ""
      lines.append(f"| {bold}{name}{bold} | {cell} | {best} |")
  if tune:
    figure_tuning(tune, smoke, os.path.join(fig_dir, "tuning.png"))
    lines += ["", f"![tuning]({rel('tuning.png')})", ""]
  return lines + [""]


def _to_target(runs, target):
  """(mean MB, mean round, seeds that reach `target`, finished seeds) over finished runs."""
  return _reach_stat([reach(r, target) for r in runs if r["summary"]])


def _result_cells(runs: list[dict], target) -> str:
  """A results row after its label: seeds | best | final | last-k mean | up bpp | down bpp |
  total MB | rounds to target | MB to target (means over the finished runs)."""
  failed = sum(bool(r["failed"]) for r in runs)
  done = [r for r in runs if r["summary"]]
  best = _pct(*_summary_stat(done, "best_accuracy"), failed)
  final = _pct(*_summary_stat(done, "final_accuracy"), failed)
  last = _pct(*_last_k_stat(done), failed)
  up, down = _summary_stat(done, "mean_uplink_bpp")[0], _summary_stat(done, "mean_downlink_bpp")[0]
  mb = _summary_stat(done, "total_bytes")[0]
  to_mb, to_round, hit, n = _to_target(done, target) if target else (None, None, 0, 0)
  to_round = f"{to_round:.0f} ({hit}/{n})" if hit else ("never" if n else "-")
  to_mb = f"{to_mb:.1f}" if hit else "-"
  bpp = f"{up:.3f} | {down:.3f} | {mb / 1e6:.1f}" if up is not None else "- | - | -"
  return f"{len(runs)} | {best} | {final} | {last} | {bpp} | {to_round} | {to_mb}"


def _within_noise(a, b) -> bool:
  """Means (mean, std, n) a and b differ by less than twice the larger sample std (n > 1 each)."""
  return abs(a[0] - b[0]) < 2 * max(a[1], b[1]) if a[2] > 1 and b[2] > 1 else False


def beyond_section(table, beyond, targets) -> list[str]:
  """Each direction the paper leaves open against default FedBiF-1/4 (Table 1's runs)."""
  lines = ["## Beyond the paper: its open directions against default FedBiF-1/4", "",
           "Same setup and tuned values as Table 1; each variant changes one thing "
           "(`experiments/grid.py:BEYOND`). Columns as in Table 1 (target: Table 1's).", ""]
  verdicts, paired = [], False
  for p in ("iid", "dir0.5"):
    rows = [(v, beyond.get((v, p), [])) for v in BEYOND]
    if not any(rs for _, rs in rows):
      continue
    reference = table.get(("fedbif", p), [])
    lines += [f"### {PARTITION_LABELS[p]}", "",
              f"| variant | seeds | best acc | final acc | last-{LAST_EVALS} acc | up bpp | down bpp | "
              "total MB | rounds to target | MB to target |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for v, rs in [("fedbif", reference)] + rows:
      if rs:
        lines.append(f"| {LABELS[v]} | {_result_cells(rs, targets.get(p))} |")
    lines.append("")
    for v, rs in rows:
      if v in CODEC_VARIANTS:
        if rs:
          lines += codec_table(rs)
          verdicts.append(codec_verdict(LABELS[v], PARTITION_LABELS[p], rs, reference))
        continue
      if rs:
        verdicts.append(paired_verdict(LABELS[v], PARTITION_LABELS[p], rs, reference))
        paired = True
  return lines + verdicts + ([""] if verdicts else []) + ([PAIRED_RULE, ""] if paired else [])


def _seed_pairs(runs, reference) -> list[tuple[dict, dict]]:
  """(variant run, default run) of the same seed (same partition and initial model), finished."""
  by_seed = {r["seed"]: r for r in reference if r["summary"]}
  return [(r, by_seed[r["seed"]]) for r in runs if r["summary"] and r["seed"] in by_seed]


PAIRED_RULE = ("Paired verdicts: **better**/**worse** when the per-seed gaps all have one sign "
               "and their mean is at least twice their std, **within noise** otherwise; a rule "
               "of thumb, not a significance test (with 2 seeds it marks a lead).")


def paired_verdict(label, partition, runs, reference) -> str:
  """A variant against default FedBiF-1/4 seed by seed (each pair shares its data partition and
  initial model, so the difference is the variant's): identical when every evaluated accuracy
  of every pair is equal; with one pair, its gap and no verdict; with more, the mean gap ± the
  std of the per-seed gaps, on the best and on the final accuracy, each "better"/"worse" only
  when its mean gap is at least twice that std and has the same sign in every seed (a rule of
  thumb, not a significance test: with 2 seeds it marks a lead)."""
  pairs = _seed_pairs(runs, reference)
  if not pairs:
    return f"- {label}, {partition}: no default FedBiF-1/4 run of the same seed to compare with yet."
  curve = lambda run: [r["test_accuracy"] for r in _evaluated(run, "test_accuracy")]
  if all(curve(a) == curve(b) for a, b in pairs):
    return (f"- {label}, {partition}: **no different**: the same test accuracy as default "
            f"FedBiF-1/4 at every evaluated round in {len(pairs)} of {len(pairs)} seeds (the "
            "variant trained exactly the same model).")
  gaps = {key: [100 * (a["summary"][key] - b["summary"][key]) for a, b in pairs]
          for key in ("best_accuracy", "final_accuracy")}
  shown = "; ".join(
      f"{key.split('_')[0]} {np.mean(g):+.1f}" + (f" ± {np.std(g, ddof=1):.1f}" if len(g) > 1 else "")
      for key, g in gaps.items())
  if len(pairs) == 1:
    return (f"- {label}, {partition}: one seed so far, no verdict: {shown} points against "
            "default FedBiF-1/4 of the same seed.")
  def word(g):
    mean, std = float(np.mean(g)), float(np.std(g, ddof=1))
    one_sign = all(x > 0 for x in g) or all(x < 0 for x in g)
    return ("better" if mean > 0 else "worse") if one_sign and abs(mean) >= 2 * std else "within noise"

  on_best, on_final = word(gaps["best_accuracy"]), word(gaps["final_accuracy"])
  said = (f"**{on_best}** on best and final" if on_best == on_final
          else f"**{on_best}** on best, **{on_final}** on final")
  return (f"- {label}, {partition}: {said}: {shown} points against default FedBiF-1/4, "
          f"paired over {len(pairs)} seeds (mean ± std of the per-seed gaps).")


def codec_table(runs) -> list[str]:
  """Per direction: the packed width, the entropy-coded bits and the empirical entropy (the
  limit of per-tensor coding), bits per compressed weight averaged over rounds, mean ± std over
  the runs."""
  def cell(key):
    mean, std, n = _mean(runs, key)
    return "-" if mean is None else (f"{mean:.3f} ± {std:.3f}" if n > 1 else f"{mean:.3f}")

  lines = ["| direction | packed bpp | entropy-coded bpp | empirical entropy bpp |",
           "|---|---|---|---|"]
  for direction in ("downlink", "uplink"):
    lines.append(f"| {direction} | {cell(f'mean_{direction}_bpp')} | "
                 f"{cell(f'mean_{direction}_coded_bpp')} | {cell(f'mean_{direction}_entropy_bpp')} |")
  return lines + [""]


def codec_verdict(label, partition, runs, reference) -> str:
  """A codec changes only bytes: the verdict checks that accuracy equals the reference runs of
  the same seeds exactly, and gives the change in total bytes over those seeds."""
  pairs = _seed_pairs(runs, reference)
  if not pairs:
    return f"- {label}, {partition}: no FedBiF-1/4 run of the same seed to compare with yet."
  same = sum(a["summary"]["final_accuracy"] == b["summary"]["final_accuracy"]
             and a["summary"]["best_accuracy"] == b["summary"]["best_accuracy"] for a, b in pairs)
  saved = [1 - a["summary"]["total_bytes"] / b["summary"]["total_bytes"] for a, b in pairs]
  accuracy = (f"accuracy identical to default FedBiF-1/4 in {same} of {len(pairs)} seeds (same "
              "training, only the encoding differs)" if same == len(pairs) else
              f"accuracy differs from default FedBiF-1/4 in {len(pairs) - same} of {len(pairs)} "
              "seeds, which a codec must not do: a bug to find")
  return (f"- {label}, {partition}: {accuracy}; total bytes {-100 * np.mean(saved):+.1f}% "
          f"against the packed encoding (mean of {len(pairs)} seeds).")


def table_section(table: dict, partitions: list[str], rel, fig_dir) -> tuple[list[str], dict]:
  """Table 1 per partition; returns the lines and {partition: target}."""
  lines = ["## Table 1", "",
           "Test accuracy (%) mean ± sample std over seeds: **best** over the evaluated rounds "
           f"(the paper's convention), **final**, and **last-{LAST_EVALS}**: the mean of each "
           f"run's last {LAST_EVALS} evaluations (the last 25 rounds at eval_every 5), which "
           "neither picks the high phase of an accuracy that swings between evaluations nor a "
           "random one. bpp over the compressed weights (mean of rounds and runs); MB: every "
           "byte sent up and down as `wire.py` encodes it (mean of "
           f"runs). Target: {100 * TARGET_FRACTION:.0f}% of FedAvg's mean best accuracy on the "
           "partition; rounds and MB to reach it are means over the seeds that reached it.", ""]
  targets = {}
  for p in partitions:
    fedavg_best = _summary_stat(table.get(("fedavg", p), []), "best_accuracy")[0]
    target = TARGET_FRACTION * fedavg_best if fedavg_best is not None else None
    targets[p] = target
    lines += [f"### {PARTITION_LABELS[p]}" + (f" (target {100 * target:.1f}%)" if target else ""),
              "", f"| method | seeds | best acc | final acc | last-{LAST_EVALS} acc | up bpp | down bpp | "
              "total MB | rounds to target | MB to target |",
              "|---|---|---|---|---|---|---|---|---|---|"]
    for v in TABLE_VARIANTS:
      runs = table.get((v, p), [])
      if runs:
        lines.append(f"| {LABELS[v]} | {_result_cells(runs, target)} |")
    lines.append("")
  variants = [v for v in TABLE_VARIANTS if any(k[0] == v for k in table)]
  figure_convergence(table, partitions, variants, os.path.join(fig_dir, "convergence.png"))
  lines += [f"![convergence]({rel('convergence.png')})", "",
            "Top: test accuracy against round; bottom: against MB sent (log scale). Mean of "
            "seeds.", ""]
  return lines, targets


def properties_section(table, abl, partitions, rel, fig_dir) -> list[str]:
  lines = ["## Sparsity and Lipschitz bound next to the untrained model (Sec. 4.4)", "",
           "Untrained sparsity: zero integers in round 1's broadcast, i.e. the untrained model "
           "quantized to m bits. Untrained Lipschitz bound: AutoLip of the initial (float) "
           "global model. Final: the last round. Means over seeds.", "",
           "| method | partition | sparsity untrained → final (%) | Lipschitz untrained → final |",
           "|---|---|---|---|"]
  for v in ("fedavg", "fedbif", "fedbif-pk"):
    for p in partitions:
      done = [r for r in table.get((v, p), []) if r["summary"]]
      if not done:
        continue
      s0, s1 = _stat([_first(r, "sparsity") for r in done])[0], _stat(
          [_last(r, "sparsity") for r in done])[0]
      l0, l1 = _stat([_first(r, "lipschitz_untrained") for r in done])[0], _stat(
          [_last(r, "lipschitz") for r in done])[0]
      lip = f"{l0:.3g} → {l1:.3g}" if l0 is not None and l1 is not None else "-"
      lines.append(f"| {LABELS[v]} | {PARTITION_LABELS[p]} | {100 * s0:.1f} → {100 * s1:.1f} | "
                   f"{lip} |")
  fb_groups = [(PARTITION_LABELS[p], table.get(("fedbif", p), [])) for p in partitions]
  figure_curves(fb_groups, "sparsity", "fraction of zero integers", "FedBiF-1/4 sparsity",
                os.path.join(fig_dir, "sparsity.png"))
  lip_groups = [(f"{LABELS[v].split(' (')[0]} {PARTITION_LABELS[p]}", table.get((v, p), []))
                for v in ("fedavg", "fedbif") for p in partitions]
  figure_curves(lip_groups, "lipschitz", "Lipschitz upper bound (AutoLip)",
                "Lipschitz bound of the global model (Fig. 6)",
                os.path.join(fig_dir, "lipschitz.png"), logy=True)
  lines += ["", f"![sparsity]({rel('sparsity.png')}) ![lipschitz]({rel('lipschitz.png')})", ""]
  hist_runs = []
  for label, grid, key in (("FedAvg", table, ("fedavg", "dir0.5")),
                           ("FedBiF-1/4", table, ("fedbif", "dir0.5")),
                           ("FedBiF with sign bit", abl, ("sign_bit", "dir0.5"))):
    rs = [r for r in grid.get(key, []) if r["histograms"]]
    if rs:
      hist_runs.append((label + f", seed {rs[0]['seed']}", rs[0]))
  if hist_runs:
    figure_histograms(hist_runs, os.path.join(fig_dir, "histograms.png"))
    lines += ["Last-layer weight distribution over rounds (Fig. 5), Dir(0.5):", "",
              f"![histograms]({rel('histograms.png')})", ""]
  return lines


def _bit_step_note(reference, abl) -> str:
  """The sentence on the virtual bits' step at m = 8, read from the runs' own configs: the
  reference FedBiF-1/4's ``bit_step`` and ``bit_lr_scale``, and the factor by which the
  "-matched" rows' scale differs (`grid.matched_bit_lr_scale`). Empty when no config says."""
  ref = next((r["config"]["fedbif"] for r in reference if r.get("config")), None)
  matched = next((r["config"]["fedbif"] for v in ("fedbif-1-8-matched", "fedbif-2-8-matched")
                  for r in abl.get((v, "dir0.5"), []) if r.get("config")), None)
  if ref is None:
    return ""
  rule, scale, m = ref["bit_step"], ref["bit_lr_scale"], ref["bits"]
  if rule != "inverse_pow2":
    return (f" The tuned per-bit rule is `{rule}` (`bit_lr_scale` {scale:g}): the most "
            "significant bit steps by scale x lr x max|w| x dL/dw at every m, so the m = 8 rows "
            "keep the tuned scale" + (" (the rows \"bit step matched to 1/4\" run at "
                                      f"{matched['bit_lr_scale']:g})." if matched else "."))
  text = (f" With the tuned per-bit rule (`{rule}`, `bit_lr_scale` {scale:g} at m = {m}) a "
          "virtual bit's SGD step is scale x lr x alpha x dL/dw, and alpha = max|w| / 2^(m-1) "
          f"is {2 ** (8 - m):g} times smaller at m = 8 while the bits' initial magnitudes are "
          f"not, so at the tuned values the bits of FedBiF-1/8 and 2/8 need {2 ** (8 - m):g} "
          "times the gradient to flip.")
  if matched is not None:
    text += (f" The rows \"bit step matched to 1/4\" run at `bit_lr_scale` "
             f"{matched['bit_lr_scale']:g} ({matched['bit_lr_scale'] / scale:g} x the tuned "
             "scale, `grid.matched_bit_lr_scale`), derived, not tuned.")
  return text


def ablation_section(table, abl, targets, rel, fig_dir) -> list[str]:
  """The ablations on Dir(0.5) in Table 1's columns plus the final sparsity, each variant against
  FedBiF-1/4 paired by seed (`paired_verdict`), and Fig. 3 / Fig. 4's curves."""
  lines = ["## Ablations on Dir(0.5) (Fig. 3, Fig. 4)", "",
           "Same setup and tuned values as Table 1; each variant changes one thing "
           "(`experiments/grid.py:ABLATIONS`). Columns as in Table 1 (target: Table 1's)."
           + _bit_step_note(table.get(("fedbif", "dir0.5"), []), abl), "",
           f"| variant | seeds | best acc | final acc | last-{LAST_EVALS} acc | up bpp | down bpp | "
           "total MB | rounds to target | MB to target | final sparsity (%) |",
           "|---|---|---|---|---|---|---|---|---|---|---|"]
  reference = table.get(("fedbif", "dir0.5"), [])
  verdicts = []
  for v, rs in [("fedbif", reference)] + [(v, abl.get((v, "dir0.5"), [])) for v in ABLATIONS]:
    if not rs:
      continue
    sparsity = _summary_stat([r for r in rs if r["summary"]], "final_sparsity")[0]
    lines.append(f"| {LABELS[v]} | {_result_cells(rs, targets.get('dir0.5'))} | "
                 + (f"{100 * sparsity:.1f} |" if sparsity is not None else "- |"))
    if v != "fedbif":
      verdicts.append(paired_verdict(LABELS[v], PARTITION_LABELS["dir0.5"], rs, reference))
  lines += [""] + verdicts + ["", PAIRED_RULE] if verdicts else []
  fig3 = [("FedBiF-1/4", table.get(("fedbif", "dir0.5"), []))] + [
      (LABELS[v], abl.get((v, "dir0.5"), []))
      for v in ("fedbif-1-8", "fedbif-2-4", "fedbif-2-8", "fedbif-1-8-matched", "fedbif-2-8-matched")]
  fig4 = [("FedBiF-1/4", table.get(("fedbif", "dir0.5"), [])),
          ("FedAvg", table.get(("fedavg", "dir0.5"), [])),
          ("SignSGD", table.get(("signsgd", "dir0.5"), []))] + [
      (LABELS[v], abl.get((v, "dir0.5"), []))
      for v in ("sign_bit", "no_vbi", "fixed_selector", "random_selector")]
  figure_curves(fig3, "test_accuracy", "test accuracy", "FedBiF-A/B, Dir(0.5) (Fig. 3)",
                os.path.join(fig_dir, "ablation_bits.png"))
  figure_curves(fig4, "test_accuracy", "test accuracy", "FedBiF variants, Dir(0.5) (Fig. 4)",
                os.path.join(fig_dir, "ablation_variants.png"))
  return lines + ["", f"![fig3]({rel('ablation_bits.png')}) "
                  f"![fig4]({rel('ablation_variants.png')})", ""]


def plane_usage(run) -> dict[int, tuple[int, float]] | None:
  """{bit plane: (rounds it was trained, its mean `bit_flip_rate` over those rounds)} of a FedBiF
  run whose metrics.jsonl logs them (``active_bits``, ``bit_flip_rate``); None otherwise."""
  rates = defaultdict(list)
  for row in run["metrics"]:
    for bit, rate in zip(row.get("active_bits", ()), row.get("bit_flip_rate", ())):
      rates[int(bit)].append(float(rate))
  return {b: (len(r), float(np.mean(r))) for b, r in sorted(rates.items())} or None


def planes_section(groups) -> list[str]:
  """How often each bit plane was trained and how much the clients flipped it, per group of
  runs ((label, partition label, runs)); groups whose runs do not log it are left out."""
  lines = []
  for label, partition, runs in groups:
    usage = [u for u in (plane_usage(r) for r in runs if r["summary"]) if u]
    if not usage:
      continue
    bits = sorted({b for u in usage for b in u}, reverse=True)
    trained = ", ".join(f"{np.mean([u.get(b, (0, 0))[0] for u in usage]):.1f}" for b in bits)
    flipped = ", ".join(
        f"{100 * np.mean([u[b][1] for u in usage if b in u]):.2f}" for b in bits)
    lines.append(f"| {label} | {partition} | {len(usage)} | {trained} | {flipped} |")
  if not lines:
    return []
  return ["## Bit planes: how often each was trained, how much the clients flipped it", "",
          "From `active_bits` and `bit_flip_rate` in metrics.jsonl (runs made before these were "
          "logged are left out). Planes from the most significant down; rounds: mean per run; "
          "flip rate: the client-weighted share of uploaded bits that differ from the broadcast "
          "bit, mean over the rounds the plane was trained and over runs.", "",
          "| variant | partition | runs | rounds trained per plane (MSB first) | "
          "flip rate per plane (%) |", "|---|---|---|---|---|"] + lines + [""]


def bridge_section(bridge) -> list[str]:
  lines = ["## The BatchNorm-free CNN (link to the earlier study; IID, seed 0)", "",
           "| method | best acc | final acc | total MB |", "|---|---|---|---|"]
  for v in ("fedavg-cnn", "fedbif-cnn"):
    for r in bridge.get((v, "iid"), []):
      s = r["summary"]
      lines.append(f"| {LABELS[v]} | {100 * s['best_accuracy']:.1f} | "
                   f"{100 * s['final_accuracy']:.1f} | {s['total_bytes'] / 1e6:.1f} |" if s
                   else f"| {LABELS[v]} | diverged | - | - |")
  return lines + [""]


def _verdict(ok):
  return "**holds**" if ok else "**does not hold**"


def _mean(runs, key):
  return _summary_stat([r for r in runs if r["summary"]], key)


def _seeds(runs) -> set:
  """The seeds of the finished runs in `runs`."""
  return {r["seed"] for r in runs if r["summary"]}


def _on_seeds(runs, seeds) -> list[dict]:
  """The runs of `runs` with a seed in `seeds` (a reference cut to a short cell's seeds)."""
  return [r for r in runs if r["seed"] in seeds]


def _seed_list(seeds) -> str:
  return ", ".join(map(str, sorted(seeds)))


def _n_seeds(seeds) -> str:
  return f"{len(seeds)} seed{'s' if len(seeds) != 1 else ''} ({_seed_list(seeds)})"


def _reach_by_seed(runs, target) -> dict:
  """{seed: (round, MB) at which the run first reaches `target`, or None} over the finished and
  the diverged runs (a diverged run reaches it only if it did before diverging)."""
  return {r["seed"]: reach(r, target) for r in runs if r["summary"] or r["failed"]}


def _reach_stat(reached):
  """(mean MB, mean round) over the entries of `reached` ((round, MB) or None) that reach the
  target (None, None if none), the number that do, and the number of entries."""
  reached = list(reached)
  hits = [h for h in reached if h]
  if not hits:
    return None, None, 0, len(reached)
  return (float(np.mean([h[1] for h in hits])), float(np.mean([h[0] for h in hits])),
          len(hits), len(reached))


def _reach_cell(reached: dict, runs) -> str:
  mb, rnd, hit, n = _reach_stat(reached.values())
  failed = sum(1 for r in runs if r["failed"] and r["seed"] in reached)
  diverged = f", {failed} diverged" if failed else ""
  return (f"{mb:.1f} ({hit}/{n} seeds{diverged}, round {rnd:.0f})" if hit
          else f"never (0/{n} seeds{diverged})")


def bytes_claim(table, p, target) -> str:
  """FedBiF's MB to `target` against FedAvg's and every baseline's on partition `p`, each pair
  over the seeds both have run (a diverged run counts, as never reaching the target unless it
  did before diverging). FedBiF is ahead of a method when, on their shared seeds, it reaches
  the target on at least one and on at least as many as the method, and with fewer MB (mean) on
  the seeds where both reach it (ahead outright when there is none). The claim holds when FedBiF
  is ahead of every method; a method sharing no seed with FedBiF counts against it. The line
  names the methods it holds and fails against with the reason, and the seeds a pair is judged
  on where they leave a seed out."""
  claim = (f"- *FedBiF needs far fewer bytes to reach a given accuracy* "
           f"({PARTITION_LABELS[p]}, target {100 * target:.1f}%): ")
  fedbif = table[("fedbif", p)]
  mine_all = _reach_by_seed(fedbif, target)
  shown, wins, losses = [], [], []
  for v in ("fedavg",) + BASELINES:
    other = table.get((v, p), [])
    theirs_all = _reach_by_seed(other, target)
    if not theirs_all:
      continue
    seeds = mine_all.keys() & theirs_all.keys()
    if not seeds:
      shown.append(f"{LABELS[v]}: no seed in common")
      losses.append((LABELS[v], "no seed in common"))
      continue
    mine = {s: mine_all[s] for s in seeds}
    theirs = {s: theirs_all[s] for s in seeds}
    hit_mine, hit = _reach_stat(mine.values())[2], _reach_stat(theirs.values())[2]
    both = sorted(s for s in seeds if mine[s] and theirs[s])
    notes = []
    if seeds != mine_all.keys() or seeds != theirs_all.keys():
      notes.append(f"seeds {_seed_list(seeds)}"
                   + (f", where FedBiF {_reach_cell(mine, fedbif)}" if seeds != mine_all.keys()
                      else ""))
    mb_mine_both = float(np.mean([mine[s][1] for s in both])) if both else None
    mb_both = float(np.mean([theirs[s][1] for s in both])) if both else None
    if both and (hit_mine != len(both) or hit != len(both)):
      notes.append(f"on the {len(both)} seed{'s' if len(both) > 1 else ''} both reach it: "
                   f"FedBiF {mb_mine_both:.1f}, {LABELS[v]} {mb_both:.1f}")
    shown.append(f"{LABELS[v]} {_reach_cell(theirs, other)}"
                 + (f" [{'; '.join(notes)}]" if notes else ""))
    if hit_mine == 0:
      losses.append((LABELS[v], "FedBiF never reaches it on their shared seeds"))
    elif hit_mine < hit:
      losses.append((LABELS[v], "FedBiF reaches it on fewer seeds"))
    elif not both or mb_mine_both < mb_both:
      wins.append(LABELS[v])
    else:
      losses.append((LABELS[v], "FedBiF needs no fewer MB where both reach it"))
  if not any(mine_all.values()):
    return (claim + f"{_verdict(False)}. FedBiF never reaches the target "
            f"{_reach_cell(mine_all, fedbif).removeprefix('never ')}; "
            "MB to target: " + "; ".join(shown) + ".")
  by_reason = defaultdict(list)
  for label, reason in losses:
    by_reason[reason].append(label)
  against = (f" (holds against {', '.join(wins) or 'none'}; not against "
             + "; ".join(f"{', '.join(labels)}: {reason}" for reason, labels in by_reason.items())
             + ")" if losses else "")
  return (claim + f"{_verdict(not losses)}{against}. MB to target: FedBiF "
          f"{_reach_cell(mine_all, fedbif)}; " + "; ".join(shown) + ".")


def _last_k_stat(runs):
  """(mean, std, n) over the finished runs of `last_mean`."""
  return _stat([last_mean(r) for r in runs if r["summary"]])


def _best_stat(runs):
  return _mean(runs, "best_accuracy")


def _matched(*cells) -> tuple[set, list[list[dict]]]:
  """The seeds every cell has a finished run of, and each cell cut to them: a comparison over
  them averages the same partitions and initial models on every side while a cell is short."""
  seeds = set.intersection(*(_seeds(rs) for rs in cells))
  return seeds, [_on_seeds(rs, seeds) for rs in cells]


def _seed_note(seeds, *cells) -> str:
  """'seeds 0, 1' when `seeds` leaves out a finished seed of one of `cells`; '' otherwise."""
  if all(_seeds(rs) <= seeds for rs in cells):
    return ""
  return f"seeds {_seed_list(seeds)}"


def _gaps_to_fedbif(table, p, stat):
  """FedBiF's `stat` (mean, std, n) on partition `p` over all its seeds and, for FedAvg and each
  baseline with a finished run there, (variant, FedBiF minus it in points or None when they
  share no seed, whether within noise, a note naming the seeds when some are left out). Each
  gap is over the seeds both cells have (`_matched`)."""
  fedbif = table.get(("fedbif", p), [])
  gaps = []
  for v in ("fedavg",) + BASELINES:
    other = table.get((v, p), [])
    if not _seeds(other) or not _seeds(fedbif):
      continue
    seeds, (mine, theirs) = _matched(fedbif, other)
    if not seeds:
      gaps.append((v, None, False, "no seed in common"))
      continue
    mine, theirs = stat(mine), stat(theirs)
    gaps.append((v, 100 * (mine[0] - theirs[0]), _within_noise(mine, theirs),
                 _seed_note(seeds, fedbif, other)))
  return stat(fedbif), gaps


def _gap_list(gaps) -> str:
  def cell(v, g, noise, note):
    if g is None:
      return f"{LABELS[v]} - ({note})"
    said = (["within noise"] if noise else []) + ([note] if note else [])
    return f"{LABELS[v]} {g:+.1f}" + (f" ({'; '.join(said)})" if said else "")
  return ", ".join(cell(*gap) for gap in gaps)


def _last_k_gaps(table, p) -> str:
  """The same comparison on the last-k mean, naming the methods FedBiF is ahead of, within noise
  of and behind there."""
  mine, gaps = _gaps_to_fedbif(table, p, _last_k_stat)
  if not gaps:
    return ""
  groups = {"ahead of": [], "within noise of": [], "behind": []}
  for v, g, noise, _ in gaps:
    if g is not None:
      groups["within noise of" if noise else "ahead of" if g > 0 else "behind"].append(LABELS[v])
  return (f" On the last-{LAST_EVALS} mean: FedBiF {100 * mine[0]:.1f}%; minus each: "
          + _gap_list(gaps) + "; "
          + "; ".join(f"{word} {', '.join(labels)}" for word, labels in groups.items() if labels)
          + ".")


def claims(table, abl, partitions, targets) -> list[str]:
  """The paper's claims, each with the numbers that decide it at this scale (means over seeds;
  a gap is called within noise when smaller than twice the larger sample std)."""
  out = []
  for p in partitions:
    mine, gaps = _gaps_to_fedbif(table, p, _best_stat)
    if gaps:
      out.append(f"- *FedBiF-1/4 (1 bpp up, 4 bpp down) beats FedAvg and every quantization "
                 f"baseline* ({PARTITION_LABELS[p]}, best accuracy): "
                 f"{_verdict(all(g is not None and g > 0 for _, g, *_ in gaps))}. "
                 f"FedBiF {100 * mine[0]:.1f}%; "
                 f"FedBiF minus each (points): {_gap_list(gaps)}." + _last_k_gaps(table, p))
  gaps = []
  for p in partitions:
    cells = table.get(("fedbif", p), []), table.get(("fedavg", p), [])
    seeds, (mine, theirs) = _matched(*cells)
    note = _seed_note(seeds, *cells)
    for key in ("best_accuracy", "final_accuracy") if seeds else ():
      gaps.append((p, key, 100 * (_mean(mine, key)[0] - _mean(theirs, key)[0]),
                   f" ({note})" if note else ""))
  if gaps:
    ok = all(2 <= g <= 9 for _, _, g, _ in gaps)
    out.append("- *FedBiF improves test accuracy over FedAvg by 2-9 points*: "
               f"{_verdict(ok)}. FedBiF minus FedAvg (points): " + ", ".join(
                   f"{PARTITION_LABELS[p]} {k.split('_')[0]} {g:+.1f}{n}" for p, k, g, n in gaps)
               + ".")
  for p in partitions:
    if targets.get(p) and table.get(("fedbif", p)):
      out.append(bytes_claim(table, p, targets[p]))
  sp = []
  for p in partitions:
    done = [r for r in table.get(("fedbif", p), [])
            if r["summary"] and _first(r, "sparsity") is not None]  # rows that log it
    if done:
      sp.append((p, np.mean([_first(r, "sparsity") for r in done]),
                 np.mean([_last(r, "sparsity") for r in done])))
  if sp:
    final = float(np.mean([s[2] for s in sp]))
    learned = float(np.mean([s[2] - s[1] for s in sp]))
    out.append(f"- *FedBiF's model sparsity is about 30%*: {_verdict(0.2 <= final <= 0.4)} "
               f"(read as 20-40%); *and it is learned*: {_verdict(learned >= 0.05)} (read as at "
               "least 5 points above the untrained quantized model). Untrained → final: "
               + ", ".join(f"{PARTITION_LABELS[p]} {100 * a:.1f} → {100 * b:.1f}%"
                           for p, a, b in sp) + ".")
  parts, ok_all = [], True
  for p in partitions:
    cells = table.get(("fedbif", p), []), table.get(("fedavg", p), [])
    seeds, (mine, theirs) = _matched(*cells)
    note = _seed_note(seeds, *cells)
    lf = [v for v in (_last(r, "lipschitz") for r in mine if r["summary"]) if v]
    la = [v for v in (_last(r, "lipschitz") for r in theirs if r["summary"]) if v]
    l0 = [v for v in (_first(r, "lipschitz_untrained") for r in mine if r["summary"]) if v]
    if lf and la:
      parts.append(f"{PARTITION_LABELS[p]} FedBiF {np.mean(lf):.3g} vs FedAvg {np.mean(la):.3g}"
                   + (f" (untrained {np.mean(l0):.3g})" if l0 else "")
                   + (f" ({note})" if note else ""))
      ok_all &= np.mean(lf) < np.mean(la)
  if parts:
    out.append(f"- *FedBiF's global model has a smaller Lipschitz constant than FedAvg's* "
               f"(AutoLip upper bound, last round): {_verdict(ok_all)}. {'; '.join(parts)}.")
  # The ablations (Fig. 3, Fig. 4), each judged on the best and on the final accuracy over the
  # seeds every cell it reads has: (claim, reading, {label in the text: runs}, test).
  ablation = lambda v: abl.get((v, "dir0.5"), [])
  fedbif, fedavg, signsgd = (table.get((v, "dir0.5"), []) for v in ("fedbif", "fedavg", "signsgd"))
  ablation_claims = [
      ("Fig. 3: FedBiF-1/8 ends lower than 1/4", "",
       {"1/8": ablation("fedbif-1-8"), "1/4": fedbif}, lambda a: a["1/8"] < a["1/4"]),
      ("Fig. 3: FedBiF-2/8 ends above 1/4", "",
       {"2/8": ablation("fedbif-2-8"), "1/4": fedbif}, lambda a: a["2/8"] > a["1/4"]),
      ("Fig. 3 with the bit step matched to 1/4 (ours): FedBiF-1/8 ends lower than 1/4", "",
       {"1/8 matched": ablation("fedbif-1-8-matched"), "1/4": fedbif},
       lambda a: a["1/8 matched"] < a["1/4"]),
      ("Fig. 3 with the bit step matched to 1/4 (ours): FedBiF-2/8 ends above 1/4", "",
       {"2/8 matched": ablation("fedbif-2-8-matched"), "1/4": fedbif},
       lambda a: a["2/8 matched"] > a["1/4"]),
      ("Without VBI accuracy is lower, but still reaches FedAvg's", "",
       {"without VBI": ablation("no_vbi"), "FedBiF": fedbif, "FedAvg": fedavg},
       lambda a: a["FedBiF"] > a["without VBI"] >= a["FedAvg"]),
      ("With a sign bit FedBiF fails to train a usable model",
       " (read as: below half of FedBiF's accuracy)",
       {"with sign bit": ablation("sign_bit"), "FedBiF": fedbif},
       lambda a: a["with sign bit"] < 0.5 * a["FedBiF"]),
      ("The fixed selector is worse than FedAvg but better than SignSGD", "",
       {"fixed": ablation("fixed_selector"), "FedAvg": fedavg, "SignSGD": signsgd},
       lambda a: a["SignSGD"] < a["fixed"] < a["FedAvg"]),
      ("The random selector is comparable to the sequential one", " (read as: within 2 points)",
       {"random": ablation("random_selector"), "sequential": fedbif},
       lambda a: abs(a["random"] - a["sequential"]) <= 0.02),
  ]
  for claim, reading, cells, test in ablation_claims:
    line = _judged_on_best_and_final(claim, reading, cells, test)
    if line:
      out.append(line)
  return out


def _judged_on_best_and_final(claim: str, reading: str, cells: dict, test) -> str | None:
  """A claim over labelled cells of runs, judged by `test` ({label: mean accuracy} -> bool) on
  the best and on the final accuracy, each a mean over the seeds every cell has (`_matched`),
  shown with its sample std when there are several seeds; None when they share no seed."""
  seeds, cut = _matched(*cells.values())
  if not seeds:
    return None
  verdicts, numbers = {}, []
  for key in ("best_accuracy", "final_accuracy"):
    stats = {label: _mean(rs, key) for label, rs in zip(cells, cut)}
    which = key.split("_")[0]
    verdicts[which] = test({label: stat[0] for label, stat in stats.items()})
    numbers.append(f"{which}: " + ", ".join(f"{k} {_pct(*stat)}" for k, stat in stats.items()))
  said = (f"{_verdict(verdicts['best'])} on the best and the final accuracy"
          if verdicts["best"] == verdicts["final"] else
          f"{_verdict(verdicts['best'])} on the best accuracy, {_verdict(verdicts['final'])} on "
          "the final")
  return (f"- *{claim}*: {said}{reading}. " + "; ".join(numbers)
          + f" (Dir(0.5), mean over {_n_seeds(seeds)}).")


def coverage(runs: dict, smoke: bool) -> list[str]:
  """Which planned cells are missing or have fewer seeds than planned."""
  planned = defaultdict(set)
  for grid in TABLE_GRIDS + ("ablations", "bridge", "beyond"):
    for r in grid_runs(grid, smoke):
      m = RUN_NAME.match(r.name)
      planned[(grid, m["variant"], m["partition"])].add(int(m["seed"]))
  short = []
  for (grid, v, p), seeds in sorted(planned.items()):
    have = {r["seed"] for r in runs.get(grid, {}).get((v, p), [])}
    if have != seeds:
      short.append(f"{grid}/{v} {PARTITION_LABELS[p]}: {len(have)} of {len(seeds)} seeds")
  return short


def write_report(root: str, out: str, tuned_path: str = DEFAULT_TUNED, smoke: bool = False) -> str:
  runs = load_runs(root)
  tuned = read_tuned(tuned_path)
  table = defaultdict(list)
  for grid in TABLE_GRIDS:
    for key, rs in runs.get(grid, {}).items():
      table[key] += rs
  abl, bridge, tune = runs.get("ablations", {}), runs.get("bridge", {}), runs.get("tune", {})
  fig_dir = os.path.join(os.path.dirname(out) or ".", "figures")
  os.makedirs(fig_dir, exist_ok=True)
  for name in os.listdir(fig_dir):  # the report owns its figures: none survives from older runs
    if name.endswith(".png"):
      os.remove(os.path.join(fig_dir, name))
  rel = lambda name: os.path.relpath(os.path.join(fig_dir, name), os.path.dirname(out) or ".")
  partitions = [p for p in PARTITIONS if any(k[1] == p for k in table)]
  everything = list(tune.values()) + [r for grid, cells in runs.items() if grid != "tune"
                                      for rs in cells.values() for r in rs]
  configs = [r["config"] for r in everything if r["config"]]
  example = next((c for c in configs if c.get("eval_test", True)), configs[0] if configs else None)
  lines = ["# Results: a fair test of FedBiF at CPU scale", "",
           "Generated by `python -m experiments.report --root=experiments/results` from the runs "
           "committed under `experiments/results/` (made by `experiments/grid.py`); do not edit "
           "by hand.", ""]
  if example is None and not tune:
    lines += ["No finished runs under the given root.", ""]
  if example is not None:
    c, d = example, example["data"]
    wall = sum(r.get("wall_seconds", 0) for run in everything for r in run["metrics"])
    lines += [
        "## Setup", "",
        f"- Data: {d['name']} ({d['source']}), a seeded subset of {d['train_subset'] or 'all'} "
        f"training images, {d['validation']} of them held out as the validation split (no "
        f"client trains on them; tuning reads only them), the rest over {c['num_clients']} "
        f"clients, all of them every round; test accuracy on "
        f"{d['test_subset'] or 'all'} test images every {c['eval_every']} rounds and the last.",
        f"- Model `{c['model']['name']}`, {c['local_epochs']} local epoch(s) of batch "
        f"{c['batch_size']}, plain SGD at each method's tuned values, {c['rounds']} rounds. "
        "FedBiF: m = 4 bits, s = 1 activated bit, sequential selector, VBI, plus the tuned "
        "bit step. FedAvg and the baselines weight clients by data share p_k on every split.",
        f"- Machine time of the finished runs: {wall / 3600:.1f} h (sum of per-round wall "
        f"time); report generated {datetime.date.today().isoformat()} on {_machine()}.", ""]
  if tune or tuned.get("methods"):
    lines += tuning_section(tune, tuned, smoke, rel, fig_dir)
  targets = {}
  if table:
    section, targets = table_section(table, partitions, rel, fig_dir)
    lines += section
    lines += properties_section(table, abl, partitions, rel, fig_dir)
  if abl:
    lines += ablation_section(table, abl, targets, rel, fig_dir)
  if bridge:
    lines += bridge_section(bridge)
  if runs.get("beyond"):
    lines += beyond_section(table, runs["beyond"], targets)
  lines += planes_section(
      [(LABELS[v], PARTITION_LABELS[p], rs) for grid in ("table1", "beyond", "ablations")
       for (v, p), rs in sorted(runs.get(grid, {}).items()) if grid != "table1" or v != "fedavg"])
  found = claims(table, abl, partitions, targets)
  lines += ["## The paper's claims, re-judged at this scale", ""]
  lines += found or ["No claim can be checked yet: too few finished runs."]
  scale = (f"`{example['model']['name']}`, {example['num_clients']} clients, "
           f"{example['rounds']} rounds" if example else "this scale")
  lines += ["", "Verdicts compare means over seeds: over the seeds that every cell a comparison "
            "reads has finished (named where that leaves a finished seed out); \"within noise\" "
            "marks a gap smaller than twice the larger sample std. In the bytes claim FedBiF is "
            "ahead of a method when, on their shared seeds (a diverged run counts, as not "
            "reaching the target after it diverged), it reaches the target on at least as many, "
            "and with fewer MB on the seeds both reach it. A claim that does not hold here is a "
            "result about "
            f"this scale ({scale}, the data above), not a verdict on the paper's full-scale "
            "runs.", ""]
  short = coverage(runs, smoke)
  lines += ["## Cells with fewer seeds than planned", ""]
  lines += [f"- {s}" for s in short] or ["None: every planned cell has all its seeds."]
  lines.append("")
  with open(out, "w") as f:
    f.write("\n".join(lines))
  return out


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line (defined only when run as a script, so that tests can import this module)."""
  flags.DEFINE_string("root", None, "The --root of experiments/grid.py.")
  flags.DEFINE_string("out", "docs/RESULTS.md", "The report; figures go to figures/ beside it "
                      "(the report owns that folder: PNGs from an earlier report are removed).")
  flags.DEFINE_string("tuned", DEFAULT_TUNED, "The tuned values file.")
  flags.DEFINE_bool("smoke", False, "The runs were made with grid.py --smoke.")


def main(argv):
  del argv
  if not FLAGS.root or not os.path.isdir(FLAGS.root):
    print(f"error: --root: no such directory: {FLAGS.root}", file=sys.stderr)
    sys.exit(2)
  print(write_report(FLAGS.root, FLAGS.out, FLAGS.tuned, FLAGS.smoke))


if __name__ == "__main__":
  define_flags()
  app.run(main)
