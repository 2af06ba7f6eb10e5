"""Payloads as uint8 arrays for a transport, and the server's check of what a client sent.

Owns the boundary between untrusted bytes and the library (no flwr import):

* `to_array(payload, codec)` - the `wire.encode` bytes (``packed`` or ``entropy``, the run's
  ``wire_codec``) as a 1-D uint8 numpy array (what a Flower `Array` carries); `from_array(data)`
  - the inverse, for input that needs no spec (a client decoding the server's downlink; either
  codec); every failure is a `PayloadError`;
* a *spec* - what a payload must look like: the same nested dicts / lists / tuples as the
  payload, with a `Leaf` in place of every array: plain array or `Bits`, dtype, shape and, for
  `Bits`, the bit width when the algorithm fixes it (FedBiF's uplink: 1 bit) or ``None`` when it
  depends on the client's data (FedDQ, DAdaQuant: any width the dtype holds). `spec_of` reads
  one off a payload or its shapes; `uplink_spec` traces one client's `client_finish` to get the
  uplink the server expects in a round;
* `validate(data, spec, codec=...)` - checks a client's bytes against a spec and returns the
  decoded payload, or raises `PayloadError` whose message is one line saying why.

`validate` checks, in order: the container (bytes, or a 1-D uint8 array); the length, within the
bounds the spec allows (`size_bounds`: exact when every width is fixed and the codec is packed;
with the entropy codec from the smallest entropy-coded form up to the packed length, which an
entropy-coded payload never exceeds), so that a huge or truncated message is refused before
decoding; the codec (an entropy-coded payload when the run is packed is refused); `wire.decode`
under a guard, with the spec's total element count as its allocation bound (wrong magic,
unknown tag or dtype, bad width, truncation, trailing bytes, non-UTF-8 keys, absurd shapes,
malformed symbol statistics or ANS words, nesting too deep: anything it raises becomes a
`PayloadError`); the tree (dict keys, list / tuple kind and length); every leaf's
kind, dtype, shape and width; every floating-point value finite. It does not check an
algorithm's semantics beyond the format (e.g. that a DAdaQuant client's "levels" match its
widths): a well-formed payload with implausible values is aggregated.
"""
from __future__ import annotations

import dataclasses
import math
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np

from fedbif_jax import wire
from fedbif_jax.pytrees import Bits


class PayloadError(ValueError):
  """Bytes that are not the payload expected; the message is one line naming what is wrong."""


@dataclasses.dataclass(frozen=True)
class Leaf:
  """One array of a spec. ``width`` (Bits only): the fixed bits per element, or None for any
  width in 1..(bits of dtype)."""
  shape: tuple
  dtype: np.dtype
  bits: bool = False
  width: int | None = None


def _one_line(text: Any, limit: int = 200) -> str:
  text = " ".join(str(text).split())
  return text if len(text) <= limit else text[:limit - 3] + "..."


def _fail(name: str, reason: str) -> PayloadError:
  return PayloadError(_one_line(f"{name}: {reason}", 300))


# ----------------------------------------------------------------------------- arrays


def to_array(payload: Any, codec: str = "packed") -> np.ndarray:
  """``wire.encode(payload, codec)`` as a 1-D uint8 array (read-only, no copy of the bytes)."""
  return np.frombuffer(wire.encode(payload, codec), np.uint8)


def _as_bytes(data: Any, name: str) -> bytes:
  if isinstance(data, (bytes, bytearray, memoryview)):
    return bytes(data)
  if isinstance(data, np.ndarray):
    if data.dtype != np.uint8:
      raise _fail(name, f"expected a uint8 array, got dtype {data.dtype}")
    if data.ndim != 1:
      raise _fail(name, f"expected a 1-D uint8 array, got shape {data.shape}")
    return data.tobytes()
  raise _fail(name, f"expected bytes or a 1-D uint8 array, got {type(data).__name__}")


def _decode(buf: bytes, name: str, max_elements: int | None = None) -> Any:
  try:
    return wire.decode(buf, max_elements)
  except RecursionError:
    raise _fail(name, "nested too deeply") from None
  except wire.WireError as e:
    raise _fail(name, str(e).removeprefix("payload: ")) from None
  except Exception as e:  # noqa: BLE001 - any other failure of the decoder is malformed input
    raise _fail(name, f"undecodable ({type(e).__name__}: {_one_line(e, 120)})") from None


