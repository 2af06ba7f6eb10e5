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
  to int32 and ``num_classes`` is the largest label (train or test) plus one; every class
  0..num_classes-1 must occur (`check_labels`).
* ``tfds``: a TensorFlow-Datasets dataset read through ``tfds.data_source``
  (random access; reading needs no TensorFlow). The name is a registered tfds
  builder (the paper's: ``svhn_cropped``, ``cifar10``, ``cifar100``) or a data
  set already prepared under ``data_dir``; a name that is neither lists the
  paper's and the closest registered names. If a registered data set
  is not yet prepared in ``array_record`` format under ``data_dir``, it is
  downloaded and prepared there when TensorFlow is installed (tfds needs it to
  prepare data: ``pip install tensorflow-cpu``, an optional extra); without
  TensorFlow the error says what to install.

Every source's labels are checked before anything else (`check_labels`): labels outside the
class range, a label space that is not 0..K-1 (npz) and test labels none of which occur in
training are refused with one line naming the file; tfds images must share one shape and be
uint8 pixels (a float or 16-bit image is refused, not cast).

Optionally seeded random subsets of the training and test sets are kept
(``train_subset``, ``test_subset``). ``mean``/``std`` (float32 [C], applied
to ``x / 255``) follow ``normalization``:

* ``train_stats``: the per-channel statistics of the training set actually
  returned (after subsetting);
* ``published``: fixed per-dataset constants (`PUBLISHED_STATS`), known for
  ``svhn_cropped`` (one value for every channel, as the authors' framework),
  ``cifar10`` and ``cifar100``; looked up by the dataset name, so an npz file
  needs ``name`` set (or a file named e.g. ``cifar10.npz``).
"""

import difflib
import importlib.util
import logging
import os
from typing import Any, NamedTuple

import numpy as np

from fedbif_jax.errors import ConfigError, check

SOURCES = ("builtin", "npz", "tfds")
BUILTIN_NAMES = ("digits",)
NORMALIZATIONS = ("train_stats", "published")
# (mean, std) per channel of x / 255: docs/REFERENCE_NOTES.md (the authors' framework).
PUBLISHED_STATS = {
    "cifar10": ((0.4914, 0.4822, 0.4465), (0.2470, 0.2435, 0.2616)),
    "cifar100": ((0.5071, 0.4865, 0.4409), (0.2673, 0.2564, 0.2762)),
    "svhn_cropped": ((0.4496, 0.4496, 0.4496), (0.1995, 0.1995, 0.1995)),
}
# The data sets of the paper, named in the error for a misspelt tfds name.
PAPER_TFDS_NAMES = ("cifar10", "cifar100", "svhn_cropped")
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
  mean: np.ndarray  # float32 [C], per-channel mean of x / 255 (train set or published)
  std: np.ndarray  # float32 [C], per-channel std of x / 255 (train set or published)
  x_val: np.ndarray  # uint8 [V, H, W, C], held out of the training set (V = 0: none)
  y_val: np.ndarray  # int32 [V]


def load_dataset(source: str, *, name: str = "", path: str = "",
                 split_train: str = "train", split_test: str = "test",
                 data_dir: str | None = None, train_subset: int = 0,
                 subset_seed: int = 0, test_subset: int = 0,
                 normalization: str = "train_stats", validation: int = 0) -> Dataset:
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
    subset_seed: seed for the training subset (and, with a second stream, for
      the test subset).
    test_subset: if > 0, keep a random subset of this many test examples.
    normalization: ``train_stats`` or ``published`` (see the module doc).
    validation: if > 0, hold this many of the (subset) training examples out as a validation
      split (drawn with ``subset_seed`` on a third stream): they are in ``x_val`` / ``y_val``
      and no longer in ``x_train``, so no client ever trains on them.

  Returns:
    A `Dataset`; ``train_stats`` mean/std are computed after subsetting and holding out.

  Raises:
    ConfigError: bad source, name, path, file content, subset size or
      normalization.
  """
  check(source in SOURCES, "data.source", f"one of {', '.join(SOURCES)}",
        source)
  check(normalization in NORMALIZATIONS, "data.normalization",
        f"one of {', '.join(NORMALIZATIONS)}", normalization)
  if normalization == "published" and name and (
      source != "tfds" or name in _tfds_registered_names()):
    _check_published(name)  # fail before reading the data (a misspelt name: data.name)
  if source == "builtin":
    name, arrays = _load_builtin(name)
  elif source == "npz":
    name, arrays = _load_npz(path, name)
  else:
    name, arrays = _load_tfds(name, split_train, split_test, data_dir)
  x_train, y_train, x_test, y_test, num_classes = arrays
  check_labels(y_train, y_test, num_classes, where=_where(source, name, path),
               every_class=source == "npz")
  x_train, y_train = _subset(x_train, y_train, train_subset, subset_seed)
  x_test, y_test = _subset(x_test, y_test, test_subset, [subset_seed, 1],
                           field="data.test_subset", split="test")
  x_train, y_train, x_val, y_val = hold_out(x_train, y_train, validation, [subset_seed, 2])
  if normalization == "published":
    mean, std = published_stats(name, x_train.shape[-1])
  else:
    mean, std = channel_stats(x_train)
  return Dataset(name, x_train, y_train, x_test, y_test, num_classes, mean,
                 std, x_val, y_val)


def check_labels(y_train: np.ndarray, y_test: np.ndarray, num_classes: int,
                 where: str = "data", every_class: bool = True) -> None:
  """Refuses labels a classifier with outputs 0..num_classes-1 cannot be scored on.

  Checked on the whole source, before any subset is drawn (a small subset may miss a class
  legitimately; a file should not):

  * every label lies in 0..num_classes-1;
  * with `every_class` (the class count was inferred from the labels, as for an npz file): every
    class 0..num_classes-1 occurs in train or test. Labels 1..10 or 100..109 are a label space
    that is not 0..K-1 and would silently give the model unused outputs;
  * some test label occurs in the training set (none: accuracy could only be 0). Test labels
    that occur only in part are logged as a warning: those test images can never be classified
    correctly, but the run measures something.

  Raises:
    ConfigError: one line that starts with `where` (``data.path: <file>`` for an npz, ``data.name:
      tfds <name>`` for tfds) and says what is wrong and how to mend it.
  """
  labels = np.concatenate([y_train, y_test])
  if not labels.size:
    return
  outside = labels[(labels < 0) | (labels >= num_classes)]
  if outside.size:
    raise ConfigError(f"{where}: labels must lie in 0..{num_classes - 1} (the data set's "
                      f"{num_classes} classes), found {_label_list(np.unique(outside))}")
  test_classes = np.unique(y_test)
  unseen = np.setdiff1d(test_classes, y_train)
  if len(y_train) and unseen.size and unseen.size == test_classes.size:
    raise ConfigError(
        f"{where}: no test label occurs in the training set (train labels "
        f"{_label_list(np.unique(y_train))}, test labels {_label_list(test_classes)}): accuracy "
        "could only be 0")
  present = np.unique(labels)
  if every_class and len(present) < num_classes:
    missing = np.setdiff1d(np.arange(num_classes), present)
    raise ConfigError(
        f"{where}: labels must be 0..K-1 with every class present, found "
        f"{len(present)} distinct labels {_label_list(present)} (missing {_label_list(missing)}):"
        f" remap them to 0..{len(present) - 1}")
  if len(y_train) and unseen.size:
    logging.warning("%s: test label(s) %s never occur in the training set: those %d test images "
                    "can never be classified correctly", where, _label_list(unseen),
                    int(np.isin(y_test, unseen).sum()))


def _label_list(values: np.ndarray, shown: int = 6) -> str:
  """``0, 1, 2`` or, for a long contiguous run, ``100..109``; at most `shown` listed."""
  values = [int(v) for v in values]
  if len(values) > 2 and values == list(range(values[0], values[-1] + 1)):
    return f"{values[0]}..{values[-1]}"
  head = ", ".join(str(v) for v in values[:shown])
  return head + (f", ... ({len(values)} in all)" if len(values) > shown else "")


def _where(source: str, name: str, path: str) -> str:
  """The field and file a data error names."""
  if source == "npz":
    return f"data.path: {path}"
  if source == "tfds":
    return f"data.name: tfds {name}"
  return f"data.name: {name}"


def hold_out(x: np.ndarray, y: np.ndarray, size: int, seed
             ) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
  """Splits a seeded random `size` examples off (x, y): (x_kept, y_kept, x_held, y_held).

  Both parts keep dataset order; ``size == 0`` holds out nothing (empty arrays).
  """
  check(isinstance(size, (int, np.integer)) and not isinstance(size, bool)
        and 0 <= size < len(x), "data.validation",
        f"0 (none) or a count in 1..{len(x) - 1} (training set size {len(x)} minus one)", size)
  held = np.zeros(len(x), bool)
  if size:
    held[np.random.default_rng(seed).choice(len(x), size, replace=False)] = True
  return x[~held], y[~held], x[held], y[held]


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


def published_stats(name: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
  """The published per-channel (mean, std) of data set `name`, float32 [C]."""
  _check_published(name)
  mean, std = (np.asarray(v, np.float32) for v in PUBLISHED_STATS[name])
  if channels != len(mean):
    raise ConfigError(f"data.normalization: the published constants of {name} "
                      f"have {len(mean)} channels, the images have {channels}")
  return mean, std


def _check_published(name: str) -> None:
  check(name in PUBLISHED_STATS, "data.normalization",
        f"train_stats for data set {name!r} (published constants exist for "
        f"{', '.join(sorted(PUBLISHED_STATS))}; set data.name to one of them)",
        "published")


def _subset(x: np.ndarray, y: np.ndarray, size: int, seed,
            field: str = "data.train_subset",
            split: str = "training") -> tuple[np.ndarray, np.ndarray]:
  """Keeps a seeded random subset of `size` examples (all if size == 0)."""
  check(isinstance(size, (int, np.integer)) and 0 <= size <= len(x), field,
        f"0 (all) or a count in 1..{len(x)} ({split} set size)", size)
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
  """Opens one split, preparing the data set first if needed and possible.

  Reads prepared ``array_record`` data without TensorFlow. If the split cannot
  be opened: an unregistered name is a one-line ConfigError listing the paper's
  data sets and the closest registered names; a registered one is downloaded
  and prepared when TensorFlow is installed, otherwise the error says to
  ``pip install tensorflow-cpu``.
  """
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
  except ImportError as e:
    raise ConfigError("data.source: tfds needs tensorflow-datasets: pip install "
                      "-r requirements.txt") from e
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir,
                            download=False)
  except Exception as e:  # pylint: disable=broad-except
    unavailable = _reason(e)
  where = f"data_dir={data_dir!r}"
  build = f"`tfds build {name} --file_format=array_record`"
  registered = _tfds_registered_names()
  if name not in registered:
    close = difflib.get_close_matches(name, registered, n=3, cutoff=0.6)
    hint = f" (closest: {', '.join(close)})" if close else ""
    raise ConfigError(
        f"data.name: must be a tfds data set: one of the paper's "
        f"{', '.join(PAPER_TFDS_NAMES)} or another registered tfds name{hint}, "
        f"or one already prepared under {where} with {build}, got {name!r}")
  if importlib.util.find_spec("tensorflow") is None:
    raise ConfigError(
        f"data.name: tfds data set {name!r} split {split!r} cannot be read "
        f"under {where} ({unavailable}); downloading and preparing it needs "
        "TensorFlow: pip install tensorflow-cpu (an optional extra), or "
        f"prepare it elsewhere with {build} and set data.data_dir")
  try:
    return tfds.data_source(name, split=split, data_dir=data_dir,
                            download=True,
                            builder_kwargs={"file_format": "array_record"})
  except Exception as e:  # pylint: disable=broad-except
    raise ConfigError(
        f"data.name: tfds data set {name!r} split {split!r} could not be "
        f"downloaded and prepared under {where} ({_reason(e)}); prepare it "
        f"with {build} on a machine with TensorFlow and internet") from e


def _reason(error: BaseException) -> str:
  """``Type: first line of the message`` (160 characters at most)."""
  line = (str(error).strip().splitlines() or [""])[0][:160]
  return f"{type(error).__name__}: {line}" if line else type(error).__name__


def _tfds_registered_names() -> list[str]:
  """The tfds builders registered in this installation (no network)."""
  try:
    import tensorflow_datasets as tfds  # pylint: disable=g-import-not-at-top
    return list(tfds.list_builders(with_community_datasets=False))
  except Exception:  # pylint: disable=broad-except
    return list(PAPER_TFDS_NAMES)


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
  images = _stack_images([np.asarray(r["image"]) for r in records], label)
  labels = np.asarray([r["label"] for r in records], np.int32)
  if images.ndim == 3:
    images = images[..., None]
  return images, labels


def _stack_images(images: list[np.ndarray], label: str) -> np.ndarray:
  """Stacks one split's images, refusing what the models cannot take as uint8 pixels.

  Images must share one shape ([H, W] or [H, W, C]) and be integers in 0..255; a float image (say
  in [0, 1]) or a 16-bit one would otherwise be cast to uint8 silently and train on garbage.
  """
  shapes = sorted({im.shape for im in images})
  if len(shapes) > 1:
    listed = ", ".join(str(list(s)) for s in shapes[:3]) + ("..." if len(shapes) > 3 else "")
    raise ConfigError(f"data.name: tfds split {label} has images of {len(shapes)} shapes "
                      f"({listed}): the models need one image size")
  if len(shapes[0]) not in (2, 3):
    raise ConfigError(f"data.name: tfds split {label} images must be [H, W] or [H, W, C], got "
                      f"shape {list(shapes[0])}")
  stacked = np.stack(images)
  if stacked.dtype != np.uint8 and stacked.size:
    low, high = stacked.min(), stacked.max()
    if not np.issubdtype(stacked.dtype, np.integer) or low < 0 or high > 255:
      raise ConfigError(f"data.name: tfds split {label} images must be uint8 pixels 0..255, got "
                        f"{stacked.dtype} with values {low}..{high}")
  return stacked.astype(np.uint8, copy=False)  # uint8 already (the usual case): no copy


def _tfds_num_classes(source: Any) -> int | None:
  """The label feature's class count from the source's dataset info."""
  try:
    return int(source.dataset_info.features["label"].num_classes)
  except (AttributeError, KeyError, TypeError):
    return None
