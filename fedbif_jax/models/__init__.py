"""Flax models by name, and which of their leaves FedBiF bit-trains.

`get_model(name, num_classes)` returns an unbound Flax module whose ``__call__(x, train, mask)``
maps float32 images [B, H, W, C] to logits float32 [B, num_classes]. ``mask`` (float [B],
1 = real example) lets BatchNorm models ignore padded examples; models without BatchNorm ignore
it. BatchNorm statistics live in the ``batch_stats`` collection (``train=True`` needs it mutable).

| name | model | parameters (32x32x3 inputs) |
|---|---|---|
| ``cnn`` | the small CNN of the engine (`cnn.py`), no BatchNorm | 545,098 (10 classes) |
| ``cnn_bn`` | the same CNN with BatchNorm after each conv (`cnn.py`), the CPU study's model | 545,194 (10 classes) |
| ``vgg11_lite`` | VGG11 at 7/8 width with BatchNorm (`vgg.py`), for SVHN | 7,066,818 (10 classes) |
| ``resnet18`` | CIFAR ResNet-18 (`resnet.py`) | 11,173,962 (10 classes) |
| ``resnet34`` | CIFAR ResNet-34 (`resnet.py`) | 21,328,292 (100 classes) |

`kernel_call_order` lists a model's kernels in the order a forward pass uses them, and
`bit_trained_predicate` builds the predicate that decides which params leaves FedBiF bit-trains:
every conv and dense kernel, or all but the first and the last with ``full_precision_first_last``.
"First" and "last" come from that forward trace, not from the params tree, whose keys sort
alphabetically (``head`` < ``stage1_block0`` < ``stem_conv``).
"""
from __future__ import annotations

import functools
from typing import Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

from fedbif_jax import pytrees
from fedbif_jax import registry
from fedbif_jax.errors import check
from fedbif_jax.models.cnn import SmallCNN, SmallCNNBN
from fedbif_jax.models.resnet import RESNET18_STAGES, RESNET34_STAGES, ResNet
from fedbif_jax.models.vgg import VGG, VGG11_LITE_WIDTHS

MODELS = {
    "cnn": SmallCNN,
    "cnn_bn": SmallCNNBN,
    "resnet18": functools.partial(ResNet, stage_sizes=RESNET18_STAGES),
    "resnet34": functools.partial(ResNet, stage_sizes=RESNET34_STAGES),
    "vgg11_lite": functools.partial(VGG, widths=VGG11_LITE_WIDTHS),
}


def register_model(name: str, factory, *, replace: bool = False) -> None:
  """Adds a user model under `name`, selectable as ``config.model.name``.

  Args:
    name: the config value that picks it.
    factory: a callable ``factory(num_classes=K)`` returning a Flax module whose
      ``__call__(x, train, mask)`` maps float32 images [B, H, W, C] to logits [B, K] (see this
      module's docstring); conv and dense kernels named ``kernel`` are bit-trained by FedBiF.
    replace: allow replacing a model already registered under `name`.
  Registration lives in this process: a Flower SuperNode or another host must run the same
  registration (e.g. in the module that builds its config) before the model is used.
  """
  registry.add(MODELS, "model", name, factory, replace)


def get_model(name: str, num_classes: int) -> nn.Module:
  """The model registered under `name` with a `num_classes`-way classifier."""
  check(name in MODELS, "model.name", f"one of {', '.join(sorted(MODELS))}", name)
  return MODELS[name](num_classes=num_classes)


def kernel_call_order(model: nn.Module, input_shape: Sequence[int]) -> list[tuple[str, ...]]:
  """Params paths of the model's kernels in the order a forward pass first uses them.

  Traces ``model.init`` abstractly (`jax.eval_shape`, no FLOPs) and records every module that
  owns a ``kernel`` param as its ``__call__`` returns.

  Args:
    model: a Flax module called as ``model.init(key, x, train=False)``.
    input_shape: the shape of x, e.g. (1, 32, 32, 3).
  Returns:
    Paths such as ``("stem_conv", "kernel")``, each once, first use first.
  """
  order: list[tuple[str, ...]] = []

  def record(next_fun, args, kwargs, context):
    out = next_fun(*args, **kwargs)
    module = context.module
    if context.method_name == "__call__" and module.has_variable("params", "kernel"):
      path = tuple(module.path) + ("kernel",)
      if path not in order:
        order.append(path)
    return out

  sample = jax.ShapeDtypeStruct(tuple(input_shape), jnp.float32)
  with nn.intercept_methods(record):
    jax.eval_shape(lambda x: model.init(jax.random.key(0), x, train=False), sample)
  return order


def bit_trained_predicate(model: nn.Module, input_shape: Sequence[int],
                          full_precision_first_last: bool = False) -> pytrees.Predicate:
  """The predicate (path, leaf) -> bool of the params leaves FedBiF bit-trains.

  Every conv and dense kernel (`pytrees.is_kernel`); with `full_precision_first_last`, all but the
  first and the last kernel of the forward pass (`kernel_call_order`), which then travel in full
  precision like biases and BatchNorm leaves (never bit-trained).
  """
  check(isinstance(full_precision_first_last, bool), "fedbif.full_precision_first_last",
        "True or False", full_precision_first_last)
  if not full_precision_first_last:
    return pytrees.is_kernel
  order = kernel_call_order(model, input_shape)
  excluded = frozenset({order[0], order[-1]}) if order else frozenset()

  def predicate(path, leaf) -> bool:
    return pytrees.is_kernel(path, leaf) and tuple(path) not in excluded

  return predicate
