"""docs/RESULTS.md and its figures, generated from the run directories of experiments/grid.py.

Reads ``<root>/<grid>/<run>/{config.json, metrics.jsonl, summary.json, histograms.jsonl,
failed.json}`` and writes:

* a Table-1-style table (final test accuracy mean +- std over seeds, uplink/downlink bpp over the
  compressed weights, total MB sent), one column per partition;
* convergence figures against round and against MB sent, the long runs, the ablations (Fig. 3
  and Fig. 4), FedBiF's sparsity (Sec. 4.4), the Lipschitz bound of FedBiF vs FedAvg (Fig. 6) and
  last-layer weight histograms over rounds (Fig. 5), as PNG beside the report;
* a claim-by-claim comparison with the paper, with the numbers that decide each claim.

Nothing in the report is typed by hand: rerunning this script on the same runs rewrites it.

  python experiments/report.py --root=/tmp/study [--out=docs/RESULTS.md]
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import re
import sys
from collections import defaultdict

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from experiments.grid import ABLATIONS, METHODS, PARTITIONS  # noqa: E402

LABELS = {"fedavg": "FedAvg", "signsgd": "SignSGD", "fedpaq": "FedPAQ", "feddq": "FedDQ",
          "dadaquant": "DAdaQuant", "fedbif": "FedBiF-1/4", "fedbif-1-8": "FedBiF-1/8",
          "fedbif-2-4": "FedBiF-2/4", "fedbif-2-8": "FedBiF-2/8", "sign_bit": "with sign bit",
          "no_vbi": "without VBI", "fixed_selector": "fixed selector (3rd bit)",
          "random_selector": "random selector"}
PARTITION_LABELS = {"iid": "IID", "dir0.5": "Dir(0.5)", "dir0.1": "Dir(0.1)"}
RUN_NAME = re.compile(r"^(?P<variant>.+)-(?P<partition>iid|dir0\.5|dir0\.1)-s(?P<seed>\d+)$")


# ----------------------------------------------------------------------------------- loading
def _read_jsonl(path: str) -> list[dict]:
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          break
  return rows


def load_runs(root: str) -> dict:
  """{grid: {(variant, partition): [run, ...]}}, a run being a dict of its files' contents."""
  runs = defaultdict(lambda: defaultdict(list))
  for grid in sorted(os.listdir(root)) if os.path.isdir(root) else []:
    gdir = os.path.join(root, grid)
    if grid.startswith(".") or not os.path.isdir(gdir):
      continue
    for name in sorted(os.listdir(gdir)):
      m = RUN_NAME.match(name)
      d = os.path.join(gdir, name)
      if not m or not os.path.isdir(d):
        continue
      run = {"name": name, "seed": int(m["seed"]), "dir": d,
             "metrics": _read_jsonl(os.path.join(d, "metrics.jsonl")),
             "histograms": _read_jsonl(os.path.join(d, "histograms.jsonl"))}
      for key in ("summary", "config", "failed"):
        path = os.path.join(d, f"{key}.json")
        run[key] = json.load(open(path)) if os.path.exists(path) else None
      if run["summary"] is None and run["failed"] is None:
        continue  # unfinished: left out of the report
      runs[grid][(m["variant"], m["partition"])].append(run)
  return runs


def _curve(runs: list[dict], key: str):
  """Rounds and the per-round mean over the (finished) runs that log `key` in every row."""
  series = [[r[key] for r in run["metrics"] if key in r] for run in runs if run["summary"]]
  series = [s for s in series if s]
  if not series:
    return None, None
  n = min(len(s) for s in series)
  rounds = [r["round"] for r in next(run for run in runs if run["summary"])["metrics"]
            if key in r][:n]
  return np.asarray(rounds), np.mean([s[:n] for s in series], axis=0)


def _stat(runs: list[dict], key: str):
  vals = [run["summary"][key] for run in runs if run["summary"]]
  return ((float(np.mean(vals)), float(np.std(vals, ddof=1)) if len(vals) > 1 else 0.0, len(vals))
          if vals else (None, None, 0))


