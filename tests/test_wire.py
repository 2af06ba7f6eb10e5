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
from fedbif_jax.wire import Bits, WireError

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
  downlink, uplinks, _ = _payloads(algorithm)
  assert wire.verify(downlink) == wire.encoded_size(downlink)
  sizes = wire.encoded_sizes(uplinks)
  for i in range(len(sizes)):
    assert wire.verify(wire.unstack(uplinks, i)) == sizes[i]


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
