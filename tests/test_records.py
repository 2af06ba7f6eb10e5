"""`fedbif_jax.records`: a run's line-per-round files, atomic JSON writes and the summary."""
import json
import math

import ml_collections

from fedbif_jax import records


def test_read_jsonl_drops_a_torn_tail_and_reads_a_missing_file_as_empty(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text('{"round": 0}\n{"round": 1}\n{"round": 2, "to')
  assert records.read_jsonl(str(path)) == [{"round": 0}, {"round": 1}]
  assert records.read_jsonl(str(tmp_path / "none.jsonl")) == []


def test_rewind_keeps_the_rounds_before_a_checkpoint_and_drops_a_torn_last_line(tmp_path):
  path = tmp_path / "metrics.jsonl"
  path.write_text('{"round": 0}\n{"round": 1}\n{"round": 2}\n{"round": 3, "tor')
  assert records.rewind_jsonl(str(path), 2) == [{"round": 0}, {"round": 1}]
  assert path.read_text() == '{"round": 0}\n{"round": 1}\n'
  path.write_text('{"round": 0}\n{"round": 1, "tor')
  assert records.rewind_jsonl(str(path), 5) == [{"round": 0}]
  assert path.read_text() == '{"round": 0}\n'
  records.append_jsonl(str(path), {"round": 1, "x": 0.5})
  assert records.read_rounds(str(path), 2) == [{"round": 0}, {"round": 1, "x": 0.5}]
  assert records.read_rounds(str(path), 1) == [{"round": 0}]


def test_write_json_atomic_replaces_the_file_and_leaves_no_tmp(tmp_path):
  path = tmp_path / "summary.json"
  path.write_text("old")
  records.write_json_atomic(str(path), {"b": 1, "a": [1.5, None]})
  assert json.loads(path.read_text()) == {"a": [1.5, None], "b": 1}
  assert path.read_text().endswith('  "b": 1\n}\n')   # sorted keys, indented, a final newline
  assert sorted(p.name for p in tmp_path.iterdir()) == ["summary.json"]
  assert records.read_json(str(path)) == {"a": [1.5, None], "b": 1}
  assert records.read_json(str(tmp_path / "none.json")) is None


def _row(t, acc, loss, up_bytes, down_bytes, **more):
  return {"round": t, "test_accuracy": acc, "test_loss": loss, "train_loss": 1.0,
          "uplink_bpp": 1.0 + t, "downlink_bpp": 4.0, "uplink_total_bpp": 1.5 + t,
          "downlink_total_bpp": 4.5, "sparsity": 0.1 * (t + 1),
          "cumulative_uplink_bytes": up_bytes, "cumulative_downlink_bytes": down_bytes,
          "cumulative_bytes": up_bytes + down_bytes, "wall_seconds": 2.0, **more}


def test_summary_of_hand_made_rows():
  config = ml_collections.ConfigDict({"algorithm": "fedbif"})
  rows = [_row(0, 0.5, 2.0, 10, 40), _row(1, 0.7, 1.0, 20, 80),
          _row(2, 0.6, 1.5, 30, 120, uplink_coded_bpp=0.9)]
  rows[1].update(validation_accuracy=0.8, validation_loss=0.9)
  summary = records.summary(rows, config)
  environment = summary.pop("environment")
  assert {"fedbif_jax", "jax", "backend", "devices", "processes"} <= set(environment)
  assert summary == {
      "algorithm": "fedbif", "rounds": 3,
      "final_accuracy": 0.6, "best_accuracy": 0.7, "best_round": 1, "final_loss": 1.5,
      "final_validation_accuracy": 0.8, "best_validation_accuracy": 0.8,
      "best_validation_round": 1, "final_validation_loss": 0.9,
      "final_sparsity": 0.30000000000000004, "mean_uplink_bpp": 2.0, "mean_downlink_bpp": 4.0,
      "mean_uplink_total_bpp": 2.5, "mean_downlink_total_bpp": 4.5,
      "total_bytes": 150, "total_uplink_bytes": 30, "total_downlink_bytes": 120,
      "wall_seconds": 6.0, "mean_uplink_coded_bpp": 0.9}
  assert records.mean_coded_bpp(rows[:2]) == {}


def test_summary_bpp_means_skip_rounds_without_traffic():
  """A deployment round with no accepted uplink has NaN bpp; the means are over the other rounds
  (hand-computed: uplink (1 + 3) / 2 = 2, total (1.5 + 3.5) / 2 = 2.5), and NaN only when no
  round carried traffic."""
  config = ml_collections.ConfigDict({"algorithm": "fedbif"})
  nan = float("nan")
  lost = dict(uplink_bpp=nan, downlink_bpp=nan, uplink_total_bpp=nan, downlink_total_bpp=nan)
  rows = [_row(0, 0.5, 2.0, 10, 40), _row(1, 0.5, 2.0, 10, 80, **lost),
          _row(2, 0.6, 1.5, 20, 120)]
  summary = records.summary(rows, config)
  assert (summary["mean_uplink_bpp"], summary["mean_uplink_total_bpp"]) == (2.0, 2.5), summary
  assert (summary["mean_downlink_bpp"], summary["mean_downlink_total_bpp"]) == (4.0, 4.5)
  assert summary["total_bytes"] == 140
  only_lost = records.summary([_row(0, 0.5, 2.0, 0, 40, **lost)], config)
  assert all(math.isnan(only_lost[f"mean_{k}"]) for k in ("uplink_bpp", "downlink_total_bpp"))
