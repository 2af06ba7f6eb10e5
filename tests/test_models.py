"""The models (`fedbif_jax/models/`) and BatchNorm in federated training.

Parameter counts and output shapes; every model trained under FedBiF, jitted, for 2 clients;
BatchNorm ignoring padded examples; BatchNorm statistics aggregated as the clients' weighted mean;
which kernels are bit-trained (the full-precision first/last option).

Keys made here use the "rbg" PRNG: XLA compiles its generator in well under a second where a
threefry normal draw costs 1-2 s per distinct kernel shape on this 2-core CPU (ResNet-34 has 37
kernels). The tests check shapes and dataflow, not random streams.
"""
import functools
import json

import chex
import flax.linen as nn
import flax.traverse_util as traverse_util
import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from conftest import small_config
from fedbif_jax import pytrees
from fedbif_jax import data as data_lib
from fedbif_jax.algorithms import get_algorithm
from fedbif_jax.algorithms.base import RoundInfo
from fedbif_jax.client import Batches, TrainData, make_local_training
from fedbif_jax.errors import ConfigError
from fedbif_jax.models import (MODELS, bit_trained_predicate, get_model, kernel_call_order)
from fedbif_jax.models.layers import batch_norm, conv3x3
from fedbif_jax.train import train_and_evaluate
from fedbif_jax.pytrees import Bits

CIFAR = (32, 32, 3)
# name, classes, parameters (BatchNorm scale/bias included, running statistics not), #kernels
MODEL_CASES = [
    ("cnn", 10, 545_098, 4),
    ("cnn_bn", 10, 545_194, 4),
    ("vgg11_lite", 10, 7_066_818, 9),
    ("resnet18", 10, 11_173_962, 21),
    ("resnet34", 100, 21_328_292, 37),
]


def _key(seed):
  return jax.random.key(seed, impl="rbg")


def _abstract_variables(model, shape=CIFAR):
  return jax.eval_shape(lambda: model.init(_key(0), jnp.zeros((1,) + shape), train=False))


def traverse(tree):
  """(path, leaf) pairs of a nested dict."""
  return traverse_util.flatten_dict(tree).items()


def _count(tree):
  return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(tree))


def test_registry_lists_the_paper_models():
  assert sorted(MODELS) == ["cnn", "cnn_bn", "resnet18", "resnet34", "vgg11_lite"]
  with pytest.raises(ConfigError) as info:
    get_model("resnet19", 10)
  assert str(info.value) == ("model.name: must be one of cnn, cnn_bn, resnet18, resnet34, "
                             "vgg11_lite, "
                             "got 'resnet19'")


@pytest.mark.parametrize("name, classes, params, kernels", MODEL_CASES)
def test_parameter_counts(name, classes, params, kernels):
  variables = _abstract_variables(get_model(name, classes))
  assert _count(variables["params"]) == params
  assert len(jax.tree.leaves(pytrees.split_params(variables["params"])[0])) == kernels
  conv_kernels = [k for k in jax.tree.leaves(pytrees.split_params(variables["params"])[0])
                  if len(k.shape) == 4]
  if name != "cnn":  # conv + BatchNorm: no conv bias
    flat = jax.tree_util.tree_flatten_with_path(variables["params"])[0]
    biases = [p for p, _ in flat if p[-1].key == "bias" and "bn" not in str(p)]
    dense = ["Dense_0", "Dense_1"] if name == "cnn_bn" else ["head"]  # the linear layers
    assert [str(b[0].key) for b in biases] == dense, biases
    assert _count(variables["batch_stats"]) == 2 * sum(k.shape[-1] for k in conv_kernels)
  else:
    assert "batch_stats" not in variables


def test_resnet_sizes_match_the_paper_within_one_percent():
  r18 = _count(_abstract_variables(get_model("resnet18", 10))["params"])
  r34 = _count(_abstract_variables(get_model("resnet34", 100))["params"])
  assert abs(r18 / 11.17e6 - 1) < 0.01 and abs(r34 / 21.3e6 - 1) < 0.01


