"""What a run measures: test accuracy and loss, sparsity of the broadcast model (curves:
`fedbif_jax.plots`).

* `make_evaluator` - accuracy and mean cross-entropy of the global model on the whole test set
  (BatchNorm in eval mode), batch by batch with jitted calls (no while loop), one host transfer.
* `sparsity` - the fraction of zero integers among the broadcast model's bit-trained weights
  (Sec. 4.4: a FedBiF weight is pruned when all bits but the most significant are 0). For
  full-precision payloads it is the fraction of exact zeros.
"""
from __future__ import annotations

from typing import Callable

import jax
import jax.numpy as jnp
import numpy as np
import optax

from fedbif_jax import data as data_lib
from fedbif_jax import xla_options
from fedbif_jax.pytrees import is_bits


EVAL_SPLITS = ("test", "validation")


def make_evaluator(model, eval_variables: Callable, dataset, batch_size: int,
                   split: str = "test") -> Callable[..., tuple[float, float]]:
  """Returns evaluate(server_state) -> (accuracy, mean loss) over one split of `dataset`:
  ``test`` (x_test, y_test) or ``validation`` (x_val, y_val, held out of the training set)."""
  if split not in EVAL_SPLITS:
    raise ValueError(f"split: must be one of {', '.join(EVAL_SPLITS)}, got {split!r}")
  x_eval = jnp.asarray(dataset.x_test if split == "test" else dataset.x_val)
  y_eval = jnp.asarray(dataset.y_test if split == "test" else dataset.y_val)
  if len(y_eval) == 0:
    raise ValueError(f"split: the {split} split is empty")
  idx, mask = data_lib.eval_batches(len(y_eval), batch_size)
  idx, mask = jnp.asarray(idx), jnp.asarray(mask)
  mean, std = jnp.asarray(dataset.mean), jnp.asarray(dataset.std)

  @xla_options.jit
  def batch_stats(variables, x, y, batch_idx, batch_mask):
    logits = model.apply(variables, data_lib.normalize(x[batch_idx], mean, std), train=False)
    labels = y[batch_idx]
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, labels)
    correct = (jnp.argmax(logits, -1) == labels).astype(jnp.float32)
    return jnp.sum(correct * batch_mask), jnp.sum(loss * batch_mask)

  to_variables = jax.jit(eval_variables)
  total = float(len(y_eval))

  def evaluate(server_state) -> tuple[float, float]:
    variables = to_variables(server_state)
    correct, loss = jnp.zeros(()), jnp.zeros(())
    for b in range(idx.shape[0]):
      c, l = batch_stats(variables, x_eval, y_eval, idx[b], mask[b])
      correct, loss = correct + c, loss + l
    correct, loss = jax.device_get((correct, loss))
    return float(correct) / total, float(loss) / total

  return evaluate


def _weight_values(payload) -> list:
  leaves = jax.tree.leaves(payload["weights"], is_leaf=is_bits)
  return [leaf.values if is_bits(leaf) else leaf for leaf in leaves]


@jax.jit
def _zero_count(payload) -> jax.Array:
  return sum(jnp.sum(values == 0) for values in _weight_values(payload))


def sparsity(payload) -> float:
  """Fraction of zero entries among ``payload["weights"]`` (integers of `Bits`, or floats).

  One reduction on the device and one scalar copied to the host.
  """
  total = sum(values.size for values in _weight_values(payload))
  return int(_zero_count(payload)) / max(total, 1)


def make_lipschitz_probe(model, eval_variables: Callable, input_shape, iterations: int = 50
                         ) -> Callable[..., tuple[float, dict]]:
  """Returns probe(server_state, key) -> (Lipschitz upper bound, last-layer histogram).

  The bound is `lipschitz.lipschitz_upper_bound` (product of per-layer spectral norms, BN folded),
  compiled once. The histogram (Fig. 5) is of the last conv/dense kernel in call order:
  ``{"layer", "edges", "counts"}`` with 41 bins over [-max|w|, max|w|].
  """
  from fedbif_jax import lipschitz

  example = jnp.zeros((1,) + tuple(input_shape), jnp.float32)

  @jax.jit
  def norms(server_state, key):
    variables = eval_variables(server_state)
    layers = lipschitz.linear_layers(model, variables, example)
    return jnp.stack([lipschitz.spectral_norm(l.apply, (1,) + l.input_shape,
                                              jax.random.fold_in(key, i), iterations)
                      for i, l in enumerate(layers)])

  last_path = []  # the last layer's params path: the model's structure, found on the first call

  def last_kernel(server_state):
    variables = eval_variables(server_state)
    if not last_path:
      last_path.extend(lipschitz.linear_layers(model, variables, example)[-1].path)
    path = tuple(last_path)
    tree = variables["params"]
    for name in path:
      tree = tree[name]
    return "/".join(path), np.asarray(tree["kernel"]).ravel()

  def probe(server_state, key) -> tuple[float, dict]:
    bound = float(np.prod(np.asarray(norms(server_state, key), np.float64)))
    layer, w = last_kernel(server_state)
    edge = float(np.abs(w).max()) or 1.0
    counts, edges = np.histogram(w, bins=41, range=(-edge, edge))
    return bound, {"layer": layer, "edges": edges.tolist(), "counts": counts.tolist()}

  return probe
