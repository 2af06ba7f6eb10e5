"""What crosses the network: the byte encodings of payloads, and the ledger.

A payload (downlink or uplink) is a pytree (nested dicts, lists, tuples) of arrays. Its
``"weights"`` entry holds the model's compressed tensors (conv and dense kernels): the paper's
bits-per-parameter (bpp) column is ``bits under "weights" / number of those weights``. Everything
else in a payload (biases, BatchNorm leaves, step sizes, scales, levels, masks) counts only in the
honest total.

Leaves are plain arrays, sent at their dtype's width (bool packed to 1 bit per element), or
`Bits` (defined in `fedbif_jax.pytrees`), an integer tensor sent with ``width`` bits per element
(1 for an activated bit or a sign, m for an m-bit integer, a per-client width for the adaptive
baselines).

Two codecs (``config.wire_codec``): ``packed`` (the default) sends every `Bits` leaf bit-packed at
its width; ``entropy`` also tries an ANS code of each `Bits` leaf under its own symbol histogram
(the `constriction` library) and keeps, leaf by leaf, whichever of the two is smaller: the
statistics an ENTROPY node must carry cost more than they save on a small or near-uniform
tensor (a balanced bit plane), which then stays packed, so an entropy-coded message is never
longer than the packed one (it differs only in its version byte and in the leaves that came out
shorter coded). Plain arrays are always sent raw.

Byte format (`encode` / `decode`, an exact round trip; for ``packed``, `encoded_size` predicts
its length from shapes, dtypes and widths alone, without copying the values off the device)::

  payload := b"FBW\x01" node      packed: no ENTROPY node anywhere
           | b"FBW\x02" node      entropy: at least one ENTROPY node
  node    := DICT  n:varint  (keylen:varint key:utf8 node) * n
           | LIST  n:varint  node * n          | TUPLE n:varint node * n
           | ARRAY   dtype:u8 ndim:varint dim:varint * ndim  data
           | BITS    dtype:u8 ndim:varint dim:varint * ndim  width:u8  packed
           | ENTROPY dtype:u8 ndim:varint dim:varint * ndim  width:u8  k:varint
                     gap:varint * k  count:varint * k  nwords:varint  word:u32le * nwords

``varint`` is unsigned LEB128. ``data`` is the elements in C order, little-endian; bool arrays are
packed 8 per byte (`np.packbits`). ``packed`` is ``ceil(size * width / 8)`` bytes: each element's
lowest ``width`` bits of its two's-complement code, most significant first, elements in C order,
the last byte zero-padded. Signed integer dtypes therefore hold [-2^(width-1), 2^(width-1) - 1]
and unsigned ones [0, 2^width - 1]; `encode` refuses values outside that range, so a payload
that claims fewer bits than its values need cannot be counted at the smaller width.

An ``ENTROPY`` node carries the same ``width``-bit codes as ``BITS``. Its header holds the
tensor's symbol statistics: the k distinct codes present, ascending (the first as ``gap`` = code,
each next as the gap to the previous minus 1), and how often each occurs (``count`` >= 1,
summing to the size). The decoder rebuilds the identical model from them,
``constriction.stream.model.Categorical(counts as float64, perfect=False)`` (symbol j = the j-th
code; constriction 0.5.0's 24-bit fixed-point quantization, deterministic), and ANS-decodes
``size`` symbols in C order from the ``nwords`` little-endian 32-bit words (encoded with
``AnsCoder.encode_reverse``). A constant tensor (k = 1) has no words. The decoder refuses a node
unless 1 <= k <= min(size, 2^width, `MAX_SYMBOLS`), the codes fit ``width`` bits, the counts sum
to the size, k = 1 exactly when nwords = 0, the node's bytes after ``width`` are fewer than
``packed`` would be (the encoder's choice, so every payload has one encoding), at most
`MAX_ELEMENTS_PER_BYTE` elements come per one of those bytes (a bound on what a short message
can make the decoder allocate; a constant tensor of up to about 6M elements still fits its 6 or
7 bytes; `decode`'s ``max_elements``, which the deployment passes from the expected shapes, is
the tight bound), all before the elements are allocated, and that the words decode
to exactly the counts with nothing left over.

Uplinks arrive stacked over clients (leading axis C, a `Bits` width of shape [C]); every client
sends its own message: `unstack` takes client i's payload and `encoded_sizes` gives all C packed
lengths. The ledger's sizes for either codec come from `coded_sizes` (packed: the shape-only
path; entropy: a real encoding of a host copy), its entropy limit from `entropy_bits`.
"""
from __future__ import annotations

