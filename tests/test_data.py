"""The MNIST IDX loader and the scikit-learn digits fallback."""

import gzip
import struct
from pathlib import Path

import numpy as np
import pytest

from teleport_jax.experiments import data as data_lib

CODES = {np.dtype("uint8"): 0x08, np.dtype("int16"): 0x0B, np.dtype("float32"): 0x0D}


def idx_bytes(array: np.ndarray) -> bytes:
  """The IDX encoding of ``array`` (magic, big-endian sizes, big-endian values)."""
  array = np.asarray(array)
  header = bytes([0, 0, CODES[array.dtype], array.ndim])
  header += struct.pack(f">{array.ndim}I", *array.shape)
  return header + array.astype(array.dtype.newbyteorder(">")).tobytes()


def write_idx(path: Path, array: np.ndarray) -> Path:
  """Writes ``array`` as an IDX file, gzipped if ``path`` ends in ``.gz``."""
  raw = idx_bytes(array)
  if path.name.endswith(".gz"):
    with gzip.open(path, "wb") as f:
      f.write(raw)
  else:
    path.write_bytes(raw)
  return path


def fake_mnist(directory: Path, *, gz: bool, n_train=20, n_val=10, side=28, seed=0):
  """Writes the four MNIST files with random pixels; returns the arrays."""
  rng = np.random.default_rng(seed)
  arrays = {
    "train-images-idx3-ubyte": rng.integers(0, 256, (n_train, side, side), dtype=np.uint8),
    "train-labels-idx1-ubyte": rng.integers(0, 10, (n_train,), dtype=np.uint8),
    "t10k-images-idx3-ubyte": rng.integers(0, 256, (n_val, side, side), dtype=np.uint8),
    "t10k-labels-idx1-ubyte": rng.integers(0, 10, (n_val,), dtype=np.uint8),
  }
  arrays["train-images-idx3-ubyte"][0, 0, 0] = 255  # the scaling maps 255 to exactly 1
  arrays["train-images-idx3-ubyte"][0, 0, 1] = 0
  arrays["train-labels-idx1-ubyte"][0] = 9  # all ten classes can be present
  for name, a in arrays.items():
    write_idx(directory / (name + (".gz" if gz else "")), a)
  return arrays


@pytest.mark.parametrize("gz", [False, True], ids=["raw", "gz"])
def test_reads_mnist_files_exactly(tmp_path, gz):
  arrays = fake_mnist(tmp_path, gz=gz)
  ds = data_lib.load_classification_data(tmp_path)
  assert ds.name == "mnist"
  assert "MNIST" in ds.note and str(tmp_path) in ds.note
  assert ds.x_train.shape == (20, 784) and ds.x_val.shape == (10, 784)
  assert ds.x_train.dtype == np.float32 and ds.x_val.dtype == np.float32
  assert ds.y_train.dtype == np.int32 and ds.y_val.dtype == np.int32
  want_train = arrays["train-images-idx3-ubyte"].reshape(20, -1).astype(np.float32) / 255
  want_val = arrays["t10k-images-idx3-ubyte"].reshape(10, -1).astype(np.float32) / 255
  np.testing.assert_array_equal(ds.x_train, want_train)
  np.testing.assert_array_equal(ds.x_val, want_val)
  np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte"])
  np.testing.assert_array_equal(ds.y_val, arrays["t10k-labels-idx1-ubyte"])
  assert ds.x_train.max() == 1.0 and ds.x_train.min() == 0.0
  assert ds.num_features == 784


def test_read_idx_other_dtypes_and_shapes(tmp_path):
  a = np.arange(-6, 6, dtype=np.int16).reshape(3, 4)
  b = np.linspace(-1, 1, 24, dtype=np.float32).reshape(2, 3, 4)
  np.testing.assert_array_equal(data_lib.read_idx(write_idx(tmp_path / "a", a)), a)
  got = data_lib.read_idx(write_idx(tmp_path / "b.gz", b))
  assert got.dtype == np.float32 and got.dtype.isnative
  np.testing.assert_array_equal(got, b)


