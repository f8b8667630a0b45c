"""Data for the classification experiment: MNIST (found, cached or fetched), else 8x8 digits.

:func:`load_classification_data` reads the four standard MNIST files
(``train-images-idx3-ubyte``, ``train-labels-idx1-ubyte``,
``t10k-images-idx3-ubyte``, ``t10k-labels-idx1-ubyte``, each optionally
gzipped; the ``train-images.idx3-ubyte`` spelling is accepted too) from a
directory. Without a directory, or if it holds none of them, it falls back to
scikit-learn's bundled 8x8 handwritten digits (1,797 real images shipped with
scikit-learn), split deterministically into training and validation sets.

:func:`locate_mnist` decides which directory that is, in this order:

1. the user's directory (``reproduce --data-dir`` or ``$TELEPORT_JAX_MNIST_DIR``),
   if it holds the files;
2. the cache, ``$TELEPORT_JAX_CACHE/mnist`` if that variable is set, else
   ``$XDG_CACHE_HOME/teleport_jax/mnist``, else ``~/.cache/teleport_jax/mnist``
   (:func:`mnist_cache_dir`);
3. a download into the cache (:func:`download_mnist`): the four ``.gz`` files
   from the first of :data:`MNIST_MIRRORS` that serves them, each checked
   against the MD5 and SHA-256 sums in :data:`MNIST_CHECKSUMS` before it is
   renamed into place (a file that fails the check is deleted and the next
   mirror tried). Only the standard library is used, with a
   :data:`DOWNLOAD_TIMEOUT_S` socket timeout, so an offline machine gives up
   quickly.

If none of them gives MNIST the result says why (for example the
``URLError`` of the last mirror) and the 8x8 digits are used; the network never
stops an experiment. ``reproduce --no-download`` or
``$TELEPORT_JAX_NO_DOWNLOAD=1`` skip step 3, so nothing touches the network.

The IDX format (LeCun et al.): a 4-byte magic number ``0x00 0x00 <dtype code>
<number of dimensions>``, then one big-endian ``uint32`` per dimension, then
the values in C order, big-endian.
"""

from __future__ import annotations

import gzip
import hashlib
import http.client
import os
import sys
import tempfile
import urllib.error
import urllib.request
import zlib
from collections.abc import Callable
from collections.abc import Mapping
from collections.abc import Sequence
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

# Mirrors of the original MNIST files (yann.lecun.com itself refuses scripted
# downloads), tried in this order. A URL is the mirror followed by the file name.
MNIST_MIRRORS = (
  "https://ossci-datasets.s3.amazonaws.com/mnist/",
  "https://storage.googleapis.com/cvdf-datasets/mnist/",
)
# The published files (9,912,422, 28,881, 1,648,877 and 4,542 bytes): the MD5
# sums torchvision checks and the SHA-256 sums TensorFlow Datasets checks. Every
# digest listed for a file must match.
MNIST_CHECKSUMS: dict[str, dict[str, str]] = {
  "train-images-idx3-ubyte.gz": {
    "md5": "f68b3c2dcbeaaa9fbdd348bbdeb94873",
    "sha256": "440fcabf73cc546fa21475e81ea370265605f56be210a4024d2ca8f203523609",
  },
  "train-labels-idx1-ubyte.gz": {
    "md5": "d53e105ee54ea40749a09fcbcd1e9432",
    "sha256": "3552534a0a558bbed6aed32b30c495cca23d567ec52cac8be1a0730e8010255c",
  },
  "t10k-images-idx3-ubyte.gz": {
    "md5": "9fb629c4189551a2d022fa330f9573f3",
    "sha256": "8d422c7b0a1c1c79245a5bcf07fe86e33eeafee792b84584aec276f5a2dbc4e6",
  },
  "t10k-labels-idx1-ubyte.gz": {
    "md5": "ec29112dd5afa0611ce80d1b7f02629c",
    "sha256": "f7ae60f92e00ec6debd23a6088c31dbd2371eca3ffa0defaefb259924204aec6",
  },
}
# Seconds a connection attempt (and every later read) may block before the mirror
# counts as unreachable.
DOWNLOAD_TIMEOUT_S = 10.0
# A response longer than this is abandoned (the largest file has 9.9 MB).
MAX_DOWNLOAD_BYTES = 32 * 2**20