import math
import sys
from typing import Any, NamedTuple

import jax
import ml_dtypes
import numpy as np

from fedbif_jax.pytrees import Bits, is_bits

MAGIC = b"FBW\x01"           # a payload without ENTROPY nodes (every packed payload)
MAGIC_ENTROPY = b"FBW\x02"   # a payload with at least one ENTROPY node
CODECS = ("packed", "entropy")
_DICT, _LIST, _TUPLE, _ARRAY, _BITS, _ENTROPY = 1, 2, 3, 4, 5, 6
MAX_SYMBOLS = 1 << 16             # distinct codes an ENTROPY node may hold (its header's k)
MAX_ELEMENTS_PER_BYTE = 1 << 20   # elements of an ENTROPY node per byte of its coded section
_DTYPES = tuple(np.dtype(d) for d in (
    np.bool_, np.int8, np.uint8, np.int16, np.uint16, np.int32, np.uint32, np.int64, np.uint64,
    np.float16, ml_dtypes.bfloat16, np.float32, np.float64))
_CODE = {d: i for i, d in enumerate(_DTYPES)}


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


def _entropy_min_len(shape: tuple, width: int) -> int:
  """The fewest bytes after ``width`` that a Bits leaf of this shape can take with codec entropy:
  packed, or a constant tensor's ENTROPY section (k, one code, its count, no words)."""
  packed = _bits_data_len(shape, width)
  return min(packed, 3 + _varint_len(math.prod(shape))) if packed else 0


def _node_size(node: Any, width_of, data_len=_bits_data_len) -> int:
  """Encoded length of `node`; `width_of(bits)` gives a Bits leaf's (shape, dtype, width),
  `data_len(shape, width)` its bytes after the width."""
  if isinstance(node, dict):
    return 1 + _varint_len(len(node)) + sum(
        _varint_len(len(k.encode())) + len(k.encode()) + _node_size(v, width_of, data_len)
        for k, v in node.items())
  if isinstance(node, (list, tuple)):
    return 1 + _varint_len(len(node)) + sum(_node_size(v, width_of, data_len) for v in node)
  if isinstance(node, Bits):
    shape, dtype, width = width_of(node)
    width = _check_width(width, dtype)
    return _shape_header_len(shape) + 1 + data_len(shape, width)
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
  """len(encode(payload)) (codec packed), from shapes, dtypes and widths (only the scalar widths
  leave the device, in one transfer)."""
  return _size_from_shapes(payload, _bits_data_len)


def min_encoded_size(payload: Any, codec: str = "packed") -> int:
  """The fewest bytes ``encode(p, codec)`` can take for any payload p with the shapes, dtypes
  and widths of `payload` (values may be shapes only): packed, exactly `encoded_size`; entropy,
  every Bits leaf at its smallest (a constant tensor's ENTROPY node where that is shorter). The
  most is `encoded_size` for both codecs."""
  _check_codec(codec)
  return _size_from_shapes(payload, _bits_data_len if codec == "packed" else _entropy_min_len)


def _size_from_shapes(payload: Any, data_len) -> int:
  _check_keys(payload)
  bits = [leaf for leaf in jax.tree.leaves(payload, is_leaf=is_bits) if is_bits(leaf)]
  widths = dict(zip(map(id, bits), jax.device_get([b.width for b in bits])))

  def width_of(b: Bits):
    shape, dtype, _ = _scalar_width(Bits(b.values, widths[id(b)]))
    return shape, dtype, int(widths[id(b)])

  return len(MAGIC) + _node_size(payload, width_of, data_len)


def _num_clients(stacked: Any) -> int:
  leaves = jax.tree.leaves(stacked, is_leaf=is_bits)
  if not leaves:
    raise WireError("payload: a stacked payload needs at least one leaf with a client axis")
  return int(np.shape(leaves[0].values if is_bits(leaves[0]) else leaves[0])[0])


def encoded_sizes(stacked: Any) -> np.ndarray:
  """Per-client encoded lengths of a payload stacked over clients (every leaf [C, ...]).

  Returns int64 [C] with ``out[i] == encoded_size(unstack(stacked, i))`` (codec packed), computed
  from shapes and the [C] widths (the only values copied to the host).
  """
  num = _num_clients(stacked)
  leaves = jax.tree.leaves(stacked, is_leaf=is_bits)
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


