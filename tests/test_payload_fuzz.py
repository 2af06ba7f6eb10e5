"""The server's uplink validator under malformed input, and a server that drops a garbage client.

Hundreds of truncated, extended, bit-flipped, crafted and random payloads (systematic cases from
real FedBiF and FedAvg uplinks plus hypothesis) go through `payload.validate`: each one either
decodes to a payload with exactly the expected structure or raises `PayloadError` with a
one-line message, never another exception. Messages of the right length (every header field of
real uplinks and downlinks mutated in place, located by a parser of the documented format
written here; random same-length edits) get past the length check, so the decoder itself is
fuzzed, on the uplink (`payload.validate`) and on the downlink (`payload.from_array`, what a
client does with the server's bytes). The same is done to FedBiF's payloads with
``wire_codec=entropy`` (ANS-coded leaves: symbol statistics and words mutated, truncated,
flipped), validated with that codec. The server-level test runs the Flower ServerApp's
round loop (`apps.run_server`) over an in-process Grid that hands every message to the real
ClientApp, with one client's reply replaced by garbage: the round completes with the others and
the reason is logged.
"""
import io
import json
import math
import os
import re

import numpy as np
import pytest

pytest.importorskip("flwr")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from fedbif_jax import wire  # noqa: E402
from fedbif_jax.deploy import payload  # noqa: E402
from fedbif_jax.deploy.payload import Leaf, PayloadError  # noqa: E402
from fedbif_jax.pytrees import Bits  # noqa: E402

CONFIG = "configs/quickstart.py"
OVERRIDES = ["--config.num_clients=3", "--config.rounds=2", "--config.local_epochs=1"]


def _config(algorithm, *overrides):
  from fedbif_jax.deploy import runconfig
  return runconfig.load_config(CONFIG, OVERRIDES + [f"--config.algorithm={algorithm}", *overrides])


ROLES = {}  # algorithm -> (roles.Server, roles.Client, its round 0), built by `real`


@pytest.fixture(scope="module")
def real():
  """{algorithm: (round-0 uplink spec, client 0's real uplink bytes)} for FedBiF and FedAvg."""
  from fedbif_jax.deploy import roles
  out = {}
  for algorithm in ("fedbif", "fedavg"):
    config = _config(algorithm)
    server, client = roles.Server(config), roles.Client(config)
    rnd = server.open_round(0)
    uplink, _, _ = client.train(0, 0, rnd.message, client.initial_state(0))
    out[algorithm] = (rnd.spec, uplink.tobytes())
    ROLES[algorithm] = (server, client, rnd)
  return out


def _conforms(decoded, spec) -> bool:
  """The decoded payload has exactly the spec's structure (a free width matches any)."""
  got = payload.spec_of(decoded)

  def same(a, b):
    if isinstance(b, dict):
      return isinstance(a, dict) and set(a) == set(b) and all(same(a[k], b[k]) for k in b)
    if isinstance(b, (list, tuple)):
      return type(a) is type(b) and len(a) == len(b) and all(map(same, a, b))
    return (a.shape == b.shape and a.dtype == b.dtype and a.bits == b.bits
            and (b.width is None or a.width == b.width))
  return same(got, spec)


def _all_finite(decoded) -> bool:
  import jax
  return all(np.isfinite(np.asarray(x, np.float64)).all() for x in jax.tree.leaves(decoded)
             if np.issubdtype(np.asarray(x).dtype, np.floating))


REASONS = []  # the PayloadError messages of the last check / decode_only calls


def decode_as(data, direction: str = "uplink") -> str:
  """`payload.from_array` (the decoder guard without a spec, as the server reads an uplink or a
  client the server's downlink): a payload or a one-line PayloadError, nothing else."""
  try:
    payload.from_array(data, direction)
  except PayloadError as e:
    assert str(e) and "\n" not in str(e), repr(str(e))
    REASONS.append(str(e))
    return "rejected"
  return "decoded"


def decode_only(data) -> str:
  return decode_as(data, "uplink")


def check(data, spec, codec="packed") -> str:
  """'ok' (a conforming, finite payload) or 'rejected' (PayloadError, one line); anything else
  fails the test."""
  try:
    decoded = payload.validate(data, spec, "uplink", codec)
  except PayloadError as e:
    message = str(e)
    assert message and "\n" not in message, repr(message)
    REASONS.append(message)
    return "rejected"
  assert _conforms(decoded, spec) and _all_finite(decoded), "accepted a payload off the spec"
  return "ok"


