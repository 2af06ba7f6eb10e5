"""Loading image-classification datasets into memory as uint8 numpy arrays.

This module owns the `Dataset` container and `load_dataset`, which reads one of
three sources:

* ``builtin``: scikit-learn's bundled 8x8 handwritten digits (works offline).
  Pixels 0..16 are mapped to uint8 by ``round(v * 255 / 16)``, images are
  ``[N, 8, 8, 1]`` and there are 10 classes. The 1797 images are split by a
  FIXED stratified split (seed 0, independent of any run seed) into 80% train /
  20% test, i.e. 1437 train and 360 test images.
* ``npz``: a ``np.savez`` archive (read with ``allow_pickle=False``) holding
  ``x_train``, ``y_train``, ``x_test`` and ``y_test``. Images are uint8
  ``[N, H, W, C]`` or ``[N, H, W]`` (a channel axis is added); labels are cast
  to int32 and ``num_classes`` is the largest label (train or test) plus one.
* ``tfds``: a TensorFlow-Datasets dataset read through ``tfds.data_source``
  (random access, no TensorFlow needed). The dataset must already be prepared
  in ``array_record`` format under ``data_dir``; nothing is downloaded.

Optionally a seeded random subset of the training set is kept
(``train_subset``). ``mean``/``std`` are per-channel statistics of
``x_train / 255`` computed on the training set actually returned.
"""

import os
from typing import Any, NamedTuple

import numpy as np

from fedbif_jax.errors import ConfigError, check

SOURCES = ("builtin", "npz", "tfds")
BUILTIN_NAMES = ("digits",)
_NPZ_KEYS = ("x_train", "y_train", "x_test", "y_test")
_TFDS_BATCH = 1024
_STATS_CHUNK = 4096


class Dataset(NamedTuple):
  """An in-memory image-classification dataset."""
  name: str
  x_train: np.ndarray  # uint8 [N, H, W, C]
  y_train: np.ndarray  # int32 [N]
  x_test: np.ndarray  # uint8 [M, H, W, C]
  y_test: np.ndarray  # int32 [M]
  num_classes: int
  mean: np.ndarray  # float32 [C], per-channel mean of x_train / 255
  std: np.ndarray  # float32 [C], per-channel std of x_train / 255


def load_dataset(source: str, *, name: str = "", path: str = "",
                 split_train: str = "train", split_test: str = "test",
                 data_dir: str | None = None, train_subset: int = 0,
                 subset_seed: int = 0) -> Dataset:
  """Loads a dataset from `source` (one of `SOURCES`).

  Args:
    source: ``builtin``, ``npz`` or ``tfds``.
    name: dataset name (``digits`` for builtin, the tfds name for tfds; for
      npz an optional label, defaulting to the file's base name).
    path: the ``.npz`` file (npz only).
    split_train: tfds split used for training.
    split_test: tfds split used for testing.
    data_dir: tfds data directory (None: the tfds default).
    train_subset: if > 0, keep a random subset of this many training examples
      (without replacement, drawn with ``subset_seed``, kept in dataset order).
    subset_seed: seed for the training subset.

  Returns:
    A `Dataset`; mean/std are computed after subsetting.

  Raises:
    ConfigError: bad source, name, path, file content or subset size.
  """
  check(source in SOURCES, "data.source", f"one of {', '.join(SOURCES)}",
        source)
  if source == "builtin":
    name, arrays = _load_builtin(name)
  elif source == "npz":
    name, arrays = _load_npz(path, name)
  else:
    name, arrays = _load_tfds(name, split_train, split_test, data_dir)
  x_train, y_train, x_test, y_test, num_classes = arrays
  x_train, y_train = _subset(x_train, y_train, train_subset, subset_seed)
  mean, std = channel_stats(x_train)
  return Dataset(name, x_train, y_train, x_test, y_test, num_classes, mean,
                 std)