MNIST_DIR_ENV = "TELEPORT_JAX_MNIST_DIR"
CACHE_ENV = "TELEPORT_JAX_CACHE"
NO_DOWNLOAD_ENV = "TELEPORT_JAX_NO_DOWNLOAD"


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


# ------------------------------------------------------------------ download
class DownloadError(OSError):
  """No mirror served a file with the expected checksums (the message says why)."""


class ChecksumError(ValueError):
  """A downloaded file's digest differs from the expected one."""


class MnistSource(NamedTuple):
  """Where :func:`locate_mnist` found MNIST, or why it did not.

  Attributes:
    directory: the directory with the four files (for
      :func:`load_classification_data`), or ``None``: use the 8x8 digits.
    origin: ``"user"`` (the user's directory), ``"cache"``, ``"download"``
      (fetched into the cache just now) or ``"none"``.
    detail: a phrase for the data set's note: where the files came from or,
      without them, why.
    message: a line for the user when MNIST is not used, else ``None``.
  """

  directory: Path | None
  origin: str
  detail: str
  message: str | None


def _stderr(line: str) -> None:
  print(line, file=sys.stderr, flush=True)


def mnist_cache_dir() -> Path:
  """The directory that caches downloaded MNIST files.

  ``$TELEPORT_JAX_CACHE/mnist`` if that variable is set, else
  ``$XDG_CACHE_HOME/teleport_jax/mnist`` (an absolute ``XDG_CACHE_HOME`` only),
  else ``~/.cache/teleport_jax/mnist``. Nothing is created.
  """
  root = os.environ.get(CACHE_ENV)
  if root:
    return Path(root).expanduser() / "mnist"
  xdg = os.environ.get("XDG_CACHE_HOME", "")
  base = Path(xdg) if os.path.isabs(xdg) else Path.home() / ".cache"
  return base / "teleport_jax" / "mnist"


def download_disabled() -> bool:
  """Whether ``$TELEPORT_JAX_NO_DOWNLOAD`` turns downloads off.

  Any value but empty, ``0``, ``false``, ``no`` or ``off`` (in any case) does.
  """
  value = os.environ.get(NO_DOWNLOAD_ENV, "").strip().lower()
  return value not in ("", "0", "false", "no", "off")


def _digests(path: Path, algorithms) -> dict[str, str]:
  hashes = {a: hashlib.new(a, usedforsecurity=False) for a in algorithms}
  with open(path, "rb") as f:
    while chunk := f.read(1 << 20):
      for h in hashes.values():
        h.update(chunk)
  return {a: h.hexdigest() for a, h in hashes.items()}


def _check(name: str, got: Mapping[str, str], expected: Mapping[str, str]) -> None:
  bad = [a for a in expected if got[a] != expected[a].lower()]
  if bad:
    raise ChecksumError(
      f"{name}: checksum mismatch ("
      + ", ".join(f"{a} {got[a]}, expected {expected[a].lower()}" for a in bad)
      + ")"
    )


def _fetch(url: str, dest: Path, expected: Mapping[str, str], timeout: float) -> int:
  """Downloads ``url`` to ``dest`` atomically, verifying ``expected``; returns the size.

  The bytes go to a temporary file next to ``dest``, which is renamed to
  ``dest`` only once its digests match, and deleted otherwise.
  """
  fd, tmp_name = tempfile.mkstemp(dir=dest.parent, prefix=f".{dest.name}.", suffix=".part")
  tmp = Path(tmp_name)
  try:
    hashes = {a: hashlib.new(a, usedforsecurity=False) for a in expected}
    size = 0
    with os.fdopen(fd, "wb") as out, urllib.request.urlopen(url, timeout=timeout) as response:
      announced = response.headers.get("Content-Length", "")
      while chunk := response.read(1 << 16):
        size += len(chunk)
        if size > MAX_DOWNLOAD_BYTES:
          raise ValueError(f"response exceeds {MAX_DOWNLOAD_BYTES} bytes")
        out.write(chunk)
        for h in hashes.values():
          h.update(chunk)
      if announced.isdigit() and size < int(announced):  # the connection closed early
        raise http.client.IncompleteRead(b"", int(announced) - size)
      out.flush()
      os.fsync(out.fileno())
    _check(dest.name, {a: h.hexdigest() for a, h in hashes.items()}, expected)
    os.replace(tmp, dest)
    return size
  except BaseException:
    tmp.unlink(missing_ok=True)
    raise


