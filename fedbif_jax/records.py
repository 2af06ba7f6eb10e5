"""A run's line-per-round records (``metrics.jsonl``, ``histograms.jsonl``) as read back by the
loop on resume, the plots and the study's report."""
from __future__ import annotations

import json
import os


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