def _final_lipschitz(run: dict):
  vals = [r["lipschitz"] for r in run["metrics"] if "lipschitz" in r]
  return vals[-1] if vals else None


def _fmt_acc(mean, std, n, failed=0):
  if mean is None:
    return "diverged" if failed else "-"
  note = f" ({failed} diverged)" if failed else ""
  return f"{100 * mean:.1f} ± {100 * std:.1f}{note}" if n > 1 else f"{100 * mean:.1f}{note}"


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


def figure_convergence(table, partitions, methods, path):
  plt = _plt()
  fig, axes = plt.subplots(2, len(partitions), figsize=(5 * len(partitions), 8), squeeze=False)
  for j, p in enumerate(partitions):
    for m in methods:
      runs = table.get((m, p), [])
      rounds, acc = _curve(runs, "test_accuracy")
      if rounds is None:
        continue
      _, mb = _curve(runs, "cumulative_bytes")
      axes[0, j].plot(rounds + 1, acc, label=LABELS.get(m, m))
      axes[1, j].plot(mb / 1e6, acc, label=LABELS.get(m, m))
    axes[0, j].set(title=PARTITION_LABELS[p], xlabel="round", ylabel="test accuracy")
    axes[1, j].set(xlabel="MB sent (up + down, cumulative)", ylabel="test accuracy", xscale="log")
    axes[1, j].xaxis.set_minor_formatter(plt.NullFormatter())
  if axes[0, 0].get_legend_handles_labels()[0]:
    axes[0, 0].legend(fontsize=8)
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
    ax.legend(fontsize=8)
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


# ----------------------------------------------------------------------------------- report
def _mean_final(runs, key="final_accuracy"):
  return _stat(runs, key)[0]


def _verdict(ok):
  return "**holds**" if ok else "**does not hold**"


