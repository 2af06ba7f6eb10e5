"""Tests for fedbif_jax.data: sources, client partitions and batch schedules."""

import importlib.util
import os

from hypothesis import given
from hypothesis import settings
from hypothesis import strategies as st
import numpy as np
import pytest

from fedbif_jax import data
from fedbif_jax.errors import ConfigError

_REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
_FAST = settings(max_examples=40, deadline=None)


def _cifar10_path() -> str:
  base = os.environ.get("FEDBIF_DATA_DIR",
                        os.path.join(_REPO, "..", "shared", "data"))
  return os.path.join(base, "cifar10.npz")


def _assert_config_error(fn, field: str) -> str:
  with pytest.raises(ConfigError) as info:
    fn()
  message = str(info.value)
  assert message.startswith(field + ":"), message
  assert "\n" not in message, message
  assert isinstance(info.value, ValueError)
  return message


def _write_npz(path, **arrays) -> str:
  np.savez(path, **arrays)
  return str(path)


def _tiny_arrays(rng: np.random.Generator, gray: bool = False) -> dict:
  shape = (4, 4) if gray else (4, 4, 3)
  return dict(
      x_train=rng.integers(0, 256, (6,) + shape, dtype=np.uint8),
      y_train=np.array([0, 1, 2, 3, 0, 2], np.int64),
      x_test=rng.integers(0, 256, (3,) + shape, dtype=np.uint8),
      y_test=np.array([4, 0, 1], np.int64))


# --------------------------------------------------------------- builtin


def test_builtin_digits_shapes_split_and_pixels():
  ds = data.load_dataset("builtin")
  assert ds.name == "digits"
  assert ds.x_train.shape == (1437, 8, 8, 1)
  assert ds.x_test.shape == (360, 8, 8, 1)
  assert ds.x_train.dtype == np.uint8 and ds.x_test.dtype == np.uint8
  assert ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32
  assert ds.num_classes == 10
  # Stratified: every class has 35..37 of its ~180 images in test.
  assert np.all(np.abs(np.bincount(ds.y_test, minlength=10) - 36) <= 1)
  allowed = {round(v * 255 / 16) for v in range(17)}
  assert set(np.unique(ds.x_train)) <= allowed
  assert ds.x_train.max() == 255 and ds.x_train.min() == 0
  from sklearn import datasets  # pylint: disable=g-import-not-at-top
  total = np.round(datasets.load_digits().images * 255 / 16).sum()
  assert ds.x_train.sum(dtype=np.int64) + ds.x_test.sum(dtype=np.int64) == total


