"""The fair-study knobs: the virtual bits' step (``fedbif.bit_lr_scale``, ``fedbif.bit_step``),
their initial scale (``fedbif.bit_init``), the validation split (``data.validation``), the
evaluation schedule (``eval_every``, ``eval_test``) and the BatchNorm CNN (``cnn_bn``).

Expected values are hand-computed (init standard deviations, per-bit step factors, validation
ids), or come from an independent route: the init-scale / step-scale equivalence of plain SGD is
checked by running two different configurations through the whole engine and comparing their
metrics, and the folded BatchNorm of ``cnn_bn`` against a hand-written per-channel affine map.
"""
import json
import math

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from fedbif_jax.algorithms import get_algorithm
from fedbif_jax import bits
from fedbif_jax import data as data_lib
from fedbif_jax import lipschitz
from fedbif_jax import metrics as metrics_lib
from fedbif_jax import models as models_lib
from fedbif_jax.algorithms import fedbif as fedbif_lib
from fedbif_jax.errors import ConfigError
from fedbif_jax.pytrees import Bits
from fedbif_jax.rounds import build_job
from fedbif_jax.train import train_and_evaluate


# ------------------------------------------------------------------ virtual bits' init and step
def test_init_std_by_hand():
  # A 3x3 conv from 4 to 8 channels: our fan-in 3*3*4 = 36; PyTorch's fan-in of the stacked
  # [m, 8, 4, 3, 3] tensor is size(1) * 4 * 3 * 3 = 288.
  assert bits.init_std((3, 3, 4, 8)) == pytest.approx(math.sqrt(2 / 36))
  assert bits.init_std((3, 3, 4, 8), "stacked_fan_in") == pytest.approx(math.sqrt(2 / 288))
  assert bits.init_std((64, 10), "stacked_fan_in") == pytest.approx(math.sqrt(2 / 640))
  with pytest.raises(ValueError, match="fedbif.bit_init: must be one of fan_in, stacked_fan_in"):
    bits.init_std((3, 3), "xavier")


def test_stacked_init_draws_the_same_normals_sqrt_out_times_smaller():
  params = {"a": {"kernel": jnp.zeros((5, 7))}, "b": {"kernel": jnp.zeros((3, 3, 2, 4))}}
  key = jax.random.key(3)
  ours = bits.init_virtual_bits(key, params, 4)
  torch_like = bits.init_virtual_bits(key, params, 4, rule="stacked_fan_in")
  np.testing.assert_allclose(torch_like["a"]["kernel"] * math.sqrt(7), ours["a"]["kernel"],
                             rtol=1e-6)
  np.testing.assert_allclose(torch_like["b"]["kernel"] * 2.0, ours["b"]["kernel"], rtol=1e-6)


def test_bit_step_scales_by_hand():
  idx = jnp.asarray([1, 3])
  np.testing.assert_allclose(fedbif_lib.bit_step_scales(idx, 4.0, "uniform"), [4.0, 4.0])
  np.testing.assert_allclose(fedbif_lib.bit_step_scales(idx, 4.0, "inverse_pow2"), [2.0, 0.5])
  with pytest.raises(ValueError, match="fedbif.bit_step: must be one of uniform, inverse_pow2"):
    fedbif_lib.bit_step_scales(idx, 1.0, "pow2")


def test_scale_gradient_is_identity_forward_and_scales_backward():
  x = jnp.asarray([[-1.0, 2.0], [3.0, -4.0]])
  scale = jnp.asarray([[10.0], [0.5]])
  assert (bits.scale_gradient(x, scale) == x).all()
  grad = jax.grad(lambda v: jnp.sum(bits.scale_gradient(v, scale) * jnp.asarray([1.0, 2.0])))(x)
  np.testing.assert_allclose(grad, [[10.0, 20.0], [0.5, 1.0]])