def _check_codec(codec: str) -> str:
  if codec not in CODECS:
    raise WireError(f"wire_codec: must be one of {', '.join(CODECS)}, got {codec!r}")
  return codec


def _codes(values: np.ndarray, width: int) -> np.ndarray:
  """The elements' `width`-bit codes (uint64, C order); WireError for values that do not fit."""
  dtype = values.dtype
  flat = values.reshape(-1)
  if dtype.kind == "i":
    lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
  else:
    lo, hi = 0, (1 << width) - 1
  if flat.size and (int(flat.min()) < lo or int(flat.max()) > hi):
    raise WireError(f"payload: Bits values in [{int(flat.min())}, {int(flat.max())}] do not fit "
                    f"{width} bits of {dtype.name} (allowed [{lo}, {hi}])")
  return flat.astype(np.int64).astype(np.uint64) & np.uint64((1 << width) - 1)


def _pack(codes: np.ndarray, width: int) -> bytes:
  if width == 1:
    return np.packbits(codes.astype(np.uint8)).tobytes()
  bits = np.empty((codes.size, width), np.uint8)
  for j in range(width):
    bits[:, j] = (codes >> np.uint64(width - 1 - j)) & np.uint64(1)
  return np.packbits(bits.reshape(-1)).tobytes()


def _from_codes(codes: np.ndarray, shape: tuple, dtype: np.dtype, width: int) -> np.ndarray:
  """Values of `dtype` from `width`-bit codes (int64 or uint64), two's complement when signed.

  In uint64 arithmetic (wrapping), so that widths up to 64 need no wider integers: a signed code
  is sign-extended as (code XOR 2^(w-1)) - 2^(w-1), then read as int64.
  """
  codes = codes.astype(np.uint64)
  if dtype.kind == "i":
    if width < 64:
      sign = np.uint64(1 << (width - 1))
      codes = (codes ^ sign) - sign
    codes = codes.view(np.int64)
  return codes.astype(dtype).reshape(shape)


def _unpack(buf: bytes, shape: tuple, dtype: np.dtype, width: int) -> np.ndarray:
  size = math.prod(shape)
  bits = np.unpackbits(np.frombuffer(buf, np.uint8), count=size * width).reshape(size, width)
  codes = np.zeros(size, np.uint64)
  for j in range(width):
    codes |= bits[:, j].astype(np.uint64) << np.uint64(width - 1 - j)
  return _from_codes(codes, shape, dtype, width)


# ----------------------------------------------------------------------------- entropy coding


def _ans():
  """constriction's stream coders (imported on first use: only the entropy codec needs them)."""
  try:
    import constriction  # pylint: disable=import-outside-toplevel
  except ImportError:
    raise WireError("payload: wire_codec entropy needs the constriction package "
                    "(pip install constriction==0.5.0)") from None
  return constriction.stream


def _model(counts) -> Any:
  """The categorical model of an ENTROPY node, rebuilt identically from its header's counts."""
  return _ans().model.Categorical(np.asarray(counts, np.float64), perfect=False)


def _histogram(codes: np.ndarray, width: int) -> tuple[np.ndarray, np.ndarray]:
  """(the distinct codes, ascending, uint64; how often each occurs, int64)."""
  if width <= 16:
    counts = np.bincount(codes.astype(np.int64), minlength=1 << width)
    present = np.flatnonzero(counts)
    return present.astype(np.uint64), counts[present]
  symbols, counts = np.unique(codes, return_counts=True)
  return symbols, counts.astype(np.int64)


def _symbol_index(codes: np.ndarray, symbols: np.ndarray, width: int) -> np.ndarray:
  """Each element's symbol: the position of its code among `symbols` (int32)."""
  if width <= 16:
    table = np.zeros(1 << width, np.int32)
    table[symbols.astype(np.int64)] = np.arange(len(symbols), dtype=np.int32)
    return table[codes.astype(np.int64)]
  return np.searchsorted(symbols, codes).astype(np.int32)