def _reason(error: BaseException) -> str:
  """A short description of a failed request, naming the exception's type."""
  if isinstance(error, urllib.error.HTTPError):
    return f"HTTPError {error.code} {error.reason}"
  if isinstance(error, urllib.error.URLError):
    return f"URLError: {error.reason}"
  if isinstance(error, http.client.IncompleteRead):
    return f"IncompleteRead: the connection closed {error.expected} bytes early"
  if isinstance(error, ChecksumError):
    return str(error)
  return f"{type(error).__name__}: {error}"


def download_mnist(
  directory: str | Path | None = None,
  *,
  mirrors: Sequence[str] = MNIST_MIRRORS,
  checksums: Mapping[str, Mapping[str, str]] = MNIST_CHECKSUMS,
  timeout: float = DOWNLOAD_TIMEOUT_S,
  log: Callable[[str], None] | None = _stderr,
) -> dict[str, str]:
  """Downloads the MNIST files that ``directory`` lacks, verifying each one.

  Each file named in ``checksums`` that is not yet in ``directory`` (as
  ``.gz`` or raw) is requested from each mirror in turn until one serves it
  with the expected digests. A mirror that cannot be reached is not asked for
  the remaining files; the first file that no mirror serves ends the download.

  Args:
    directory: where the files go (created if needed); ``None``:
      :func:`mnist_cache_dir`.
    mirrors: base URLs, each ending in ``/``.
    checksums: file name -> {``hashlib`` algorithm -> expected hex digest}.
    timeout: socket timeout in seconds (connecting and each read).
    log: receives a line per request and per rejected file; ``None``: silent.

  Returns:
    file name -> the URL it was downloaded from (empty if nothing was missing).

  Raises:
    DownloadError: a file could not be fetched from any mirror; the message
      lists each mirror's failure (e.g. ``URLError: [Errno 111] Connection
      refused`` or a checksum mismatch). Files fetched before it are kept.
  """
  log = log or (lambda line: None)
  directory = Path(directory) if directory is not None else mnist_cache_dir()
  try:
    directory.mkdir(parents=True, exist_ok=True)
  except OSError as e:
    raise DownloadError(f"cannot create {directory}: {e}") from e
  fetched: dict[str, str] = {}
  unreachable: dict[str, str] = {}
  for name, expected in checksums.items():
    if _find(directory, name.removesuffix(".gz")) is not None:
      continue
    failures = []
    for mirror in mirrors:
      url = mirror + name
      if mirror in unreachable:
        failures.append(f"{url}: {unreachable[mirror]}")
        continue
      log(f"MNIST: downloading {url}")
      try:
        _fetch(url, directory / name, expected, timeout)
      except ChecksumError as e:
        log(f"MNIST: {url}: {e}; the file was deleted")
        failures.append(f"{url}: {e}")
        continue
      except (OSError, http.client.HTTPException, ValueError) as e:
        failures.append(f"{url}: {_reason(e)}")
        if isinstance(e, urllib.error.HTTPError):
          e.close()  # the server answered: ask it for the other files
        elif isinstance(e, OSError):
          unreachable[mirror] = _reason(e)
        continue
      fetched[name] = url
      break
    else:
      raise DownloadError(f"{name}: " + "; ".join(failures or ["no mirrors given"]))
  return fetched


def _cache_detail(cache: Path, files: dict[str, Path], checksums) -> str:
  """``"the cache, ..."``, saying whether the files are the published ones."""
  try:
    verified = all(
      path.name in checksums
      and _digests(path, checksums[path.name])
      == {a: d.lower() for a, d in checksums[path.name].items()}
      for path in files.values()
    )
  except OSError:
    verified = False
  state = "checksum-verified" if verified else "files differing from the published checksums"
  return f"the cache, {state}"


