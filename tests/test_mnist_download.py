"""Finding, caching and downloading MNIST, against a local HTTP server only.

Every request goes to a ``ThreadingHTTPServer`` on 127.0.0.1; an autouse fixture
refuses (and records) any connection to another host.
"""

import gzip
import hashlib
import http.server
import json
import socket
import struct
import sys
import threading
import types
from pathlib import Path

import numpy as np
import pytest

from teleport_jax.experiments import cli
from teleport_jax.experiments import data as data_lib

NAMES = tuple(data_lib.MNIST_CHECKSUMS)


def _idx_gz(array: np.ndarray) -> bytes:
  """``array`` (uint8) as a gzipped IDX file, byte for byte reproducible."""
  header = bytes([0, 0, 0x08, array.ndim]) + struct.pack(f">{array.ndim}I", *array.shape)
  return gzip.compress(header + array.astype(np.uint8).tobytes(), mtime=0)


@pytest.fixture(scope="module")
def arrays():
  rng = np.random.default_rng(0)
  return {
    "train-images-idx3-ubyte.gz": rng.integers(0, 256, (5, 4, 4), dtype=np.uint8),
    "train-labels-idx1-ubyte.gz": rng.integers(0, 10, (5,), dtype=np.uint8),
    "t10k-images-idx3-ubyte.gz": rng.integers(0, 256, (3, 4, 4), dtype=np.uint8),
    "t10k-labels-idx1-ubyte.gz": rng.integers(0, 10, (3,), dtype=np.uint8),
  }


@pytest.fixture(scope="module")
def files(arrays):
  return {name: _idx_gz(a) for name, a in arrays.items()}


@pytest.fixture(scope="module")
def checksums(files):
  return {
    name: {"md5": hashlib.md5(b).hexdigest(), "sha256": hashlib.sha256(b).hexdigest()}
    for name, b in files.items()
  }


class _Handler(http.server.BaseHTTPRequestHandler):
  """``/good/NAME``: the file; ``/bad/NAME``: one byte changed; ``/short/NAME``: cut off."""

  def do_GET(self):  # noqa: N802 (the http.server API)
    self.server.requests.append(self.path)
    kind, _, name = self.path.strip("/").partition("/")
    body = self.server.files.get(name)
    if body is None or kind not in ("good", "bad", "short"):
      self.send_error(404)
      return
    size = len(body)
    if kind == "bad":
      body = body[:-1] + bytes([body[-1] ^ 0xFF])
    elif kind == "short":  # announces the whole file, sends half, closes the connection
      body = body[: size // 2]
    self.send_response(200)
    self.send_header("Content-Type", "application/octet-stream")
    self.send_header("Content-Length", str(size))
    self.end_headers()
    self.wfile.write(body)

  def log_message(self, format, *args):  # noqa: A002 (the http.server API)
    del format, args


@pytest.fixture
def server(files):
  """A local mirror; ``server.url(kind)`` is a base URL, ``server.requests`` the paths asked."""
  httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Handler)
  httpd.daemon_threads = True
  httpd.files = files
  httpd.requests = []
  thread = threading.Thread(target=httpd.serve_forever, kwargs=dict(poll_interval=0.02))
  thread.start()
  httpd.url = lambda kind: f"http://127.0.0.1:{httpd.server_address[1]}/{kind}/"
  yield httpd
  httpd.shutdown()
  httpd.server_close()
  thread.join(timeout=5)


@pytest.fixture
def closed_port():
  """A local port nobody listens on: connections are refused at once."""
  with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


@pytest.fixture(autouse=True)
def connections(monkeypatch):
  """Records every outgoing connection; any host but 127.0.0.1 fails the test."""
  seen = []
  connect, getaddrinfo = socket.socket.connect, socket.getaddrinfo

  def guarded_connect(self, address):
    seen.append(address)
    if isinstance(address, tuple) and address[0] != "127.0.0.1":
      raise AssertionError(f"a test tried to connect to {address}")
    return connect(self, address)

  def guarded_getaddrinfo(host, *args, **kwargs):
    if host not in ("127.0.0.1", "localhost"):
      raise AssertionError(f"a test tried to resolve {host}")
    return getaddrinfo(host, *args, **kwargs)

  monkeypatch.setattr(socket.socket, "connect", guarded_connect)
  monkeypatch.setattr(socket, "getaddrinfo", guarded_getaddrinfo)
  monkeypatch.delenv(data_lib.MNIST_DIR_ENV, raising=False)
  return seen


