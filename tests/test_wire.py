"""The wire format (`fedbif_jax/wire.py`): exact round trips, predicted sizes, every payload type.

Hypothesis draws shapes, dtypes, widths and values for the primitives; every algorithm's real
downlink and uplink (one client, and stacked over clients) must encode to exactly
`encoded_size` bytes and decode to the same payload.
"""
import functools
import math

import jax
import jax.numpy as jnp
import ml_dtypes
import numpy as np
import optax
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from conftest import small_config
from fedbif_jax import wire
from fedbif_jax.algorithms import ALGORITHMS, get_algorithm
from fedbif_jax.algorithms.base import RoundInfo
from fedbif_jax.models import get_model
from fedbif_jax.pytrees import Bits, is_bits
from fedbif_jax.wire import WireError

INT_DTYPES = [np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32]
FLOAT_DTYPES = [np.float32, np.float16, np.float64, ml_dtypes.bfloat16]
shapes = st.lists(st.integers(0, 6), min_size=0, max_size=3).map(tuple)


def _same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    assert x.dtype == y.dtype and x.shape == y.shape
    assert x.tobytes() == y.tobytes()


def _roundtrip(payload):
  data = wire.encode(payload)
  assert wire.encoded_size(payload) == len(data)
  return wire.decode(data), data


@settings(max_examples=150, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(INT_DTYPES), data=st.data())
def test_bits_roundtrip_any_shape_dtype_width(shape, dtype, data):
  bits = np.dtype(dtype).itemsize * 8
  width = data.draw(st.integers(1, bits), label="width")
  signed = np.dtype(dtype).kind == "i"
  lo, hi = (-(1 << (width - 1)), (1 << (width - 1)) - 1) if signed else (0, (1 << width) - 1)
  seed = data.draw(st.integers(0, 2**32 - 1), label="seed")
  values = np.random.default_rng(seed).integers(lo, hi, size=shape, endpoint=True).astype(dtype)
  if values.size:  # always exercise both ends of the range
    values.flat[0], values.flat[-1] = lo, hi
  payload = {"weights": {"k": Bits(values, np.asarray(width, np.int32))}}
  decoded, data_bytes = _roundtrip(payload)
  _same(decoded, payload)
  header = len(data_bytes) - math.ceil(values.size * width / 8)
  assert header <= 40, "the header of one small Bits leaf stays small"


@settings(max_examples=100, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(FLOAT_DTYPES + [np.bool_, np.int32, np.uint8]),
       seed=st.integers(0, 2**32 - 1))
def test_plain_arrays_roundtrip_bit_exact(shape, dtype, seed):
  rng = np.random.default_rng(seed)
  if dtype == np.bool_:
    x = rng.random(shape) < 0.5
  elif np.dtype(dtype).kind in "iu":
    x = rng.integers(0, 100, shape).astype(dtype)
  else:
    x = rng.standard_normal(shape).astype(dtype)
    if x.size >= 3:  # specials survive bit for bit
      x.flat[0], x.flat[1], x.flat[2] = np.nan, -0.0, np.inf
  decoded, data = _roundtrip({"x": x})
  _same(decoded, {"x": x})
  per = 1 / 8 if dtype == np.bool_ else np.dtype(dtype).itemsize
  assert len(data) - math.ceil(x.size * per) <= 24


def test_structure_keeps_empty_dicts_lists_tuples_and_scalars():
  payload = {"weights": {}, "other": {"a": {"b": np.float32(2.5)}}, "model_state": {},
             "list": [np.arange(3, dtype=np.int32), (np.zeros((0, 2), np.float32),)],
             "ünïcode": np.array(True)}
  decoded, _ = _roundtrip(payload)
  _same(decoded, payload)
  assert isinstance(decoded["list"], list) and isinstance(decoded["list"][1], tuple)


def test_packed_layout_is_msb_first_twos_complement():
  payload = Bits(np.array([-2, 1, -1], np.int8), np.asarray(2, np.int32))
  data = wire.encode(payload)
  # codes 10 01 11 -> 0b100111 padded to a byte: 0b10011100
  assert data[-1] == 0b10011100
  one_bit = wire.encode(Bits(np.array([1, 0, 1, 1, 0, 0, 0, 0, 1], np.uint8), np.int32(1)))
  assert one_bit[-2:] == bytes([0b10110000, 0b10000000])