def locate_mnist(
  data_dir: str | Path | None = None,
  *,
  download: bool | None = None,
  cache_dir: str | Path | None = None,
  mirrors: Sequence[str] = MNIST_MIRRORS,
  checksums: Mapping[str, Mapping[str, str]] = MNIST_CHECKSUMS,
  timeout: float = DOWNLOAD_TIMEOUT_S,
  log: Callable[[str], None] | None = _stderr,
) -> MnistSource:
  """The directory to read MNIST from: the user's, the cache, or a fresh download.

  Never raises because of the network: a failed download gives
  ``directory=None`` and a ``message`` saying why and where to put the files.

  Args:
    data_dir: the user's directory (``--data-dir`` / ``$TELEPORT_JAX_MNIST_DIR``),
      used if it holds the four files.
    download: whether to fetch missing files; ``None``: unless
      ``$TELEPORT_JAX_NO_DOWNLOAD`` is set. ``False`` never touches the network.
    cache_dir: the cache; ``None``: :func:`mnist_cache_dir`.
    mirrors, checksums, timeout, log: as for :func:`download_mnist`.

  Returns:
    A :class:`MnistSource`.

  Raises:
    FileNotFoundError: ``data_dir`` is not a directory or holds only some of
      the files (as :func:`find_mnist`).
  """
  if data_dir is not None and find_mnist(data_dir) is not None:
    return MnistSource(Path(data_dir), "user", "the user's directory", None)
  cache = Path(cache_dir) if cache_dir is not None else mnist_cache_dir()
  skipped = f"{data_dir} holds no MNIST IDX files; " if data_dir is not None else ""
  try:
    files = find_mnist(cache) if cache.is_dir() else None
  except FileNotFoundError:  # some files: a download completes them
    files = None
  if files is not None:
    return MnistSource(cache, "cache", skipped + _cache_detail(cache, files, checksums), None)
  if download is None:
    download = not download_disabled()
  if download:
    try:
      fetched = download_mnist(
        cache, mirrors=mirrors, checksums=checksums, timeout=timeout, log=log
      )
      files = find_mnist(cache)
    except (DownloadError, FileNotFoundError) as e:
      why = f"MNIST could not be fetched ({e})"
    else:
      if files is not None:
        hosts = sorted({url.removesuffix(name) for name, url in fetched.items()})
        how = f"downloaded from {', '.join(hosts)} into the cache" if hosts else "the cache"
        detail = f"{skipped}{how}, checksum-verified"
        return MnistSource(cache, "download", detail, None)
      why = f"MNIST could not be fetched (no files were written to {cache})"
  else:
    why = (
      f"MNIST is not in {cache} and downloading is turned off (--no-download or ${NO_DOWNLOAD_ENV})"
    )
  message = (
    f"{skipped}{why}; put the four MNIST files (train/t10k images/labels, .gz or raw) in "
    f"{cache} or pass --data-dir DIR (or ${MNIST_DIR_ENV}); using scikit-learn's 8x8 digits "
    "instead."
  )
  return MnistSource(None, "none", skipped + why, message)


def load_classification_data(
  data_dir: Path | None,
  *,
  max_train: int | None = None,
  max_val: int | None = None,
  seed: int = 0,
  source: str | None = None,
) -> Dataset:
  """MNIST from ``data_dir`` if it holds the IDX files, else the 8x8 digits.

  Reads only local files; :func:`locate_mnist` finds (or fetches) the directory.

  Args:
    data_dir: directory with the four MNIST IDX files, or ``None``.
    max_train: keep at most this many training examples (a random subset
      drawn with ``seed``, in original order).
    max_val: the same for the validation set.
    seed: seed of the subsets and of the digits split.
    source: for the note: where ``data_dir`` came from or, if it is ``None``,
      why MNIST is not used (:attr:`MnistSource.detail`).

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
    origin = f"{source}; " if source else ""
    what = f"MNIST from {Path(data_dir)} ({origin}{len(y_tr)} training / {len(y_va)} test images)"
  else:
    x_tr, y_tr, x_va, y_va = load_digits_split(seed)
    name = "sklearn_digits"
    if source:
      why = source
    elif data_dir is None:
      why = "no data directory was given"
    else:
      why = f"{Path(data_dir)} holds no MNIST IDX files"
    what = (
      f"scikit-learn's bundled 8x8 handwritten digits ({len(y_tr) + len(y_va)} real images, "
      f"stratified {len(y_tr)}/{len(y_va)} train/validation split) because {why}; "
      f"pass --data-dir or ${MNIST_DIR_ENV} with the MNIST IDX files, or let reproduce "
      "download them, to run on MNIST"
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
    note=f"Data: {what}{subset}.",
  )
