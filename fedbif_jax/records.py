"""A run's records on disk: the line-per-round files (``metrics.jsonl``, ``histograms.jsonl``),
appended once per round and rewound on resume, the JSON files written atomically
(``summary.json``), and the run's summary of its rows (`summary`). Used by the simulator's loop
(`train.py`), the Flower server (`deploy/apps.py`), the plots and the study's report.

No JAX at import (the report reads records without starting a backend).
"""
from __future__ import annotations

import json
import math
import os
from typing import Any

import numpy as np


def read_jsonl(path: str) -> list[dict]:
  """The rows of a .jsonl file in order; a torn last line (a writer killed mid-line) and
  everything after it are dropped; a missing file has no rows."""
  rows = []
  if os.path.exists(path):
    with open(path) as f:
      for line in f:
        try:
          rows.append(json.loads(line))
        except json.JSONDecodeError:
          break
  return rows


def read_rounds(path: str, upto_round: int) -> list[dict]:
  """The rows of a per-round .jsonl file for rounds < upto_round (a torn last line is dropped)."""
  return [row for row in read_jsonl(path) if row["round"] < upto_round]


def rewind_jsonl(path: str, upto_round: int) -> list[dict]:
  """Keeps the lines of a per-round .jsonl file for rounds < upto_round (a torn last line is
  dropped), rewrites the file with them and returns them: the rounds after a checkpoint are
  redone on resume."""
  rows = read_rounds(path, upto_round)
  with open(path, "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)
  return rows


def append_jsonl(path: str, row: dict) -> None:
  """Appends `row` as one line of a .jsonl file."""
  with open(path, "a") as f:
    f.write(json.dumps(row) + "\n")


def read_json(path: str) -> Any:
  """The JSON object in `path`, or None when there is no such file."""
  if not os.path.exists(path):
    return None
  with open(path) as f:
    return json.load(f)


def write_json_atomic(path: str, obj: Any) -> None:
  """Writes JSON (indented, sorted keys, a final newline) through a temporary file and a rename:
  readers never see half a file."""
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=2, sort_keys=True)
    f.write("\n")
  os.replace(tmp, path)


def summary(rows: list[dict], config) -> dict:
  """The run's summary (``summary.json``): accuracy (final, best and its round) on each split
  that was evaluated (``final_accuracy``/``best_accuracy`` are the test set's,
  ``*_validation_accuracy`` the held-out validation split's), the final loss, sparsity, mean bpp,
  total bytes, wall time and the `environment`. The bpp means are over the rounds whose
  ``uplink_bpp`` is finite (every simulator round)."""
  out = {"algorithm": config.algorithm, "rounds": len(rows)}
  for key, prefix in (("test_accuracy", ""), ("validation_accuracy", "validation_")):
    evaluated = [r for r in rows if key in r]
    if evaluated:
      accs = [r[key] for r in evaluated]
      best = int(np.argmax(accs))
      out.update({f"final_{prefix}accuracy": accs[-1], f"best_{prefix}accuracy": accs[best],
                  f"best_{prefix}round": evaluated[best]["round"]})
      loss_key = key.replace("accuracy", "loss")
      if loss_key in evaluated[-1]:
        out[f"final_{prefix}loss"] = evaluated[-1][loss_key]
  # A deployment round that accepted no uplink has nothing in the ledger (it counts accepted
  # clients only) and NaN bpp; the means are over the other rounds, so one lost round does not
  # void the run's figures (the deployment summary counts the lost rounds).
  carried = [r for r in rows if math.isfinite(r["uplink_bpp"])]
  out.update({
      "final_sparsity": rows[-1]["sparsity"],
      **{f"mean_{key}": _mean_or_nan([r[key] for r in carried])
         for key in ("uplink_bpp", "downlink_bpp", "uplink_total_bpp", "downlink_total_bpp")},
      "total_bytes": int(rows[-1]["cumulative_bytes"]),
      "total_uplink_bytes": int(rows[-1]["cumulative_uplink_bytes"]),
      "total_downlink_bytes": int(rows[-1]["cumulative_downlink_bytes"]),
      "wall_seconds": float(sum(r.get("wall_seconds", 0.0) for r in rows)),
      "environment": environment(),
  })
  out.update(mean_coded_bpp(carried))
  return out


def _mean_or_nan(values: list[float]) -> float:
  """The mean of `values`; NaN when there are none (a run in which no round carried traffic)."""
  return float(np.mean(values)) if values else float("nan")


def environment() -> dict:
  """What ran the job (summary.json's ``environment``): versions and devices."""
  import platform  # pylint: disable=import-outside-toplevel
  import flax  # pylint: disable=import-outside-toplevel
  import jax  # pylint: disable=import-outside-toplevel
  from fedbif_jax import __version__  # pylint: disable=import-outside-toplevel
  devices = jax.devices()
  return {"fedbif_jax": __version__, "jax": jax.__version__, "jaxlib": jax.lib.__version__,
          "flax": flax.__version__, "python": platform.python_version(),
          "backend": jax.default_backend(), "device_kind": devices[0].device_kind,
          "devices": len(devices), "processes": jax.process_count()}


CODED_BPP_FIELDS = ("uplink_coded_bpp", "downlink_coded_bpp", "uplink_entropy_bpp",
                    "downlink_entropy_bpp")


def mean_coded_bpp(rows: list[dict]) -> dict:
  """``mean_<field>`` of the entropy codec's bpp fields (`rounds.traffic`) over the rows that have
  them (no field for a packed run, whose summary keeps exactly its fields)."""
  return {f"mean_{key}": float(np.mean(values)) for key in CODED_BPP_FIELDS
          if (values := [r[key] for r in rows if key in r])}