@pytest.mark.parametrize("values, width, dtype", [
    ([8], 4, np.int8), ([-9], 4, np.int8), ([2], 1, np.uint8), ([8], 3, np.uint16)])
def test_values_that_do_not_fit_the_width_are_refused(values, width, dtype):
  with pytest.raises(WireError, match="do not fit"):
    wire.encode(Bits(np.array(values, dtype), np.int32(width)))


@pytest.mark.parametrize("bad, message", [
    (Bits(np.zeros(3, np.float32), np.int32(1)),                      # not integers
     r"^payload: Bits values must be integers, got dtype float32$"),
    (Bits(np.zeros(3, np.int8), np.int32(0)),                         # width 0
     r"^payload: Bits width must be in 1\.\.8 for int8, got 0$"),
    (Bits(np.zeros(3, np.int8), np.int32(9)),                         # wider than the dtype
     r"^payload: Bits width must be in 1\.\.8 for int8, got 9$"),
    (Bits(np.zeros((2, 3), np.int8), np.array([1, 2], np.int32)),    # stacked widths
     r"^payload: Bits width must be a scalar in one client's payload, got shape \(2,\)"),
    (np.zeros(2, np.complex64),                                       # unsupported dtype
     r"^payload: dtype complex64 cannot be sent \(allowed: bool, int8, .*, float64\)$"),
])
def test_unencodable_payloads_raise(bad, message):
  with pytest.raises(WireError, match=message):
    wire.encode({"weights": bad})
  with pytest.raises(WireError, match=message):
    wire.encoded_size({"weights": bad})


def test_decode_rejects_garbage():
  data = wire.encode({"x": np.arange(4, dtype=np.float32)})
  with pytest.raises(WireError, match="truncated"):
    wire.decode(data[:-1])
  with pytest.raises(WireError, match="trailing"):
    wire.decode(data + b"\0")
  with pytest.raises(WireError, match="magic"):
    wire.decode(b"nope" + data[4:])


@settings(max_examples=40, deadline=None)
@given(widths=st.lists(st.integers(1, 16), min_size=1, max_size=5), shape=shapes,
       seed=st.integers(0, 2**32 - 1))
def test_stacked_sizes_match_each_clients_encoding(widths, shape, seed):
  rng = np.random.default_rng(seed)
  c = len(widths)
  values = np.stack([rng.integers(0, 1 << w, size=shape).astype(np.uint16) for w in widths])
  stacked = {"weights": {"k": Bits(jnp.asarray(values), jnp.asarray(widths, jnp.int32))},
             "scale": {"k": jnp.ones((c,), jnp.float32)}, "levels": jnp.arange(c, dtype=jnp.int32),
             "model_state": {}}
  sizes = wire.encoded_sizes(stacked)
  for i in range(c):
    one = wire.unstack(stacked, i)
    assert sizes[i] == wire.encoded_size(one) == len(wire.encode(one)) == wire.verify(one)
  assert wire.weight_bits(stacked) == sum(widths) * int(np.prod(shape))


def test_verify_catches_a_size_or_value_mismatch(monkeypatch):
  payload = {"weights": {"k": Bits(np.array([1, 2], np.int8), np.int32(3))}}
  assert wire.verify(payload) == len(wire.encode(payload))
  monkeypatch.setattr(wire, "encoded_size", lambda p: 1)
  with pytest.raises(WireError, match="predicted"):
    wire.verify(payload, "downlink")
  monkeypatch.undo()
  monkeypatch.setattr(wire, "decode", lambda d: {"weights": {"k": Bits(np.array([1, 3], np.int8),
                                                                       np.int32(3))}})
  with pytest.raises(WireError, match="differs"):
    wire.verify(payload, "uplink")


@functools.lru_cache(maxsize=None)
def _variables(input_shape):
  return jax.jit(lambda k: get_model("cnn", 10).init(k, jnp.zeros((1,) + input_shape)))(
      jax.random.key(0))


@jax.jit
def _perturb(trainable, scale):
  """A stand-in for local training: trainable + scale * N(0, 1)."""
  leaves, treedef = jax.tree.flatten(trainable)
  noise = [scale * jax.random.normal(jax.random.key(i), x.shape) for i, x in enumerate(leaves)]
  return optax.apply_updates(trainable, jax.tree.unflatten(treedef, noise))