def test_real_uplinks_pass_and_widths_are_fixed(real):
  spec, data = real["fedbif"]
  assert check(data, spec) == "ok" and check(np.frombuffer(data, np.uint8), spec) == "ok"
  widths = [leaf.width for leaf in _leaves(spec) if leaf.bits]
  assert widths and set(widths) == {1}, widths  # FedBiF uploads 1 bit per weight, fixed
  lo, hi = payload.size_bounds(spec)
  assert lo == hi == len(data)
  spec, data = real["fedavg"]
  assert check(data, spec) == "ok" and not any(leaf.bits for leaf in _leaves(spec))


@pytest.mark.parametrize("algorithm, widths", [("signsgd", {1}), ("fedpaq", {4}),
                                                ("feddq", {None}), ("dadaquant", {None})])
def test_uplink_spec_fixes_the_widths_the_algorithm_fixes(algorithm, widths):
  """A width the algorithm's program fixes is enforced; a data-dependent one (FedDQ, DAdaQuant)
  is left free within the dtype, and the length bounds then span the widths."""
  from fedbif_jax.deploy import roles
  spec = roles.Server(_config(algorithm)).open_round(0).spec
  assert {leaf.width for leaf in _leaves(spec) if leaf.bits} == widths
  lo, hi = payload.size_bounds(spec)
  assert (lo == hi) == (widths != {None}), (lo, hi)


def _leaves(spec):
  if isinstance(spec, dict):
    return [x for v in spec.values() for x in _leaves(v)]
  if isinstance(spec, (list, tuple)):
    return [x for v in spec for x in _leaves(v)]
  return [spec]


