"""Regenerates the README's quickstart figures from real runs.

  python scripts/readme_quickstart.py            # runs FedBiF-1/4 and FedAvg on the quickstart
                                                 # config, rewrites README.md between markers
  python scripts/readme_quickstart.py --check    # exit 1 if README.md's block is out of date

Writes the paragraph between ``<!-- quickstart:begin -->`` and ``<!-- quickstart:end -->`` in
README.md: accuracy (final, best), bpp up and down, MB sent and wall time of each run, and the
machine. Accuracy and bytes are deterministic on one machine; wall time is not: run it with
nothing else on the CPU (about a minute on 2 cores).
"""
from __future__ import annotations

import argparse
import importlib.util
import os
import platform
import re
import sys
import tempfile

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
README = os.path.join(REPO, "README.md")
BEGIN, END = "<!-- quickstart:begin -->", "<!-- quickstart:end -->"


def _quickstart(algorithm: str):
  spec = importlib.util.spec_from_file_location(
      "quickstart", os.path.join(REPO, "configs", "quickstart.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  config.unlock()
  config.algorithm = algorithm
  config.lock()
  return config


def _cpu() -> str:
  try:
    with open("/proc/cpuinfo") as f:
      return next((l.split(":", 1)[1].strip() for l in f if l.startswith("model name")),
                  platform.processor())
  except OSError:
    return platform.processor()


def block(summaries: dict) -> str:
  """The README paragraph of `summaries` ({"fedbif": summary, "fedavg": summary})."""
  b, a = summaries["fedbif"], summaries["fedavg"]
  return (
      f"{BEGIN}\n"
      "FedBiF-1/4 on the 8x8 digits bundled with scikit-learn (1,437 train / 360 test images), 10\n"
      f"IID clients, 30 rounds of 2 local epochs: **{b['final_accuracy']:.3f}** final test "
      f"accuracy (best {b['best_accuracy']:.3f}),\n"
      f"{b['mean_uplink_bpp']:.3f} bpp up and {b['mean_downlink_bpp']:.3f} bpp down, "
      f"{b['total_bytes'] / 1e6:.1f} MB sent, {b['wall_seconds']:.0f} s. The same setup with "
      "FedAvg\n"
      f"(`--config.algorithm=fedavg`): {a['final_accuracy']:.3f} (best {a['best_accuracy']:.3f}), "
      f"{a['mean_uplink_bpp']:.0f}/{a['mean_downlink_bpp']:.0f} bpp, "
      f"{a['total_bytes'] / 1e6:.1f} MB, {a['wall_seconds']:.0f} s.\n"
      f"Measured on {os.cpu_count()} cores of {_cpu()} (jax {b['environment']['jax']}) by\n"
      "`python scripts/readme_quickstart.py`; accuracy and bytes repeat exactly on one machine.\n"
      f"{END}")


def replace_block(text: str, new_block: str) -> str:
  pattern = re.compile(re.escape(BEGIN) + r".*?" + re.escape(END), re.S)
  if not pattern.search(text):
    raise ValueError(f"README.md: no {BEGIN} ... {END} block")
  return pattern.sub(lambda _: new_block, text, count=1)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--check", action="store_true",
                      help="compare accuracy and bytes with README.md instead of writing it")
  args = parser.parse_args(argv)
  from fedbif_jax.train import train_and_evaluate  # pylint: disable=import-outside-toplevel
  summaries = {}
  with tempfile.TemporaryDirectory() as tmp:
    for algorithm in ("fedbif", "fedavg"):
      summaries[algorithm] = train_and_evaluate(_quickstart(algorithm),
                                                os.path.join(tmp, algorithm)).summary
  with open(README) as f:
    text = f.read()
  new_text = replace_block(text, block(summaries))
  if args.check:
    strip = lambda t: re.sub(r"\d+ s\b|Measured on .*?\)", "", t)  # wall time and machine
    stale = strip(new_text) != strip(text)
    print("README.md quickstart block is " + ("stale" if stale else "up to date"))
    return 1 if stale else 0
  with open(README, "w") as f:
    f.write(new_text)
  print(block(summaries))
  return 0


if __name__ == "__main__":
  sys.exit(main())
