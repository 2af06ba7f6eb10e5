"""`fedbif_jax.records`: reading back a run's line-per-round files."""
from fedbif_jax import records


def test_read_jsonl_drops_a_torn_tail_and_reads_a_missing_file_as_empty(tmp_path):
  path = tmp_path / "m.jsonl"
  path.write_text('{"round": 0}\n{"round": 1}\n{"round": 2, "to')
  assert records.read_jsonl(str(path)) == [{"round": 0}, {"round": 1}]
  assert records.read_jsonl(str(tmp_path / "none.jsonl")) == []