def from_array(data: Any, name: str = "payload", max_bytes: int | None = None,
               max_elements: int | None = None) -> Any:
  """Decodes bytes or a 1-D uint8 array written by `to_array`; raises PayloadError. The bounds
  refuse a longer message, or one whose header claims more elements in all (`wire.decode`)."""
  buf = _as_bytes(data, name)
  if max_bytes is not None and len(buf) > max_bytes:
    raise _fail(name, f"{len(buf)} bytes, more than the {max_bytes} allowed")
  return _decode(buf, name, max_elements)


# ----------------------------------------------------------------------------- specs


def _walk(node: Any, leaf_fn) -> Any:
  """The same nested dicts / lists / tuples with `leaf_fn` applied to Bits and arrays."""
  if isinstance(node, dict):
    return {k: _walk(v, leaf_fn) for k, v in node.items()}
  if isinstance(node, Bits):
    return leaf_fn(node)
  if isinstance(node, list):
    return [_walk(v, leaf_fn) for v in node]
  if isinstance(node, tuple) and not hasattr(node, "_fields"):
    return tuple(_walk(v, leaf_fn) for v in node)
  return leaf_fn(node)


def spec_of(payload: Any) -> Any:
  """The spec a payload (arrays, or their `jax.ShapeDtypeStruct`s) satisfies. A `Bits` width is
  fixed when it is a concrete scalar and free (None) when it is only a shape."""
  def leaf(node):
    if isinstance(node, Bits):
      width = node.width
      fixed = None if isinstance(width, jax.ShapeDtypeStruct) else int(np.asarray(width))
      return Leaf(tuple(np.shape(node.values)), np.dtype(node.values.dtype), True, fixed)
    return Leaf(tuple(node.shape), np.dtype(node.dtype))
  return _walk(payload, leaf)


def uplink_spec(local, downlink: Any, client_state: Any, key: jax.Array) -> Any:
  """The spec of the uplink one client sends in a round with this downlink.

  Traces `local.start` and `local.finish` (`fedbif_jax/client.py`; no training step runs) for
  shapes and dtypes. A `Bits` width is fixed where the traced width is a constant of the
  program (independent of the client's data, state and training: FedBiF's and SignSGD's 1 bit,
  FedPAQ's b bits), free where it is computed (FedDQ, DAdaQuant).

  Args:
    local: the algorithm's `LocalTraining`.
    downlink, client_state, key: the round's downlink and one client's state and key (arrays
      or `jax.ShapeDtypeStruct`s; only their shapes and dtypes are used).
  """
  carry = jax.eval_shape(local.start, downlink, client_state, key)

  def uplink_of(downlink, client_state, carry, key):
    return local.finish(downlink, client_state, carry, key)[0]

  closed, shapes = jax.make_jaxpr(uplink_of, return_shape=True)(downlink, client_state, carry, key)
  consts = dict(zip(closed.jaxpr.constvars, closed.consts))

  def constant(var):
    if isinstance(var, jex.core.Literal):
      return var.val
    return consts.get(var)

  flat, treedef = jax.tree.flatten(shapes)
  known = [constant(v) for v in closed.jaxpr.outvars]
  positions = jax.tree.unflatten(treedef, list(range(len(flat))))

  def leaf(node):
    if isinstance(node, Bits):
      values, width = flat[node.values], known[node.width]
      fixed = int(np.asarray(width)) if width is not None and np.ndim(width) == 0 else None
      return Leaf(tuple(values.shape), np.dtype(values.dtype), True, fixed)
    return Leaf(tuple(flat[node].shape), np.dtype(flat[node].dtype))
  return _walk(positions, leaf)


def _skeleton(spec: Any, bound: str) -> Any:
  """Shapes of a payload satisfying `spec`, free widths at their smallest or largest value."""
  def leaf(node: Leaf):
    values = jax.ShapeDtypeStruct(node.shape, node.dtype)
    if not node.bits:
      return values
    width = node.width if node.width is not None else (
        1 if bound == "min" else np.dtype(node.dtype).itemsize * 8)
    return Bits(values, width)
  return _walk(spec, leaf)