def _payloads(algorithm, input_shape=(8, 8, 1), num_clients=3, **overrides):
  """(downlink, stacked uplinks) of one round of `algorithm`, with the clients' local training
  replaced by a random perturbation of their model (the payloads' shapes and widths are real)."""
  config = small_config(algorithm=algorithm, num_clients=num_clients, **overrides)
  algo = get_algorithm(config)
  variables = _variables(input_shape)
  server = algo.init(jax.random.key(1), variables)
  n = jnp.asarray([100.0, 200.0, 700.0][:num_clients])
  info = RoundInfo(n / n.sum(), n)
  downlink = jax.jit(algo.broadcast)(server, jax.random.key(2), info)
  init_client, start, finish = map(jax.jit, (algo.init_client, algo.client_start,
                                             algo.client_finish))
  ups = []
  for c in range(num_clients):
    state = init_client(jax.random.key(10 + c), variables)
    local = start(downlink, state, jax.random.key(20 + c))
    local = local._replace(trainable=_perturb(local.trainable, 0.01 * (c + 1)))
    stats = {"loss_sum": jnp.float32(1.0), "count": config.local_epochs * n[c]}
    up, _ = finish(downlink, state, local, jax.random.key(30 + c), stats)
    ups.append(up)
  return downlink, jax.tree.map(lambda *x: jnp.stack(x), *ups), variables


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", sorted(ALGORITHMS))
def test_every_algorithms_payloads_roundtrip(algorithm):
  """Both codecs: packed at exactly `encoded_size`; entropy decoded to the very payload that was
  encoded, at the length the ledger counts, never longer than packed."""
  downlink, uplinks, _ = _payloads(algorithm)
  assert wire.verify(downlink) == wire.encoded_size(downlink)
  sizes = wire.encoded_sizes(uplinks)
  for i in range(len(sizes)):
    assert wire.verify(wire.unstack(uplinks, i)) == sizes[i]
  coded = wire.coded_sizes(uplinks, "entropy", stacked=True).sizes
  messages = [("downlink", downlink, wire.coded_sizes(downlink, "entropy").sizes[0],
               wire.encoded_size(downlink))]
  messages += [(f"uplink {i}", wire.unstack(uplinks, i), coded[i], sizes[i])
               for i in range(len(sizes))]
  entropy_nodes = 0
  for name, payload, ledger, packed in messages:
    data = wire.encode(payload, "entropy")
    _same(wire.decode(data), jax.tree.map(lambda b: Bits(b.values, np.asarray(b.width, np.int32))
                                          if isinstance(b, Bits) else b,
                                          jax.device_get(payload), is_leaf=is_bits))
    assert len(data) == ledger <= packed, name
    assert wire.verify(payload, name, "entropy") == len(data)
    entropy_nodes += data[:4] == wire.MAGIC_ENTROPY
  if algorithm == "fedbif":  # its m-bit broadcast always has a skewed histogram
    assert wire.encode(downlink, "entropy")[:4] == wire.MAGIC_ENTROPY
  print(f"{algorithm}: {entropy_nodes} of {len(messages)} messages with entropy-coded leaves")


@pytest.mark.slow
def test_fedbif_1_4_on_the_cifar_cnn_is_exactly_1_and_4_bpp():
  """The ledger's figures for the 545k-parameter CNN, per client, with the bytes worked out."""
  downlink, uplinks, variables = _payloads("fedbif", input_shape=(32, 32, 3), num_clients=2)
  kernels = 864 + 18432 + 524288 + 1280
  assert sum(x.size for x in jax.tree.leaves(variables)) == 545098   # 234 biases
  assert wire.weight_bits(downlink) / kernels == 4.0
  assert wire.weight_bits(uplinks) / (2 * kernels) == 1.0
  down_bytes, up_bytes = wire.encoded_size(downlink), wire.encoded_sizes(uplinks)
  # payload bytes: 4-bit integers, 4 float32 steps, a 4-bit mask (1 byte), 234 float32 biases.
  assert kernels * 4 // 8 + 16 + 1 + 936 < down_bytes < kernels * 4 // 8 + 16 + 1 + 936 + 400
  assert kernels // 8 + 936 < up_bytes[0] == up_bytes[1] < kernels // 8 + 936 + 400
  total_down, total_up = 8 * down_bytes / kernels, 8 * up_bytes[0] / kernels
  assert 4.0 < total_down < 4.02 and 1.0 < total_up < 1.02


