"""End-to-end outputs equal the recorded ones (`tests/golden_cases.py` says how to re-record).

On the machine that recorded them (same CPU model and jax version) every field of every
``metrics.jsonl`` row and of ``summary.json`` must be equal, float for float: the oracle for a
restructuring that should change nothing. On another CPU, XLA may generate other float code, so
the byte ledger, bpp and the round numbers stay exact and the learned numbers get a tolerance.
"""
import json
import math

import pytest

import golden_cases

# Ledger and schedule fields: computed from the config and payload shapes, never from floats.
EXACT_EVERYWHERE = ("round", "uplink_bits", "downlink_bits", "uplink_bpp", "downlink_bpp",
                    "cumulative_uplink_bytes", "cumulative_downlink_bytes", "cumulative_bytes",
                    "client_state_bytes", "rounds", "algorithm", "total_bytes",
                    "total_uplink_bytes", "total_downlink_bytes")


def _same(key: str, got, want, exact: bool) -> bool:
  if exact or key in EXACT_EVERYWHERE or not isinstance(want, float):
    return got == want
  if "accuracy" in key:
    return abs(got - want) <= 0.02  # a few test images
  return math.isclose(got, want, rel_tol=1e-2, abs_tol=1e-4)


def _compare(actual: dict, expected: dict, exact: bool, where: str) -> list[str]:
  problems = []
  if set(actual) != set(expected):
    return [f"{where}: fields differ: only now {sorted(set(actual) - set(expected))}, only "
            f"recorded {sorted(set(expected) - set(actual))}"]
  for key, want in expected.items():
    got = actual[key]
    if isinstance(want, list) and isinstance(got, list) and len(got) == len(want):
      same = all(_same(key, g, w, exact) for g, w in zip(got, want))  # e.g. bit_flip_rate
    else:
      same = _same(key, got, want, exact)
    if not same:
      problems.append(f"{where}.{key}: {got!r} != recorded {want!r}")
  return problems


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(golden_cases.CASES))
def test_outputs_equal_the_recorded_ones(name):
  with open(golden_cases.golden_path(name)) as f:
    recorded = json.load(f)
  exact = recorded["machine"] == golden_cases.machine()
  result = golden_cases.run_case(name)
  assert len(result["rows"]) == len(recorded["rows"]), "a different number of rounds"
  problems = _compare(result["summary"], recorded["summary"], exact, "summary")
  for row, want in zip(result["rows"], recorded["rows"]):
    problems += _compare(row, want, exact, f"round {want['round']}")
  assert not problems, (f"{name} ({'exact' if exact else 'tolerant'}: recorded on "
                        f"{recorded['machine']}, now {golden_cases.machine()}):\n"
                        + "\n".join(problems[:20]))
