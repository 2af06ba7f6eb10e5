"""What crosses the network: payload leaf types, the bit-packed byte encoding, and the ledger.

A payload (downlink or uplink) is a pytree (nested dicts, lists, tuples) of arrays. Its
``"weights"`` entry holds the model's compressed tensors (conv and dense kernels): the paper's
bits-per-parameter (bpp) column is ``bits under "weights" / number of those weights``. Everything
else in a payload (biases, BatchNorm leaves, step sizes, scales, levels, masks) counts only in the
honest total.

Leaves are plain arrays, sent at their dtype's width (bool packed to 1 bit per element), or
`Bits`, an integer tensor sent with ``width`` bits per element (1 for an activated bit or a sign,
m for an m-bit integer, a per-client width for the adaptive baselines).

Byte format (`encode` / `decode`, an exact round trip; `encoded_size` predicts its length from
shapes, dtypes and widths alone, without copying the values off the device)::

  payload := b"FBW" VERSION node
  node    := DICT  n:varint  (keylen:varint key:utf8 node) * n
           | LIST  n:varint  node * n          | TUPLE n:varint node * n
           | ARRAY dtype:u8 ndim:varint dim:varint * ndim  data
           | BITS  dtype:u8 ndim:varint dim:varint * ndim  width:u8  packed

``varint`` is unsigned LEB128. ``data`` is the elements in C order, little-endian; bool arrays are
packed 8 per byte (`np.packbits`). ``packed`` is ``ceil(size * width / 8)`` bytes: each element's
lowest ``width`` bits of its two's-complement code, most significant first, elements in C order,
the last byte zero-padded. Signed integer dtypes therefore hold [-2^(width-1), 2^(width-1) - 1]
and unsigned ones [0, 2^width - 1]; `encode` refuses values outside that range, so a payload
that claims fewer bits than its values need cannot be counted at the smaller width.

Uplinks arrive stacked over clients (leading axis C, a `Bits` width of shape [C]); every client
sends its own message: `unstack` takes client i's payload and `encoded_sizes` gives all C lengths.
"""
from __future__ import annotations

import math
import sys
from typing import Any

import flax
import jax
import ml_dtypes
import numpy as np

MAGIC = b"FBW\x01"
_DICT, _LIST, _TUPLE, _ARRAY, _BITS = 1, 2, 3, 4, 5
_DTYPES = tuple(np.dtype(d) for d in (
    np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
    np.float16, ml_dtypes.bfloat16, np.float32, np.float64))
_CODE = {d: i for i, d in enumerate(_DTYPES)}


@flax.struct.dataclass
class Bits:
  """An integer tensor sent with `width` bits per element.

  values: integer array [*lead, ...] (e.g. int8 m-bit integers or uint8 0/1 bits); signed dtypes
    are sent in `width`-bit two's complement, unsigned ones as `width`-bit unsigned integers.
  width: int32 array [*lead] or scalar: bits per element (per client when stacked over clients).
  """
  values: jax.Array
  width: jax.Array


def is_bits(x: Any) -> bool:
  """Whether `x` is a `Bits` leaf (the ``is_leaf`` of every tree map over payloads)."""
  return isinstance(x, Bits)


def _leaf_bits(leaf: Any) -> float:
  if isinstance(leaf, Bits):
    width = np.asarray(leaf.width, np.float64)
    per_width_entry = leaf.values.size / max(width.size, 1)
    return float(width.sum() * per_width_entry)
  dtype = np.dtype(leaf.dtype)
  per_element = 1 if dtype == np.bool_ else dtype.itemsize * 8
  return float(leaf.size * per_element)


def weight_bits(payload: Any) -> float:
  """Bits the elements under ``payload["weights"]`` occupy: the bpp numerator.

  From shapes and widths only (no device-to-host copy of data); for `Bits` exactly width x size.
  For uplinks stacked over clients (leading axis C) this is the sum over the clients. The
  ledger's byte figures come from `encoded_size` / `encoded_sizes`, which add headers, the other
  leaves and byte padding.
  """
  weights = payload.get("weights", {}) if isinstance(payload, dict) else {}
  return sum(map(_leaf_bits, jax.tree.leaves(weights, is_leaf=is_bits)))


# ----------------------------------------------------------------------------- byte encoding


class WireError(RuntimeError):
  """A payload that does not survive the wire: unencodable, or a mismatched size or value."""