def _entropy_section(codes: np.ndarray, width: int, packed_len: int) -> bytes | None:
  """An ENTROPY node's bytes after its width (statistics, word count, ANS words), or None where
  they would not be fewer than the `packed_len` bytes of BITS (or break a decoder bound)."""
  size = codes.size
  if not size:
    return None
  symbols, counts = _histogram(codes, width)
  k = len(symbols)
  if k > MAX_SYMBOLS:
    return None
  gaps = [int(symbols[0])] + (np.diff(symbols) - np.uint64(1)).tolist()
  head = _varint(k) + b"".join(map(_varint, gaps)) + b"".join(_varint(int(c)) for c in counts)
  words = np.zeros(0, np.uint32)
  if k > 1:
    info = float(-(counts * np.log2(counts / size)).sum())  # size x H, bits
    # The code cannot undercut the information content by more than the coder's 64-bit state:
    # skip coding a tensor that cannot win.
    if len(head) + 1 + 4 * max(0, math.ceil((info - 64) / 32)) >= packed_len:
      return None
    coder = _ans().stack.AnsCoder()
    coder.encode_reverse(_symbol_index(codes, symbols, width), _model(counts))
    words = coder.get_compressed()
  section = head + _varint(len(words)) + _little_endian(words.astype(np.uint32))
  if len(section) >= packed_len or size > MAX_ELEMENTS_PER_BYTE * len(section):
    return None
  return section


def _decode_entropy(r: "_Reader", shape: tuple, dtype: np.dtype, width: int) -> np.ndarray:
  """The values of an ENTROPY node whose header up to `width` has been read; WireError unless
  every check of the module docstring holds (all before the elements are allocated)."""
  start, size = r.pos, math.prod(shape)

  def bad(reason: str) -> WireError:
    return WireError(f"payload: malformed at byte {start} (entropy-coded leaf: {reason})")

  k, most = r.varint(), min(size, 1 << width, MAX_SYMBOLS)
  if not 1 <= k <= most:
    raise bad(f"{k} symbols, allowed 1..{most}")
  symbols, code = [], -1
  for _ in range(k):
    code += r.varint() + 1
    symbols.append(code)
  if code >= 1 << width:
    raise bad(f"code {code} does not fit {width} bits")
  counts = [r.varint() for _ in range(k)]
  if min(counts) < 1 or sum(counts) != size:
    raise bad(f"symbol counts (each >= 1) sum to {sum(counts)}, the shape has {size} elements")
  nwords = r.varint()
  if (nwords == 0) != (k == 1):
    raise bad(f"{nwords} words for {k} symbols")
  words = r.take(4 * nwords)
  section, packed = r.pos - start, _bits_data_len(shape, width)
  if section >= packed:
    raise bad(f"{section} bytes, not fewer than the {packed} bytes packed")
  if size > MAX_ELEMENTS_PER_BYTE * section:
    raise bad(f"{size} elements in {section} bytes, more than {MAX_ELEMENTS_PER_BYTE} per byte")
  table = np.array(symbols, np.uint64)
  if k == 1:
    return _from_codes(np.full(size, table[0], np.uint64), shape, dtype, width)
  stream = _ans()
  try:
    coder = stream.stack.AnsCoder(np.frombuffer(words, "<u4").astype(np.uint32))
    index = coder.decode(_model(counts), size)
    exact = coder.is_empty() and np.array_equal(np.bincount(index, minlength=k), counts)
  except Exception as e:  # noqa: BLE001 - constriction refusing the words is malformed input
    raise bad(f"{type(e).__name__}: {' '.join(str(e).split())[:120]}") from None
  except BaseException as e:  # a Rust panic inside constriction (pyo3's PanicException)
    if type(e).__name__ != "PanicException":
      raise
    raise bad("the ANS decoder panicked") from None
  if not exact:
    raise bad("the words do not decode to the symbol counts")
  return _from_codes(table[index], shape, dtype, width)


# ----------------------------------------------------------------------------- encode / decode


def _shape_header(code: int, shape: tuple) -> bytes:
  return bytes([code]) + _varint(len(shape)) + b"".join(_varint(int(d)) for d in shape)


class _Writer:
  """An encoding in progress: its chunks, the codec, and how many ENTROPY nodes it holds."""

  def __init__(self, codec: str):
    self.chunks, self.codec, self.entropy_nodes = [], codec, 0


