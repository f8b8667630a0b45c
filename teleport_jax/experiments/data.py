"""Data for the classification experiment: MNIST from IDX files, else 8x8 digits.

Nothing is downloaded. :func:`load_classification_data` reads the four
standard MNIST files (``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally
gzipped; the ``train-images.idx3-ubyte`` spelling is accepted too) from a
directory. Without a directory, or if it holds none of them, it falls back to
scikit-learn's bundled 8x8 handwritten digits (1,797 real images shipped with
scikit-learn), split deterministically into training and validation sets.

The IDX format (LeCun et al.): a 4-byte magic number ``0x00 0x00 <dtype code>
<number of dimensions>``, then one big-endian ``uint32`` per dimension, then
the values in C order, big-endian.
"""

from __future__ import annotations

import gzip
import zlib
from pathlib import Path
from typing import NamedTuple

import numpy as np

# IDX dtype code -> big-endian numpy dtype.
IDX_DTYPES = {
  0x08: np.dtype(">u1"),
  0x09: np.dtype(">i1"),
  0x0B: np.dtype(">i2"),
  0x0C: np.dtype(">i4"),
  0x0D: np.dtype(">f4"),
  0x0E: np.dtype(">f8"),
}

MNIST_FILES = {
  "train_images": "train-images-idx3-ubyte",
  "train_labels": "train-labels-idx1-ubyte",
  "val_images": "t10k-images-idx3-ubyte",
  "val_labels": "t10k-labels-idx1-ubyte",
}

DIGITS_VAL_FRACTION = 0.4


class Dataset(NamedTuple):
  """A classification data set, ready for an MLP.

  Attributes:
    x_train: ``(n_train, features)`` float32 in ``[0, 1]``.
    y_train: ``(n_train,)`` int32 class labels.
    x_val: ``(n_val, features)`` float32 in ``[0, 1]``.
    y_val: ``(n_val,)`` int32 class labels.
    name: ``"mnist"`` or ``"sklearn_digits"``.
    note: a sentence saying which data was used and why.
  """

  x_train: np.ndarray
  y_train: np.ndarray
  x_val: np.ndarray
  y_val: np.ndarray
  name: str
  note: str

  @property
  def num_features(self) -> int:
    return int(self.x_train.shape[1])

  @property
  def num_classes(self) -> int:
    return int(max(self.y_train.max(), self.y_val.max())) + 1


def read_idx(path: str | Path) -> np.ndarray:
  """Reads one IDX file (gzipped if its name ends in ``.gz``).

  Args:
    path: the file.

  Returns:
    The array, in native byte order, with the shape of the header.

  Raises:
    ValueError: naming the file, if the magic number, dtype code, sizes or the
      amount of data are wrong (or the gzip stream is corrupt).
  """
  path = Path(path)
  try:
    if path.name.endswith(".gz"):
      with gzip.open(path, "rb") as f:
        raw = f.read()
    else:
      raw = path.read_bytes()
  except (OSError, EOFError, zlib.error) as e:
    raise ValueError(f"{path.name}: cannot read IDX file ({e}).") from e
  if len(raw) < 4:
    raise ValueError(f"{path.name}: not an IDX file (only {len(raw)} bytes).")
  if raw[0] != 0 or raw[1] != 0:
    raise ValueError(
      f"{path.name}: not an IDX file (magic number starts with {raw[0]:#04x} {raw[1]:#04x}, "
      "expected 0x00 0x00)."
    )
  code, ndim = raw[2], raw[3]
  if code not in IDX_DTYPES:
    raise ValueError(f"{path.name}: unknown IDX dtype code {code:#04x}.")
  if ndim == 0:
    raise ValueError(f"{path.name}: IDX header declares 0 dimensions.")
  header = 4 + 4 * ndim
  if len(raw) < header:
    raise ValueError(f"{path.name}: truncated IDX header ({ndim} dimensions declared).")
  shape = tuple(int(s) for s in np.frombuffer(raw, ">u4", count=ndim, offset=4))
  dtype = IDX_DTYPES[code]
  expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
  if len(raw) - header != expected:
    raise ValueError(
      f"{path.name}: IDX header declares shape {shape} of {dtype.str} "
      f"({expected} bytes of data) but the file holds {len(raw) - header}."
    )
  data = np.frombuffer(raw, dtype, offset=header).reshape(shape)
  return data.astype(dtype.newbyteorder("="))


def _find(data_dir: Path, base: str) -> Path | None:
  """The file for ``base`` in ``data_dir`` (raw or ``.gz``, ``-idx`` or ``.idx``)."""
  names = [base, base.replace("-idx", ".idx")]
  for name in names:
    for candidate in (name, name + ".gz"):
      if (data_dir / candidate).is_file():
        return data_dir / candidate
  return None


def find_mnist(data_dir: Path | None) -> dict[str, Path] | None:
  """The four MNIST files in ``data_dir``, or ``None`` if it holds none of them.

  Raises:
    FileNotFoundError: if ``data_dir`` is given but is not a directory, or
      holds some of the files but not all four.
  """
  if data_dir is None:
    return None
  data_dir = Path(data_dir)
  if not data_dir.is_dir():
    raise FileNotFoundError(f"data_dir {str(data_dir)!r} is not a directory.")
  found = {k: _find(data_dir, base) for k, base in MNIST_FILES.items()}
  if all(p is None for p in found.values()):
    return None
  missing = [MNIST_FILES[k] for k, p in found.items() if p is None]
  if missing:
    raise FileNotFoundError(
      f"data_dir {str(data_dir)!r} holds some MNIST files but not {', '.join(missing)} "
      "(raw or .gz)."
    )
  return found  # type: ignore[return-value]


