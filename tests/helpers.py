"""Shared test helpers: running main.py in a subprocess, reading metrics.jsonl."""
import json
import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def run_main(*args, env=None, timeout=900, check=True, devices=1):
  """Runs ``python main.py ARGS`` from the repo root; returns the CompletedProcess."""
  e = dict(os.environ)
  e["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  e["JAX_PLATFORMS"] = "cpu"
  e.setdefault("ASCAN_COMPILATION_CACHE", os.path.join(REPO, ".jax_cache"))
  e.update(env or {})
  proc = subprocess.run([sys.executable, "main.py", *args], cwd=REPO, env=e,
                        capture_output=True, text=True, timeout=timeout)
  if check and proc.returncode != 0:
    raise AssertionError(f"main.py {' '.join(args)} failed ({proc.returncode}):\n"
                         f"{proc.stdout[-3000:]}\n{proc.stderr[-6000:]}")
  return proc


def read_jsonl(path):
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]