def test_decode_raises_only_wire_errors_on_a_malformed_header():
  # The key "k" is stored as UTF-8 in the header; 0xff is never valid UTF-8. Before the decoder
  # wrapped its failures, this escaped as UnicodeDecodeError.
  data = bytearray(wire.encode({"k": np.zeros(3, np.float32)}))
  at = data.index(b"k")
  data[at] = 0xFF
  with pytest.raises(wire.WireError, match=r"payload: malformed at byte \d+ \(UnicodeDecodeError"):
    wire.decode(bytes(data))


# ----------------------------------------------------------------------------- entropy codec


def _skewed(size=100_000, seed=0):
  """int8 4-bit codes with exact counts: 0 x 75%, +-1 x 10% each, +-2 x 2.5% each, shuffled.
  By hand: H = -(0.75 log2 0.75 + 2 x 0.1 log2 0.1 + 2 x 0.025 log2 0.025) = 1.24176015 bits."""
  counts = {0: 75, 1: 10, -1: 10, 2: 2.5, -2: 2.5}
  values = np.concatenate([np.full(int(size * c / 100), v, np.int8) for v, c in counts.items()])
  return np.random.default_rng(seed).permutation(values)


SKEWED_H = 1.2417601481809735  # bits per element of `_skewed`, worked out in its docstring


def test_skewed_tensor_codes_near_its_entropy_and_below_packed():
  values = _skewed()
  payload = {"weights": {"k": Bits(values, np.int32(4))}}
  packed, coded = wire.encode(payload), wire.encode(payload, "entropy")
  assert coded[:4] == wire.MAGIC_ENTROPY and packed[:4] == wire.MAGIC
  _same(wire.decode(coded), payload)
  # The same header up to the width byte; then the ENTROPY section instead of 50,000 packed bytes.
  header = len(packed) - values.size * 4 // 8
  section = len(coded) - header
  limit = values.size * SKEWED_H / 8                       # 15,522.0 bytes
  # Overhead: the statistics (k, 5 codes, 5 counts: 17 bytes), the word count (3), the ANS
  # state flush (<= 8) and the 24-bit quantization of the probabilities (a few bytes here).
  assert limit <= section <= limit + 40, (section, limit)
  assert len(coded) < len(packed)
  assert wire.entropy_bits(payload) == pytest.approx(values.size * SKEWED_H, rel=1e-12)
  coded_sizes = wire.coded_sizes(payload, "entropy")
  assert coded_sizes.sizes.tolist() == [len(coded)] and coded_sizes.weight_bits == 8 * section


def test_uniform_random_tensor_falls_back_to_packed():
  values = np.random.default_rng(3).integers(-8, 8, 40_000).astype(np.int8)
  payload = {"weights": {"k": Bits(values, np.int32(4))}, "b": np.ones(3, np.float32)}
  assert wire.encode(payload, "entropy") == wire.encode(payload)       # version 1, BITS node
  assert wire.coded_sizes(payload, "entropy").sizes.tolist() == [wire.encoded_size(payload)]


def test_entropy_bits_by_hand():
  one = {"weights": {"a": Bits(np.array([0, 0, 0, 1], np.uint8), np.int32(1)),
                     "f": np.zeros(2, np.float32)},                 # sent raw: 2 x 32 bits
         "other": Bits(np.array([0, 1, 2, 3], np.uint8), np.int32(2))}  # not a weight
  # H([3/4, 1/4]) = 0.8112781244591328 bits, x 4 elements.
  assert wire.entropy_bits(one) == pytest.approx(4 * 0.8112781244591328 + 64, rel=1e-12)
  stacked = {"weights": {"a": Bits(np.array([[5, 5, 7, 7], [2, 2, 2, 2]], np.int8),
                                   np.array([4, 4], np.int32))}}
  # client 0: H = 1 bit x 4; client 1: a constant tensor, 0 bits (its own histogram).
  assert wire.entropy_bits(stacked, stacked=True) == pytest.approx(4.0, rel=1e-12)
  assert wire.entropy_bits(wire.unstack(stacked, 1)) == 0.0


