"""The experiment configs in configs/: every one loads; the paper's three match Sec. 4.1 and their
``:smoke`` variants run end to end (tensorflow-datasets mock data, no download)."""
import glob
import importlib
import json
import math
import os

from absl import flags
from ml_collections import config_flags
import pytest

from conftest import REPO
from fedbif_jax.errors import ConfigError
from fedbif_jax.rounds import validate_config
from fedbif_jax.train import train_and_evaluate

CONFIG_FILES = sorted(glob.glob(os.path.join(REPO, "configs", "*.py")))
# config, model, tfds name, lr, rounds, augmentation
PAPER = [
    ("svhn_vgg11", "vgg11_lite", "svhn_cropped", 0.01, 100, "none"),
    ("cifar10_resnet18", "resnet18", "cifar10", 0.1, 200, "crop_flip"),
    ("cifar100_resnet34", "resnet34", "cifar100", 0.1, 200, "crop_flip"),
]


def _load(name):
  return importlib.import_module(f"configs.{name}")


def test_every_config_file_loads_locked_and_valid():
  assert len(CONFIG_FILES) >= 5
  for path in CONFIG_FILES:
    module = _load(os.path.splitext(os.path.basename(path))[0])
    config = module.get_config()
    assert config.is_locked, path
    if config.data.source == "npz" and not config.data.path:
      config.data.path = "given/on/the/command/line.npz"
    validate_config(config)
    with pytest.raises(AttributeError):
      config.fedbif.bitz = 8


@pytest.mark.parametrize("name, model, dataset, lr, rounds, augment", PAPER)
def test_paper_configs_follow_section_4_1(name, model, dataset, lr, rounds, augment):
  c = _load(name).get_config()
  assert (c.algorithm, c.model.name, c.data.source, c.data.name) == ("fedbif", model, "tfds", dataset)
  assert (c.lr, c.rounds) == (lr, rounds)
  assert (c.num_clients, c.clients_per_round, c.batch_size, c.local_epochs) == (10, 0, 64, 5)
  assert (c.fedbif.bits, c.fedbif.active_bits, c.fedbif.full_precision_first_last) == (4, 1, False)
  assert (c.data.partition, c.data.normalization, c.data.augment) == ("iid", "published", augment)
  assert (c.data.train_subset, c.data.test_subset) == (0, 0)
  # The baselines as their papers and code set them: p_k weights for all but FedBiF (Eq. 6),
  # DAdaQuant's phi = rounds / 10 (0: follows --config.rounds), FedDQ's official resolutions.
  assert (c.aggregation_weights, c.dadaquant.phi) == ("paper", 0)
  assert c.feddq.resolution == (0.005 if model.startswith("resnet") else 0.001)
  smoke = _load(name).get_config("smoke")
  assert smoke.is_locked and smoke.model.name == model and smoke.data.name == dataset
  assert smoke.rounds == 1 and smoke.num_clients == 2 and smoke.data.train_subset <= 64


def test_smoke_and_overrides_from_the_command_line():
  argv = ["launch.py", f"--config={REPO}/configs/cifar10_resnet18.py:smoke",
          "--config.data.partition=dirichlet", "--config.data.mu=0.5"]
  values = flags.FlagValues()
  config_flags.DEFINE_config_file("config", None, "", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  c = values.config
  assert (c.model.name, c.rounds, c.num_clients) == ("resnet18", 1, 2)
  assert (c.data.partition, c.data.mu) == ("dirichlet", 0.5)


def test_unknown_variant_is_a_config_error():
  with pytest.raises(ConfigError, match=r"^config: must be '' or 'smoke'"):
    _load("svhn_vgg11").get_config("smoky")


@pytest.mark.slow
@pytest.mark.parametrize("name", [p[0] for p in PAPER])
def test_smoke_variant_runs(tmp_path, name):
  tfds = pytest.importorskip("tensorflow_datasets")
  config = _load(name).get_config("smoke")
  with tfds.testing.mock_data(num_examples=32):
    summary = train_and_evaluate(config, str(tmp_path)).summary
  assert summary["rounds"] == 1
  # The mock images are random: the accuracy is a whole number of the 32 test images
  # (test_subset = eval_batch_size = 32), and the loss a finite, positive mean over them.
  assert config.data.test_subset == 32
  correct = summary["final_accuracy"] * 32
  assert abs(correct - round(correct)) < 1e-9, summary["final_accuracy"]
  row = json.loads(open(tmp_path / "metrics.jsonl").readline())
  assert math.isfinite(row["test_loss"]) and row["test_loss"] > 0.0
  assert summary["mean_uplink_bpp"] == 1.0 and summary["mean_downlink_bpp"] == 4.0


@pytest.mark.parametrize("override, field, listed", [
    (dict(model__name="resnet19"), "model.name", "cnn, cnn_bn, resnet18, resnet34, vgg11_lite"),
    (dict(data__name="cifar1o"), "data.name", "cifar10, cifar100, svhn_cropped"),
])
def test_misspelt_model_or_dataset_lists_the_valid_names(tmp_path, override, field, listed):
  tfds = pytest.importorskip("tensorflow_datasets")
  config = _load("cifar10_resnet18").get_config("smoke")
  for dotted, value in override.items():
    section, key = dotted.split("__")
    config[section][key] = value
  with tfds.testing.mock_data(num_examples=32), pytest.raises(ConfigError) as info:
    train_and_evaluate(config, str(tmp_path))
  message = str(info.value)
  assert message.startswith(field + ":") and listed in message and "\n" not in message