def _fedbif_gradient(make_config, **fedbif_fields):
  """d loss / d (activated virtual bits) of one leaf, for bits 1 and 3 of m = 4 active."""
  config = make_config(fedbif__active_bits=2, fedbif__selector="fixed", fedbif__fixed_bits=(1, 3),
                       **{f"fedbif__{k}": v for k, v in fedbif_fields.items()})
  algorithm = get_algorithm(config)
  rng = np.random.default_rng(0)
  q = jnp.asarray(rng.integers(-8, 8, (6, 5)), jnp.int32)
  downlink = {"weights": {"d": {"kernel": Bits(q, jnp.asarray(4, jnp.int32))}},
              "alpha": {"d": {"kernel": jnp.asarray(0.25, jnp.float32)}},
              "other": {}, "active": jnp.asarray([False, True, False, True])}
  v = jnp.asarray(rng.standard_normal((2, 6, 5)), jnp.float32)
  target = jnp.asarray(rng.standard_normal((6, 5)), jnp.float32)

  def loss(active_bits):
    w = algorithm.model_params({"active_bits": {"d": {"kernel": active_bits}}, "other": {}},
                               downlink)["d"]["kernel"]
    return jnp.sum(w * target)

  return jax.grad(loss)(v), target


def test_bit_step_scales_the_straight_through_gradient_per_bit(make_config):
  plain, target = _fedbif_gradient(make_config)
  # Straight-through by hand: dL/dv_i = alpha * 2^i * dL/dw = 0.25 * 2^i * target, i in (1, 3).
  np.testing.assert_allclose(plain[0], 0.25 * 2 * target, rtol=1e-6)
  np.testing.assert_allclose(plain[1], 0.25 * 8 * target, rtol=1e-6)
  scaled, _ = _fedbif_gradient(make_config, bit_lr_scale=3.0)
  np.testing.assert_allclose(scaled, 3.0 * plain, rtol=1e-6)
  per_bit, _ = _fedbif_gradient(make_config, bit_lr_scale=3.0, bit_step="inverse_pow2")
  # 2^-i cancels Eq. 4's 2^i: every activated bit gets 3 * alpha * dL/dw.
  np.testing.assert_allclose(per_bit[0], 3.0 * 0.25 * target, rtol=1e-6)
  np.testing.assert_allclose(per_bit[1], 3.0 * 0.25 * target, rtol=1e-6)


@pytest.mark.parametrize("field,value,allowed", [
    ("bit_lr_scale", 0.0, "a finite number > 0"),
    ("bit_lr_scale", -2.0, "a finite number > 0"),
    ("bit_step", "pow2", "one of uniform, inverse_pow2"),
    ("bit_init", "xavier", "one of fan_in, stacked_fan_in"),
])
def test_bad_bit_fields_name_the_field(make_config, field, value, allowed):
  with pytest.raises(ConfigError, match=f"fedbif.{field}: must be {allowed}"):
    get_algorithm(make_config(**{f"fedbif__{field}": value}))


class _MLP(nn.Module):
  """Both kernels have 10 output units, so stacked_fan_in is fan_in / sqrt(10) for each."""
  num_classes: int = 10

  @nn.compact
  def __call__(self, x, train=False, mask=None):
    del train, mask
    x = nn.relu(nn.Dense(10)(x.reshape((x.shape[0], -1))))
    return nn.Dense(self.num_classes)(x)


@pytest.mark.slow
def test_init_scale_equals_step_scale_for_sgd_through_the_engine(tmp_path, make_config,
                                                                 monkeypatch):
  """Virtual bits drawn c = 1/sqrt(10) times smaller (stacked_fan_in) and trained with lr follow
  the same hard bits as fan_in bits trained with sqrt(10) x the step: same weights every round,
  so the same metrics to the last bit, over several rounds of inheritance and aggregation."""
  monkeypatch.setitem(models_lib.MODELS, "mlp10", _MLP)
  common = dict(model__name="mlp10", rounds=3, lr=0.1, wire_check_every=0)
  rows = {}
  for name, fields in (("stacked", {"fedbif__bit_init": "stacked_fan_in"}),
                       ("scaled", {"fedbif__bit_lr_scale": math.sqrt(10)}),
                       ("plain", {})):
    train_and_evaluate(make_config(**common, **fields), str(tmp_path / name))
    with open(tmp_path / name / "metrics.jsonl") as f:
      rows[name] = [json.loads(line) for line in f]
  keys = ("test_accuracy", "test_loss", "train_loss", "sparsity")
  stacked = [[r[k] for k in keys] for r in rows["stacked"]]
  assert stacked == [[r[k] for k in keys] for r in rows["scaled"]]
  # ... and the knob is not a no-op: the unscaled run differs.
  assert stacked != [[r[k] for k in keys] for r in rows["plain"]]