def test_constant_tensor_is_one_symbol_without_words():
  values = np.full((64, 8), -3, np.int8)
  payload = {"weights": {"k": Bits(values, np.int32(3))}}
  coded = wire.encode(payload, "entropy")
  # k=1, code 0b101 = 5, count 512 (2-byte varint), 0 words: 5 bytes instead of 192 packed.
  assert coded.endswith(bytes([1, 5]) + bytes([0x80, 0x04]) + bytes([0]))
  assert len(coded) == len(wire.encode(payload)) - 192 + 5
  _same(wire.decode(coded), payload)


@settings(max_examples=150, deadline=None)
@given(shape=shapes, dtype=st.sampled_from(INT_DTYPES + [np.int64, np.uint64]), data=st.data())
def test_entropy_roundtrip_any_shape_dtype_width_and_skew(shape, dtype, data):
  """Values from a geometric law (mostly one code, a tail of others) at random widths: the
  entropy codec decodes exactly, is never longer than packed, and the ledger's length is the
  encoding's."""
  bits = np.dtype(dtype).itemsize * 8
  width = data.draw(st.integers(1, bits), label="width")
  signed = np.dtype(dtype).kind == "i"
  lo, hi = (-(1 << (width - 1)), (1 << (width - 1)) - 1) if signed else (0, (1 << width) - 1)
  rng = np.random.default_rng(data.draw(st.integers(0, 2**32 - 1), label="seed"))
  skew = data.draw(st.floats(0.05, 1.0), label="skew")
  offsets = rng.geometric(skew, size=shape) - 1
  values = np.clip(np.where(rng.random(shape) < 0.5, -offsets, offsets) if signed else offsets,
                   lo, hi).astype(dtype)
  if values.size > 2:
    values.flat[0], values.flat[-1] = lo, hi
  payload = {"weights": {"k": Bits(values, np.asarray(width, np.int32))},
             "x": np.arange(3, dtype=np.float32)}
  coded = wire.encode(payload, "entropy")
  _same(wire.decode(coded), payload)
  assert len(coded) <= wire.encoded_size(payload) == len(wire.encode(payload))
  assert wire.min_encoded_size(payload, "entropy") <= len(coded)
  assert wire.coded_sizes(payload, "entropy").sizes.tolist() == [len(coded)]
  assert wire.verify(payload, codec="entropy") == len(coded)


def test_stacked_coded_sizes_are_each_clients_encoding():
  rng = np.random.default_rng(5)
  values = np.stack([_skewed(8000, seed=1), rng.integers(-8, 8, 8000).astype(np.int8),
                     np.zeros(8000, np.int8)])
  stacked = {"weights": {"k": Bits(jnp.asarray(values), jnp.asarray([4, 4, 4], jnp.int32))},
             "scale": jnp.ones((3, 2), jnp.float32)}
  coded = wire.coded_sizes(stacked, "entropy", stacked=True)
  lengths = [len(wire.encode(wire.unstack(stacked, i), "entropy")) for i in range(3)]
  assert coded.sizes.tolist() == lengths
  assert lengths[1] == wire.encoded_sizes(stacked)[1]     # uniform: packed
  assert lengths[0] < lengths[1] and lengths[2] < lengths[0]
  packed = wire.coded_sizes(stacked, "packed", stacked=True)
  assert packed.sizes.tolist() == wire.encoded_sizes(stacked).tolist()
  assert packed.weight_bits == wire.weight_bits(stacked) == 3 * 8000 * 4


