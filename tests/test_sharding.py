"""Runs tests/sharded in its own process on 8 emulated CPU devices."""

import os
import pathlib
import subprocess
import sys

HERE = pathlib.Path(__file__).parent


def test_sharded_training_matches_one_device_on_eight_emulated_devices():
  env = dict(os.environ)
  flags = env.get("XLA_FLAGS", "")
  env["XLA_FLAGS"] = (flags + " --xla_force_host_platform_device_count=8").strip()
  env["TELEPORT_JAX_SHARDED"] = "1"
  cmd = [sys.executable, "-m", "pytest", str(HERE / "sharded"), "-q", "-p", "no:cacheprovider"]
  cmd += ["-p", "no:xdist", "-o", "addopts=-ra --import-mode=importlib"]
  proc = subprocess.run(cmd, env=env, capture_output=True, text=True, cwd=HERE.parent)
  out = proc.stdout + proc.stderr
  assert proc.returncode == 0, out[-6000:]
  assert " passed" in out and "skipped" not in out, out[-3000:]