def claims(table, abl, long, partitions) -> list[str]:
  """The paper's claims, each with the numbers that decide it at this scale."""
  out = []
  fb = {p: table.get(("fedbif", p), []) for p in partitions}
  # 1. FedBiF beats FedAvg and every quantization baseline.
  for p in partitions:
    mine = _mean_final(fb[p])
    if mine is None:
      continue
    others = {m: _mean_final(table.get((m, p), [])) for m in METHODS if m != "fedbif"}
    others = {m: v for m, v in others.items() if v is not None}
    beaten = [m for m, v in others.items() if mine > v]
    lost = [f"{LABELS[m]} {100 * v:.1f}" for m, v in others.items() if mine <= v]
    out.append(f"- *FedBiF-1/4 (1 bpp up, 4 bpp down) beats FedAvg and every quantization "
               f"baseline* ({PARTITION_LABELS[p]}): {_verdict(not lost)}. FedBiF {100 * mine:.1f}%"
               f"; beats {', '.join(LABELS[m] for m in beaten) or 'none'}"
               + (f"; behind {', '.join(lost)}." if lost else "."))
  # 2. 2-9 points better than FedAvg.
  gaps = []
  for p in partitions:
    a, b = _mean_final(fb[p]), _mean_final(table.get(("fedavg", p), []))
    if a is not None and b is not None:
      gaps.append(f"{PARTITION_LABELS[p]} {100 * (a - b):+.1f}")
  if gaps:
    ok = all(2 <= float(g.split()[-1]) <= 9 for g in gaps)
    out.append(f"- *FedBiF improves test accuracy over FedAvg by 2-9 points*: {_verdict(ok)}. "
               f"FedBiF minus FedAvg, final accuracy (points): {', '.join(gaps)}.")
  # 3. Sparsity about 30%.
  sp = [(p, _stat(fb[p], "final_sparsity")[0]) for p in partitions if fb[p]]
  sp = [(p, v) for p, v in sp if v is not None]
  if sp:
    mean = float(np.mean([v for _, v in sp]))
    out.append(f"- *FedBiF's model sparsity is about 30%*: {_verdict(0.2 <= mean <= 0.4)} "
               f"(read as 20-40%). Final sparsity of the broadcast model: "
               + ", ".join(f"{PARTITION_LABELS[p]} {100 * v:.1f}%" for p, v in sp)
               + f"; mean {100 * mean:.1f}%.")
  # 4. Lipschitz constants smaller than FedAvg's.
  parts = []
  ok_all = True
  for p in partitions:
    lf = [_final_lipschitz(r) for r in fb[p] if r["summary"]]
    la = [_final_lipschitz(r) for r in table.get(("fedavg", p), []) if r["summary"]]
    lf, la = [v for v in lf if v], [v for v in la if v]
    if lf and la:
      parts.append(f"{PARTITION_LABELS[p]} FedBiF {np.mean(lf):.3g} vs FedAvg {np.mean(la):.3g}")
      ok_all &= np.mean(lf) < np.mean(la)
  if parts:
    out.append(f"- *FedBiF's global model has a smaller Lipschitz constant than FedAvg's* "
               f"(AutoLip upper bound, last round): {_verdict(ok_all)}. {'; '.join(parts)}.")
  # 5. Fig. 3.
  a = {v: _curve(abl.get((v, "dir0.5"), []), "test_accuracy")[1]
       for v in ("fedbif-1-8", "fedbif-2-4", "fedbif-2-8")}
  a["fedbif-1-4"] = _curve(table.get(("fedbif", "dir0.5"), []), "test_accuracy")[1]
  if all(v is not None for v in a.values()):
    half = {k: float(np.mean(v[: max(1, len(v) // 2)])) for k, v in a.items()}
    final = {k: float(v[-1]) for k, v in a.items()}
    fmt = lambda d: ", ".join(f"{k.replace('fedbif-', '').replace('-', '/')} {100 * v:.1f}"
                              for k, v in d.items())
    out.append(f"- *Fig. 3: FedBiF-1/8 converges slower and ends lower than 1/4*: "
               f"{_verdict(half['fedbif-1-8'] < half['fedbif-1-4'] and final['fedbif-1-8'] < final['fedbif-1-4'])}."
               f" *FedBiF-2/4 converges fastest*: "
               f"{_verdict(half['fedbif-2-4'] == max(half.values()))}. *FedBiF-2/8 ends above 1/4*: "
               f"{_verdict(final['fedbif-2-8'] > final['fedbif-1-4'])}. Mean accuracy over the first "
               f"half of the rounds (speed): {fmt(half)}; final: {fmt(final)} (Dir(0.5), mean of seeds).")
  # 6. Fig. 4.
  ref = {k: _mean_final(table.get((k, "dir0.5"), [])) for k in ("fedbif", "fedavg", "signsgd")}
  var = {k: _mean_final(abl.get((k, "dir0.5"), [])) for k in
         ("no_vbi", "sign_bit", "fixed_selector", "random_selector")}
  if ref["fedbif"] is not None and ref["fedavg"] is not None and any(v is not None for v in var.values()):
    f, avg, sgn = ref["fedbif"], ref["fedavg"], ref["signsgd"]
    pct = lambda v: f"{100 * v:.1f}"
    if var["no_vbi"] is not None:
      out.append(f"- *Without VBI accuracy is lower, but still reaches FedAvg's*: "
                 f"{_verdict(var['no_vbi'] < f and var['no_vbi'] >= avg)}. without VBI "
                 f"{pct(var['no_vbi'])}, FedBiF {pct(f)}, FedAvg {pct(avg)}.")
    if var["sign_bit"] is not None:
      sb_sp = _stat(abl.get(("sign_bit", "dir0.5"), []), "final_sparsity")[0]
      out.append(f"- *With a sign bit FedBiF fails to train a usable model (weights decay to 0)*: "
                 f"{_verdict(var['sign_bit'] < 0.5 * f)} (read as: below half of FedBiF's "
                 f"accuracy). with sign bit {pct(var['sign_bit'])} (final sparsity "
                 f"{100 * sb_sp:.1f}%), FedBiF {pct(f)}.")
    if var["fixed_selector"] is not None and sgn is not None:
      out.append(f"- *The fixed selector is worse than FedAvg but better than SignSGD*: "
                 f"{_verdict(sgn < var['fixed_selector'] < avg)}. fixed {pct(var['fixed_selector'])}"
                 f", FedAvg {pct(avg)}, SignSGD {pct(sgn)}.")
    if var["random_selector"] is not None:
      out.append(f"- *The random selector is comparable to the sequential one* (within 2 points): "
                 f"{_verdict(abs(var['random_selector'] - f) <= 0.02)}. random "
                 f"{pct(var['random_selector'])}, sequential {pct(f)}.")
  # 7. The long horizon.
  lf, la = long.get(("fedbif", "iid")), long.get(("fedavg", "iid"))
  if lf and la and lf[0]["summary"] and la[0]["summary"]:
    cf, ca = _curve(lf, "test_accuracy")[1], _curve(la, "test_accuracy")[1]
    n = min(len(cf), len(ca))
    table_rounds = next((r["config"]["rounds"] for rs in table.values() for r in rs
                         if r["config"]), None)
    checkpoints = sorted({k for k in (table_rounds, n // 4, n // 2, n) if k and 1 <= k <= n})
    gaps = ", ".join(f"round {k}: {100 * (cf[k - 1] - ca[k - 1]):+.1f}" for k in checkpoints)
    best_f, best_a = lf[0]["summary"]["best_accuracy"], la[0]["summary"]["best_accuracy"]
    out.append(f"- *With a longer horizon FedBiF catches up with FedAvg* (the open question of the "
               f"engine issue): {_verdict(cf[n - 1] >= ca[n - 1])} at {n} rounds (read as: "
               f"FedBiF's final accuracy reaches FedAvg's). FedBiF minus FedAvg (IID, seed 0, "
               f"points) at {gaps}; best accuracy FedBiF {100 * best_f:.1f}, FedAvg "
               f"{100 * best_a:.1f}.")
  return out


def write_report(root: str, out: str) -> str:
  runs = load_runs(root)
  table, abl, long = runs.get("table1", {}), runs.get("ablations", {}), runs.get("long", {})
  fig_dir = os.path.join(os.path.dirname(out) or ".", "figures")
  os.makedirs(fig_dir, exist_ok=True)
  rel = lambda name: os.path.relpath(os.path.join(fig_dir, name), os.path.dirname(out) or ".")
  partitions = [p for p in PARTITIONS if any(k[1] == p for k in table)]
  methods = [m for m in METHODS if any(k[0] == m for k in table)]
  any_run = next((r for rs in (list(table.values()) + list(abl.values()) + list(long.values()))
                  for r in rs if r["config"]), None)
  lines = ["# Results: the paper's study at CPU scale", "",
           "Generated by `python experiments/report.py` from the run directories of "
           "`experiments/grid.py`; do not edit by hand.", ""]
  if any_run is None:
    lines += ["No finished runs under the given root.", ""]
  else:
    c = any_run["config"]
    d = c["data"]
    wall = sum(r["wall_seconds"] for g in runs.values() for rs in g.values() for run in rs
               for r in run["metrics"])
    lines += [
        "## Setup", "",
        f"- Data: {d['name']} ({d['source']}), a seeded subset of {d['train_subset'] or 'all'} "
        f"training images split over {c['num_clients']} clients (all of them every round); test "
        f"accuracy on a seeded subset of {d['test_subset'] or 'all'} test images. The seed picks "
        "the subsets, the partition and the initialisation.",
        f"- Model `{c['model']['name']}`, {c['local_epochs']} local epoch(s) of batch "
        f"{c['batch_size']}, plain SGD lr {c['lr']}, {c['rounds']} rounds (table and ablations); "
        f"long runs {max((len(r['metrics']) for rs in long.values() for r in rs), default=0)} "
        "rounds. FedBiF: m = 4 bits, s = 1 activated bit, sequential selector from the MSB, VBI.",
        f"- Lipschitz bound and last-layer histogram every {c['lipschitz_every']} rounds (and the "
        "last round).",
        f"- Total training time of all runs: {wall / 60:.0f} min (sum of per-round wall time); "
        f"report generated {datetime.date.today().isoformat()} on {_machine()}.",
        "", "Reproduce:", "", "```",
        "python experiments/grid.py --root=/tmp/study --data_path=../shared/data/cifar10.npz",
        "python experiments/report.py --root=/tmp/study --out=docs/RESULTS.md", "```", ""]

  if table:
    lines += ["## Table 1 (CPU scale)", "",
              "Final test accuracy (%), mean ± sample std (n - 1) over seeds; bpp over the compressed weights, "
              "mean of rounds and runs; MB: all bytes sent up and down, as encoded by `wire.py`, "
              "mean of runs.", "",
              "| method | uplink bpp | downlink bpp | "
              + " | ".join(f"{PARTITION_LABELS[p]} acc" for p in partitions) + " | total MB | seeds |",
              "|---|---|---|" + "---|" * len(partitions) + "---|---|"]
    for m in methods:
      allruns = [r for p in partitions for r in table.get((m, p), [])]
      cells = []
      for p in partitions:
        rs = table.get((m, p), [])
        cells.append(_fmt_acc(*_stat(rs, "final_accuracy"), sum(bool(r["failed"]) for r in rs)))
      up, down = _stat(allruns, "mean_uplink_bpp")[0], _stat(allruns, "mean_downlink_bpp")[0]
      mb = _stat(allruns, "total_bytes")[0]
      seeds = sorted({r["seed"] for r in allruns})
      lines.append(f"| {LABELS[m]} | {up:.3f} | {down:.3f} | " + " | ".join(cells)
                   + f" | {mb / 1e6:.1f} | {len(seeds)} |" if up is not None else
                   f"| {LABELS[m]} | - | - | " + " | ".join(cells) + " | - | - |")
    figure_convergence(table, partitions, methods, os.path.join(fig_dir, "convergence.png"))
    lines += ["", f"![convergence]({rel('convergence.png')})", "",
              "Top: test accuracy against round; bottom: against MB sent (log scale). Mean of seeds.",
              ""]
    fb_groups = [(PARTITION_LABELS[p], table.get(("fedbif", p), [])) for p in partitions]
    figure_curves(fb_groups, "sparsity", "fraction of zero integers", "FedBiF-1/4 sparsity",
                  os.path.join(fig_dir, "sparsity.png"))
    lip_groups = [(f"{LABELS[m]} {PARTITION_LABELS[p]}", table.get((m, p), []))
                  for m in ("fedavg", "fedbif") for p in partitions]
    figure_curves(lip_groups, "lipschitz", "Lipschitz upper bound (AutoLip)",
                  "Lipschitz bound of the global model (Fig. 6)",
                  os.path.join(fig_dir, "lipschitz.png"), logy=True)
    lines += ["## Sparsity and Lipschitz constants (Sec. 4.4)", "",
              f"![sparsity]({rel('sparsity.png')}) ![lipschitz]({rel('lipschitz.png')})", ""]
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

  if abl:
    lines += ["## Ablations on Dir(0.5)", "", "| variant | final acc (%) | uplink bpp | "
              "downlink bpp | final sparsity | seeds |", "|---|---|---|---|---|---|"]
    ref = [("FedBiF-1/4 (Table 1 run)", table.get(("fedbif", "dir0.5"), []))]
    for name, rs in ref + [(LABELS[v], abl.get((v, "dir0.5"), [])) for v in ABLATIONS]:
      if not rs:
        continue
      acc = _fmt_acc(*_stat(rs, "final_accuracy"), sum(bool(r["failed"]) for r in rs))
      up, down = _stat(rs, "mean_uplink_bpp")[0], _stat(rs, "mean_downlink_bpp")[0]
      sp = _stat(rs, "final_sparsity")[0]
      lines.append(f"| {name} | {acc} | " + (f"{up:.3f} | {down:.3f} | {100 * sp:.1f}% |"
                                              if up is not None else "- | - | - |")
                   + f" {len(rs)} |")
    fig3 = [("FedBiF-1/4", table.get(("fedbif", "dir0.5"), []))] + [
        (LABELS[v], abl.get((v, "dir0.5"), [])) for v in ("fedbif-1-8", "fedbif-2-4", "fedbif-2-8")]
    fig4 = [("FedBiF-1/4", table.get(("fedbif", "dir0.5"), [])),
            ("FedAvg", table.get(("fedavg", "dir0.5"), [])),
            ("SignSGD", table.get(("signsgd", "dir0.5"), []))] + [
        (LABELS[v], abl.get((v, "dir0.5"), []))
        for v in ("sign_bit", "no_vbi", "fixed_selector", "random_selector")]
    figure_curves(fig3, "test_accuracy", "test accuracy", "FedBiF-A/B, Dir(0.5) (Fig. 3)",
                  os.path.join(fig_dir, "ablation_bits.png"))
    figure_curves(fig4, "test_accuracy", "test accuracy", "FedBiF variants, Dir(0.5) (Fig. 4)",
                  os.path.join(fig_dir, "ablation_variants.png"))
    lines += ["", f"![fig3]({rel('ablation_bits.png')}) ![fig4]({rel('ablation_variants.png')})",
              ""]

  if long:
    lines += ["## Long runs (IID, seed 0)", "",
              "| method | rounds | final acc (%) | best acc (%) | total MB |", "|---|---|---|---|---|"]
    for m in METHODS:
      for r in long.get((m, "iid"), []):
        s = r["summary"]
        lines.append(f"| {LABELS[m]} | {s['rounds']} | {100 * s['final_accuracy']:.1f} | "
                     f"{100 * s['best_accuracy']:.1f} | {s['total_bytes'] / 1e6:.1f} |" if s else
                     f"| {LABELS[m]} | - | diverged | - | - |")
    figure_curves([(LABELS[m], long.get((m, "iid"), [])) for m in METHODS], "test_accuracy",
                  "test accuracy", "Long runs, IID", os.path.join(fig_dir, "long.png"))
    lines += ["", f"![long]({rel('long.png')})", ""]

  found = claims(table, abl, long, partitions)
  lines += ["## The paper's claims at this scale", ""]
  lines += found or ["No claim can be checked: too few runs."]
  lines += ["", "Each verdict compares means over seeds; the tables give the sample std, and with "
            "3 seeds a difference smaller than about twice the larger std is within seed noise. "
            "A claim that does not hold here is a result about this scale (small CNN, a few "
            "thousand images, tens of rounds), not a verdict on the paper's full-scale runs.", ""]
  with open(out, "w") as f:
    f.write("\n".join(lines))
  return out


FLAGS = flags.FLAGS


def define_flags() -> None:
  """The command line (defined only when run as a script, so that tests can import this module)."""
  flags.DEFINE_string("root", None, "The --root of experiments/grid.py.")
  flags.DEFINE_string("out", "docs/RESULTS.md", "The report; figures go to figures/ beside it.")

def main(argv):
  del argv
  if not FLAGS.root or not os.path.isdir(FLAGS.root):
    print(f"error: --root: no such directory: {FLAGS.root}", file=sys.stderr)
    sys.exit(2)
  print(write_report(FLAGS.root, FLAGS.out))


if __name__ == "__main__":
  define_flags()
  app.run(main)
