"""Virtual bits: the client-side parameterisation of FedBiF (Sec. 3.1, 3.2).

Every bit-trained leaf of a Flax params pytree (conv and dense kernels by default) is replaced on
the client by ``m`` real-valued *virtual bits* of shape ``[m, *kernel.shape]``. The forward pass
turns them into binary bits with a step function whose gradient is the identity
(straight-through estimator, `ste_step`), rebuilds integers with Eq. 4 and weights with Eq. 3
(`weights_from_bits`). Only the *activated* bits receive gradients; frozen bits are constants.

A virtual-bit pytree is the params pytree *pruned* to its bit-trained leaves: the same nested
dict keys, each kept leaf with a leading bit axis. `pytrees.split_params` / `pytrees.merge_params`
move between a full params pytree and its (bit-trained, full-precision) halves.
"""
from __future__ import annotations

import math
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp

from fedbif_jax import pytrees
from fedbif_jax import quant

Params = pytrees.Params
Predicate = pytrees.Predicate


@jax.custom_vjp
def ste_step(v: jax.Array) -> jax.Array:
  """Step h(v) = 1 where v > 0 else 0, with the straight-through gradient dh/dv = 1 (Sec. 3.1).

  Args:
    v: float array [...].
  Returns:
    float array [...] (v's dtype) of exact 0.0 / 1.0.
  """
  return (v > 0).astype(v.dtype)


def _ste_fwd(v):
  return ste_step(v), None


def _ste_bwd(_, g):
  return (g,)


ste_step.defvjp(_ste_fwd, _ste_bwd)


@jax.custom_vjp
def scale_gradient(x: jax.Array, scale: jax.Array) -> jax.Array:
  """Identity in the forward pass; multiplies the incoming gradient by `scale` (broadcast to x).

  For plain SGD, the engine's optimizer, scaling a leaf's gradient by c is scaling its step by c:
  FedBiF's per-bit learning rates (`fedbif.bit_lr_scale`, `fedbif.bit_step`) are this. `scale`
  gets no gradient.
  """
  return x


def _scale_gradient_fwd(x, scale):
  return x, scale


def _scale_gradient_bwd(scale, g):
  return (g * scale).astype(g.dtype), jnp.zeros_like(scale)


scale_gradient.defvjp(_scale_gradient_fwd, _scale_gradient_bwd)


def fan_in(shape: tuple[int, ...]) -> int:
  """Fan-in of a Flax kernel (conv HWIO or dense IO): the product of all but the last axis."""
  return int(math.prod(shape[:-1])) if len(shape) > 1 else int(shape[0])


# How the virtual bits' initial magnitudes are drawn (`init_std`).
BIT_INITS = ("fan_in", "stacked_fan_in")


def init_std(shape: tuple[int, ...], rule: str = "fan_in") -> float:
  """Standard deviation of the Kaiming-normal virtual bits of a kernel of `shape` (no bit axis).

  * ``fan_in``: sqrt(2 / fan_in(shape)), the kernel's own fan-in (Flax HWIO / IO layout).
  * ``stacked_fan_in``: fan-in as PyTorch's ``kaiming_normal_`` computes it on one stacked bit
    tensor ``[m, out, in, k, k]`` (``size(1)`` times the receptive field, i.e. out * in * k * k):
    sqrt(2 / (fan_in(shape) * out)), sqrt(out) times smaller.

  The paper says only "Kaiming initialization". With plain SGD the initial scale is a hidden
  learning-rate multiplier: virtual bits drawn c times larger follow the same hard bits as the
  unscaled ones trained with 1/c of the step (their trajectories differ by the factor c), so
  ``stacked_fan_in`` equals ``fan_in`` with each kernel's bit step scaled by sqrt(out).
  """
  if rule not in BIT_INITS:
    raise ValueError(f"fedbif.bit_init: must be one of {', '.join(BIT_INITS)}, got {rule!r}")
  fan = fan_in(shape)
  if rule == "stacked_fan_in":
    fan *= int(shape[-1])
  return math.sqrt(2.0 / fan)


def init_virtual_bits(key: jax.Array, params: Params, m: int,
                      predicate: Predicate = pytrees.is_kernel, rule: str = "fan_in") -> dict:
  """Kaiming-normal virtual bits for every bit-trained leaf (Alg. 1, "Clients initialize ...").

  Args:
    key: PRNG key.
    params: a Flax params pytree (nested dicts of arrays).
    m: bit width.
    predicate: which leaves are bit-trained (default: conv and dense kernels).
    rule: `init_std`'s rule, ``fan_in`` (default) or ``stacked_fan_in``.
  Returns:
    Pruned nested dict: each bit-trained leaf of shape S becomes float32 [m, *S] drawn from
    N(0, init_std(S, rule)^2). Other leaves are absent.
  """
  m = quant.check_bits(m)
  bit_params, _ = pytrees.split_params(params, predicate)
  return pytrees.map_with_keys(
      lambda k, leaf: init_std(tuple(leaf.shape), rule) * jax.random.normal(
          k, (m,) + tuple(leaf.shape), jnp.float32), key, bit_params, rule="split")