def test_ledger_with_the_entropy_codec_counts_the_coded_bytes():
  from fedbif_jax import records, rounds
  values = np.stack([_skewed(8000, seed=s) for s in (1, 2)])
  uplinks = {"weights": {"k": Bits(values, np.array([4, 4], np.int32))}}
  downlink = {"weights": {"k": Bits(_skewed(8000, seed=9), np.int32(4))},
              "step": np.float32(0.5)}
  packed = rounds.traffic(downlink, uplinks, 8000)
  assert set(packed) == {"uplink_bits", "downlink_bits", "uplink_bpp", "downlink_bpp",
                         "uplink_total_bpp", "downlink_total_bpp"}
  row = rounds.traffic(downlink, uplinks, 8000, "entropy")
  up = [wire.encode(wire.unstack(uplinks, i), "entropy") for i in range(2)]
  down = wire.encode(downlink, "entropy")
  assert row["uplink_bits"] == 8 * sum(map(len, up)) and row["downlink_bits"] == 16 * len(down)
  assert row["uplink_bpp"] == row["downlink_bpp"] == 4.0          # the packed widths
  assert row["downlink_total_bpp"] == 8 * len(down) / 8000
  # Only the "weights" leaf: the section after its header (the step and the rest excluded).
  header = len(wire.encode({"weights": {"k": Bits(np.zeros(8000, np.int8), np.int32(4))}})) - 4000
  assert row["downlink_coded_bpp"] == 8 * (len(wire.encode(
      {"weights": downlink["weights"]}, "entropy")) - header) / 8000
  assert SKEWED_H < row["downlink_coded_bpp"] < SKEWED_H + 0.05
  assert row["uplink_entropy_bpp"] == pytest.approx(SKEWED_H, rel=1e-12)
  assert row["downlink_entropy_bpp"] == pytest.approx(SKEWED_H, rel=1e-12)
  assert set(records.mean_coded_bpp([row, row])) == {
      "mean_uplink_coded_bpp", "mean_downlink_coded_bpp", "mean_uplink_entropy_bpp",
      "mean_downlink_entropy_bpp"}
  assert records.mean_coded_bpp([packed]) == {}


def _entropy_node(k_codes_counts, nwords_words=(0, b""), shape=(8,), dtype_code=1, width=4):
  """An ENTROPY payload ``{"w": <node>}`` assembled by hand from the documented grammar."""
  gaps, counts = k_codes_counts
  body = (bytes([len(gaps)]) + b"".join(wire._varint(g) for g in gaps)
          + b"".join(wire._varint(c) for c in counts) + wire._varint(nwords_words[0])
          + nwords_words[1])
  head = bytes([6, dtype_code, len(shape)]) + b"".join(wire._varint(d) for d in shape)
  return wire.MAGIC_ENTROPY + b"\x01\x01\x01w" + head + bytes([width]) + body


def test_hand_assembled_entropy_nodes():
  # 8 x code 3 as one symbol takes 4 bytes (k, code, count, no words), as many as packed (8 x 4
  # bits): the encoder would keep it packed, so the decoder refuses it (one encoding each).
  with pytest.raises(WireError, match=r"malformed at byte \d+ \(entropy-coded leaf: 4 bytes, "
                                      r"not fewer than the 4 bytes packed\)"):
    wire.decode(_entropy_node(([3], [8])))
  ok = _entropy_node(([3], [64]), shape=(64,))                  # 32 bytes packed, 4 coded
  _same(wire.decode(ok), {"w": Bits(np.full(64, 3, np.int8), np.int32(4))})


@pytest.mark.parametrize("data, message", [
    (_entropy_node(([], []), shape=(64,)), r"0 symbols, allowed 1\.\.16"),
    (_entropy_node(([0] * 17, [1] * 17), shape=(64,)), r"17 symbols, allowed 1\.\.16"),
    (_entropy_node(([0] * 3, [1] * 3), shape=(2,)), r"3 symbols, allowed 1\.\.2"),
    (_entropy_node(([16], [64]), shape=(64,)), r"code 16 does not fit 4 bits"),
    (_entropy_node(([3], [63]), shape=(64,)), r"counts \(each >= 1\) sum to 63"),
    (_entropy_node(([1, 0], [64, 0]), shape=(64,)), r"counts \(each >= 1\) sum to 64"),
    (_entropy_node(([3], [64]), (1, b"\x01\0\0\0"), shape=(64,)), r"1 words for 1 symbols"),
    (_entropy_node(([0, 0], [60, 4]), shape=(64,)), r"0 words for 2 symbols"),
    (_entropy_node(([0, 0], [60, 4]), (1, b"\0\0\0\0"), shape=(64,)), r"ValueError: Invalid"),
    (_entropy_node(([0, 0], [60, 4]), (1, b"\x05\0\0\0"), shape=(64,)),
     r"do not decode to the symbol counts"),
    (_entropy_node(([0], [1 << 23]), shape=(1 << 23,)), r"more than 1048576 per byte"),
    (_entropy_node(([0, 0], [60, 4]), (1 << 40, b""), shape=(64,)), r"^payload: truncated"),
    (_entropy_node(([0, 0], [60, 4]), (1, b"\x05\0\0"), shape=(64,)), r"^payload: truncated"),
    (wire.MAGIC + _entropy_node(([3], [64]), shape=(64,))[4:], r"unknown node tag 6"),
    (wire.MAGIC_ENTROPY + wire.encode({"w": np.zeros(3, np.int8)})[4:],
     r"but no entropy-coded leaf"),
    (wire.MAGIC_ENTROPY[:3] + b"\x03" + b"\x01\x00", r"not an encoded payload"),
])
def test_malformed_entropy_nodes_raise_one_wire_error(data, message):
  with pytest.raises(WireError, match=message) as info:
    wire.decode(data)
  assert "\n" not in str(info.value)


