"""Learning curves of one run (``curves.png``) or of several workdirs side by side.

Three panels: accuracy against round, loss against round (the test loss where evaluated, and
the clients' training loss every round), and accuracy against the cumulative MB sent up and
down on a log axis (compressed methods differ from FedAvg by orders of magnitude). Accuracy is
the test set's, or the validation split's for a run that never read the test set.

Several runs in one figure:

  python -m fedbif_jax.plots /tmp/run_fedbif /tmp/run_fedavg --out=/tmp/compare.png

labels each run by its workdir's name (``--labels`` to choose) and reads its ``metrics.jsonl``.
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Mapping, Sequence

from fedbif_jax import records


def run_title(config) -> str:
  """A run's curves title: algorithm (with m and s for FedBiF), model, data and partition."""
  algorithm = config.algorithm
  if algorithm == "fedbif":
    algorithm += f"-{config.fedbif.active_bits}/{config.fedbif.bits}"
  partition = config.data.partition + (f"({config.data.mu:g})"
                                       if config.data.partition == "dirichlet" else "")
  return f"{algorithm}, {config.model.name}, {config.data.name} {partition}"


def _accuracy_key(rows: list[dict]) -> str:
  return "test_accuracy" if any("test_accuracy" in r for r in rows) else "validation_accuracy"


def figure(runs: Mapping[str, list[dict]], title: str = ""):
  """The matplotlib figure of `runs` ({label: metrics.jsonl rows}); see the module docstring."""
  import matplotlib  # pylint: disable=import-outside-toplevel
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel

  fig, (ax_acc, ax_loss, ax_mb) = plt.subplots(1, 3, figsize=(15, 4))
  key = _accuracy_key([r for rows in runs.values() for r in rows])
  for label, rows in runs.items():
    evaluated = [r for r in rows if key in r]
    line, = ax_acc.plot([r["round"] + 1 for r in evaluated], [r[key] for r in evaluated],
                        label=label)
    loss_key = key.replace("accuracy", "loss")
    ax_loss.plot([r["round"] + 1 for r in evaluated if loss_key in r],
                 [r[loss_key] for r in evaluated if loss_key in r], color=line.get_color(),
                 label=f"{label}: {loss_key.replace('_', ' ')}")
    ax_loss.plot([r["round"] + 1 for r in rows], [r["train_loss"] for r in rows],
                 color=line.get_color(), linestyle=":", label=f"{label}: train loss")
    ax_mb.plot([r["cumulative_bytes"] / 1e6 for r in evaluated], [r[key] for r in evaluated],
               color=line.get_color(), label=label)
  ax_acc.set(xlabel="round", ylabel=key.replace("_", " "))
  ax_loss.set(xlabel="round", ylabel="loss")
  ax_mb.set(xlabel="cumulative MB sent (up + down)", ylabel=key.replace("_", " "))
  ax_mb.set_xscale("log")
  for ax in (ax_acc, ax_loss, ax_mb):
    ax.grid(alpha=0.3)
  ax_loss.legend(fontsize="small")
  if len(runs) > 1:
    ax_acc.legend(fontsize="small")
  fig.suptitle(title)
  fig.tight_layout()
  return fig


def plot_runs(runs: Mapping[str, list[dict]], path: str, title: str = "") -> None:
  """Writes the figure of `runs` ({label: rows}) to `path` (PNG)."""
  import matplotlib.pyplot as plt  # pylint: disable=import-outside-toplevel
  fig = figure(runs, title)
  fig.savefig(path, dpi=100)
  plt.close(fig)


def read_rows(workdir: str) -> list[dict]:
  """The rows of ``<workdir>/metrics.jsonl`` (a torn last line is left out)."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    raise FileNotFoundError(f"workdir: {workdir!r} has no metrics.jsonl")
  return records.read_jsonl(path)


def main(argv: Sequence[str] | None = None) -> int:
  parser = argparse.ArgumentParser(prog="python -m fedbif_jax.plots", description=__doc__.split(
      "\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("workdirs", nargs="+", help="run workdirs (each with a metrics.jsonl)")
  parser.add_argument("--out", required=True, help="the PNG to write")
  parser.add_argument("--labels", default="", help="comma-separated labels, one per workdir "
                      "(default: the workdirs' folder names)")
  parser.add_argument("--title", default="")
  args = parser.parse_args(argv)
  labels = ([l.strip() for l in args.labels.split(",")] if args.labels else
            [os.path.basename(os.path.normpath(w)) for w in args.workdirs])
  if len(labels) != len(args.workdirs):
    print(f"error: --labels: must give {len(args.workdirs)} labels (one per workdir), got "
          f"{len(labels)}", file=sys.stderr)
    return 2
  try:
    runs = {label: read_rows(w) for label, w in zip(labels, args.workdirs)}
  except FileNotFoundError as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  plot_runs(runs, args.out, args.title)
  print(f"wrote {args.out}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