def _locate(cache, mirrors, checksums, log=None, **kwargs):
  return data_lib.locate_mnist(
    cache_dir=cache,
    mirrors=mirrors,
    checksums=checksums,
    timeout=5.0,
    log=(log.append if log is not None else None),
    **kwargs,
  )


def _check_mnist(ds, arrays):
  assert ds.name == "mnist"
  assert ds.x_train.shape == (5, 16) and ds.x_val.shape == (3, 16)
  want = arrays["train-images-idx3-ubyte.gz"].reshape(5, -1).astype(np.float32) / 255
  np.testing.assert_array_equal(ds.x_train, want)
  np.testing.assert_array_equal(ds.y_train, arrays["train-labels-idx1-ubyte.gz"])
  np.testing.assert_array_equal(ds.y_val, arrays["t10k-labels-idx1-ubyte.gz"])


def _only_the_files(cache: Path, files) -> None:
  """The cache holds exactly the published bytes and no temporary file."""
  assert sorted(p.name for p in cache.iterdir()) == sorted(NAMES)
  for name, body in files.items():
    assert (cache / name).read_bytes() == body


def test_download_verifies_caches_and_the_loader_reads_it(
  tmp_path, server, files, checksums, arrays
):
  cache, log = tmp_path / "cache", []
  found = _locate(cache, [server.url("good")], checksums, log, download=True)
  assert found.origin == "download" and found.directory == cache and found.message is None
  assert found.detail == f"downloaded from {server.url('good')} into the cache, checksum-verified"
  assert sorted(server.requests) == sorted(f"/good/{n}" for n in NAMES)
  assert len(log) == 4 and all(
    line.startswith("MNIST: downloading http://127.0.0.1") for line in log
  )
  _only_the_files(cache, files)
  ds = data_lib.load_classification_data(found.directory, source=found.detail)
  _check_mnist(ds, arrays)
  assert f"MNIST from {cache} (downloaded from" in ds.note and "checksum-verified" in ds.note

  # a second call reads the cache and sends no request
  again = _locate(cache, [server.url("good")], checksums, download=True)
  assert again.origin == "cache" and again.directory == cache
  assert again.detail == "the cache, checksum-verified"
  assert len(server.requests) == 4
  _check_mnist(data_lib.load_classification_data(again.directory, source=again.detail), arrays)


def test_a_wrong_checksum_is_deleted_and_the_next_mirror_used(tmp_path, server, files, checksums):
  cache, log = tmp_path / "cache", []
  found = _locate(cache, [server.url("bad"), server.url("good")], checksums, log, download=True)
  assert found.origin == "download" and found.detail.startswith(
    f"downloaded from {server.url('good')} into"
  )
  # every file was first refused from the bad mirror, then fetched from the good one
  assert server.requests == [f"/{k}/{n}" for n in NAMES for k in ("bad", "good")]
  rejected = [line for line in log if "checksum mismatch" in line]
  assert len(rejected) == 4 and all("the file was deleted" in line for line in rejected)
  assert "md5" in rejected[0] and "sha256" in rejected[0]
  _only_the_files(cache, files)


def test_a_wrong_checksum_on_every_mirror_gives_the_digits(tmp_path, server, checksums):
  cache = tmp_path / "cache"
  found = _locate(cache, [server.url("bad")], checksums, download=True)
  assert found.origin == "none" and found.directory is None
  assert found.message.startswith("MNIST could not be fetched (train-images-idx3-ubyte.gz: ")
  assert "checksum mismatch" in found.message and "8x8 digits" in found.message
  assert server.requests == ["/bad/train-images-idx3-ubyte.gz"]  # the first failure ends it
  assert list(cache.iterdir()) == []  # the rejected download is gone
  ds = data_lib.load_classification_data(found.directory, source=found.detail)
  assert ds.name == "sklearn_digits" and "because MNIST could not be fetched" in ds.note