def _check_same_structure(a: Params, b: Params, name_a: str, name_b: str) -> None:
  flat_a, flat_b = traverse_util.flatten_dict(a), traverse_util.flatten_dict(b)
  if flat_a.keys() != flat_b.keys():
    raise ValueError(f"{name_b}: leaves {sorted('/'.join(k) for k in flat_b)} do not match "
                     f"{name_a} leaves {sorted('/'.join(k) for k in flat_a)}")
  for path in flat_a:
    if tuple(flat_a[path].shape) != tuple(flat_b[path].shape):
      raise ValueError(f"{name_b}: leaf {'/'.join(path)} has shape {tuple(flat_b[path].shape)}, "
                       f"{name_a} has {tuple(flat_a[path].shape)}")


# The magnitude given to a virtual bit that is exactly 0, so that its sign can carry a bit.
_MIN_MAGNITUDE = 1e-6


def inherit(virtual_bits: Params, received_bits: Params) -> dict:
  """Virtual bits inheritance (VBI, Sec. 3.2): keep |v|, take the sign from the received bit.

  v_new = |v| if b == 1 else -|v|, so that ste_step(v_new) == b exactly. A virtual bit that is
  exactly 0 gets magnitude 1e-6 (a zero could not encode a 1).

  Args:
    virtual_bits: pruned nested dict of float [m, ...] (the client's own).
    received_bits: the same structure, 0/1 arrays [m, ...] decoded from the downlink (Eq. 4).
  Returns:
    The inherited virtual bits, same structure, shapes and dtypes as `virtual_bits`.
  """
  _check_same_structure(virtual_bits, received_bits, "virtual_bits", "received_bits")

  def one(v, b):
    magnitude = jnp.maximum(jnp.abs(v), _MIN_MAGNITUDE)
    return jnp.where(b > 0, magnitude, -magnitude).astype(v.dtype)

  return jax.tree.map(one, virtual_bits, received_bits)


def reinitialize(key: jax.Array, virtual_bits: Params, received_bits: Params,
                 rule: str = "fan_in") -> dict:
  """The "without VBI" ablation (Sec. 4.3): fresh Kaiming magnitudes (`init_std`'s `rule`),
  signs from the received bits."""
  fresh = pytrees.map_with_keys(
      lambda k, v: init_std(tuple(v.shape[1:]), rule) * jax.random.normal(k, v.shape, v.dtype),
      key, virtual_bits, rule="split")
  return inherit(fresh, received_bits)


def _bit_weights(m: int, ndim: int) -> jax.Array:
  return (2.0 ** jnp.arange(m, dtype=jnp.float32)).reshape((m,) + (1,) * ndim)


def leaf_from_bits(v: jax.Array, alpha: jax.Array, active: jax.Array, m: int,
                   encoding: str = "offset") -> jax.Array:
  """One leaf of `weights_from_bits`: v float [m, ...] -> weights float [...]."""
  if v.shape[0] != m:
    raise ValueError(f"virtual_bits: leading axis must have length m={m}, got shape {v.shape}")
  mask = jnp.asarray(active, bool).reshape((m,) + (1,) * (v.ndim - 1))
  h = ste_step(v)
  h = jnp.where(mask, h, jax.lax.stop_gradient(h))
  w = _bit_weights(m, v.ndim - 1)
  if encoding == "offset":
    integer = jnp.sum(w * h, axis=0) - 2.0 ** (m - 1)
  else:
    integer = (1.0 - 2.0 * h[-1]) * jnp.sum(w[:-1] * h[:-1], axis=0)
  return alpha * integer


def weights_from_bits(virtual_bits: Params, alpha: Params, active: jax.Array, m: int,
                      encoding: str = "offset") -> dict:
  """Rebuilds weights alpha * (sum_i 2^i h(v_i) - 2^(m-1)) from virtual bits (Eq. 4, 3).

  Gradients reach only the activated bits: for an active bit i,
  dL/dv_i = alpha * 2^i * dL/dw (straight-through); frozen bits are `stop_gradient` constants.

  Args:
    virtual_bits: pruned nested dict of float32 [m, ...].
    alpha: the same structure with float32 scalars (the layers' step sizes, Eq. 5).
    active: bool [m], the selector's mask shared by all leaves.
    m: bit width.
    encoding: "offset" (the paper) or "sign_magnitude" (the sign-bit ablation).
  Returns:
    Pruned nested dict of float32 weights [...] (the bit axis removed).
  """
  quant.check_bits(m, encoding=encoding)
  if tuple(jnp.shape(active)) != (m,):
    raise ValueError(f"active: must be a bool mask of shape ({m},), got shape {jnp.shape(active)}")
  return jax.tree.map(lambda v, a: leaf_from_bits(v, a, active, m, encoding), virtual_bits, alpha)


def hard_bits(virtual_bits: Params) -> dict:
  """The binary bits the virtual bits currently encode: uint8 [m, ...] per leaf."""
  return jax.tree.map(lambda v: (v > 0).astype(jnp.uint8), virtual_bits)
