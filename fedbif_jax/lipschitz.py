"""An upper bound on a model's Lipschitz constant (FedBiF Sec. 4.4, Fig. 6).

Following Virmaux & Scaman (2018, "AutoLip"), the bound is the product over layers of each
layer's spectral norm (its largest singular value as a linear map), the activations, pooling and
flattening being 1-Lipschitz. Each conv or dense layer is treated as the linear map it applies to
inputs of the shape it actually sees (so convolutions are not flattened to their kernels), and
the first BatchNorm after one (in eval mode: a per-channel affine map D) is folded into it. That
BatchNorm may follow the layer directly or through per-channel 1-Lipschitz operations (ReLU, a
max-pool over disjoint windows, as in the ``cnn_bn`` model): D scales each channel by one
constant, so |D phi(u) - D phi(v)| <= |D (u - v)| element- or window-wise, and ||D A|| still
bounds the pair.

Spectral norms come from power iteration on A^T A, with A u from `jax.jvp` and A^T v from
`jax.vjp` of the layer (biases drop out: the derivative of an affine map is its linear part), so
any Flax Conv/Dense configuration (strides, padding, dilation) is handled by Flax's own code.

For residual networks the product over layers is still an upper bound of the chain of layers it
sees, but it ignores the skip connections; it is the quantity the issue and the paper's Fig. 6
compare between algorithms, not a tight constant.
"""
from __future__ import annotations

from typing import Callable, NamedTuple

import flax.linen as nn
import jax
import jax.numpy as jnp
from jax import lax


class Layer(NamedTuple):
  path: tuple[str, ...]
  apply: Callable[[jax.Array], jax.Array]  # x [1, ...] -> y, affine in x
  input_shape: tuple[int, ...]


def spectral_norm(fn: Callable[[jax.Array], jax.Array], input_shape: tuple[int, ...],
                  key: jax.Array, iterations: int = 50) -> jax.Array:
  """Largest singular value of the linear part of an affine `fn`, by power iteration.

  Args:
    fn: affine map from float32 arrays of `input_shape` to any shape.
    input_shape: its input shape (e.g. [1, H, W, C]).
    key: PRNG key for the starting vector.
    iterations: power-iteration steps on A^T A.
  Returns:
    float32 scalar sigma_max(A) (a lower estimate that converges from below).
  """
  x0 = jnp.zeros(input_shape, jnp.float32)
  _, transpose = jax.vjp(fn, x0)
  forward = lambda u: jax.jvp(fn, (x0,), (u,))[1]

  def body(_, u):
    v = transpose(forward(u))[0]
    return v / jnp.maximum(jnp.linalg.norm(v), 1e-30)

  u = jax.random.normal(key, input_shape, jnp.float32)
  u = jax.lax.fori_loop(0, iterations, body, u / jnp.linalg.norm(u))
  return jnp.linalg.norm(forward(u))


def linear_layers(model: nn.Module, variables: dict, x: jax.Array) -> list[Layer]:
  """The model's Conv/Dense layers in call order, each with a following BatchNorm folded in.

  Runs one eval-mode forward pass on `x` (e.g. a single example [1, H, W, C]) and records every
  `nn.Conv`/`nn.Dense` call with its input shape, and every `nn.BatchNorm` that is the next
  Conv/Dense/BatchNorm call after such a layer and normalises its channels (module docstring:
  directly after it, or after a ReLU or max-pool of its output).
  """
  records: list[dict] = []

  def interceptor(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name != "__call__":
      return out
    if isinstance(module, (nn.Conv, nn.Dense)):
      # lax's own convolution: the models' (`fedbif_jax.models.conv`) is a jax.custom_vjp, which
      # has no forward mode; the linear map is the same.
      plain = ({"conv_general_dilated": lax.conv_general_dilated}
               if isinstance(module, nn.Conv) else {})
      records.append({"path": module.scope.path, "module": module.clone(parent=None, **plain),
                      "shape": tuple(args[0].shape), "out": out, "bn": None, "closed": False})
    elif isinstance(module, nn.BatchNorm):
      last = records[-1] if records else None
      if (last is not None and not last["closed"]
          and args[0].shape[-1] == last["out"].shape[-1]):
        last["bn"] = (module.scope.path, module.clone(parent=None, use_running_average=True))
      if last is not None:
        last["closed"] = True
    return out

  with nn.intercept_methods(interceptor):
    model.apply(variables, x, train=False)

  def subtree(collection, path):
    tree = variables.get(collection, {})
    for name in path:
      tree = tree[name]
    return tree

  layers = []
  for r in records:
    layer_vars = {"params": subtree("params", r["path"])}
    fn = lambda z, m=r["module"], v=layer_vars: m.apply(v, z)
    if r["bn"] is not None:
      bn_path, bn = r["bn"]
      bn_vars = {"params": subtree("params", bn_path),
                 "batch_stats": subtree("batch_stats", bn_path)}
      fn = lambda z, f=fn, b=bn, v=bn_vars: b.apply(v, f(z))
    layers.append(Layer(r["path"], fn, r["shape"][1:]))
  return layers


def lipschitz_upper_bound(model: nn.Module, variables: dict, input_shape: tuple[int, ...],
                          key: jax.Array, iterations: int = 50) -> tuple[float, dict[str, float]]:
  """Product of the per-layer spectral norms (AutoLip) of the model at `variables`.

  Args:
    model, variables: a Flax model called as ``model.apply(variables, x, train=False)``.
    input_shape: one example's shape, e.g. (32, 32, 3); it fixes what each convolution sees.
    key: PRNG key for the power iterations.
  Returns:
    (bound, {layer path: spectral norm}), floats.
  """
  x = jnp.zeros((1,) + tuple(input_shape), jnp.float32)
  norms = {}
  for i, layer in enumerate(linear_layers(model, variables, x)):
    sigma = spectral_norm(layer.apply, (1,) + layer.input_shape, jax.random.fold_in(key, i),
                          iterations)
    norms["/".join(layer.path)] = float(sigma)
  bound = 1.0
  for sigma in norms.values():
    bound *= sigma
  return bound, norms