def test_an_interrupted_download_leaves_no_file(tmp_path, server, checksums):
  cache = tmp_path / "cache"
  found = _locate(cache, [server.url("short")], checksums, download=True)
  assert found.origin == "none" and "IncompleteRead: the connection closed" in found.message
  assert server.requests == ["/short/train-images-idx3-ubyte.gz"]
  assert list(cache.iterdir()) == []


def test_a_server_that_is_down_gives_the_digits_with_the_reason(
  tmp_path, closed_port, checksums, connections
):
  cache = tmp_path / "cache"
  mirror = f"http://127.0.0.1:{closed_port}/mnist/"
  found = _locate(cache, [mirror], checksums, download=True)
  assert found.origin == "none" and found.directory is None
  line = found.message
  assert "\n" not in line
  assert line.startswith(f"MNIST could not be fetched (train-images-idx3-ubyte.gz: {mirror}")
  assert "URLError" in line and "refused" in line
  assert f"in {cache} or pass --data-dir DIR" in line
  assert line.endswith("using scikit-learn's 8x8 digits instead.")
  assert connections == [("127.0.0.1", closed_port)]  # one attempt, not one per file
  ds = data_lib.load_classification_data(found.directory, source=found.detail)
  assert ds.name == "sklearn_digits" and "URLError" in ds.note


def test_an_unreachable_mirror_is_tried_once(tmp_path, server, closed_port, files, checksums):
  cache, log = tmp_path / "cache", []
  down = f"http://127.0.0.1:{closed_port}/"
  found = _locate(cache, [down, server.url("good")], checksums, log, download=True)
  assert found.origin == "download"
  assert sum(down in line for line in log) == 1 and len(server.requests) == 4
  _only_the_files(cache, files)


def test_a_partial_cache_is_completed(tmp_path, server, files, checksums):
  cache = tmp_path / "cache"
  cache.mkdir()
  (cache / NAMES[0]).write_bytes(files[NAMES[0]])
  found = _locate(cache, [server.url("good")], checksums, download=True)
  assert found.origin == "download"
  assert sorted(server.requests) == sorted(f"/good/{n}" for n in NAMES[1:])
  _only_the_files(cache, files)


def test_the_users_directory_comes_first(tmp_path, server, files, checksums):
  user = tmp_path / "user"
  user.mkdir()
  for name, body in files.items():
    (user / name).write_bytes(body)
  found = _locate(tmp_path / "cache", [server.url("good")], checksums, data_dir=user)
  assert found == data_lib.MnistSource(user, "user", "the user's directory", None)
  assert server.requests == [] and not (tmp_path / "cache").exists()
  # an empty user directory: the cache or a download, and the note says so
  empty = tmp_path / "empty"
  empty.mkdir()
  found = _locate(
    tmp_path / "cache", [server.url("good")], checksums, data_dir=empty, download=True
  )
  assert found.origin == "download" and found.detail.startswith(f"{empty} holds no MNIST")


@pytest.mark.parametrize("how", ["env", "argument"])
def test_opting_out_never_connects(tmp_path, server, checksums, connections, monkeypatch, how):
  if how == "env":
    monkeypatch.setenv(data_lib.NO_DOWNLOAD_ENV, "1")
    download = None
  else:
    monkeypatch.delenv(data_lib.NO_DOWNLOAD_ENV, raising=False)
    download = False
  cache = tmp_path / "cache"
  found = _locate(cache, [server.url("good")], checksums, download=download)
  assert found.origin == "none" and "downloading is turned off" in found.message
  assert "$TELEPORT_JAX_NO_DOWNLOAD" in found.message and str(cache) in found.message
  assert server.requests == [] and connections == [] and not cache.exists()


@pytest.mark.parametrize(("value", "off"), [("1", True), ("yes", True), ("0", False), ("", False)])
def test_the_opt_out_variable(monkeypatch, value, off):
  monkeypatch.setenv(data_lib.NO_DOWNLOAD_ENV, value)
  assert data_lib.download_disabled() is off


def test_the_suite_runs_with_downloads_off():
  assert data_lib.download_disabled()