@pytest.mark.parametrize("name, classes", [(n, c) for n, c, _, _ in MODEL_CASES])
def test_output_shapes_in_train_and_eval_mode(name, classes):
  model = get_model(name, classes)
  variables = _abstract_variables(model)
  x = jnp.zeros((5,) + CIFAR)
  logits = jax.eval_shape(lambda v: model.apply(v, x, train=False), variables)
  assert logits.shape == (5, classes) and logits.dtype == jnp.float32
  state = {k: v for k, v in variables.items() if k != "params"}
  if state:
    logits, new_state = jax.eval_shape(
        lambda v: model.apply(v, x, train=True, mask=jnp.ones(5), mutable=list(state)), variables)
    assert list(new_state) == ["batch_stats"]
    chex.assert_trees_all_equal_shapes(dict(new_state), state)
  else:
    logits = jax.eval_shape(lambda v: model.apply(v, x, train=True, mask=jnp.ones(5)), variables)
  assert logits.shape == (5, classes)


def test_vgg_rejects_images_smaller_than_32():
  model = get_model("vgg11_lite", 10)
  with pytest.raises(ConfigError, match=r"^model.name: must be used with images of at least 32x32"):
    model.init(_key(0), jnp.zeros((1, 8, 8, 1)))


# ------------------------------------------- FedBiF forward and backward, 2 clients


@pytest.mark.slow
@pytest.mark.parametrize("name, classes", [(n, c) for n, c, _, _ in MODEL_CASES])
def test_fedbif_trains_every_model_jitted_for_two_clients(name, classes):
  """Broadcast, 2 clients x 1 jitted step (forward + backward through the virtual bits,
  crop/flip augmentation on), aggregation, then a jitted forward of the new global model."""
  model = get_model(name, classes)
  config = small_config(lr=0.05)
  algo = get_algorithm(config)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1,) + CIFAR), train=False))(_key(0))
  has_bn = "batch_stats" in variables
  rng = np.random.default_rng(0)
  data = TrainData(jnp.asarray(rng.integers(0, 256, (12,) + CIFAR, dtype=np.uint8)),
                   jnp.asarray(rng.integers(0, classes, 12), jnp.int32))
  local = make_local_training(algo, model, optax.sgd(config.lr), [0.5] * 3, [0.25] * 3,
                              augment="crop_flip")
  start, finish = jax.jit(local.start), jax.jit(local.finish)
  steps = jax.jit(local.steps, static_argnames="num_steps")
  info = RoundInfo(jnp.array([0.75, 0.25]), jnp.array([6.0, 6.0]))
  server = algo.init(_key(1), variables)
  downlink = jax.jit(algo.broadcast)(server, _key(2), info)
  init_client = jax.jit(algo.init_client)

  uplinks, metrics = [], []
  for c in range(2):
    state = init_client(_key(10 + c), variables)
    carry0 = start(downlink, state, _key(20 + c))
    # 6 examples per client, the last 2 slots of the batch padding.
    batches = Batches(jnp.arange(6 * c, 6 * c + 8, dtype=jnp.int32)[None] % 12,
                      jnp.array([[1.0] * 6 + [0.0] * 2]))
    carry = steps(downlink, carry0, data, batches, _key(30 + c), num_steps=1)
    uplink, _, metric = finish(downlink, state, carry, _key(40 + c))
    assert float(metric["count"]) == 6.0 and np.isfinite(float(metric["loss_sum"]))
    moved = jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                         carry.local.trainable["active_bits"], carry0.local.trainable["active_bits"])
    assert all(jax.tree.leaves(moved)), f"client {c}: a kernel got no gradient"
    if has_bn:
      changed = jax.tree.map(lambda a, b: bool(jnp.any(a != b)),
                             carry.local.model_state, carry0.local.model_state)
      assert all(jax.tree.leaves(changed)), "BatchNorm statistics must update in train mode"
    uplinks.append(uplink)
    metrics.append(metric)

  # Every conv and dense kernel is bit-trained (1 bit each), first and last included.
  kernels = pytrees.split_params(variables["params"])[0]
  sent = jax.tree.map(lambda b: b.values.shape, uplinks[0]["weights"],
                      is_leaf=lambda x: isinstance(x, Bits))
  assert sent == jax.tree.map(lambda k: (1,) + k.shape, kernels)
  assert not [p for p, _ in traverse(uplinks[0]["other"]) if p[-1] == "kernel"]

  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *uplinks)
  new_server = jax.jit(algo.aggregate)(server, downlink, stacked, info.weights,
                                       jax.tree.map(lambda *xs: jnp.stack(xs), *metrics))
  if has_bn:  # the global statistics are the clients' weighted mean
    expected = jax.tree.map(lambda a, b: 0.75 * a + 0.25 * b,
                            uplinks[0]["model_state"], uplinks[1]["model_state"])
    chex.assert_trees_all_close(new_server["model_state"], expected, rtol=1e-6, atol=1e-7)
  logits = jax.jit(lambda v, x: model.apply(v, x, train=False))(
      algo.eval_variables(new_server), jnp.zeros((3,) + CIFAR))
  assert logits.shape == (3, classes) and bool(jnp.all(jnp.isfinite(logits)))