def test_builtin_is_deterministic_and_stats_match_numpy():
  a = data.load_dataset("builtin", name="digits")
  b = data.load_dataset("builtin", train_subset=0, subset_seed=123)
  np.testing.assert_array_equal(a.x_train, b.x_train)
  np.testing.assert_array_equal(a.y_test, b.y_test)
  x = a.x_train.astype(np.float64) / 255
  assert a.mean.dtype == np.float32 and a.mean.shape == (1,)
  np.testing.assert_allclose(a.mean, x.mean(axis=(0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(a.std, x.std(axis=(0, 1, 2)), rtol=1e-5)
  assert 0.2 < a.mean[0] < 0.4 and 0.3 < a.std[0] < 0.45


def test_train_subset_is_seeded_and_stats_follow_it():
  full = data.load_dataset("builtin")
  a = data.load_dataset("builtin", train_subset=100, subset_seed=1)
  b = data.load_dataset("builtin", train_subset=100, subset_seed=1)
  c = data.load_dataset("builtin", train_subset=100, subset_seed=2)
  assert a.x_train.shape == (100, 8, 8, 1) and a.y_train.shape == (100,)
  np.testing.assert_array_equal(a.x_train, b.x_train)
  assert not np.array_equal(a.x_train, c.x_train)
  keep = np.sort(np.random.default_rng(1).choice(1437, 100, replace=False))
  np.testing.assert_array_equal(a.x_train, full.x_train[keep])
  np.testing.assert_array_equal(a.y_train, full.y_train[keep])
  np.testing.assert_array_equal(a.x_test, full.x_test)
  x = a.x_train.astype(np.float64) / 255
  np.testing.assert_allclose(a.mean, x.mean(axis=(0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(a.std, x.std(axis=(0, 1, 2)), rtol=1e-5)


# ------------------------------------------------------------------- npz


def test_npz_roundtrip(tmp_path):
  arrays = _tiny_arrays(np.random.default_rng(0))
  path = _write_npz(tmp_path / "tiny.npz", **arrays)
  ds = data.load_dataset("npz", path=path)
  assert ds.name == "tiny"
  np.testing.assert_array_equal(ds.x_train, arrays["x_train"])
  np.testing.assert_array_equal(ds.x_test, arrays["x_test"])
  assert ds.y_train.dtype == np.int32 and ds.y_test.dtype == np.int32
  np.testing.assert_array_equal(ds.y_test, [4, 0, 1])
  assert ds.num_classes == 5  # Max label (4, in test only) + 1.
  x = arrays["x_train"].astype(np.float64) / 255
  np.testing.assert_allclose(ds.mean, x.mean(axis=(0, 1, 2)), rtol=1e-5)
  np.testing.assert_allclose(ds.std, x.std(axis=(0, 1, 2)), rtol=1e-5)
  assert data.load_dataset("npz", path=path, name="mine").name == "mine"


def test_npz_grayscale_gets_channel_axis(tmp_path):
  arrays = _tiny_arrays(np.random.default_rng(1), gray=True)
  ds = data.load_dataset("npz", path=_write_npz(tmp_path / "g.npz", **arrays))
  assert ds.x_train.shape == (6, 4, 4, 1) and ds.x_test.shape == (3, 4, 4, 1)
  np.testing.assert_array_equal(ds.x_train[..., 0], arrays["x_train"])
  assert ds.mean.shape == (1,)


def test_npz_missing_path_names_field(tmp_path):
  missing = str(tmp_path / "nope.npz")
  message = _assert_config_error(
      lambda: data.load_dataset("npz", path=missing), "data.path")
  assert message == f"data.path: file not found: {missing}"
  _assert_config_error(lambda: data.load_dataset("npz"), "data.path")


def test_npz_content_errors(tmp_path):
  rng = np.random.default_rng(2)
  arrays = _tiny_arrays(rng)
  no_test_y = {k: v for k, v in arrays.items() if k != "y_test"}
  path = _write_npz(tmp_path / "keys.npz", **no_test_y)
  message = _assert_config_error(
      lambda: data.load_dataset("npz", path=path), "data.path")
  assert "y_test" in message

  floats = dict(arrays, x_train=arrays["x_train"].astype(np.float32))
  path = _write_npz(tmp_path / "float.npz", **floats)
  message = _assert_config_error(
      lambda: data.load_dataset("npz", path=path), "data.path")
  assert "x_train" in message and "uint8" in message

  short = dict(arrays, y_train=arrays["y_train"][:4])
  path = _write_npz(tmp_path / "short.npz", **short)
  _assert_config_error(lambda: data.load_dataset("npz", path=path),
                       "data.path")

  garbage = tmp_path / "garbage.npz"
  garbage.write_bytes(b"not a zip file")
  _assert_config_error(lambda: data.load_dataset("npz", path=str(garbage)),
                       "data.path")


def test_npz_is_loaded_without_pickle(tmp_path):
  arrays = _tiny_arrays(np.random.default_rng(3))
  labels = np.empty(6, dtype=object)
  labels[:] = [0, 1, 2, 0, 1, 2]
  path = _write_npz(tmp_path / "pickled.npz", **dict(arrays, y_train=labels))
  _assert_config_error(lambda: data.load_dataset("npz", path=path),
                       "data.path")


@pytest.mark.skipif(not os.path.exists(_cifar10_path()),
                    reason="real cifar10.npz not present")
def test_real_cifar10_npz():
  ds = data.load_dataset("npz", path=_cifar10_path())
  assert ds.name == "cifar10" and ds.num_classes == 10
  assert ds.x_train.shape == (30000, 32, 32, 3)
  assert ds.x_test.shape == (10000, 32, 32, 3)
  assert ds.y_train.dtype == np.int32
  np.testing.assert_array_equal(np.bincount(ds.y_train), [3000] * 10)
  np.testing.assert_allclose(ds.mean * 255, [125.39, 123.04, 114.01],
                             atol=0.01)
  np.testing.assert_allclose(ds.std * 255, [63.0, 62.1, 66.7], atol=0.2)


# ------------------------------------------------------------------ tfds


@pytest.mark.parametrize("name,shape", [
    ("cifar10", (32, 32, 3)),
    ("svhn_cropped", (32, 32, 3)),
    ("mnist", (28, 28, 1)),
    ("fashion_mnist", (28, 28, 1)),
])
def test_tfds_mock(name, shape):
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=8):
    ds = data.load_dataset("tfds", name=name)
  assert ds.name == name and ds.num_classes == 10
  assert ds.x_train.shape == (8,) + shape and ds.x_test.shape == (8,) + shape
  assert ds.x_train.dtype == np.uint8
  assert ds.y_train.dtype == np.int32 and ds.y_train.shape == (8,)
  assert np.all((ds.y_train >= 0) & (ds.y_train < 10))
  assert ds.mean.shape == (shape[-1],) and np.all(ds.std > 0)


class _FakeInfo:

  class _Label:
    num_classes = 7

  features = {"label": _Label()}


class _FakeSource:
  """A tfds-like random-access source that counts batched reads."""

  dataset_info = _FakeInfo()

  def __init__(self, n: int, offset: int):
    self.n, self.offset, self.batched_calls = n, offset, 0

  def __len__(self):
    return self.n

  def _record(self, i):
    image = np.full((2, 3), (i + self.offset) % 256, np.uint8)
    return {"image": image, "label": np.int64(i % 5)}

  def __getitem__(self, i):
    return self._record(i)

  def __getitems__(self, keys):
    self.batched_calls += 1
    return [self._record(i) for i in keys]


def test_tfds_reads_records_in_batches(monkeypatch):
  tfds = pytest.importorskip("tensorflow_datasets")
  sources = {"train": _FakeSource(2500, 0), "test": _FakeSource(3, 100)}
  seen = []

  def fake_data_source(name, *, split, data_dir=None, download=True):
    seen.append((name, split, data_dir, download))
    return sources[split]

  monkeypatch.setattr(tfds, "data_source", fake_data_source)
  ds = data.load_dataset("tfds", name="fake", data_dir="/d")
  assert seen == [("fake", "train", "/d", False), ("fake", "test", "/d", False)]
  assert sources["train"].batched_calls == 3  # 2500 records, 1024 per batch.
  assert ds.num_classes == 7
  assert ds.x_train.shape == (2500, 2, 3, 1)
  np.testing.assert_array_equal(ds.x_train[:, 0, 0, 0],
                                np.arange(2500) % 256)
  np.testing.assert_array_equal(ds.y_train, np.arange(2500) % 5)
  np.testing.assert_array_equal(ds.x_test[:, 0, 0, 0], [100, 101, 102])


def test_tfds_unprepared_dataset_is_config_error(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  message = _assert_config_error(
      lambda: data.load_dataset("tfds", name="no_such_dataset_xyz",
                                data_dir=str(tmp_path)), "data.name")
  assert "tfds build no_such_dataset_xyz" in message
  message = _assert_config_error(
      lambda: data.load_dataset("tfds", name="cifar10",
                                data_dir=str(tmp_path / "empty")), "data.name")
  assert "prepare" in message
  _assert_config_error(lambda: data.load_dataset("tfds"), "data.name")


# ------------------------------------------------------- source errors


def test_source_errors():
  message = _assert_config_error(lambda: data.load_dataset("hdf5"),
                                 "data.source")
  assert all(s in message for s in data.SOURCES)
  _assert_config_error(lambda: data.load_dataset("builtin", name="mnist"),
                       "data.name")
  _assert_config_error(lambda: data.load_dataset("builtin", train_subset=5000),
                       "data.train_subset")
  _assert_config_error(lambda: data.load_dataset("builtin", train_subset=-1),
                       "data.train_subset")


# ------------------------------------------------------------------- iid


@_FAST
@given(num_samples=st.integers(1, 300), num_clients=st.integers(1, 40),
       seed=st.integers(0, 2**32 - 1))
def test_iid_partition_properties(num_samples, num_clients, seed):
  num_clients = min(num_clients, num_samples)
  parts = data.iid_partition(num_samples, num_clients,
                             np.random.default_rng(seed))
  shard = num_samples // num_clients
  assert len(parts) == num_clients
  assert all(p.dtype == np.int64 and len(p) == shard for p in parts)
  union = np.concatenate(parts)
  assert len(np.unique(union)) == len(union)  # Disjoint.
  perm = np.random.default_rng(seed).permutation(num_samples)
  np.testing.assert_array_equal(union, perm[:shard * num_clients])


def test_iid_partition_seeding():
  a = data.iid_partition(100, 4, np.random.default_rng(7))
  b = data.iid_partition(100, 4, np.random.default_rng(7))
  c = data.iid_partition(100, 4, np.random.default_rng(8))
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))
  labels = np.zeros(103, np.int32)  # Remainder of 3 is dropped.
  parts = data.partition("iid", labels, 4, np.random.default_rng(0))
  assert [len(p) for p in parts] == [25] * 4


# ------------------------------------------------------------- dirichlet


def _niid_bench_reference(labels, n_parties, beta, rng, min_require_size):
  """NIID-Bench's noniid-labeldir loop, transcribed, with a Generator."""
  min_size, num_classes, n = 0, labels.max() + 1, len(labels)
  while min_size < min_require_size:
    idx_batch = [[] for _ in range(n_parties)]
    for k in range(num_classes):
      idx_k = np.where(labels == k)[0]
      rng.shuffle(idx_k)
      proportions = rng.dirichlet(np.repeat(beta, n_parties))
      proportions = np.array([p * (len(idx_j) < n / n_parties)
                              for p, idx_j in zip(proportions, idx_batch)])
      proportions = proportions / proportions.sum()
      proportions = (np.cumsum(proportions) * len(idx_k)).astype(int)[:-1]
      chunks = np.split(idx_k, proportions)
      idx_batch = [idx_j + idx.tolist()
                   for idx_j, idx in zip(idx_batch, chunks)]
      min_size = min(len(idx_j) for idx_j in idx_batch)
  for j in range(n_parties):
    rng.shuffle(idx_batch[j])
  return idx_batch


def _class_counts(parts, labels, num_classes):
  return np.stack([np.bincount(labels[p], minlength=num_classes)
                   for p in parts])


def _labels(n=5000, num_classes=10, seed=0):
  return np.random.default_rng(seed).integers(0, num_classes, n).astype(
      np.int32)


@pytest.mark.parametrize("mu,num_clients", [(0.5, 10), (0.1, 7), (5.0, 20)])
def test_dirichlet_matches_niid_bench(mu, num_clients):
  labels = _labels(2000)
  parts = data.dirichlet_partition(labels, num_clients, mu,
                                   np.random.default_rng(3))
  ref = _niid_bench_reference(labels, num_clients, mu,
                              np.random.default_rng(3), 10)
  assert len(parts) == num_clients
  for got, want in zip(parts, ref):
    np.testing.assert_array_equal(got, want)


@_FAST
@given(setting=st.sampled_from([(0.1, 10), (0.3, 12), (1.0, 20), (10.0, 30)]),
       clients=st.integers(1, 30), seed=st.integers(0, 2**32 - 1))
def test_dirichlet_invariants(setting, clients, seed):
  mu, max_clients = setting  # Feasible client counts for min_size=10.
  num_clients = min(clients, max_clients)
  labels = _labels(1500, seed=seed % 7)
  parts = data.dirichlet_partition(labels, num_clients, mu,
                                   np.random.default_rng(seed), min_size=10)
  union = np.concatenate(parts)
  assert union.dtype == np.int64
  np.testing.assert_array_equal(np.sort(union), np.arange(1500))  # All, once.
  assert min(len(p) for p in parts) >= 10
  # Cap rule: a client receives class k only if, before class k, it held
  # fewer than N / num_clients samples. As in NIID-Bench, float rounding of
  # cumsum(p) (just below 1) can leak one sample to the LAST client.
  counts = _class_counts(parts, labels, 10)
  before = np.cumsum(counts, axis=1) - counts
  allowed = (counts == 0) | (before < 1500 / num_clients)
  assert np.all(allowed[:-1])
  assert np.all(allowed[-1] | (counts[-1] <= 1))


def test_dirichlet_cap_rule_constructed_case():
  # Two clients, cap N/2 = 100. A client that takes >= 100 of class 0 must get
  # none of class 1, which then goes entirely to the other client.
  labels = np.array([0] * 150 + [1] * 50, np.int32)
  capped = 0
  for seed in range(40):
    parts = data.dirichlet_partition(labels, 2, 0.3,
                                     np.random.default_rng(seed), min_size=0)
    counts = _class_counts(parts, labels, 2)
    for j in range(2):
      if counts[j, 0] >= 100:
        capped += 1
        assert counts[j, 1] == 0 and counts[1 - j, 1] == 50
  assert capped > 0


def test_dirichlet_reproducible_and_mu_controls_skew():
  labels = _labels()
  a = data.dirichlet_partition(labels, 10, 0.1, np.random.default_rng(0))
  b = data.dirichlet_partition(labels, 10, 0.1, np.random.default_rng(0))
  c = data.dirichlet_partition(labels, 10, 0.1, np.random.default_rng(1))
  assert all(np.array_equal(x, y) for x, y in zip(a, b))
  assert not all(np.array_equal(x, y) for x, y in zip(a, c))
  assert not np.array_equal(np.sort(a[0]), a[0])  # Shuffled at the end.

  def mean_distinct(mu):
    parts = data.partition("dirichlet", labels, 10, np.random.default_rng(0),
                           mu=mu)
    return (_class_counts(parts, labels, 10) > 0).sum(axis=1).mean()

  skewed, flat = mean_distinct(0.1), mean_distinct(100.0)
  assert skewed < 6 and flat == 10 and skewed < flat


def test_partition_errors():
  labels = _labels(50)
  rng = np.random.default_rng(0)
  message = _assert_config_error(
      lambda: data.partition("shards", labels, 5, rng), "data.partition")
  assert "iid" in message and "dirichlet" in message
  for mu in (0.0, -1.0):
    _assert_config_error(lambda: data.partition("dirichlet", labels, 5, rng,
                                                mu=mu), "data.mu")
  for kind in data.PARTITIONS:
    message = _assert_config_error(
        lambda: data.partition(kind, labels, 51, rng, min_size=0),
        "data.num_clients")
    assert "50 samples" in message
    _assert_config_error(lambda: data.partition(kind, labels, 0, rng),
                         "data.num_clients")
  _assert_config_error(lambda: data.partition("dirichlet", labels, 10, rng,
                                              min_size=6), "data.min_size")
  message = _assert_config_error(
      lambda: data.dirichlet_partition(_labels(100), 10, 0.01, rng,
                                       min_size=10, max_tries=5),
      "data.min_size")
  assert "data.mu" in message and "fewer clients" in message


def test_describe_partition_is_one_line():
  labels = np.array([0, 0, 1, 1, 1, 2, 2, 2, 2, 0], np.int32)
  parts = [np.array([0, 2, 5]), np.array([1, 3, 4, 6]), np.array([7, 8])]
  line = data.describe_partition(parts, labels, 3)
  assert line == ("3 clients, sizes min 2 / median 3 / max 4; labels per "
                  "client: c0 [1 1 1] c1 [1 2 1] c2 [0 0 2]")
  many = data.iid_partition(5000, 50, np.random.default_rng(0))
  line = data.describe_partition(many, _labels(), 10)
  assert "\n" not in line and line.startswith("50 clients, sizes min 100 / "
                                              "median 100 / max 100;")
  assert "c49" not in line and "distinct labels per client" in line


# -------------------------------------------------------------- batching


def test_steps_per_epoch():
  assert [data.steps_per_epoch(n, 2) for n in (0, 1, 2, 3, 4, 5)] == [
      0, 1, 1, 2, 2, 3]
  assert data.steps_per_epoch(1, 10) == 1


def test_round_batches_hand_computed():
  clients = [np.array([10, 11, 12, 13, 14]), np.array([20, 21, 22])]
  idx, mask = data.round_batches(clients, 2, 2, np.random.default_rng(0))
  assert idx.shape == mask.shape == (2, 6, 2)
  assert idx.dtype == np.int32 and mask.dtype == np.float32
  np.testing.assert_array_equal(mask[0], [[1, 1], [1, 1], [1, 0]] * 2)
  np.testing.assert_array_equal(mask[1], [[1, 1], [1, 0], [0, 0]] * 2)
  assert np.all(idx[mask == 0] == 0)
  rng = np.random.default_rng(0)  # Consumed client by client, epoch by epoch.
  for k, client in enumerate(clients):
    for e in range(2):
      flat = idx[k, 3 * e:3 * e + 3].reshape(-1)
      np.testing.assert_array_equal(flat[:len(client)],
                                    rng.permutation(client))


@_FAST
@given(sizes=st.lists(st.integers(0, 23), min_size=1, max_size=5),
       batch_size=st.integers(1, 6), epochs=st.integers(1, 3),
       seed=st.integers(0, 2**32 - 1))
def test_round_batches_invariants(sizes, batch_size, epochs, seed):
  rng = np.random.default_rng(seed)
  pool = rng.permutation(np.arange(1, sum(sizes) + 1))  # Indices >= 1.
  clients = np.split(pool, np.cumsum(sizes)[:-1])
  idx, mask = data.round_batches(clients, batch_size, epochs,
                                 np.random.default_rng(seed))
  spe = max(-(-n // batch_size) for n in sizes)
  assert idx.shape == (len(sizes), epochs * spe, batch_size)
  for k, (client, n) in enumerate(zip(clients, sizes)):
    real = idx[k][mask[k] == 1]
    assert set(real) <= set(client)  # Never another client's index.
    np.testing.assert_array_equal(np.bincount(real, minlength=pool.size + 1),
                                  np.isin(np.arange(pool.size + 1), client)
                                  * epochs)
    per_step = mask[k].sum(axis=1).reshape(epochs, spe)
    want = np.clip(n - np.arange(spe) * batch_size, 0, batch_size)
    np.testing.assert_array_equal(per_step, np.tile(want, (epochs, 1)))
    epoch_masks = mask[k].reshape(epochs, -1)  # Real first, then padding.
    assert np.all(epoch_masks[:, :n] == 1) and np.all(epoch_masks[:, n:] == 0)
  assert np.all(idx[mask == 0] == 0)
  again = data.round_batches(clients, batch_size, epochs,
                             np.random.default_rng(seed))
  np.testing.assert_array_equal(idx, again[0])
  np.testing.assert_array_equal(mask, again[1])


def test_round_batches_empty_clients():
  idx, mask = data.round_batches([np.zeros(0, np.int64), np.arange(3)], 4, 2,
                                 np.random.default_rng(0))
  assert idx.shape == (2, 2, 4)
  assert mask[0].sum() == 0 and np.all(idx[0] == 0)
  np.testing.assert_array_equal(mask[1], [[1, 1, 1, 0]] * 2)
  idx, mask = data.round_batches([np.zeros(0, np.int64)], 4, 2,
                                 np.random.default_rng(0))
  assert idx.shape == mask.shape == (1, 0, 4)


def test_eval_batches_hand_computed():
  idx, mask = data.eval_batches(5, 2)
  np.testing.assert_array_equal(idx, [[0, 1], [2, 3], [4, 0]])
  np.testing.assert_array_equal(mask, [[1, 1], [1, 1], [1, 0]])
  assert idx.dtype == np.int32 and mask.dtype == np.float32
  idx, mask = data.eval_batches(4, 2)
  np.testing.assert_array_equal(idx, [[0, 1], [2, 3]])
  assert mask.min() == 1
  idx, mask = data.eval_batches(0, 3)
  assert idx.shape == mask.shape == (0, 3)


# ------------------------------------------------ normalisation and test subset


def test_published_normalisation_by_dataset_name(tmp_path):
  rng = np.random.default_rng(0)
  path = _write_npz(tmp_path / "cifar10.npz", **_tiny_arrays(rng))
  default = data.load_dataset("npz", path=path)
  x = default.x_train.astype(np.float64) / 255
  np.testing.assert_allclose(default.mean, x.mean(axis=(0, 1, 2)), rtol=1e-5)  # train_stats
  ds = data.load_dataset("npz", path=path, normalization="published")
  np.testing.assert_array_equal(ds.mean, np.float32([0.4914, 0.4822, 0.4465]))
  np.testing.assert_array_equal(ds.std, np.float32([0.2470, 0.2435, 0.2616]))
  ds = data.load_dataset("npz", path=path, name="svhn_cropped", normalization="published")
  np.testing.assert_array_equal(ds.mean, np.float32([0.4496] * 3))
  np.testing.assert_array_equal(ds.std, np.float32([0.1995] * 3))
  ds = data.load_dataset("npz", path=path, name="cifar100", normalization="published")
  np.testing.assert_array_equal(ds.std, np.float32([0.2673, 0.2564, 0.2762]))
  message = _assert_config_error(
      lambda: data.load_dataset("npz", path=path, name="tiny", normalization="published"),
      "data.normalization")
  assert "cifar10, cifar100, svhn_cropped" in message
  _assert_config_error(lambda: data.load_dataset("npz", path=path, normalization="imagenet"),
                       "data.normalization")
  gray = _write_npz(tmp_path / "gray.npz", **_tiny_arrays(rng, gray=True))
  _assert_config_error(lambda: data.load_dataset("npz", path=gray, name="cifar10",
                                                 normalization="published"),
                       "data.normalization")


def test_test_subset_is_seeded_and_checked():
  full = data.load_dataset("builtin")
  a = data.load_dataset("builtin", test_subset=50, subset_seed=3)
  b = data.load_dataset("builtin", test_subset=50, subset_seed=3)
  c = data.load_dataset("builtin", test_subset=50, subset_seed=4)
  assert a.x_test.shape == (50, 8, 8, 1) and len(a.y_test) == 50
  np.testing.assert_array_equal(a.y_test, b.y_test)
  assert not np.array_equal(a.x_test, c.x_test)
  np.testing.assert_array_equal(a.x_train, full.x_train)  # the training set is untouched
  matches = (a.x_test[:, None] == full.x_test[None]).all(axis=(2, 3, 4)).any(axis=1)
  assert matches.all()
  _assert_config_error(lambda: data.load_dataset("builtin", test_subset=361),
                       "data.test_subset")


def test_tfds_cifar100_mock_has_100_classes():
  tfds = pytest.importorskip("tensorflow_datasets")
  with tfds.testing.mock_data(num_examples=8):
    ds = data.load_dataset("tfds", name="cifar100", normalization="published")
  assert ds.num_classes == 100 and ds.x_train.shape == (8, 32, 32, 3)
  np.testing.assert_array_equal(ds.mean, np.float32([0.5071, 0.4865, 0.4409]))


def test_tfds_misspelt_name_lists_the_paper_datasets(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  message = _assert_config_error(
      lambda: data.load_dataset("tfds", name="cifar1o", data_dir=str(tmp_path)), "data.name")
  assert "cifar10, cifar100, svhn_cropped" in message
  assert "closest: cifar10" in message and message.endswith("got 'cifar1o'")


def test_tfds_unprepared_without_tensorflow_says_what_to_install(tmp_path):
  pytest.importorskip("tensorflow_datasets")
  if importlib.util.find_spec("tensorflow") is not None:
    pytest.skip("TensorFlow is installed: the loader would download and prepare instead")
  message = _assert_config_error(
      lambda: data.load_dataset("tfds", name="svhn_cropped", data_dir=str(tmp_path)),
      "data.name")
  assert "pip install tensorflow-cpu" in message


# ------------------------------------------------------------ augmentation


def _crop_candidates(image: np.ndarray, padding: int) -> np.ndarray:
  """Every crop_flip output of one image: [2 * (2p + 1)^2, H, W, C], flip-major."""
  h, w = image.shape[:2]
  padded = np.pad(image, ((padding, padding), (padding, padding), (0, 0)))
  crops = [padded[dy:dy + h, dx:dx + w] for dy in range(2 * padding + 1)
           for dx in range(2 * padding + 1)]
  return np.stack(crops + [c[:, ::-1] for c in crops])


def test_crop_flip_outputs_are_padded_crops_with_uniform_offsets_and_fair_flips():
  import jax  # pylint: disable=g-import-not-at-top
  image = (np.arange(64, dtype=np.uint8) + 1).reshape(8, 8, 1)  # all pixels distinct, no 0
  batch = np.broadcast_to(image, (3000, 8, 8, 1))
  out = np.asarray(data.random_crop_flip(jax.random.key(0), batch))
  assert out.shape == batch.shape and out.dtype == np.uint8
  candidates = _crop_candidates(image, 4)                       # [162, 8, 8, 1]
  hits = (out[:, None] == candidates[None]).all(axis=(2, 3, 4))  # [3000, 162]
  assert np.all(hits.sum(axis=1) == 1), "each output is exactly one crop (flipped or not)"
  which = hits.argmax(axis=1)
  flipped = which >= 81
  assert 0.45 < flipped.mean() < 0.55
  offsets = np.bincount(which % 81, minlength=81)
  assert offsets.min() > 0 and offsets.max() < 3 * 3000 / 81  # all 81 offsets, none dominant
  np.testing.assert_array_equal(
      out, np.asarray(data.random_crop_flip(jax.random.key(0), batch)))  # a pure function of key
  assert not np.array_equal(out, np.asarray(data.random_crop_flip(jax.random.key(1), batch)))


def test_augment_batch_names():
  import jax  # pylint: disable=g-import-not-at-top
  x = np.random.default_rng(0).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
  np.testing.assert_array_equal(np.asarray(data.augment_batch("none", jax.random.key(0), x)), x)
  assert np.asarray(data.augment_batch("crop_flip", jax.random.key(0), x)).shape == x.shape
  message = _assert_config_error(lambda: data.augment_batch("mixup", jax.random.key(0), x),
                                 "data.augment")
  assert "none, crop_flip" in message


# --------------------------------------------------------------- label and image checks


@pytest.mark.parametrize("y_train, y_test, num_classes, every_class, fragment", [
    # 100..109 train, 0..9 test: not one test label was ever trained on.
    (np.arange(100, 110), np.arange(10), 110, True,
     "src: no test label occurs in the training set (train labels 100..109, test labels 0..9)"),
    # One-based labels: class 0 never occurs, the model would get an unused output.
    (np.arange(1, 11), np.arange(1, 11), 11, True,
     "src: labels must be 0..K-1 with every class present, found 10 distinct labels 1..10 "
     "(missing 0): remap them to 0..9"),
    # A gap in the middle (class 3 of 0..5 absent).
    (np.array([0, 1, 2, 4, 5]), np.array([0, 5]), 6, True,
     "found 5 distinct labels 0, 1, 2, 4, 5 (missing 3): remap them to 0..4"),
    # tfds: the class count comes from the data set's info; a label beyond it is refused.
    (np.array([0, 1, 10]), np.array([0, 1]), 10, False,
     "src: labels must lie in 0..9 (the data set's 10 classes), found 10"),
    (np.array([0, 1, -1]), np.array([0, 1]), 2, True, "found -1"),
])
def test_check_labels_refuses_what_cannot_be_scored(y_train, y_test, num_classes, every_class,
                                                    fragment):
  with pytest.raises(ConfigError) as info:
    data.check_labels(y_train, y_test, num_classes, where="src", every_class=every_class)
  assert fragment in str(info.value)


def test_check_labels_accepts_a_dense_label_space_and_warns_on_a_partly_unseen_test_set(caplog):
  data.check_labels(np.arange(10), np.arange(10), 10)  # nothing to say
  # tfds: classes 7..9 of the info's 10 need not occur.
  data.check_labels(np.arange(7), np.arange(7), 10, every_class=False)
  assert not caplog.records
  # Label 4 occurs only in the test set (twice): the run is possible, two images are lost.
  data.check_labels(np.array([0, 1, 2, 3]), np.array([4, 0, 4, 1]), 5, where="src")
  assert [r.getMessage() for r in caplog.records] == [
      "src: test label(s) 4 never occur in the training set: those 2 test images can never be "
      "classified correctly"]


@pytest.mark.parametrize("images, fragment", [
    ([np.zeros((8, 8, 3), np.float32) + 0.5] * 2, "must be uint8 pixels 0..255, got float32"),
    ([np.full((8, 8), 1000, np.uint16)] * 2, "got uint16 with values 1000..1000"),
    ([np.zeros((8, 8, 3), np.uint8), np.zeros((9, 8, 3), np.uint8)],
     "has images of 2 shapes ([8, 8, 3], [9, 8, 3]"),
    ([np.zeros((2, 8, 8, 3), np.uint8)] * 2, "must be [H, W] or [H, W, C], got shape [2, 8, 8, 3]"),
])
def test_tfds_images_the_models_cannot_take_are_refused_not_cast(images, fragment):
  records = [{"image": im, "label": 0} for im in images]  # a list is a random-access source
  with pytest.raises(ConfigError) as info:
    data.sources._read_records(records, "fake[train]")
  assert str(info.value).startswith("data.name: tfds split fake[train]")
  assert fragment in str(info.value)


def test_tfds_integer_pixels_in_range_are_kept():
  records = [{"image": np.full((2, 2), v, np.int64), "label": 0} for v in (0, 255)]
  images, _ = data.sources._read_records(records, "fake[train]")
  assert images.dtype == np.uint8 and images.shape == (2, 2, 2, 1)
  np.testing.assert_array_equal(images[:, 0, 0, 0], [0, 255])


def test_pad_steps_and_compact_schedule_only_move_masked_steps():
  from fedbif_jax.data import compact_schedule, pad_steps
  idx = np.arange(2 * 3 * 2, dtype=np.int32).reshape(2, 3, 2)
  mask = np.array([[[1, 1], [0, 0], [1, 0]], [[0, 0], [0, 0], [1, 1]]], np.float32)
  padded_idx, padded_mask = pad_steps(idx, mask, 5)
  assert padded_idx.shape == padded_mask.shape == (2, 5, 2)
  assert not padded_mask[:, 3:].any() and not padded_idx[:, 3:].any()
  assert pad_steps(idx, mask, 3) == (idx, mask)
  moved_idx, moved_mask, real = compact_schedule(padded_idx, padded_mask)
  assert real.tolist() == [2, 1]
  np.testing.assert_array_equal(moved_idx[0, :2], idx[0, [0, 2]])
  np.testing.assert_array_equal(moved_idx[1, :1], idx[1, [2]])
  np.testing.assert_array_equal(moved_mask.sum(axis=(1, 2)), mask.sum(axis=(1, 2)))