# --------------------------------------------------------------------------- validation split
def _id_images(n: int, offset: int) -> np.ndarray:
  """uint8 images [n, 4, 4, 1] whose first two pixels spell the id offset + i (unique)."""
  ids = np.arange(offset, offset + n)
  x = np.zeros((n, 4, 4, 1), np.uint8)
  x[:, 0, 0, 0], x[:, 0, 1, 0] = ids // 256, ids % 256
  return x


def _ids(x: np.ndarray) -> set:
  return set((x[:, 0, 0, 0].astype(int) * 256 + x[:, 0, 1, 0]).tolist())


def test_validation_split_is_disjoint_from_every_client_and_the_test_set(tmp_path, make_config):
  path = str(tmp_path / "ids.npz")
  rng = np.random.default_rng(0)
  np.savez(path, x_train=_id_images(400, 0), y_train=rng.integers(0, 4, 400),
           x_test=_id_images(50, 1000), y_test=rng.integers(0, 4, 50))
  config = make_config(data__source="npz", data__path=path, data__train_subset=300,
                       data__validation=60, data__partition="dirichlet", data__min_size=5)
  job = build_job(config)
  val = _ids(job.dataset.x_val)
  assert len(val) == 60 == len(job.dataset.y_val)
  clients = [_ids(job.dataset.x_train[p]) for p in job.parts]
  assert all(not (c & val) for c in clients)
  assert sum(len(c) for c in clients) == 240 == len(set().union(*clients))
  assert not (val & _ids(job.dataset.x_test)) and val <= set(range(400))
  # Seeded by `seed`: the same seed holds out the same images, another seed others.
  again = data_lib.load_dataset("npz", path=path, train_subset=300, validation=60)
  assert _ids(again.x_val) == val
  other = data_lib.load_dataset("npz", path=path, train_subset=300, validation=60, subset_seed=1)
  assert _ids(other.x_val) != val


def test_validation_split_errors():
  with pytest.raises(ConfigError, match=r"data.validation: must be 0 \(none\) or a count in 1..1436"):
    data_lib.load_dataset("builtin", validation=1437)
  with pytest.raises(ConfigError, match="data.validation"):
    data_lib.load_dataset("builtin", validation=-1)


@pytest.mark.slow
def test_tuning_run_never_reads_the_test_set(tmp_path, make_config, monkeypatch):
  made = []
  real = metrics_lib.make_evaluator

  def spy(model, eval_variables, dataset, batch_size, split="test"):
    made.append(split)
    return real(model, eval_variables, dataset, batch_size, split)

  monkeypatch.setattr(metrics_lib, "make_evaluator", spy)
  summary = train_and_evaluate(
      make_config(rounds=5, eval_every=2, eval_test=False, data__validation=200),
      str(tmp_path / "tune")).summary
  assert made == ["validation"]
  with open(tmp_path / "tune" / "metrics.jsonl") as f:
    rows = [json.loads(line) for line in f]
  # Evaluated every 2 rounds and at the last: rounds 1, 3 and 4 (0-based).
  assert [r["round"] for r in rows if "validation_accuracy" in r] == [1, 3, 4]
  assert not any("test_accuracy" in r for r in rows)
  assert "final_accuracy" not in summary and "best_accuracy" not in summary
  accs = [r["validation_accuracy"] for r in rows if "validation_accuracy" in r]
  assert summary["final_validation_accuracy"] == accs[-1]
  assert summary["best_validation_accuracy"] == max(accs)
  # Training works: well above chance (10 classes) on the held-out digits after 5 rounds.
  assert summary["best_validation_accuracy"] > 0.5
  with pytest.raises(ConfigError, match="eval_test: must be True unless data.validation > 0"):
    train_and_evaluate(make_config(eval_test=False), str(tmp_path / "none"))