def test_truncations_and_extra_bytes(real):
  counts = {"ok": 0, "rejected": 0}
  for algorithm, (spec, data) in real.items():
    n = len(data)
    cuts = sorted(set(list(range(0, 64)) + list(range(64, n, max(1, n // 40))) + [n - 1]))
    for cut in cuts:
      counts[check(data[:cut], spec)] += 1
    for extra in (b"\x00", b"\xff" * 7, bytes(range(100)), data):
      counts[check(data + extra, spec)] += 1
  print(f"truncations/extensions: {counts}")
  assert counts["ok"] == 0 and counts["rejected"] >= 150, counts


def test_bit_flips(real):
  """Single-bit flips all over the header and at random places in the data: a flip inside the
  packed bits or a float gives a different but well-formed payload (accepted if finite), a flip
  in the structure is rejected."""
  rng = np.random.default_rng(0)
  counts = {"ok": 0, "rejected": 0}
  for algorithm, (spec, data) in real.items():
    positions = sorted(set(range(0, 8 * 48)) | set(rng.integers(0, 8 * len(data), 120).tolist()))
    for bit in positions:
      flipped = bytearray(data)
      flipped[bit // 8] ^= 1 << (bit % 8)
      counts[check(bytes(flipped), spec)] += 1
  print(f"bit flips: {counts}")
  assert counts["ok"] > 0 and counts["rejected"] > 100, counts


def _reencoded(decoded, edit):
  import copy
  tree = copy.deepcopy(decoded)
  edit(tree)
  return wire.encode(tree)


def _first(tree, want):
  """(parent, key) of the first leaf (depth first, sorted keys) for which want(leaf) holds."""
  if isinstance(tree, dict):
    for k in sorted(tree):
      v = tree[k]
      if not isinstance(v, (dict, list, tuple)) and want(v):
        return tree, k
      found = _first(v, want) if isinstance(v, (dict, list, tuple)) else None
      if found:
        return found
  return None


def test_crafted_malformations(real):
  """Wrong magic/version/tag/dtype code, wrong dtypes, shapes, widths, keys and structure,
  huge claimed sizes, NaN/inf, deep nesting, bad UTF-8 keys, wrong containers."""
  bits_spec, bits_data = real["fedbif"]
  avg_spec, avg_data = real["fedavg"]
  bits_up = payload.validate(bits_data, bits_spec)
  avg_up = payload.validate(avg_data, avg_spec)
  is_bits = lambda v: isinstance(v, Bits)
  is_float = lambda v: isinstance(v, np.ndarray) and v.dtype == np.float32 and v.size > 1
  is_matrix = lambda v: isinstance(v, np.ndarray) and v.ndim > 1

  def set_leaf(want, make):
    def edit(tree):
      parent, key = _first(tree, want)
      parent[key] = make(parent[key])
    return edit

  cases = {
      "empty": (b"", bits_spec),
      "magic only": (wire.MAGIC, bits_spec),
      "wrong magic": (b"XXXX" + bits_data[4:], bits_spec),
      "wrong version": (b"FBW\x02" + bits_data[4:], bits_spec),
      "unknown tag": (bits_data[:4] + b"\x09" + bits_data[5:], bits_spec),
      "fedavg sent for fedbif": (avg_data, bits_spec),
      "fedbif sent for fedavg": (bits_data, avg_spec),
      "NaN in a float leaf": (_reencoded(bits_up, set_leaf(is_float, lambda v: np.where(
          np.arange(v.size).reshape(v.shape) == 0, np.nan, v).astype(np.float32))), bits_spec),
      "inf in a float leaf": (_reencoded(avg_up, set_leaf(is_float, lambda v: np.full_like(
          v, np.inf))), avg_spec),
      "float64 instead of float32": (_reencoded(avg_up, set_leaf(is_float, lambda v: v.astype(
          np.float64))), avg_spec),
      "wrong shape": (_reencoded(avg_up, set_leaf(is_matrix, lambda v: v.reshape(-1))), avg_spec),
      "one element short": (_reencoded(avg_up, set_leaf(is_float, lambda v: v.reshape(-1)[1:])),
                            avg_spec),
      "2 bits instead of 1": (_reencoded(bits_up, set_leaf(is_bits, lambda b: Bits(
          b.values, np.int32(2)))), bits_spec),
      "int8 bits instead of uint8": (_reencoded(bits_up, set_leaf(is_bits, lambda b: Bits(
          b.values.astype(np.int8), np.int32(2)))), bits_spec),
      "plain array instead of Bits": (_reencoded(bits_up, set_leaf(is_bits, lambda b: b.values)),
                                      bits_spec),
      "missing key": (_reencoded(avg_up, lambda t: t.pop(sorted(t)[0])), avg_spec),
      "extra key": (_reencoded(avg_up, lambda t: t.update(evil=np.zeros(3, np.float32))),
                    avg_spec),
      "list instead of dict": (wire.encode([avg_up]), avg_spec),
      # Same length as expected, so the structure check (not the length check) must catch them.
      "renamed key, same length": (_reencoded(avg_up, lambda t: t.update(
          weightz=t.pop("weights"))), avg_spec),
      "int32 instead of float32, same length": (_reencoded(avg_up, set_leaf(
          is_float, lambda v: v.view(np.int32))), avg_spec),
      "permuted shape, same length": (_reencoded(avg_up, set_leaf(
          is_matrix, lambda v: v.reshape(v.shape[::-1]))), avg_spec),
      "permuted Bits shape, same length": (_reencoded(bits_up, set_leaf(
          is_bits, lambda b: Bits(b.values.reshape(b.values.shape[::-1]), b.width))), bits_spec),
      "tuple instead of list": (wire.encode({"weights": (np.zeros(1),)}), {"weights": [
          Leaf((1,), np.dtype(np.float64))]}),
      "deeply nested": (wire.MAGIC + b"\x02\x01" * 5000 + b"\x02\x00", avg_spec),
      "non-UTF-8 key": (wire.MAGIC + b"\x01\x01\x02\xff\xfe\x04\x0b\x00", bits_spec),
      "huge claimed dims": (wire.MAGIC + b"\x04\x0b\x02" + b"\xff" * 9 + b"\x7f" + b"\x01",
                            bits_spec),
      "huge claimed dict size": (wire.MAGIC + b"\x01" + b"\xff" * 9 + b"\x01", bits_spec),
      "huge claimed key length": (wire.MAGIC + b"\x01\x01" + b"\xff" * 8 + b"\x01", bits_spec),
      "zero-size huge dims": (wire.MAGIC + b"\x04\x0b\x02\x00" + b"\xff" * 9 + b"\x7f",
                              {"x": Leaf((0,), np.dtype(np.float32))}),
      "unknown dtype code": (wire.MAGIC + b"\x04\x63\x01\x01" + b"\x00" * 4,
                             Leaf((1,), np.dtype(np.float32))),
      "width 0": (wire.MAGIC + b"\x05\x02\x01\x08\x00" + b"\x00", Leaf(
          (8,), np.dtype(np.uint8), True, None)),
      "width 9 for uint8": (wire.MAGIC + b"\x05\x02\x01\x01\x09" + b"\x00\x00", Leaf(
          (1,), np.dtype(np.uint8), True, None)),
      "float32 container": (np.frombuffer(bits_data[:len(bits_data) // 4 * 4], np.float32),
                            bits_spec),
      "2-D uint8 container": (np.frombuffer(bits_data, np.uint8)[None], bits_spec),
      "str container": ("FBW\x01", bits_spec),
      "None": (None, bits_spec),
      "list of ints": (list(bits_data[:10]), bits_spec),
  }
  results, decoded = {}, {}
  for name, (data, spec) in cases.items():
    REASONS.clear()
    results[name], decoded[name] = check(data, spec), decode_only(data)
    print(f"  {name}: {' | '.join(REASONS)}")
  assert set(results.values()) == {"rejected"}, results
  # Well-formed payloads of the wrong structure decode; everything malformed is refused.
  assert {n for n, r in decoded.items() if r == "decoded"} <= {
      "fedavg sent for fedbif", "fedbif sent for fedavg", "NaN in a float leaf",
      "inf in a float leaf", "float64 instead of float32", "wrong shape", "one element short",
      "2 bits instead of 1", "int8 bits instead of uint8", "plain array instead of Bits",
      "missing key", "extra key", "list instead of dict", "tuple instead of list",
      "renamed key, same length", "int32 instead of float32, same length",
      "permuted shape, same length", "permuted Bits shape, same length"}, decoded


@settings(max_examples=120, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.binary(max_size=300), st.booleans())
def test_random_bytes(real, tail, with_magic):
  spec, _ = real["fedbif"]
  data = (wire.MAGIC if with_magic else b"") + tail
  assert check(data, spec) == "rejected"
  decode_only(data)


# Up to 4 byte edits: (kind, where, value), applied by `edited`.
EDITS = st.lists(st.tuples(st.sampled_from(["replace", "insert", "delete"]),
                           st.integers(0, 10 ** 6), st.integers(0, 255)), min_size=1, max_size=4)


def edited(data: bytes, edits) -> bytes:
  mutated = bytearray(data)
  for kind, where, value in edits:
    i = where % (len(mutated) + 1)
    if kind == "insert":
      mutated.insert(i, value)
    elif mutated and kind == "delete":
      del mutated[min(i, len(mutated) - 1)]
    elif mutated:
      mutated[min(i, len(mutated) - 1)] = value
  return bytes(mutated)


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["fedbif", "fedavg"]), EDITS)
def test_random_mutations(real, algorithm, edits):
  spec, data = real[algorithm]
  mutated = edited(data, edits)
  check(mutated, spec)
  decode_only(mutated)


# ----------------------------------------------------------------------------- same length


# Bytes per element of each dtype code, in the order of wire's format (bool, int8, uint8, int16,
# uint16, int32, uint32, int64, uint64, float16, bfloat16, float32, float64); bool packs 8 per byte.
_ITEMSIZE = [None, 1, 1, 2, 2, 4, 4, 8, 8, 2, 2, 4, 8]


def header_fields(data: bytes) -> list:
  """(offset, length, kind) of every header field of an encoded payload: the magic, node tags,
  counts, key lengths, keys, dtype codes, ndims, dims and widths, and an ENTROPY node's symbol
  count, code gaps, symbol counts and word count (the element data and ANS words skipped).

  Parsed here from the grammar in `fedbif_jax/wire.py`'s docstring, independently of its decoder;
  it must end exactly at the last byte."""
  out, pos = [(0, 4, "magic")], 4

  def varint(kind):
    nonlocal pos
    start, n, shift = pos, 0, 0
    while True:
      b = data[pos]
      pos += 1
      n |= (b & 0x7F) << shift
      shift += 7
      if not b & 0x80:
        break
    out.append((start, pos - start, kind))
    return n

  def node():
    nonlocal pos
    tag = data[pos]
    out.append((pos, 1, "tag"))
    pos += 1
    if tag == 1:                                   # DICT
      for _ in range(varint("count")):
        k = varint("key length")
        out.append((pos, k, "key"))
        pos += k
        node()
    elif tag in (2, 3):                            # LIST, TUPLE
      for _ in range(varint("count")):
        node()
    elif tag in (4, 5, 6):                         # ARRAY, BITS, ENTROPY
      code = data[pos]
      out.append((pos, 1, "dtype"))
      pos += 1
      size = math.prod(varint("dim") for _ in range(varint("ndim")))
      if tag == 5:
        width = data[pos]
        out.append((pos, 1, "width"))
        pos += 1 + -(-size * width // 8)
      elif tag == 6:                               # symbol statistics, then the ANS words
        out.append((pos, 1, "width"))
        pos += 1
        k = varint("symbols")
        for kind in ("gap", "count"):
          for _ in range(k):
            varint(kind)
        words = varint("words")
        pos += 4 * words
      else:
        pos += -(-size // 8) if code == 0 else size * _ITEMSIZE[code]
    else:
      raise AssertionError(f"tag {tag} at byte {pos - 1}")

  node()
  assert pos == len(data), (pos, len(data))
  return out


@pytest.fixture(scope="module")
def downlinks(real):
  """{algorithm: the real round-0 downlink bytes} for FedBiF and FedAvg."""
  return {algorithm: ROLES[algorithm][2].message.tobytes() for algorithm in real}


def decode_downlink(data) -> str:
  return decode_as(data, "downlink")


def _same_length_outcome(direction, data, spec) -> str:
  """Runs a same-length message through the uplink validator or the downlink decoder; the length
  check cannot be what refuses it."""
  REASONS.clear()
  outcome = check(data, spec) if direction == "uplink" else decode_downlink(data)
  assert not any("bytes, expected" in r for r in REASONS), REASONS
  return outcome


def test_header_parser_reads_every_real_payload(real, downlinks):
  for algorithm, (_, data) in real.items():
    kinds = {kind for _, _, kind in header_fields(data)}
    assert kinds >= {"magic", "tag", "count", "key length", "key", "dtype", "ndim", "dim"}
    header_fields(downlinks[algorithm])
  assert any(kind == "width" for _, _, kind in header_fields(real["fedbif"][1]))
  assert any(kind == "width" for _, _, kind in header_fields(downlinks["fedbif"]))


def test_every_header_field_mutated_in_place(real, downlinks):
  """Every header byte of the real FedBiF and FedAvg uplinks and downlinks set to 0, 1, 2, 0x7f,
  0x80, 0xff and its value + 1 (first byte of each key): the message keeps its length, so the
  decoder itself runs; every outcome is a payload or a one-line PayloadError."""
  counts, reasons = {}, set()
  for algorithm, (spec, up) in real.items():
    for direction, data in (("uplink", up), ("downlink", downlinks[algorithm])):
      for offset, length, kind in header_fields(data):
        for j in range(1 if kind == "key" else length):
          for value in {0, 1, 2, 0x7F, 0x80, 0xFF, (data[offset + j] + 1) % 256}:
            mutated = bytearray(data)
            mutated[offset + j] = value
            outcome = _same_length_outcome(direction, bytes(mutated), spec)
            key = (direction, outcome)
            counts[key] = counts.get(key, 0) + 1
            reasons.update(re.sub(r"[0-9]+", "N", r.split(": ", 1)[1])[:40] for r in REASONS)
  print(counts, sorted(reasons), sep="\n")
  assert counts[("uplink", "rejected")] > 500 and counts[("downlink", "rejected")] > 500, counts
  assert counts[("uplink", "ok")] > 0 and counts[("downlink", "decoded")] > 100, counts
  # Refusals from inside the decoder, not only at its door (the magic).
  # ("malformed at byte": a header the decoder cannot read, e.g. a non-UTF-8 key, as WireError.)
  for fragment in ("truncated", "trailing bytes", "unknown node tag", "unknown dtype code",
                   "Bits width must be in", "malformed at byte", "keys differ"):
    assert any(fragment in r for r in reasons), (fragment, sorted(reasons))


@settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["fedbif", "fedavg"]), st.sampled_from(["uplink", "downlink"]),
       st.lists(st.tuples(st.booleans(), st.integers(0, 10 ** 9), st.integers(0, 255)),
                min_size=1, max_size=4))
def test_same_length_mutations_of_headers_and_data(real, downlinks, algorithm, direction, edits):
  """Up to 4 bytes replaced, each in a header field (True) or anywhere (False): the decoder runs
  on a message of the right length; a payload or a one-line PayloadError."""
  spec, up = real[algorithm]
  data = up if direction == "uplink" else downlinks[algorithm]
  fields = header_fields(data)
  mutated = bytearray(data)
  for in_header, where, value in edits:
    if in_header:
      offset, length, _ = fields[where % len(fields)]
      mutated[offset + (where // len(fields)) % length] = value
    else:
      mutated[where % len(mutated)] = value
  _same_length_outcome(direction, bytes(mutated), spec)


# ----------------------------------------------------------------------------- the Flower layer


def test_flower_arrays_that_are_not_payload_arrays():
  from flwr.app import Array, ArrayRecord, ConfigRecord, RecordDict

  from fedbif_jax.deploy import apps
  good = np.arange(10, dtype=np.uint8)
  npy = Array(np.zeros(4, np.uint8)).data
  assert b"(4,)" in npy
  huge = io.BytesIO()  # a .npy header claiming 10^15 bytes (np.load would allocate them)
  np.lib.format.write_array_header_1_0(huge, {"descr": "|u1", "fortran_order": False,
                                              "shape": (10 ** 15,)})
  bad = {
      "float array": ArrayRecord({"payload": Array(good.astype(np.float32))}),
      "2-D array": ArrayRecord({"payload": Array(good.reshape(2, 5))}),
      "no payload entry": ArrayRecord({"other": Array(good)}),
      "config record": ConfigRecord({"payload": b"FBW\x01"}),
      "lying .npy header": ArrayRecord({"payload": Array("uint8", (4,), "numpy.ndarray",
                                                         npy.replace(b"(4,)", b"(9,)"))}),
      "huge .npy header": ArrayRecord({"payload": Array("uint8", (4,), "numpy.ndarray",
                                                        huge.getvalue() + b"FBW\x01")}),
      "not .npy": ArrayRecord({"payload": Array("uint8", (4,), "numpy.ndarray", b"FBW\x01")}),
      "torch stype": ArrayRecord({"payload": Array("uint8", (4,), "torch.Tensor", b"abcd")}),
  }
  for name, record in bad.items():
    with pytest.raises(PayloadError):
      apps.read_array(RecordDict({"uplink": record}), "uplink", name)
  with pytest.raises(PayloadError):
    apps.read_array(RecordDict({}), "uplink", "missing record")
  data, size = apps.read_array(RecordDict({"uplink": ArrayRecord({"payload": Array(good)})}),
                                 "uplink", "good")
  assert data.tolist() == good.tolist() and size > good.size


def test_close_round_renormalises_the_weights_over_accepted_clients(real):
  """FedAvg, 3 clients, uniform weights 1/3: client 1's uplink is garbage, so the new model is
  the mean of clients 0 and 2 (weights 1/2), and the reason is recorded."""
  import jax

  from fedbif_jax.deploy import roles
  server, client, rnd = ROLES["fedavg"]
  replies = {}
  for c in (0, 2):
    data, metrics, _ = client.train(0, c, rnd.message, client.initial_state(c))
    replies[c] = roles.Reply(data, metrics)
  replies[1] = roles.Reply(b"FBW\x01garbage", {"loss_sum": 1.0, "count": 1.0})
  row = server.close_round(rnd, replies)
  assert row["accepted"] == [0, 2] and "uplink of client 1" in row["dropped"]["1"], row
  ups = [payload.validate(replies[c].data, rnd.spec) for c in (0, 2)]
  expected = jax.tree.map(lambda a, b: 0.5 * a + 0.5 * b, ups[0]["weights"], ups[1]["weights"])
  got = {k: v for k, v in server.state["params"].items()}
  for path, want in jax.tree_util.tree_flatten_with_path(expected)[0]:
    have = got
    for key in path:
      have = have[key.key]
    np.testing.assert_allclose(np.asarray(have), want, rtol=1e-6, atol=1e-7)


class _LoopbackGrid:
  """An in-process Flower Grid: every message goes to `apps.client_app` with the node's own
  persistent Context; `tamper(message, reply)` may replace a reply."""

  def __init__(self, run_config, num_clients, tamper, cache_dir):
    from flwr.app import Context, RecordDict
    node_config = lambda c: {"partition-id": c, "cache-dir": cache_dir}
    self.contexts = {100 + c: Context(run_id=1, node_id=100 + c, node_config=node_config(c),
                                      state=RecordDict(), run_config=run_config)
                     for c in range(num_clients)}
    self.tamper = tamper

  def get_node_ids(self):
    return list(self.contexts)

  def send_and_receive(self, messages, *, timeout=None):
    from flwr.app import Error, Message

    from fedbif_jax.deploy import apps
    replies = []
    for message in messages:
      try:
        reply = apps.client_app(message, self.contexts[message.metadata.dst_node_id])
      except Exception as e:  # what a SuperNode reports when a ClientApp raises
        reply = Message(Error(code=2, reason=repr(e)), reply_to=message)
      replies.append(self.tamper(message, reply))
    return replies


def test_server_drops_a_garbage_client_and_finishes_the_round(tmp_path, real, serverapp):
  """Round 0: client 1 sends random bytes, and the round completes with clients 0 and 2
  (weights renormalised). Round 1: client 2 sends a NaN and clients 0 and 1 random bytes, so no
  uplink is accepted: the model stays, the row's bpp are NaN and the summary's bpp means are
  round 0's. The reasons are logged and recorded."""
  from flwr.app import Array, ArrayRecord, Message, MetricRecord, RecordDict

  from fedbif_jax.deploy import apps, runconfig
  run_config = runconfig.launcher_run_config(CONFIG, OVERRIDES, str(tmp_path), 60, 10)
  rng = np.random.default_rng(1)

  def tamper(message, reply):
    if message.metadata.message_type != "train":
      return reply
    t, client = int(message.content["round"]["round"]), int(message.content["round"]["client-id"])
    if (t, client) in ((0, 1), (1, 0), (1, 1)):
      garbage = rng.integers(0, 256, 5000, dtype=np.uint8)
    elif (t, client) == (1, 2):
      decoded = wire.decode(apps.read_array(reply.content, "uplink", "x")[0].tobytes())
      parent, key = _first(decoded, lambda v: isinstance(v, np.ndarray) and v.dtype == np.float32)
      parent[key] = np.full_like(parent[key], np.nan)
      garbage = np.frombuffer(wire.encode(decoded), np.uint8)
    else:
      return reply
    return Message(RecordDict({"uplink": ArrayRecord({"payload": Array(garbage)}),
                               "metrics": MetricRecord({"loss_sum": 1.0, "count": 1.0})}),
                   reply_to=message)

  grid = _LoopbackGrid(run_config, 3, tamper, str(tmp_path / "cache"))
  summary = apps.run_server(grid, _config("fedbif"), str(tmp_path), round_timeout=60,
                              node_timeout=10)
  with open(tmp_path / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  messages = serverapp
  print("\n".join(m for m in messages if "dropped" in m))
  assert [r["accepted"] for r in rows] == [[0, 2], []], rows
  assert list(rows[0]["dropped"]) == ["1"] and sorted(rows[1]["dropped"]) == ["0", "1", "2"]
  assert "non-finite" in rows[1]["dropped"]["2"], rows[1]["dropped"]
  assert any("round 0: dropped client 1: uplink of client 1:" in m for m in messages), messages
  assert any("round 1: dropped client 2:" in m and "non-finite" in m for m in messages)
  assert any("round 1: no client's uplink was accepted" in m for m in messages), messages
  assert summary["rounds"] == 2 and summary["dropped_uplinks"] == 4
  assert summary["rounds_without_uplink"] == 1
  assert all(math.isfinite(r["test_loss"]) for r in rows)
  # The model did not move in round 1: it evaluates exactly as after round 0.
  assert rows[1]["test_accuracy"] == rows[0]["test_accuracy"], rows
  assert rows[1]["test_loss"] == rows[0]["test_loss"], rows
  spec, data = real["fedbif"]
  # The ledger counts the accepted clients only: two in round 0, none in round 1.
  assert rows[0]["uplink_bytes_accepted"] == 2 * len(data) == rows[0]["uplink_bits"] // 8
  assert rows[1]["uplink_bytes_accepted"] == 0 == rows[1]["uplink_bits"]
  assert all(r["uplink_bytes_received"] > r["uplink_bytes_accepted"] for r in rows), rows
  assert math.isnan(rows[1]["uplink_bpp"]) and math.isnan(rows[1]["downlink_bpp"]), rows[1]
  for key in ("uplink_bpp", "downlink_bpp", "uplink_total_bpp", "downlink_total_bpp"):
    assert summary[f"mean_{key}"] == rows[0][key], (key, summary)
  assert summary["mean_uplink_bpp"] == 1.0 and summary["mean_downlink_bpp"] == 4.0, summary
  import jax

  from fedbif_jax import train
  model = train.load_global(str(tmp_path))
  assert model.round == 2
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(model.variables))
  assert os.path.exists(tmp_path / "summary.json")


# ----------------------------------------------------------------------------- entropy codec


@pytest.fixture(scope="module")
def entropy_real():
  """FedBiF's round 0 with ``wire_codec=entropy``: (uplink spec, client 0's uplink bytes, the
  downlink bytes), as the roles send them."""
  from fedbif_jax.deploy import roles
  config = _config("fedbif", "--config.wire_codec=entropy")
  server, client = roles.Server(config), roles.Client(config)
  rnd = server.open_round(0)
  uplink, _, _ = client.train(0, 0, rnd.message, client.initial_state(0))
  return rnd.spec, uplink.tobytes(), rnd.message.tobytes()


def test_entropy_coded_payloads_pass_within_the_bounds(real, entropy_real):
  spec, up, down = entropy_real
  packed_spec, packed_up = real["fedbif"]
  assert down[:4] == wire.MAGIC_ENTROPY, "FedBiF's 4-bit broadcast has a skewed histogram"
  assert len(down) < len(ROLES["fedbif"][2].message.tobytes())
  lo, hi = payload.size_bounds(spec, "entropy")
  assert (lo, hi) != payload.size_bounds(spec) and hi == len(packed_up)
  assert lo <= len(up) <= hi
  assert check(up, spec, "entropy") == "ok"
  assert check(packed_up, spec, "entropy") == "ok"  # every leaf kept packed: a version-1 payload
  assert decode_as(down, "downlink") == "decoded"
  decoded = payload.validate(up, spec, "uplink", "entropy")
  assert wire.encode(decoded, "entropy") == up    # one encoding per payload
  if up[:4] == wire.MAGIC_ENTROPY:  # a packed run refuses entropy-coded uplinks
    REASONS.clear()
    assert check(up, spec) == "rejected"
    assert any("wire_codec is packed" in r or "bytes, expected" in r for r in REASONS), REASONS


def test_entropy_downlinks_truncated_flipped_and_mutated(entropy_real):
  """The entropy-coded downlink (ENTROPY nodes with real ANS words) as a client decodes it, and a
  hand-made entropy uplink against the spec: truncations, bit flips, random edits."""
  spec, up, down = entropy_real
  rng = np.random.default_rng(2)
  counts = {}
  for direction, data in (("downlink", down), ("uplink", up)):
    outcome = (lambda d: decode_as(d, "downlink")) if direction == "downlink" else (
        lambda d: check(d, spec, "entropy"))
    variants = [data[:cut] for cut in range(0, len(data), max(1, len(data) // 60))]
    variants += [data + extra for extra in (b"\0", b"\x01\0\0\0")]
    for bit in sorted(set(range(8 * 64)) | set(rng.integers(0, 8 * len(data), 200).tolist())):
      flipped = bytearray(data)
      flipped[bit // 8] ^= 1 << (bit % 8)
      variants.append(bytes(flipped))
    for _ in range(150):
      mutated = bytearray(data)
      for where in rng.integers(0, len(data), rng.integers(1, 5)):
        mutated[where] = rng.integers(0, 256)
      variants.append(bytes(mutated))
    for v in variants:
      key = (direction, outcome(v))
      counts[key] = counts.get(key, 0) + 1
  print(counts)
  assert counts[("downlink", "rejected")] > 200 and counts[("uplink", "rejected")] > 200, counts


def test_every_entropy_header_field_mutated_in_place(entropy_real):
  """Every header byte of the entropy-coded downlink and uplink, the symbol statistics and word
  counts included, set to 0, 1, 0x7f, 0x80, 0xff and its value + 1: the length is unchanged,
  so the decoder's own checks run; a payload or a one-line PayloadError."""
  spec, up, down = entropy_real
  counts, reasons = {}, set()
  for direction, data in (("uplink", up), ("downlink", down)):
    fields = header_fields(data)
    kinds = {kind for _, _, kind in fields}
    if data[:4] == wire.MAGIC_ENTROPY:
      assert {"symbols", "gap", "count", "words"} <= kinds, kinds
    for offset, length, kind in fields:
      for j in range(1 if kind == "key" else length):
        for value in {0, 1, 0x7F, 0x80, 0xFF, (data[offset + j] + 1) % 256}:
          mutated = bytearray(data)
          mutated[offset + j] = value
          REASONS.clear()
          outcome = (check(bytes(mutated), spec, "entropy") if direction == "uplink"
                     else decode_downlink(bytes(mutated)))
          counts[(direction, outcome)] = counts.get((direction, outcome), 0) + 1
          reasons.update(re.sub(r"[0-9]+", "N", r.split(": ", 1)[1])[:90] for r in REASONS)
  print(counts, sorted(reasons), sep="\n")
  assert counts[("downlink", "rejected")] > 200, counts
  for fragment in ("entropy-coded leaf: N symbols", "symbol counts", "words for N symbols",
                   "not fewer than", "do not decode to the symbol counts", "unknown node tag"):
    assert any(fragment in r for r in reasons), (fragment, sorted(reasons))


@settings(max_examples=100, deadline=None, suppress_health_check=list(HealthCheck))
@given(st.sampled_from(["uplink", "downlink"]), EDITS)
def test_random_mutations_of_entropy_payloads(entropy_real, direction, edits):
  spec, up, down = entropy_real
  if direction == "uplink":
    check(edited(up, edits), spec, "entropy")
  else:
    decode_downlink(edited(down, edits))


@pytest.mark.parametrize("algorithm", ["fedbif", "fedavg", "dadaquant"])
def test_a_client_bounds_the_downlink_by_its_expected_elements(algorithm):
  """The client traces the broadcast's shapes (`roles.Client.downlink_elements`): the real
  downlink has exactly that many elements, and a message claiming one more is refused before it
  is decoded."""
  from fedbif_jax.deploy import roles
  config = _config(algorithm, "--config.wire_codec=entropy")
  client = roles.Client(config)
  message = roles.Server(config).open_round(0).message
  decoded = payload.from_array(message, "downlink", max_elements=client.downlink_elements)
  assert payload.num_elements(payload.spec_of(decoded)) == client.downlink_elements
  with pytest.raises(PayloadError, match="elements allowed"):
    payload.from_array(message, "downlink", max_elements=client.downlink_elements - 1)