def channel_stats(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
  """Per-channel mean and std (float32 [C]) of uint8 `x` / 255, chunked."""
  channels = x.shape[-1]
  total = np.zeros(channels, np.float64)
  total_sq = np.zeros(channels, np.float64)
  for start in range(0, len(x), _STATS_CHUNK):
    chunk = x[start:start + _STATS_CHUNK].reshape(-1, channels)
    chunk = chunk.astype(np.float64) / 255.0
    total += chunk.sum(axis=0)
    total_sq += np.square(chunk).sum(axis=0)
  count = max(x.size // channels, 1)
  mean = total / count
  var = np.maximum(total_sq / count - np.square(mean), 0.0)
  return mean.astype(np.float32), np.sqrt(var).astype(np.float32)


def _subset(x: np.ndarray, y: np.ndarray, size: int,
            seed: int) -> tuple[np.ndarray, np.ndarray]:
  """Keeps a seeded random subset of `size` examples (all if size == 0)."""
  check(0 <= size <= len(x), "data.train_subset",
        f"0 (all) or a count in 1..{len(x)} (training set size)", size)
  if size == 0:
    return x, y
  keep = np.sort(np.random.default_rng(seed).choice(len(x), size,
                                                    replace=False))
  return x[keep], y[keep]


def _load_builtin(name: str) -> tuple[str, tuple]:
  """scikit-learn digits, fixed stratified 80/20 split (seed 0)."""
  name = name or "digits"
  check(name in BUILTIN_NAMES, "data.name",
        f"one of {', '.join(BUILTIN_NAMES)} for data.source=builtin", name)
  # Imported lazily: scikit-learn is slow to import and only needed here.
  # pylint: disable-next=g-import-not-at-top
  from sklearn import datasets, model_selection
  digits = datasets.load_digits()
  x = np.round(digits.images * (255.0 / 16.0)).astype(np.uint8)[..., None]
  y = digits.target.astype(np.int32)
  x_train, x_test, y_train, y_test = model_selection.train_test_split(
      x, y, test_size=0.2, stratify=y, random_state=0)
  return name, (x_train, y_train, x_test, y_test, 10)


def _load_npz(path: str, name: str) -> tuple[str, tuple]:
  """Reads and validates a pickle-free .npz archive."""
  check(bool(path), "data.path", "the path of a .npz file", path)
  if not os.path.isfile(path):
    raise ConfigError(f"data.path: file not found: {path}")
  try:
    with np.load(path, allow_pickle=False) as archive:
      missing = [k for k in _NPZ_KEYS if k not in archive.files]
      if missing:
        raise ConfigError(
            f"data.path: {path} lacks key(s) {', '.join(missing)} (needs "
            f"{', '.join(_NPZ_KEYS)})")
      arrays = {k: archive[k] for k in _NPZ_KEYS}
  except ConfigError:
    raise
  except (OSError, ValueError) as e:
    raise ConfigError(f"data.path: cannot read {path} as a pickle-free .npz "
                      f"archive ({type(e).__name__})") from e
  x_train, y_train = _npz_split(arrays, "train", path)
  x_test, y_test = _npz_split(arrays, "test", path)
  if x_train.shape[1:] != x_test.shape[1:]:
    raise ConfigError(f"data.path: {path}: x_train images {x_train.shape[1:]} "
                      f"and x_test images {x_test.shape[1:]} differ in shape")
  num_classes = int(max(y_train.max(initial=-1), y_test.max(initial=-1))) + 1
  name = name or os.path.splitext(os.path.basename(path))[0]
  return name, (x_train, y_train, x_test, y_test, num_classes)


def _npz_split(arrays: dict[str, np.ndarray], split: str,
               path: str) -> tuple[np.ndarray, np.ndarray]:
  """Checks x_<split>, y_<split>; returns uint8 NHWC images, int32 labels."""
  x, y = arrays[f"x_{split}"], arrays[f"y_{split}"]
  if x.dtype != np.uint8 or x.ndim not in (3, 4):
    raise ConfigError(f"data.path: {path}: x_{split} must be uint8 [N,H,W,C] "
                      f"or [N,H,W], got {x.dtype} {list(x.shape)}")
  if not np.issubdtype(y.dtype, np.integer) or y.ndim != 1:
    raise ConfigError(f"data.path: {path}: y_{split} must be a 1-D integer "
                      f"array, got {y.dtype} {list(y.shape)}")
  if len(x) != len(y):
    raise ConfigError(f"data.path: {path}: x_{split} has {len(x)} images but "
                      f"y_{split} has {len(y)} labels")
  if y.size and y.min() < 0:
    raise ConfigError(f"data.path: {path}: y_{split} has negative labels")
  if x.ndim == 3:
    x = x[..., None]
  return x, y.astype(np.int32)


def _load_tfds(name: str, split_train: str, split_test: str,
               data_dir: str | None) -> tuple[str, tuple]:
  """Reads a prepared tfds dataset through `tfds.data_source`."""
  check(bool(name), "data.name", "a tfds dataset name for data.source=tfds",
        name)
  train = _tfds_source(name, split_train, data_dir)
  test = _tfds_source(name, split_test, data_dir)
  x_train, y_train = _read_records(train, f"{name}[{split_train}]")
  x_test, y_test = _read_records(test, f"{name}[{split_test}]")
  num_classes = _tfds_num_classes(train)
  if num_classes is None:
    num_classes = int(max(y_train.max(initial=-1), y_test.max(initial=-1))) + 1
  return name, (x_train, y_train, x_test, y_test, num_classes)


def _tfds_source(name: str, split: str, data_dir: str | None) -> Any:
  """Opens one split; any failure becomes a one-line ConfigError."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return tfds.data_source(name, split=split, data_dir=data_dir,
                            download=False)
  except Exception as e:  # pylint: disable=broad-except
    reason = (str(e).strip().splitlines() or [""])[0][:160]
    raise ConfigError(
        f"data.name: tfds dataset {name!r} split {split!r} is not available "
        f"under data_dir={data_dir!r} ({type(e).__name__}: {reason}); prepare "
        f"it first, e.g. `tfds build {name} --file_format=array_record` on a "
        "machine with TensorFlow and internet") from e


def _read_records(source: Any, label: str) -> tuple[np.ndarray, np.ndarray]:
  """Stacks a data source's {'image', 'label'} records into arrays."""
  records = []
  batched = hasattr(source, "__getitems__")
  for start in range(0, len(source), _TFDS_BATCH):
    keys = list(range(start, min(start + _TFDS_BATCH, len(source))))
    if batched:
      try:
        records.extend(source.__getitems__(keys))
        continue
      except (TypeError, NotImplementedError):
        # Some sources (e.g. tfds's test mocks) have a broken batched read.
        batched = False
    records.extend(source[k] for k in keys)
  if not records:
    raise ConfigError(f"data.name: tfds split {label} is empty")
  images = np.stack([np.asarray(r["image"], np.uint8) for r in records])
  labels = np.asarray([r["label"] for r in records], np.int32)
  if images.ndim == 3:
    images = images[..., None]
  return images, labels


def _tfds_num_classes(source: Any) -> int | None:
  """The label feature's class count from the source's dataset info."""
  try:
    return int(source.dataset_info.features["label"].num_classes)
  except (AttributeError, KeyError, TypeError):
    return None
