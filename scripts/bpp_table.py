"""Measured bits per parameter of every algorithm: runs them and writes a Markdown table.

Every algorithm (fedavg, fedbif, signsgd, fedpaq, feddq, dadaquant) runs through
`train_and_evaluate` on one config (default: the offline quickstart, digits) with its default
section; the table reports what the ledger in each run's metrics.jsonl measured: final and best
test accuracy, mean uplink / downlink bpp over the compressed weights (the paper's column), the
same with every encoded byte (headers, scales, biases; our honest column), megabytes sent and wall
time, then the per-round uplink bpp of FedDQ and DAdaQuant. ``--variant`` adds runs with their own
overrides (by default a short-memory DAdaQuant, whose levels rise on the quickstart).

The runs use ``--codec`` as their ``wire_codec`` (default ``entropy``; the codec changes what is
counted, not what is trained): the totals and megabytes are the bytes sent with it, and with
``entropy`` a second table gives, per algorithm and direction, the weights' bpp packed at their
widths, entropy-coded (symbol statistics included) and their empirical entropy (the limit), each
averaged over the whole run.

Cost: the runs are the whole cost (docs/BPP.md gives each run's wall time). On the 2-core CPU
with the study grid running, the quickstart section took 2.7-3.1 min and the 2-round CIFAR-10
CNN section 3.5 min (both sections, one after the other: 6 min 10 s).

The output file holds one section per ``--section`` (default: the config's file name), between
HTML comment markers; a rerun replaces its own section and keeps the others.

Usage:
  python scripts/bpp_table.py --out=docs/BPP.md
  python scripts/bpp_table.py --algorithms=dadaquant --set=dadaquant.psi=0.5 --out=/tmp/d.md
  python scripts/bpp_table.py --config=configs/cifar10_cnn.py --per_algorithm \
      --data_path=../shared/data/cifar10.npz --rounds=2 --out=/tmp/bpp_cifar.md
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import logging
import os
import platform
import shlex
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

import jax

from fedbif_jax import wire
from fedbif_jax.train import train_and_evaluate

ALGORITHMS = ("fedavg", "fedbif", "signsgd", "fedpaq", "feddq", "dadaquant")
TRENDS = ("feddq", "dadaquant")
DEFAULT_VARIANTS = ("dadaquant:dadaquant.psi=0.3,dadaquant.phi=1",)


def load_config(path: str, arg: str | None = None):
  """The config file's ``get_config()``, or ``get_config(arg)`` when `arg` is given."""
  spec = importlib.util.spec_from_file_location("experiment_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config() if arg is None else module.get_config(arg)


def _override(config, item: str) -> None:
  dotted, value = item.split("=", 1)
  *parents, leaf = dotted.split(".")
  node = config
  for part in parents:
    node = node[part]
  node[leaf] = type(node[leaf])(json.loads(value) if value[:1] in "0123456789-[{tf" else value)


def plan(args) -> list[tuple[str, str, list[str]]]:
  """(label, algorithm, overrides) of every run."""
  runs = [(name, name, []) for name in args.algorithms.split(",") if name]
  for variant in (args.variant if args.variant is not None else DEFAULT_VARIANTS):
    name, _, items = variant.partition(":")
    overrides = [i for i in items.split(",") if i]
    runs.append((f"{name} ({', '.join(overrides)})", name, overrides))
  return runs


def run(args) -> dict:
  results = {}
  for label, name, overrides in plan(args):
    config = load_config(args.config, name if args.per_algorithm else None)
    config.unlock()
    config.algorithm = name
    config.checkpoint_every = 0
    config.wire_codec = args.codec
    if args.rounds:
      config.rounds = args.rounds
    if args.data_path:
      config.data.path = args.data_path
    for item in list(args.set) + overrides:
      _override(config, item)
    config.lock()
    workdir = os.path.join(args.workdir, label.replace(" ", "").replace("(", "_").replace(")", "")
                           .replace(",", "_").replace("=", ""))
    os.makedirs(workdir, exist_ok=True)
    for stale in ("metrics.jsonl", "summary.json", "config.json"):  # every run starts afresh
      if os.path.exists(os.path.join(workdir, stale)):
        os.remove(os.path.join(workdir, stale))
    start = time.time()
    summary = train_and_evaluate(config, workdir).summary
    wall = time.time() - start
    rows = [json.loads(line) for line in open(os.path.join(workdir, "metrics.jsonl"))]
    results[label] = {"summary": summary, "rows": rows, "wall": wall, "algorithm": name}
    print(f"{label}: acc {summary['final_accuracy']:.3f}  up {summary['mean_uplink_bpp']:.3f}  "
          f"down {summary['mean_downlink_bpp']:.3f} bpp  {wall:.0f}s", flush=True)
  return results


def table(results: dict, args) -> str:
  command = shlex.join(["python", "scripts/bpp_table.py"] + sys.argv[1:])
  first = next(iter(results.values()))
  lines = [
      f"## {args.section}",
      "",
      f"Produced by `{command}` (jax {jax.__version__}, {platform.machine()} "
      f"{jax.default_backend()}, {os.cpu_count()} CPU cores), config "
      f"`{os.path.relpath(os.path.abspath(args.config), REPO)}`"
      f"{' with ' + ', '.join(args.set) if args.set else ''}, {first['summary']['rounds']} rounds, "
      + ("seed 0, every algorithm at the config's values for it (`get_config(ALGORITHM)`: "
         "the study's tuned values) unless its label says otherwise." if args.per_algorithm else
         "seed 0, every algorithm with its default config section (`fedbif_jax/config.py`) "
         "unless its label says otherwise."),
      "",
      "*bpp* is the paper's column: bits sent for the compressed conv/dense kernels per kernel weight "
      "(for a `Bits` payload exactly its width), averaged over rounds and clients. *total bpp* is "
      "8 x the encoded bytes of the whole message (`wire.encode`: headers, shapes, step sizes, scales, "
      "levels, biases and BatchNorm in float32) per kernel weight. *MB* is the sum over the run of "
      "every uplink and every client's copy of the downlink.",
      "",
      f"Payloads sent with `wire_codec={args.codec}`"
      + (" (each `Bits` leaf ANS-coded under its own histogram where that is shorter than packed):"
         " *total bpp* and *MB* count those bytes; *bpp* stays the packed width." if args.codec
         == "entropy" else "."),
      "",
      "| algorithm | final acc | best acc | uplink bpp | downlink bpp | uplink total bpp | "
      "downlink total bpp | MB sent | wall |",
      "|---|---|---|---|---|---|---|---|---|",
  ]
  for name, r in results.items():
    s = r["summary"]
    lines.append(
        f"| {name} | {s['final_accuracy']:.3f} | {s['best_accuracy']:.3f} | "
        f"{s['mean_uplink_bpp']:.3f} | {s['mean_downlink_bpp']:.3f} | "
        f"{s['mean_uplink_total_bpp']:.3f} | {s['mean_downlink_total_bpp']:.3f} | "
        f"{s['total_bytes'] / 1e6:.2f} | {r['wall']:.0f} s |")
  lines += coded_table(results)
  for label, r in results.items():
    if r["algorithm"] not in TRENDS:
      continue
    bpp = [row["uplink_bpp"] for row in r["rows"]]
    loss = [row["train_loss"] for row in r["rows"]]
    lines += ["", f"Per-round uplink bpp of {label} (rounds 1..{len(bpp)}), and the round's mean "
              "client training loss:", "", "```", "bpp  " + " ".join(f"{b:.2f}" for b in bpp),
              "loss " + " ".join(f"{l:.3f}" for l in loss), "```"]
  return "\n".join(lines) + "\n"


CODED_COLUMNS = ("bpp", "coded_bpp", "entropy_bpp")


def coded_table(results: dict) -> list[str]:
  """The weights' packed, entropy-coded and empirical-entropy bpp per algorithm and direction
  (summary means over the run); no lines when the runs have no coded fields (codec packed)."""
  if not all("mean_uplink_coded_bpp" in r["summary"] for r in results.values()):
    return []
  lines = [
      "", "The compressed weights per algorithm and direction, averaged over the run: *packed* "
      "is the bpp above (the widths), *coded* the bits the entropy codec sent for them (each "
      "leaf's symbol statistics and word count included; a leaf it kept packed at its padded "
      "bytes), *entropy* their empirical entropy, size x H of each tensor's own histogram "
      "(`wire.entropy_bits`: the limit of coding each tensor's elements under one model; float32 "
      "weights count their 32 bits).", "",
      "| algorithm | uplink packed | uplink coded | uplink entropy | downlink packed | "
      "downlink coded | downlink entropy |",
      "|---|---|---|---|---|---|---|"]
  for name, r in results.items():
    s = r["summary"]
    cells = [f"{s[f'mean_{d}_{c}']:.3f}" for d in ("uplink", "downlink") for c in CODED_COLUMNS]
    lines.append(f"| {name} | {' | '.join(cells)} |")
  return lines


def write_section(path: str, section: str, text: str) -> None:
  """Replaces (or appends) `section` of the Markdown file at `path`, keeping the others."""
  begin, end = f"<!-- bpp_table:{section} -->", f"<!-- /bpp_table:{section} -->"
  block = f"{begin}\n{text}{end}\n"
  old = open(path).read() if os.path.exists(path) else HEADER
  if begin in old and end in old:
    new = old[:old.index(begin)] + block + old[old.index(end) + len(end) + 1:]
  else:
    new = old.rstrip("\n") + "\n\n" + block
  with open(path, "w") as f:
    f.write(new)


HEADER = """# Measured bits per parameter

Written by `scripts/bpp_table.py`; each section below says the command that produced it.
"""


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
  parser.add_argument("--config", default=os.path.join(REPO, "configs", "quickstart.py"))
  parser.add_argument("--data_path", default="", help="config.data.path (npz configs)")
  parser.add_argument("--rounds", type=int, default=0, help="override config.rounds (0: keep)")
  parser.add_argument("--algorithms", default=",".join(ALGORITHMS))
  parser.add_argument("--codec", default="entropy", choices=wire.CODECS,
                      help="wire_codec of the runs (entropy adds the coded/entropy bpp table)")
  parser.add_argument("--set", action="append", default=[],
                      help="config override applied to every algorithm, e.g. --set=lr=0.1")
  parser.add_argument("--per_algorithm", action="store_true",
                      help="load each algorithm's config as get_config(ALGORITHM) (configs that "
                      "take a METHOD argument, e.g. configs/cifar10_cnn.py: its tuned values)")
  parser.add_argument("--workdir", default=os.path.join(tempfile.gettempdir(), "bpp_table"))
  parser.add_argument("--variant", action="append", default=None,
                      help="ALGO:k=v,k=v, an extra run with its own overrides (repeatable); "
                      f"default {' '.join(DEFAULT_VARIANTS)}; --variant= for none")
  parser.add_argument("--section", default="", help="section of --out to (re)write "
                      "(default: the config file's name)")
  parser.add_argument("--out", default=os.path.join(REPO, "docs", "BPP.md"))
  args = parser.parse_args(argv)
  args.variant = [v for v in args.variant if v] if args.variant is not None else None
  args.section = args.section or os.path.splitext(os.path.basename(args.config))[0]
  logging.getLogger("fedbif_jax").setLevel(logging.WARNING)
  results = run(args)
  text = table(results, args)
  os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
  write_section(args.out, args.section, text)
  print(text)


if __name__ == "__main__":
  main()