def test_decode_budget_refuses_claimed_elements_before_allocating():
  data = _entropy_node(([3], [64]), shape=(64,))
  assert wire.decode(data, max_elements=64)["w"].values.size == 64
  with pytest.raises(WireError, match=r"more than the 63 elements allowed"):
    wire.decode(data, max_elements=63)
  # A one-word ANS stream can claim a billion near-certain symbols; the budget stops it first.
  with pytest.raises(WireError, match=r"more than the 1000 elements allowed"):
    wire.decode(_entropy_node(([0, 0], [10 ** 9 - 1, 1]), (1, b"\x01\0\0\0"),
                              shape=(10 ** 9,)), max_elements=1000)


def test_entropy_fuzz_raises_only_wire_errors():
  """Truncations, single-bit flips and random byte edits of real entropy-coded payloads (one
  ENTROPY leaf with many symbols, one constant, one packed): a payload or a WireError."""
  rng = np.random.default_rng(7)
  payload = {"weights": {"a": Bits(_skewed(3000, seed=2), np.int32(4)),
                         "c": Bits(np.zeros((40, 40), np.uint8), np.int32(2)),
                         "u": Bits(rng.integers(0, 2, 500).astype(np.uint8), np.int32(1))},
             "bias": np.ones(5, np.float32)}
  data = wire.encode(payload, "entropy")
  outcomes = {"decoded": 0, "refused": 0}

  def attempt(mutated):
    try:
      wire.decode(bytes(mutated))
      outcomes["decoded"] += 1
    except WireError as e:
      assert "\n" not in str(e)
      outcomes["refused"] += 1

  for cut in range(0, len(data), 7):
    attempt(data[:cut])
  for bit in list(range(0, 8 * 120)) + rng.integers(0, 8 * len(data), 400).tolist():
    flipped = bytearray(data)
    flipped[bit // 8] ^= 1 << (bit % 8)
    attempt(flipped)
  for _ in range(300):
    mutated = bytearray(data)
    for where in rng.integers(0, len(data), rng.integers(1, 4)):
      mutated[where] = rng.integers(0, 256)
    attempt(mutated)
  print(outcomes)
  assert outcomes["refused"] > 500 and outcomes["decoded"] > 0, outcomes


@pytest.mark.parametrize("codec", ["packed", "entropy"])
@pytest.mark.parametrize("dtype, width, values", [
    (np.int64, 63, [-(1 << 62), (1 << 62) - 1, 0, -1]),
    (np.int64, 64, [-(1 << 63), (1 << 63) - 1, 5, -5]),
    (np.uint64, 64, [0, (1 << 64) - 1, 1 << 63, 1]),
    (np.int8, 8, [-128, 127, 0, -1]),
])
def test_widest_codes_round_trip(codec, dtype, width, values):
  """Codes at 63 and 64 bits (the sign extension must not need an integer wider than 64 bits;
  found by the hypothesis round trip: width 63 once raised OverflowError)."""
  values = np.array(values, dtype)
  payload = {"weights": {"k": Bits(values, np.asarray(width, np.int32))}}
  decoded = wire.decode(wire.encode(payload, codec))["weights"]["k"].values
  assert decoded.dtype == values.dtype and decoded.tolist() == values.tolist()
