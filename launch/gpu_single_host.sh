#!/usr/bin/env bash
# Runs ascan_jax on one NVIDIA GPU host with 1-8 GPUs: a single python process sees every GPU
# (jax.devices() lists them all; no distributed runtime is started). It exports the XLA, NCCL and
# allocator settings below (each one explained where it is set; a value already in your
# environment wins), prints them and the command, then execs `python main.py ...` so that SIGTERM
# reaches main.py directly (it then writes a checkpoint and exits 0; re-running resumes).
#
# Example:
#   pip install -r requirements.txt "jax[cuda13]==0.10.2"
#   launch/gpu_single_host.sh --workdir=/data/runs/ascan_l --config=configs/ascan_l.py -- --config.seed=1
#
# --dry_run prints the environment and the command and runs nothing.
set -euo pipefail

SCRIPT_DIR="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
REPO="$(cd "$SCRIPT_DIR/.." && pwd)"
PROG="launch/gpu_single_host.sh"

WORKDIR="" CONFIG="" PYTHON="python3" DRY_RUN=0
EXTRA_ARGS=()

usage() {
  cat <<EOF
Usage: $PROG --workdir=DIR --config=FILE[:ARG] [--python=PY] [--dry_run] [-- MAIN_PY_ARGS...]

Runs python main.py on this host with every visible NVIDIA GPU in one process, with the XLA/NCCL/
allocator environment tuned for speed (printed before the run).

Required:
  --workdir=DIR         main.py --workdir (checkpoints, metrics; a re-run resumes from it)
  --config=FILE[:ARG]   main.py --config, e.g. configs/ascan_l.py

Optional:
  --python=PY           the python with requirements.txt and "jax[cuda13]==0.10.2" installed
                        (default: $PYTHON)
  --dry_run             print the environment and the command, run nothing
  -h, --help            print this help and exit
  -- ARGS...            everything after -- is passed to main.py, e.g. --mode=bench

Example:
  $PROG --workdir=/data/runs/ascan_l --config=configs/ascan_l.py -- --config.seed=1
EOF
}

die_usage() {
  printf '%s: %s\n' "$PROG" "$*" >&2
  printf "Run '%s --help' for usage.\n" "$PROG" >&2
  exit 2
}

quote_word() {
  local word="$1" q="'\\''"
  if [[ "$word" =~ ^[A-Za-z0-9_./:=,@%+-]+$ ]]; then printf '%s' "$word"; else printf "'%s'" "${word//\'/$q}"; fi
}

quote_cmd() {
  local out="" word
  for word in "$@"; do out="$out${out:+ }$(quote_word "$word")"; done
  printf '%s\n' "$out"
}

wants_help() {
  local arg
  for arg in "$@"; do
    case "$arg" in
      --) return 1 ;;
      -h | --help) return 0 ;;
    esac
  done
  return 1
}

set_option() {
  case "$1" in
    --workdir) WORKDIR="$2" ;;
    --config) CONFIG="$2" ;;
    --python) PYTHON="$2" ;;
    *) die_usage "unknown option: $1" ;;
  esac
}

parse_args() {
  while (($#)); do
    case "$1" in
      --) shift; EXTRA_ARGS=("$@"); return 0 ;;
      --dry_run) DRY_RUN=1 ;;
      --workdir=* | --config=* | --python=*) set_option "${1%%=*}" "${1#*=}" ;;
      --workdir | --config | --python)
        (($# >= 2)) || die_usage "option $1 needs a value"
        set_option "$1" "$2"
        shift ;;
      *) die_usage "unknown option: $1" ;;
    esac
    shift
  done
}