def _subsample(x, y, limit, rng):
  if limit is None or limit >= len(y):
    return x, y
  idx = np.sort(rng.permutation(len(y))[:limit])
  return x[idx], y[idx]


def _images_and_labels(images_path: Path, labels_path: Path):
  images = read_idx(images_path)
  labels = read_idx(labels_path)
  if images.ndim < 2:
    raise ValueError(f"{images_path.name}: expected images (>= 2 dimensions), got {images.shape}.")
  if labels.ndim != 1:
    raise ValueError(f"{labels_path.name}: expected 1-D labels, got shape {labels.shape}.")
  if len(images) != len(labels):
    raise ValueError(
      f"{images_path.name} has {len(images)} images but {labels_path.name} has {len(labels)} labels."
    )
  if labels.size and (labels.min() < 0 or labels.max() > 255):
    raise ValueError(f"{labels_path.name}: labels out of range [0, 255].")
  x = images.reshape(len(images), -1).astype(np.float32)
  if images.dtype == np.uint8:
    x /= np.float32(255.0)
  return x, labels.astype(np.int32)


def load_mnist(files: dict[str, Path]) -> tuple[np.ndarray, ...]:
  """Reads MNIST from the paths given by :func:`find_mnist`.

  Returns:
    ``(x_train, y_train, x_val, y_val)``: images flattened to float32 in
    ``[0, 1]`` (``uint8`` / 255), labels int32; validation = the t10k set.
  """
  x_tr, y_tr = _images_and_labels(files["train_images"], files["train_labels"])
  x_va, y_va = _images_and_labels(files["val_images"], files["val_labels"])
  if x_tr.shape[1] != x_va.shape[1]:
    raise ValueError(
      f"{files['train_images'].name} has {x_tr.shape[1]} pixels per image but "
      f"{files['val_images'].name} has {x_va.shape[1]}."
    )
  return x_tr, y_tr, x_va, y_va


def load_digits_split(seed: int = 0) -> tuple[np.ndarray, ...]:
  """scikit-learn's 8x8 digits, stratified into train/validation (60/40).

  Returns:
    ``(x_train, y_train, x_val, y_val)``: pixels / 16 as float32 in ``[0, 1]``.
  """
  from sklearn.datasets import load_digits

  digits = load_digits()
  x = (digits.data / 16.0).astype(np.float32)
  y = digits.target.astype(np.int32)
  rng = np.random.default_rng(seed)
  train_idx, val_idx = [], []
  for c in np.unique(y):  # stratified: the same fraction of every class
    idx = rng.permutation(np.flatnonzero(y == c))
    n_val = int(round(DIGITS_VAL_FRACTION * len(idx)))
    val_idx.append(idx[:n_val])
    train_idx.append(idx[n_val:])
  tr, va = np.sort(np.concatenate(train_idx)), np.sort(np.concatenate(val_idx))
  return x[tr], y[tr], x[va], y[va]


def load_classification_data(
  data_dir: Path | None,
  *,
  max_train: int | None = None,
  max_val: int | None = None,
  seed: int = 0,
) -> Dataset:
  """MNIST from ``data_dir`` if it holds the IDX files, else the 8x8 digits.

  Args:
    data_dir: directory with the four MNIST IDX files, or ``None``.
    max_train: keep at most this many training examples (a random subset
      drawn with ``seed``, in original order).
    max_val: the same for the validation set.
    seed: seed of the subsets and of the digits split.

  Returns:
    A :class:`Dataset`.

  Raises:
    ValueError: a malformed IDX file (naming it).
    FileNotFoundError: ``data_dir`` is not a directory or misses some of the files.
  """
  files = find_mnist(data_dir)
  if files is not None:
    x_tr, y_tr, x_va, y_va = load_mnist(files)
    name = "mnist"
    source = f"MNIST from {Path(data_dir)} ({len(y_tr)} training / {len(y_va)} test images)"
  else:
    x_tr, y_tr, x_va, y_va = load_digits_split(seed)
    name = "sklearn_digits"
    why = (
      "no data directory was given"
      if data_dir is None
      else f"{Path(data_dir)} holds no MNIST IDX files"
    )
    source = (
      f"scikit-learn's bundled 8x8 handwritten digits ({len(y_tr) + len(y_va)} real images, "
      f"stratified {len(y_tr)}/{len(y_va)} train/validation split) because {why}; "
      "pass --data-dir or $TELEPORT_JAX_MNIST_DIR with the MNIST IDX files to run on MNIST"
    )
  rng = np.random.default_rng(seed)
  x_tr, y_tr = _subsample(x_tr, y_tr, max_train, rng)
  x_va, y_va = _subsample(x_va, y_va, max_val, rng)
  subset = ""
  if max_train is not None or max_val is not None:
    subset = f"; used {len(y_tr)} training and {len(y_va)} validation examples"
  return Dataset(
    x_train=np.ascontiguousarray(x_tr, np.float32),
    y_train=np.ascontiguousarray(y_tr, np.int32),
    x_val=np.ascontiguousarray(x_va, np.float32),
    y_val=np.ascontiguousarray(y_va, np.int32),
    name=name,
    note=f"Data: {source}{subset}.",
  )