def test_cache_directory(monkeypatch, tmp_path):
  monkeypatch.delenv(data_lib.CACHE_ENV, raising=False)
  monkeypatch.setenv("HOME", str(tmp_path / "home"))
  monkeypatch.delenv("XDG_CACHE_HOME", raising=False)
  assert data_lib.mnist_cache_dir() == tmp_path / "home/.cache/teleport_jax/mnist"
  monkeypatch.setenv("XDG_CACHE_HOME", "relative/ignored")
  assert data_lib.mnist_cache_dir() == tmp_path / "home/.cache/teleport_jax/mnist"
  monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
  assert data_lib.mnist_cache_dir() == tmp_path / "xdg/teleport_jax/mnist"
  monkeypatch.setenv(data_lib.CACHE_ENV, str(tmp_path / "mine"))
  assert data_lib.mnist_cache_dir() == tmp_path / "mine/mnist"


def test_the_published_checksums_are_complete():
  assert set(data_lib.MNIST_CHECKSUMS) == {base + ".gz" for base in data_lib.MNIST_FILES.values()}
  for sums in data_lib.MNIST_CHECKSUMS.values():
    assert len(sums["md5"]) == 32 and len(sums["sha256"]) == 64
  assert all(m.startswith("https://") and m.endswith("/") for m in data_lib.MNIST_MIRRORS)


# ------------------------------------------------------------------ reproduce
@pytest.fixture
def reproduce(tmp_path, monkeypatch):
  """``cli.main`` with a stand-in ``classification`` that loads the data and reports its note."""
  seen = {}

  def run(config, progress):
    ds = data_lib.load_classification_data(config.data_dir, source=config.data_source)
    seen.update(config=config, dataset=ds)
    progress.update(1)
    return dict(protocol=dict(dataset=ds.name), notes=[ds.note])

  fake = types.ModuleType("teleport_jax.experiments._stand_in")
  fake.num_units, fake.run = (lambda config: 1), run
  monkeypatch.setitem(sys.modules, fake.__name__, fake)
  monkeypatch.setattr(cli, "EXPERIMENTS", {"classification": "_stand_in", "newton": "_stand_in"})
  monkeypatch.setattr(cli, "_library_fingerprint", lambda: {})
  monkeypatch.setenv(data_lib.CACHE_ENV, str(tmp_path / "cache"))
  monkeypatch.delenv(data_lib.NO_DOWNLOAD_ENV, raising=False)

  def main(*args):
    assert cli.main([*args, "--out", str(tmp_path / "out"), "--no-progress"]) == 0
    return seen

  return main


def test_reproduce_no_download_never_connects(reproduce, connections, capsys):
  seen = reproduce("--only", "classification", "--no-download")
  assert connections == []
  assert seen["config"].data_dir is None and seen["dataset"].name == "sklearn_digits"
  err = capsys.readouterr().err  # the one-line reason goes to stderr
  assert "downloading is turned off (--no-download" in err and "8x8 digits instead" in err
  summary = json.loads(Path(seen["config"].out_dir, "summary.json").read_text())
  assert "downloading is turned off" in summary["experiments"]["classification"]["notes"][0]


def test_reproduce_env_opt_out_never_connects(reproduce, connections, monkeypatch, capsys):
  monkeypatch.setenv(data_lib.NO_DOWNLOAD_ENV, "1")
  seen = reproduce("--only", "classification")
  assert connections == [] and seen["config"].data_dir is None
  assert "downloading is turned off" in capsys.readouterr().err


def test_reproduce_prints_where_mnist_came_from(reproduce, tmp_path, files, connections, capsys):
  cache = tmp_path / "cache" / "mnist"
  cache.mkdir(parents=True)
  for name, body in files.items():
    (cache / name).write_bytes(body)
  seen = reproduce("--only", "classification")
  assert connections == [] and seen["config"].data_dir == cache
  assert seen["dataset"].name == "mnist"
  out = capsys.readouterr().out
  # not the published files: the note says so rather than claiming a verification
  assert f"note: Data: MNIST from {cache} (the cache, files differing" in out


def test_reproduce_without_classification_data_looks_for_none(reproduce, monkeypatch):
  def fail(*args, **kwargs):
    raise AssertionError("locate_mnist called")

  monkeypatch.setattr(data_lib, "locate_mnist", fail)
  seen = reproduce("--only", "newton")
  assert seen["config"].data_dir is None and seen["config"].data_source is None