# ------------------------------------------------------------------ BatchNorm


@pytest.mark.slow
@pytest.mark.parametrize("name, shape", [("vgg11_lite", CIFAR), ("resnet18", CIFAR)])
def test_batchnorm_ignores_padded_examples(name, shape):
  """[a, b, junk, junk] with mask [1, 1, 0, 0] gives a and b the logits and the running
  statistics of [a, b] alone; with the junk unmasked they differ."""
  model = get_model(name, 10)
  variables = jax.jit(lambda k: model.init(k, jnp.zeros((1,) + shape), train=False))(_key(0))
  rng = np.random.default_rng(1)
  real = jnp.asarray(rng.normal(size=(2,) + shape), jnp.float32)
  junk = jnp.full((2,) + shape, 50.0)

  @jax.jit
  def train_apply(x, mask):
    return model.apply(variables, x, train=True, mask=mask, mutable=["batch_stats"])

  ref_logits, ref_state = train_apply(real, jnp.ones(2))
  logits, state = train_apply(jnp.concatenate([real, junk]), jnp.array([1.0, 1.0, 0.0, 0.0]))
  chex.assert_trees_all_close(logits[:2], ref_logits, rtol=1e-4, atol=1e-4)
  chex.assert_trees_all_close(state, ref_state, rtol=1e-5, atol=1e-6)
  _, unmasked = train_apply(jnp.concatenate([real, junk]), jnp.ones(4))
  first_bn = "bn0" if name == "vgg11_lite" else "stem_bn"
  assert not np.allclose(unmasked["batch_stats"][first_bn]["mean"],
                         ref_state["batch_stats"][first_bn]["mean"])


class _TinyBN(nn.Module):
  """conv 8 + BatchNorm + ReLU, global pool, dense: a BatchNorm model that trains in a second."""

  @nn.compact
  def __call__(self, x, train=False, mask=None):
    x = nn.relu(batch_norm(conv3x3(8, name="conv")(x), train, mask, name="bn"))
    return nn.Dense(10, name="head")(jnp.mean(x, axis=(1, 2)))