def _varint(n: int) -> bytes:
  out = bytearray()
  while True:
    byte, n = n & 0x7F, n >> 7
    out.append(byte | (0x80 if n else 0))
    if not n:
      return bytes(out)


def _varint_len(n: int) -> int:
  return max(1, -(-int(n).bit_length() // 7))


def _dtype_code(dtype: np.dtype) -> int:
  dtype = np.dtype(dtype)
  if dtype not in _CODE:
    raise WireError(f"payload: dtype {dtype.name} cannot be sent "
                    f"(allowed: {', '.join(d.name for d in _DTYPES)})")
  return _CODE[dtype]


def _little_endian(arr: np.ndarray) -> bytes:
  arr = np.ascontiguousarray(arr)
  return (arr if sys.byteorder == "little" else arr.byteswap()).tobytes()


def _shape_header_len(shape: tuple) -> int:
  return 1 + 1 + _varint_len(len(shape)) + sum(_varint_len(d) for d in shape)


def _array_data_len(shape: tuple, dtype: np.dtype) -> int:
  size = math.prod(shape)
  dtype = np.dtype(dtype)
  return -(-size // 8) if dtype == np.bool_ else size * dtype.itemsize


def _bits_data_len(shape: tuple, width: int) -> int:
  return -(-math.prod(shape) * int(width) // 8)


def _check_width(width: int, dtype: np.dtype) -> int:
  dtype = np.dtype(dtype)
  if dtype.kind not in "iu":
    raise WireError(f"payload: Bits values must be integers, got dtype {dtype.name}")
  width = int(width)
  if not 1 <= width <= dtype.itemsize * 8:
    raise WireError(f"payload: Bits width must be in 1..{dtype.itemsize * 8} for {dtype.name}, "
                    f"got {width}")
  return width


def _node_size(node: Any, width_of) -> int:
  """Encoded length of `node`; `width_of(bits)` gives a Bits leaf's (shape, dtype, width)."""
  if isinstance(node, dict):
    return 1 + _varint_len(len(node)) + sum(
        _varint_len(len(k.encode())) + len(k.encode()) + _node_size(v, width_of)
        for k, v in node.items())
  if isinstance(node, (list, tuple)):
    return 1 + _varint_len(len(node)) + sum(_node_size(v, width_of) for v in node)
  if isinstance(node, Bits):
    shape, dtype, width = width_of(node)
    width = _check_width(width, dtype)
    return _shape_header_len(shape) + 1 + _bits_data_len(shape, width)
  if not hasattr(node, "dtype"):
    node = np.asarray(node)
  shape, dtype = tuple(node.shape), np.dtype(node.dtype)
  _dtype_code(dtype)
  return _shape_header_len(shape) + _array_data_len(shape, dtype)


def _scalar_width(bits: Bits) -> tuple[tuple, np.dtype, int]:
  if np.ndim(bits.width) != 0:
    raise WireError(f"payload: Bits width must be a scalar in one client's payload, got shape "
                    f"{np.shape(bits.width)} (use encoded_sizes / unstack for stacked uplinks)")
  return tuple(np.shape(bits.values)), np.dtype(bits.values.dtype), int(bits.width)


def encoded_size(payload: Any) -> int:
  """len(encode(payload)), from shapes, dtypes and widths (only the scalar widths leave the device,
  in one transfer)."""
  _check_keys(payload)
  bits = [leaf for leaf in jax.tree.leaves(payload, is_leaf=is_bits) if is_bits(leaf)]
  widths = dict(zip(map(id, bits), jax.device_get([b.width for b in bits])))

  def width_of(b: Bits):
    shape, dtype, _ = _scalar_width(Bits(b.values, widths[id(b)]))
    return shape, dtype, int(widths[id(b)])

  return len(MAGIC) + _node_size(payload, width_of)


def encoded_sizes(stacked: Any) -> np.ndarray:
  """Per-client encoded lengths of a payload stacked over clients (every leaf [C, ...]).

  Returns int64 [C] with ``out[i] == encoded_size(unstack(stacked, i))``, computed from shapes and
  the [C] widths (the only values copied to the host).
  """
  leaves = jax.tree.leaves(stacked, is_leaf=is_bits)
  if not leaves:
    raise WireError("payload: a stacked payload needs at least one leaf with a client axis")
  num = int(np.shape(leaves[0].values if is_bits(leaves[0]) else leaves[0])[0])
  widths = jax.device_get([leaf.width for leaf in leaves if is_bits(leaf)])
  widths = [np.broadcast_to(np.asarray(w), (num,)) for w in widths]
  per_leaf = {}
  for leaf, w in zip([leaf for leaf in leaves if is_bits(leaf)], widths):
    per_leaf[id(leaf)] = w

  def sized(i):
    def width_of(bits):
      return (tuple(np.shape(bits.values))[1:], np.dtype(bits.values.dtype),
              int(per_leaf[id(bits)][i]))
    return width_of

  def strip(node):  # the same tree with a client axis removed from plain leaves' shapes
    if isinstance(node, dict):
      return {k: strip(v) for k, v in node.items()}
    if isinstance(node, (list, tuple)):
      return type(node)(strip(v) for v in node)
    if isinstance(node, Bits):
      return node
    return jax.ShapeDtypeStruct(tuple(np.shape(node))[1:], node.dtype)

  _check_keys(stacked)
  skeleton = strip(stacked)
  return np.array([len(MAGIC) + _node_size(skeleton, sized(i)) for i in range(num)], np.int64)


def unstack(stacked: Any, i: int) -> Any:
  """Client i's payload from one stacked over clients (index the leading axis of every leaf)."""
  return jax.tree.map(lambda x: x[i], stacked)


def _check_keys(node: Any) -> None:
  if isinstance(node, dict):
    for k, v in node.items():
      if not isinstance(k, str):
        raise WireError(f"payload: dict keys must be strings, got {k!r}")
      _check_keys(v)
  elif isinstance(node, (list, tuple)) and not isinstance(node, Bits):
    for v in node:
      _check_keys(v)


def _pack(values: np.ndarray, width: int) -> bytes:
  dtype = values.dtype
  flat = values.reshape(-1)
  if dtype.kind == "i":
    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
  else:
    lo, hi = 0, (1 << width) - 1
  if flat.size and (int(flat.min()) < lo or int(flat.max()) > hi):
    raise WireError(f"payload: Bits values in [{int(flat.min())}, {int(flat.max())}] do not fit "
                    f"{width} bits of {dtype.name} (allowed [{lo}, {hi}])")
  codes = flat.astype(np.int64).astype(np.uint64) & np.uint64((1 << width) - 1)
  if width == 1:
    return np.packbits(codes.astype(np.uint8)).tobytes()
  bits = np.empty((flat.size, width), np.uint8)
  for j in range(width):
    bits[:, j] = (codes >> np.uint64(width - 1 - j)) & np.uint64(1)
  return np.packbits(bits.reshape(-1)).tobytes()


def _unpack(buf: bytes, shape: tuple, dtype: np.dtype, width: int) -> np.ndarray:
  size = math.prod(shape)
  bits = np.unpackbits(np.frombuffer(buf, np.uint8), count=size * width).reshape(size, width)
  codes = np.zeros(size, np.int64)
  for j in range(width):
    codes |= bits[:, j].astype(np.int64) << (width - 1 - j)
  if dtype.kind == "i":
    codes = np.where(codes >= (1 << (width - 1)), codes - (1 << width), codes)
  return codes.astype(dtype).reshape(shape)


def _shape_header(code: int, shape: tuple) -> bytes:
  return bytes([code]) + _varint(len(shape)) + b"".join(_varint(int(d)) for d in shape)


def _encode_node(node: Any, out: list) -> None:
  if isinstance(node, dict):
    out.append(bytes([_DICT]) + _varint(len(node)))
    for k, v in node.items():
      key = k.encode()
      out.append(_varint(len(key)) + key)
      _encode_node(v, out)
  elif isinstance(node, (list, tuple)) and not isinstance(node, Bits):
    out.append(bytes([_TUPLE if isinstance(node, tuple) else _LIST]) + _varint(len(node)))
    for v in node:
      _encode_node(v, out)
  elif isinstance(node, Bits):
    values = np.asarray(node.values)
    _, dtype, width = _scalar_width(node)
    width = _check_width(width, dtype)
    out.append(bytes([_BITS]) + _shape_header(_dtype_code(dtype), values.shape) + bytes([width]))
    out.append(_pack(values, width))
  else:
    arr = np.asarray(node)
    code = _dtype_code(arr.dtype)
    out.append(bytes([_ARRAY]) + _shape_header(code, arr.shape))
    if arr.dtype == np.bool_:
      out.append(np.packbits(arr.reshape(-1)).tobytes())
    else:
      out.append(_little_endian(arr))


def encode(payload: Any) -> bytes:
  """One client's (or the broadcast) payload as bytes; see the module docstring for the format."""
  _check_keys(payload)
  out = [MAGIC]
  _encode_node(jax.device_get(payload), out)
  return b"".join(out)


class _Reader:
  def __init__(self, data: bytes):
    self.data, self.pos = memoryview(data), 0

  def take(self, n: int) -> bytes:
    if self.pos + n > len(self.data):
      raise WireError(f"payload: truncated at byte {self.pos} (needs {n} more)")
    chunk = bytes(self.data[self.pos:self.pos + n])
    self.pos += n
    return chunk

  def byte(self) -> int:
    return self.take(1)[0]

  def varint(self) -> int:
    n = shift = 0
    while True:
      b = self.byte()
      n |= (b & 0x7F) << shift
      shift += 7
      if not b & 0x80:
        return n

  def shape(self) -> tuple[np.dtype, tuple]:
    code = self.byte()
    if code >= len(_DTYPES):
      raise WireError(f"payload: unknown dtype code {code} at byte {self.pos - 1}")
    return _DTYPES[code], tuple(self.varint() for _ in range(self.varint()))


def _decode_node(r: _Reader) -> Any:
  tag = r.byte()
  if tag == _DICT:
    out = {}
    for _ in range(r.varint()):
      key = r.take(r.varint()).decode()
      out[key] = _decode_node(r)
    return out
  if tag in (_LIST, _TUPLE):
    items = [_decode_node(r) for _ in range(r.varint())]
    return tuple(items) if tag == _TUPLE else items
  if tag == _BITS:
    dtype, shape = r.shape()
    width = _check_width(r.byte(), dtype)
    values = _unpack(r.take(_bits_data_len(shape, width)), shape, dtype, width)
    return Bits(values, np.asarray(width, np.int32))
  if tag == _ARRAY:
    dtype, shape = r.shape()
    buf = r.take(_array_data_len(shape, dtype))
    if dtype == np.bool_:
      return np.unpackbits(np.frombuffer(buf, np.uint8), count=math.prod(shape)).astype(
          bool).reshape(shape)
    arr = np.frombuffer(buf, dtype).reshape(shape)
    return (arr if sys.byteorder == "little" else arr.byteswap()).copy()
  raise WireError(f"payload: unknown node tag {tag} at byte {r.pos - 1}")


def decode(data: bytes) -> Any:
  """Inverse of `encode`: nested dicts/lists/tuples of numpy arrays and `Bits` (width int32).

  Raises:
    WireError: for any bytes that are not an encoded payload (one line); a malformed header
      (non-UTF-8 keys, absurd shapes, ...) never escapes as another exception type.
  """
  if bytes(data[:len(MAGIC)]) != MAGIC:
    raise WireError(f"payload: not an encoded payload (magic {bytes(data[:len(MAGIC)])!r})")
  r = _Reader(data)
  r.pos = len(MAGIC)
  try:
    payload = _decode_node(r)
  except (ValueError, TypeError, OverflowError, MemoryError, IndexError, KeyError) as e:
    # UnicodeDecodeError is a ValueError.
    raise WireError(f"payload: malformed at byte {r.pos} ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
  if r.pos != len(data):
    raise WireError(f"payload: {len(data) - r.pos} trailing bytes after the payload")
  return payload


def _same(a: Any, b: Any) -> bool:
  """Exact equality of two payloads: tree structure, dtypes, shapes and every bit of the values."""
  if jax.tree.structure(a) != jax.tree.structure(b):
    return False
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    x, y = np.asarray(x), np.asarray(y)
    if x.dtype != y.dtype or x.shape != y.shape:
      return False
    if x.tobytes() != y.tobytes():
      return False
  return True


def verify(payload: Any, name: str = "payload") -> int:
  """Encodes and decodes `payload`; raises WireError unless the length equals `encoded_size` and
  the decoded payload equals the original exactly (Bits widths compared as int32). Returns the
  length in bytes."""
  data = encode(payload)
  predicted = encoded_size(payload)
  if len(data) != predicted:
    raise WireError(f"{name}: encoded_size predicted {predicted} bytes, the encoding has {len(data)}")
  host = jax.device_get(payload)
  host = jax.tree.map(lambda b: Bits(b.values, np.asarray(b.width, np.int32)) if is_bits(b) else b,
                      host, is_leaf=is_bits)
  if not _same(decode(data), host):
    raise WireError(f"{name}: the decoded payload differs from the one encoded")
  return len(data)