def _encode_node(node: Any, w: _Writer, tally: list | None = None,
                 root_tally: list | None = None) -> None:
  """Appends `node`'s bytes to `w`. `tally` receives the data bytes of every leaf below (after its
  header); `root_tally` (the root call only) the same for the leaves under its "weights" entry."""
  out = w.chunks
  if isinstance(node, dict):
    out.append(bytes([_DICT]) + _varint(len(node)))
    for k, v in node.items():
      key = k.encode()
      out.append(_varint(len(key)) + key)
      _encode_node(v, w, root_tally if root_tally is not None and k == "weights" else tally)
    return
  if isinstance(node, (list, tuple)) and not isinstance(node, Bits):
    out.append(bytes([_TUPLE if isinstance(node, tuple) else _LIST]) + _varint(len(node)))
    for v in node:
      _encode_node(v, w, tally)
    return
  if isinstance(node, Bits):
    values = np.asarray(node.values)
    _, dtype, width = _scalar_width(node)
    width = _check_width(width, dtype)
    head = _shape_header(_dtype_code(dtype), values.shape) + bytes([width])
    codes = _codes(values, width)
    data = (_entropy_section(codes, width, _bits_data_len(values.shape, width))
            if w.codec == "entropy" else None)
    w.entropy_nodes += data is not None
    out.append(bytes([_BITS if data is None else _ENTROPY]) + head)
    data = _pack(codes, width) if data is None else data
  else:
    arr = np.asarray(node)
    code = _dtype_code(arr.dtype)
    out.append(bytes([_ARRAY]) + _shape_header(code, arr.shape))
    data = np.packbits(arr.reshape(-1)).tobytes() if arr.dtype == np.bool_ else _little_endian(arr)
  out.append(data)
  if tally is not None:
    tally.append(len(data))


def _encode(payload: Any, codec: str) -> tuple[bytes, int]:
  """(``encode(payload, codec)``, the data bytes of the leaves under ``payload["weights"]``)."""
  _check_codec(codec)
  _check_keys(payload)
  w, weights = _Writer(codec), []
  _encode_node(jax.device_get(payload), w, root_tally=weights)
  return (MAGIC_ENTROPY if w.entropy_nodes else MAGIC) + b"".join(w.chunks), sum(weights)


def encode(payload: Any, codec: str = "packed") -> bytes:
  """One client's (or the broadcast) payload as bytes; see the module docstring for the format.

  codec: ``packed`` (every Bits leaf bit-packed) or ``entropy`` (each Bits leaf as the shorter of
    BITS and ENTROPY; without any ENTROPY leaf the bytes are exactly the packed ones).
  """
  return _encode(payload, codec)[0]


class _Reader:
  def __init__(self, data: bytes, entropy: bool, max_elements: int | None):
    self.data, self.pos = memoryview(data), 0
    self.entropy, self.entropy_nodes = entropy, 0
    self.max_elements, self.budget = max_elements, max_elements

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
    shape = tuple(self.varint() for _ in range(self.varint()))
    if self.budget is not None:  # counted before anything of the leaf is allocated
      self.budget -= math.prod(shape)
      if self.budget < 0:
        raise WireError(f"payload: more than the {self.max_elements} elements allowed, at byte "
                        f"{self.pos}")
    return _DTYPES[code], shape


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
  if tag == _BITS or (tag == _ENTROPY and r.entropy):
    dtype, shape = r.shape()
    width = _check_width(r.byte(), dtype)
    if tag == _ENTROPY:
      r.entropy_nodes += 1
      values = _decode_entropy(r, shape, dtype, width)
    else:
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


def decode(data: bytes, max_elements: int | None = None) -> Any:
  """Inverse of `encode` (either codec): nested dicts/lists/tuples of numpy arrays and `Bits`
  (width int32).

  max_elements: if given, a payload whose leaves claim more elements in all is refused as soon
    as its header says so (a validator that knows the expected shapes passes their total; pass
    it for untrusted bytes: an ENTROPY node may otherwise claim up to `MAX_ELEMENTS_PER_BYTE`
    elements per byte).

  Raises:
    WireError: for any bytes that are not an encoded payload (one line); a malformed header
      (non-UTF-8 keys, absurd shapes, bad symbol statistics, ...) never escapes as another
      exception type.
  """
  magic = bytes(data[:len(MAGIC)])
  if magic not in (MAGIC, MAGIC_ENTROPY):
    raise WireError(f"payload: not an encoded payload (magic {magic!r})")
  r = _Reader(data, magic == MAGIC_ENTROPY, max_elements)
  r.pos = len(MAGIC)
  try:
    payload = _decode_node(r)
  except (ValueError, TypeError, OverflowError, MemoryError, IndexError, KeyError) as e:
    # UnicodeDecodeError is a ValueError.
    raise WireError(f"payload: malformed at byte {r.pos} ({type(e).__name__}: "
                    f"{str(e).splitlines()[0][:120] if str(e) else ''})") from None
  if r.pos != len(data):
    raise WireError(f"payload: {len(data) - r.pos} trailing bytes after the payload")
  if r.entropy and not r.entropy_nodes:
    raise WireError(f"payload: magic {MAGIC_ENTROPY!r} (entropy-coded) but no entropy-coded leaf")
  return payload