@pytest.mark.slow
@pytest.mark.parametrize("algorithm", ["fedavg", "fedbif"])
def test_aggregated_batchnorm_statistics_are_the_weighted_client_mean(algorithm):
  """3 clients train on different labels (unequal sizes, Dirichlet); the server's running
  statistics are sum_k w_k * stats_k with data-size weights, and evaluation uses them."""
  digits = data_lib.load_dataset("builtin")
  model = _TinyBN()
  config = small_config(algorithm=algorithm)
  algo = get_algorithm(config)
  variables = model.init(_key(0), jnp.zeros((1, 8, 8, 1)))
  local = make_local_training(algo, model, optax.sgd(0.05), digits.mean, digits.std)
  data = TrainData(jnp.asarray(digits.x_train), jnp.asarray(digits.y_train))
  parts = data_lib.partition("dirichlet", digits.y_train, 3, np.random.default_rng(0), mu=0.3)
  idx, mask = data_lib.round_batches(parts, 32, 1, np.random.default_rng(1))
  sizes = np.array([len(p) for p in parts], np.float32)
  weights = jnp.asarray(sizes / sizes.sum())
  info = RoundInfo(weights, jnp.asarray(sizes))
  server = algo.init(_key(1), variables)
  downlink = algo.broadcast(server, _key(2), info)
  start, finish = jax.jit(local.start), jax.jit(local.finish)
  steps = jax.jit(local.steps, static_argnames="num_steps")
  uplinks, metrics = [], []
  for c in range(3):
    state = algo.init_client(_key(10 + c), variables)
    carry = start(downlink, state, _key(20 + c))
    for _ in range(idx.shape[1]):
      carry = steps(downlink, carry, data, Batches(jnp.asarray(idx[c]), jnp.asarray(mask[c])),
                    _key(30 + c), num_steps=1)
    uplink, _, metric = finish(downlink, state, carry, _key(40 + c))
    uplinks.append(uplink)
    metrics.append(metric)
  client_stats = [u["model_state"]["batch_stats"]["bn"] for u in uplinks]
  assert not np.allclose(client_stats[0]["mean"], client_stats[1]["mean"])
  stacked = jax.tree.map(lambda *xs: jnp.stack(xs), *uplinks)
  new_server = algo.aggregate(server, downlink, stacked, weights,
                              jax.tree.map(lambda *xs: jnp.stack(xs), *metrics))
  for stat in ("mean", "var"):
    expected = sum(float(weights[k]) * np.asarray(client_stats[k][stat]) for k in range(3))
    np.testing.assert_allclose(new_server["model_state"]["batch_stats"]["bn"][stat], expected,
                               rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(algo.eval_variables(new_server)["batch_stats"]["bn"][stat],
                               expected, rtol=1e-6, atol=1e-7)


# ------------------------------------------------ which kernels are bit-trained


def test_first_and_last_kernels_come_from_the_forward_pass():
  order = kernel_call_order(get_model("resnet18", 10), (1,) + CIFAR)
  assert order[0] == ("stem_conv", "kernel") and order[-1] == ("head", "kernel")
  assert len(order) == 21 and order[1] == ("stage1_block0", "conv1", "kernel")
  assert sorted(order)[0] == ("head", "kernel")  # why alphabetical order would not do
  vgg = kernel_call_order(get_model("vgg11_lite", 10), (1,) + CIFAR)
  assert vgg[0] == ("conv0", "kernel") and vgg[-1] == ("head", "kernel")
  cnn = kernel_call_order(get_model("cnn", 10), (1, 8, 8, 1))
  assert cnn == [("Conv_0", "kernel"), ("Conv_1", "kernel"), ("Dense_0", "kernel"),
                 ("Dense_1", "kernel")]


def test_full_precision_first_last_predicate():
  model = get_model("resnet18", 10)
  params = _abstract_variables(model)["params"]
  assert bit_trained_predicate(model, (1,) + CIFAR) is pytrees.is_kernel
  predicate = bit_trained_predicate(model, (1,) + CIFAR, True)
  bit, full = pytrees.split_params(params, predicate)
  flat_full = dict(traverse(full))
  assert ("stem_conv", "kernel") in flat_full and ("head", "kernel") in flat_full
  assert len(jax.tree.leaves(bit)) == 19
  assert not any(p[-1] in ("scale", "bias") for p, _ in traverse(bit))
  with pytest.raises(ConfigError, match=r"^fedbif.full_precision_first_last: must be True or False"):
    bit_trained_predicate(model, (1,) + CIFAR, "yes")


@pytest.mark.slow
def test_full_precision_first_last_in_a_run(tmp_path):
  """The first and last kernels travel as float32 both ways; the bpp columns count the other
  kernels only (the ledger's kernel count uses the same predicate, or uplink bpp would be < 1)."""
  config = small_config(rounds=1, fedbif__full_precision_first_last=True)
  model = get_model("cnn", 10)
  predicate = bit_trained_predicate(model, (1, 8, 8, 1), True)
  algo = get_algorithm(config, predicate)
  variables = model.init(_key(0), jnp.zeros((1, 8, 8, 1)))
  downlink = algo.broadcast(algo.init(_key(1), variables), _key(2),
                            RoundInfo(jnp.full((4,), 0.25), jnp.full((4,), 10.0)))
  assert sorted(downlink["weights"]) == ["Conv_1", "Dense_0"]
  for layer in ("Conv_0", "Dense_1"):
    assert downlink["other"][layer]["kernel"].dtype == jnp.float32

  summary = train_and_evaluate(config, str(tmp_path)).summary
  assert summary["mean_uplink_bpp"] == 1.0 and summary["mean_downlink_bpp"] == 4.0
  row = json.loads((tmp_path / "metrics.jsonl").read_text().splitlines()[0])
  # cnn on 8x8x1 digits: kernels 288 (first), 18,432, 32,768, 1,280 (last). The two float32
  # kernels alone add 32 * 1,568 bits per 51,200 bit-trained weights to the uplink total.
  assert 1.0 + 32 * 1_568 / 51_200 < row["uplink_total_bpp"] < 2.3


# ------------------------------------------------------ augmentation in the step


@pytest.mark.slow
def test_client_step_augments_with_the_step_key():
  """crop_flip changes what a step trains on, identically for the same key, differently for
  another; "none" steps on the images as they are."""
  digits = data_lib.load_dataset("builtin")
  model = get_model("cnn", 10)
  config = small_config()
  algo = get_algorithm(config)
  variables = model.init(_key(0), jnp.zeros((1, 8, 8, 1)))
  downlink = algo.broadcast(algo.init(_key(1), variables), _key(2),
                            RoundInfo(jnp.full((2,), 0.5), jnp.full((2,), 32.0)))
  state = algo.init_client(_key(3), variables)
  data = TrainData(jnp.asarray(digits.x_train), jnp.asarray(digits.y_train))
  batches = Batches(jnp.arange(32, dtype=jnp.int32)[None], jnp.ones((1, 32)))

  runs = {}
  for augment in ("none", "crop_flip"):
    local = make_local_training(algo, model, optax.sgd(0.05), digits.mean, digits.std,
                                augment=augment)
    runs[augment] = (local.start(downlink, state, _key(4)),
                     jax.jit(functools.partial(local.steps, num_steps=1)))

  def loss(augment, step_key):
    carry, steps = runs[augment]
    return float(steps(downlink, carry, data, batches, step_key).loss_sum)

  plain = loss("none", _key(5))
  assert plain == loss("none", _key(6))
  augmented = loss("crop_flip", _key(5))
  assert augmented != plain and augmented == loss("crop_flip", _key(5))
  assert augmented != loss("crop_flip", _key(6))
  with pytest.raises(ConfigError, match=r"^data.augment: must be one of none, crop_flip"):
    make_local_training(algo, model, optax.sgd(0.05), digits.mean, digits.std, augment="flip")


class _AvgPoolBN(nn.Module):
  """conv + masked BatchNorm + ReLU, average pool, dense: no max-pool ties between backends."""

  @nn.compact
  def __call__(self, x, train=False, mask=None):
    x = nn.relu(batch_norm(conv3x3(8, name="conv")(x), train, mask, name="bn"))
    x = nn.avg_pool(x, (2, 2), strides=(2, 2))
    return nn.Dense(10, name="head")(x.reshape((x.shape[0], -1)))


@pytest.mark.slow
def test_backends_agree_with_augmentation_and_batchnorm():
  """Clients of unequal size have fully masked steps between epochs, which the sequential
  backend skips and vmap runs: augmentation keyed by real steps draws the same crops on both,
  and the masked BatchNorm statistics agree."""
  from fedbif_jax import parallel  # pylint: disable=g-import-not-at-top
  digits = data_lib.load_dataset("builtin")
  rng = np.random.default_rng(0)
  x = rng.integers(0, 256, digits.x_train.shape, dtype=np.uint8)
  model = _AvgPoolBN()
  algo = get_algorithm(small_config())
  variables = model.init(_key(0), jnp.zeros((1, 8, 8, 1)))
  local = make_local_training(algo, model, optax.sgd(0.05), digits.mean, digits.std,
                              augment="crop_flip")
  parts = [np.arange(0, 100), np.arange(100, 400), np.arange(400, 440)]  # 2, 5 and 1 steps
  idx, mask = data_lib.round_batches(parts, 64, 2, np.random.default_rng(1))
  real = mask.sum(axis=-1) > 0
  assert (~real[:, :-1] & real[:, 1:]).any(), "a masked step must come before a real one"
  server = algo.init(_key(1), variables)
  downlink = jax.jit(algo.broadcast)(server, _key(2), RoundInfo(jnp.full((3,), 1 / 3),
                                                                jnp.full((3,), 100.0)))
  states = jax.tree.map(lambda *s: np.stack(s), *[
      jax.device_get(algo.init_client(_key(10 + c), variables)) for c in range(3)])
  keys = jax.random.split(jax.random.key(3), 3)
  data = TrainData(jnp.asarray(x), jnp.asarray(digits.y_train))
  runners = [parallel.make_runner(name, local, 1) for name in ("sequential", "vmap")]
  results = [r.run(downlink, states, idx, mask, keys, r.place(data)) for r in runners]
  for a, b in zip(*results):
    chex.assert_trees_all_close(a, b, atol=1e-5, rtol=1e-5)
  assert results[0][0]["model_state"]["batch_stats"]["bn"]["mean"].shape == (3, 8)


@pytest.mark.parametrize("shape", [(2, 8, 8, 3), (3, 7, 9, 4), (1, 2, 2, 1)])
def test_max_pool_2x2_equals_flax_max_pool_and_routes_gradient_to_the_max(shape):
  from fedbif_jax.models.layers import max_pool_2x2
  x = jax.random.normal(jax.random.key(shape[1]), shape)  # continuous: no ties
  np.testing.assert_array_equal(max_pool_2x2(x), nn.max_pool(x, (2, 2), strides=(2, 2)))
  g = jax.grad(lambda a: jnp.sum(max_pool_2x2(a) * 3.0))(x)
  g_ref = jax.grad(lambda a: jnp.sum(nn.max_pool(a, (2, 2), strides=(2, 2)) * 3.0))(x)
  np.testing.assert_array_equal(g, g_ref)
  assert float(jnp.sum(g)) == 3.0 * (shape[0] * (shape[1] // 2) * (shape[2] // 2) * shape[3])


def test_max_pool_2x2_gives_a_tied_window_gradient_to_its_first_maximum():
  from fedbif_jax.models.layers import max_pool_2x2
  # One 4x5 image, one channel: windows (rows 0-1 / 2-3, cols 0-1 / 2-3; col 4 dropped).
  x = jnp.array([[1., 1., 0., 2., 9.],
                 [1., 0., 2., 2., 9.],
                 [-1., -3., 5., 4., 9.],
                 [-2., -1., 4., 5., 9.]]).reshape(1, 4, 5, 1)
  upstream = jnp.array([[10., 20.], [30., 40.]]).reshape(1, 2, 2, 1)
  g = jax.grad(lambda a: jnp.sum(max_pool_2x2(a) * upstream))(x)[0, :, :, 0]
  expected = np.array([[10., 0., 0., 20., 0.],   # three-way tie at 1: top-left; tie at 2: (0, 3)
                       [0., 0., 0., 0., 0.],
                       [30., 0., 40., 0., 0.],   # ties at -1 and at 5: the first of each
                       [0., 0., 0., 0., 0.]])
  np.testing.assert_array_equal(g, expected)
  np.testing.assert_array_equal(max_pool_2x2(x)[0, :, :, 0], [[1., 2.], [-1., 5.]])


def test_relu_before_or_after_max_pool_2x2_same_values_and_gradient():
  from fedbif_jax.models.layers import max_pool_2x2
  # Integer-valued input: many exact ties, zeros and negative windows.
  x = jnp.round(2 * jax.random.normal(jax.random.key(0), (3, 6, 6, 4)))
  c = jax.random.normal(jax.random.key(1), (3, 3, 3, 4))
  first = lambda a: jnp.sum(max_pool_2x2(jax.nn.relu(a)) * c)
  after = lambda a: jnp.sum(jax.nn.relu(max_pool_2x2(a)) * c)
  np.testing.assert_array_equal(first(x), after(x))
  np.testing.assert_array_equal(jax.grad(first)(x), jax.grad(after)(x))
  g = jax.jit(jax.vmap(jax.grad(after)))(jnp.stack([x, -x]))   # also under jit and vmap
  np.testing.assert_array_equal(g[0], jax.grad(after)(x))