validate_args() {
  local missing=()
  [[ -n "$WORKDIR" ]] || missing+=(--workdir)
  [[ -n "$CONFIG" ]] || missing+=(--config)
  ((${#missing[@]} == 0)) || die_usage "missing required option(s): ${missing[*]}"
  [[ -f "${CONFIG%%:*}" ]] || die_usage "--config: '${CONFIG%%:*}' is not a file (relative to $(pwd))"
}

# The GPU environment; gpu_multi_node.slurm sets the same (tests/test_launch.py checks that).
# Only flags that exist in jax/jaxlib 0.10.2 (an unknown XLA flag aborts the process).
GPU_ENV=()
gpu_env() {
  # Latency hiding scheduler: schedules the asynchronous collectives (the gradient all-reduce
  # across GPUs) to overlap with independent compute instead of running them back to back. Off
  # by default in XLA; JAX's GPU performance tips and NVIDIA's JAX containers turn it on. With
  # one GPU there are no collectives and it changes nothing. Flags already in $XLA_FLAGS come
  # after ours, so yours win. Considered and left at XLA's defaults: command buffers (CUDA
  # graphs, --xla_gpu_enable_command_buffer: on by default), --xla_gpu_triton_gemm_any (helps
  # or hurts per model; measure with --mode=bench first), collective combine thresholds and
  # JAX_OPTIMIZATION_LEVEL=O1 (pay off mostly for FSDP / scanned layers, cost compile time).
  local xla_flags="--xla_gpu_enable_latency_hiding_scheduler=true"
  GPU_ENV=("XLA_FLAGS=$xla_flags${XLA_FLAGS:+ $XLA_FLAGS}")
  # GPU memory: JAX preallocates 75% of each GPU by default; 90% leaves room for larger batches
  # and less rematerialisation while keeping some for cuDNN/cuBLAS workspaces and NCCL buffers
  # (NVIDIA's JAX guidance uses 0.8-0.9). jaxlib 0.10.2 reads XLA_CLIENT_MEM_FRACTION (the old
  # name XLA_PYTHON_CLIENT_MEM_FRACTION is deprecated, and setting both makes the CUDA plugin
  # fail to load), so this is set only when neither is. Preallocation stays on (the default):
  # one big arena avoids fragmentation and allocation stalls.
  if [[ -z "${XLA_CLIENT_MEM_FRACTION:-}" && -z "${XLA_PYTHON_CLIENT_MEM_FRACTION:-}" ]]; then
    GPU_ENV+=("XLA_CLIENT_MEM_FRACTION=0.9")
  fi
  # Platforms: an explicit list makes a CUDA plugin that fails to initialise (CUDA/driver
  # mismatch, bad setting) an error, instead of JAX silently running everything on the CPU.
  GPU_ENV+=("JAX_PLATFORMS=${JAX_PLATFORMS:-cuda,cpu}")
  # Persistent compilation cache (main.py --compilation_cache_dir defaults to it): a resumed or
  # restarted run reuses compiled programs and their GPU autotuning results instead of redoing
  # them. JAX writes it from process 0 only: on several nodes it helps where the directory is
  # shared by all of them ($HOME usually is on a cluster).
  GPU_ENV+=("ASCAN_COMPILATION_CACHE=${ASCAN_COMPILATION_CACHE:-${XDG_CACHE_HOME:-${HOME:-/tmp}/.cache}/ascan_jax/jax_cache}")
  # Unbuffered output: logs reach a file or pipe as they are written.
  GPU_ENV+=("PYTHONUNBUFFERED=1")
  # NCCL on one host needs nothing: it finds NVLink/NVSwitch/PCIe paths itself (NVLS on H100
  # NVSwitch systems is on by default). Not set on purpose: CUDA_DEVICE_MAX_CONNECTIONS=1 (helps
  # overlap on Hopper, slower on Blackwell per NVIDIA). If a multi-GPU run ever hangs in a
  # collective, NVIDIA's remedy for one process driving several GPUs is NCCL_LAUNCH_MODE=GROUP.
}

print_and_run() {
  local assignment cmd=("$PYTHON" "$REPO/main.py" "--workdir=$WORKDIR" "--config=$CONFIG"
    ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
  echo "# environment:"
  for assignment in "${GPU_ENV[@]}"; do echo "export $(quote_word "$assignment")"; done
  echo "# command:"
  quote_cmd "${cmd[@]}"
  if ((DRY_RUN)); then return 0; fi
  for assignment in "${GPU_ENV[@]}"; do export "${assignment?}"; done
  exec "${cmd[@]}"
}

main() {
  if wants_help "$@"; then usage; exit 0; fi
  parse_args "$@"
  validate_args
  gpu_env
  print_and_run
}

main "$@"