# ----------------------------------------------------------------------------- the ledger


class Coded(NamedTuple):
  """What a payload costs under a codec: one message, or one per client of a stacked uplink."""
  sizes: np.ndarray      # int64 [C] (C = 1 for one message): len(encode(message_i, codec))
  weight_bits: float     # bits of the leaves under "weights", summed over the messages


def coded_sizes(payload: Any, codec: str = "packed", stacked: bool = False) -> Coded:
  """The ledger's exact sizes of `payload` (stacked over clients: one message per client).

  packed: `encoded_size` / `encoded_sizes` from shapes (no values leave the device) and
  `weight_bits` (width x size, the paper's numerator). entropy: the lengths depend on the values,
  so each message is really encoded from one host copy; weight_bits is 8 x the bytes each
  "weights" leaf takes after its header (an ENTROPY node's statistics and word count included,
  a leaf kept packed at its padded bytes).
  """
  _check_codec(codec)
  if codec == "packed":
    sizes = encoded_sizes(payload) if stacked else np.array([encoded_size(payload)], np.int64)
    return Coded(sizes, weight_bits(payload))
  host = jax.device_get(payload)
  messages = [unstack(host, i) for i in range(_num_clients(host))] if stacked else [host]
  encoded = [_encode(m, codec) for m in messages]
  return Coded(np.array([len(data) for data, _ in encoded], np.int64),
               float(8 * sum(weights for _, weights in encoded)))


def entropy_bits(payload: Any, stacked: bool = False) -> float:
  """The empirical entropy of ``payload["weights"]`` in bits: the limit of coding each tensor's
  elements under one per-tensor model, which the entropy codec approaches (headers aside).

  Each Bits leaf (each client's own tensor, when stacked over clients) counts size x H, with
  H = -sum_v p_v log2 p_v over the frequencies p_v of its values; plain arrays count their raw
  bits, as both codecs send them. Summed over the clients when stacked.
  """
  weights = payload.get("weights", {}) if isinstance(payload, dict) else {}
  total = 0.0
  for leaf in jax.tree.leaves(jax.device_get(weights), is_leaf=is_bits):
    if not is_bits(leaf):
      total += _leaf_bits(leaf)
      continue
    values = np.asarray(leaf.values)
    lead = values.shape[0] if stacked else 1
    for tensor in values.reshape(lead, values.size // max(lead, 1)):
      _, counts = np.unique(tensor, return_counts=True)
      total += float(-(counts * np.log2(counts / tensor.size)).sum())
  return total


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


def verify(payload: Any, name: str = "payload", codec: str = "packed") -> int:
  """Encodes and decodes `payload` with `codec`; raises WireError unless the length equals
  `encoded_size` (packed) or is at most it (entropy: never longer than packed) and the decoded
  payload equals the original exactly (Bits widths compared as int32). Returns the length in
  bytes."""
  data = encode(payload, codec)
  predicted = encoded_size(payload)
  if codec == "packed" and len(data) != predicted:
    raise WireError(f"{name}: encoded_size predicted {predicted} bytes, the encoding has {len(data)}")
  if len(data) > predicted:
    raise WireError(f"{name}: the {codec}-coded encoding has {len(data)} bytes, more than the "
                    f"{predicted} packed")
  host = jax.device_get(payload)
  host = jax.tree.map(lambda b: Bits(b.values, np.asarray(b.width, np.int32)) if is_bits(b) else b,
                      host, is_leaf=is_bits)
  if not _same(decode(data), host):
    raise WireError(f"{name}: the decoded payload differs from the one encoded")
  return len(data)