def size_bounds(spec: Any, codec: str = "packed") -> tuple[int, int]:
  """(smallest, largest) length in bytes of ``wire.encode(p, codec)`` for a payload p satisfying
  `spec` (packed: equal when every width is fixed). Entropy coding keeps a Bits leaf packed
  unless its coded form is shorter, so the largest is the packed one for both codecs."""
  return (wire.min_encoded_size(_skeleton(spec, "min"), codec),
          wire.encoded_size(_skeleton(spec, "max")))


def num_elements(spec: Any) -> int:
  """Elements of all the leaves of a payload satisfying `spec`."""
  return sum(math.prod(leaf.shape) for leaf in jax.tree.leaves(spec))


# ----------------------------------------------------------------------------- validation


def _is_float(dtype: np.dtype) -> bool:
  return bool(jnp.issubdtype(dtype, jnp.floating))


def _match(node: Any, spec: Any, name: str, path: str) -> None:
  where = path or "the payload"
  if isinstance(spec, dict):
    if not isinstance(node, dict):
      raise _fail(name, f"{where}: expected a dict, got {_kind(node)}")
    if set(node) != set(spec):
      missing, extra = sorted(set(spec) - set(node)), sorted(set(node) - set(spec))
      raise _fail(name, f"{where}: keys differ (missing {missing[:4]}, unexpected "
                        f"{[_one_line(k, 40) for k in extra[:4]]})")
    for k, v in spec.items():
      _match(node[k], v, name, f"{path}/{k}" if path else k)
    return
  if isinstance(spec, (list, tuple)):
    if type(node) is not type(spec):
      raise _fail(name, f"{where}: expected a {type(spec).__name__}, got {_kind(node)}")
    if len(node) != len(spec):
      raise _fail(name, f"{where}: expected {len(spec)} items, got {len(node)}")
    for i, (n, s) in enumerate(zip(node, spec)):
      _match(n, s, name, f"{path}[{i}]")
    return
  if spec.bits:
    if not isinstance(node, Bits):
      raise _fail(name, f"{where}: expected Bits, got {_kind(node)}")
    values = node.values
  else:
    if not isinstance(node, np.ndarray):
      raise _fail(name, f"{where}: expected an array, got {_kind(node)}")
    values = node
  if values.dtype != spec.dtype:
    raise _fail(name, f"{where}: dtype {values.dtype.name}, expected {np.dtype(spec.dtype).name}")
  if tuple(values.shape) != tuple(spec.shape):
    raise _fail(name, f"{where}: shape {tuple(values.shape)}, expected {tuple(spec.shape)}")
  if spec.bits and spec.width is not None and int(node.width) != spec.width:
    raise _fail(name, f"{where}: {int(node.width)} bits per element, expected {spec.width}")
  if _is_float(values.dtype):
    with np.errstate(all="ignore"):
      finite = np.isfinite(values.astype(np.float64) if values.dtype.itemsize < 8 else values)
    if not finite.all():
      bad = int(finite.size - finite.sum())
      raise _fail(name, f"{where}: {bad} non-finite value{'s' if bad > 1 else ''} (NaN or inf)")


def _kind(node: Any) -> str:
  if isinstance(node, Bits):
    return "Bits"
  if isinstance(node, np.ndarray):
    return f"an array {node.dtype.name}{list(node.shape)}"
  return type(node).__name__


def validate(data: Any, spec: Any, name: str = "payload", codec: str = "packed") -> Any:
  """The payload in `data` (bytes or a 1-D uint8 array) if it satisfies `spec` and was encoded
  with `codec` (``entropy`` accepts packed leaves too: the encoder keeps a leaf packed where
  that is shorter); otherwise raises `PayloadError` with a one-line reason (see the module
  docstring for the checks)."""
  buf = _as_bytes(data, name)
  lo, hi = size_bounds(spec, codec)
  if not lo <= len(buf) <= hi:
    expected = f"{lo}" if lo == hi else f"{lo}..{hi}"
    raise _fail(name, f"{len(buf)} bytes, expected {expected}")
  if codec == "packed" and buf.startswith(wire.MAGIC_ENTROPY):
    raise _fail(name, "entropy-coded, but this run's wire_codec is packed")
  payload = _decode(buf, name, num_elements(spec))
  try:
    _match(payload, spec, name, "")
  except PayloadError:
    raise
  except Exception as e:  # noqa: BLE001 - a decoded tree that the checks cannot read
    raise _fail(name, f"unreadable structure ({type(e).__name__}: {_one_line(e, 120)})") from None
  return payload