# ---------------------------------------------------------------------------------- cnn_bn
def test_cnn_bn_shape_and_parameter_count():
  model = models_lib.get_model("cnn_bn", 10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert sum(x.size for x in jax.tree.leaves(variables["params"])) == 545_194
  assert sum(x.size for x in jax.tree.leaves(variables["batch_stats"])) == 192
  assert "bias" not in variables["params"]["conv0"]


def test_cnn_bn_lipschitz_folds_the_batchnorm_after_the_pool():
  model = models_lib.get_model("cnn_bn", 10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 8, 8, 3)))
  rng = np.random.default_rng(1)
  stats = jax.tree.map(lambda a: jnp.asarray(rng.uniform(0.5, 2.0, a.shape), jnp.float32),
                       variables["batch_stats"])
  params = dict(variables["params"])
  params["bn0"] = {"scale": jnp.asarray(rng.uniform(-2, 2, 32), jnp.float32),
                   "bias": jnp.asarray(rng.uniform(-1, 1, 32), jnp.float32)}
  variables = {"params": params, "batch_stats": stats}
  layers = lipschitz.linear_layers(model, variables, jnp.zeros((1, 8, 8, 3)))
  assert [l.path for l in layers] == [("conv0",), ("conv1",), ("Dense_0",), ("Dense_1",)]
  x = jnp.asarray(rng.standard_normal((1, 8, 8, 3)), jnp.float32)
  conv = jax.lax.conv_general_dilated(x, params["conv0"]["kernel"], (1, 1), ((1, 1), (1, 1)),
                                      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  bn = params["bn0"]
  expected = ((conv - stats["bn0"]["mean"]) / jnp.sqrt(stats["bn0"]["var"] + 1e-5) * bn["scale"]
              + bn["bias"])
  np.testing.assert_allclose(layers[0].apply(x), expected, rtol=1e-4, atol=1e-5)


def test_a_flower_deployment_refuses_an_evaluation_schedule(make_config):
  from fedbif_jax.deploy import roles  # imports no flwr
  with pytest.raises(ConfigError, match="eval_every: must be 1 in a Flower deployment"):
    roles.Server(make_config(eval_every=2))
  with pytest.raises(ConfigError, match="eval_test: must be True in a Flower deployment"):
    roles.Server(make_config(eval_test=False, data__validation=100))


def test_study_config_is_the_tuned_table_run(tmp_path, monkeypatch):
  from configs import cifar10_study
  from experiments import grid
  tuned = {"methods": {"fedavg": {"overrides": {"lr": 0.1}},
                       "fedbif": {"overrides": {"lr": 0.2, "fedbif.bit_lr_scale": 4.0,
                                                "fedbif.bit_step": "inverse_pow2"}}}}
  path = tmp_path / "tuned.json"
  path.write_text(json.dumps(tuned))
  monkeypatch.setattr(grid, "DEFAULT_TUNED", str(path))
  base = grid.study_config("")
  for method in ("fedavg", "fedbif"):
    config = cifar10_study.get_config(method)
    run = next(r for r in grid.grid_runs("table1") if r.name == f"{method}-iid-s0")
    assert config.to_dict() == grid.run_config(base, run, tuned).to_dict()
  # configs/cifar10_cnn.py is the same with the BatchNorm-free CNN: the study's bridge runs,
  # whose results its docstring quotes. The bridge's FedBiF weighs clients by data share, the
  # config by Eq. 6's 1/|C^t|: the same weights on IID's equal shards.
  from configs import cifar10_cnn
  for method in ("fedavg", "fedbif"):
    config = cifar10_cnn.get_config(method).to_dict()
    run = next(r for r in grid.grid_runs("bridge") if r.name == f"{method}-cnn-iid-s0")
    bridge = grid.run_config(base, run, tuned).to_dict()
    assert config.pop("aggregation_weights") in ("uniform", bridge.pop("aggregation_weights"))
    assert config == bridge and config["model"]["name"] == "cnn"
  assert cifar10_cnn.get_config().algorithm == "fedbif"
  assert cifar10_study.get_config().fedbif.bit_step == "inverse_pow2"  # default: FedBiF
  with pytest.raises(ConfigError, match="config: feddq has no tuned values"):
    cifar10_study.get_config("feddq")
  with pytest.raises(ConfigError, match="config: must be one of fedavg"):
    cifar10_study.get_config("fedprox")