def test_subsets_are_deterministic(tmp_path):
  arrays = fake_mnist(tmp_path, gz=False)
  a = data_lib.load_classification_data(tmp_path, max_train=7, max_val=4, seed=3)
  b = data_lib.load_classification_data(tmp_path, max_train=7, max_val=4, seed=3)
  assert a.x_train.shape == (7, 784) and a.y_val.shape == (4,)
  np.testing.assert_array_equal(a.x_train, b.x_train)
  # every kept row is one of the file's rows, with its own label
  images = arrays["train-images-idx3-ubyte"].reshape(20, -1).astype(np.float32) / 255
  for x, y in zip(a.x_train, a.y_train):
    (i,) = np.flatnonzero(np.all(images == x, axis=1))
    assert arrays["train-labels-idx1-ubyte"][i] == y
  assert "7 training and 4 validation" in a.note


def _corrupt(path: Path, how: str) -> None:
  raw = path.read_bytes()
  if how == "truncated":
    path.write_bytes(raw[:-5])
  elif how == "magic":
    path.write_bytes(b"\x01\x02" + raw[2:])
  elif how == "dtype":
    path.write_bytes(raw[:2] + b"\x42" + raw[3:])
  elif how == "extra":
    path.write_bytes(raw + b"\x00")
  elif how == "short":
    path.write_bytes(raw[:2])
  elif how == "header":
    path.write_bytes(raw[:9])
  else:
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["truncated", "magic", "dtype", "extra", "short", "header"])
def test_corrupted_file_raises_with_its_name(tmp_path, how):
  fake_mnist(tmp_path, gz=False)
  _corrupt(tmp_path / "t10k-images-idx3-ubyte", how)
  with pytest.raises(ValueError, match="t10k-images-idx3-ubyte"):
    data_lib.load_classification_data(tmp_path)


@pytest.mark.parametrize("how", ["truncated", "garbled"])
def test_corrupted_gzip_raises_with_its_name(tmp_path, how):
  fake_mnist(tmp_path, gz=True)
  path = tmp_path / "train-labels-idx1-ubyte.gz"
  raw = path.read_bytes()
  # "garbled": a wrong CRC-32 in the gzip trailer
  path.write_bytes(
    raw[:12] if how == "truncated" else raw[:-8] + bytes(b ^ 0xFF for b in raw[-8:-4]) + raw[-4:]
  )
  with pytest.raises(ValueError, match="train-labels-idx1-ubyte.gz"):
    data_lib.load_classification_data(tmp_path)


def test_label_count_mismatch_raises(tmp_path):
  fake_mnist(tmp_path, gz=False)
  write_idx(tmp_path / "train-labels-idx1-ubyte", np.zeros(19, np.uint8))
  with pytest.raises(ValueError, match="train-labels-idx1-ubyte"):
    data_lib.load_classification_data(tmp_path)


def test_partial_mnist_directory_raises(tmp_path):
  fake_mnist(tmp_path, gz=False)
  (tmp_path / "t10k-labels-idx1-ubyte").unlink()
  with pytest.raises(FileNotFoundError, match="t10k-labels-idx1-ubyte"):
    data_lib.load_classification_data(tmp_path)


def test_missing_directory_raises(tmp_path):
  with pytest.raises(FileNotFoundError, match="not a directory"):
    data_lib.load_classification_data(tmp_path / "nope")


def _check_digits(ds):
  assert ds.name == "sklearn_digits"
  assert ds.x_train.shape[1] == 64 and ds.x_val.shape[1] == 64
  assert len(ds.y_train) + len(ds.y_val) == 1797
  assert ds.x_train.dtype == np.float32 and ds.y_train.dtype == np.int32
  assert 0.0 <= ds.x_train.min() and ds.x_train.max() <= 1.0
  assert set(np.unique(ds.y_train)) == set(range(10)) == set(np.unique(ds.y_val))
  assert ds.num_classes == 10
  assert "8x8" in ds.note and "digits" in ds.note


def test_empty_directory_falls_back_to_digits(tmp_path):
  ds = data_lib.load_classification_data(tmp_path)
  _check_digits(ds)
  assert "holds no MNIST" in ds.note


def test_no_directory_falls_back_to_digits_deterministically():
  a = data_lib.load_classification_data(None)
  b = data_lib.load_classification_data(None, max_train=100, max_val=50)
  _check_digits(a)
  assert "no data directory" in a.note
  np.testing.assert_array_equal(a.x_train, data_lib.load_classification_data(None).x_train)
  assert b.x_train.shape == (100, 64) and b.x_val.shape == (50, 64)
