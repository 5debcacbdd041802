#!/usr/bin/env bash
# The accelerator report on one NVIDIA GPU of this workplace's device machine (an H200 with the
# 'cuda' image: jax 0.11.2 + CUDA, flax, optax, orbax, torch 2.11, timm; no grain, no
# ml_collections, no internet), in one call of under 8 minutes.
#
# Example (from the repository root):
#   results/accelerator/device_report.sh prepare     # here, where PyPI is reachable: the wheels the
#                                                    # device image lacks, into .whl/ (ignored by git)
#   # then, through the device tool: run(command="bash results/accelerator/device_report.sh run",
#   #                                    carry=[".whl"], timeout_s=540)
#   # and copy the files it returns into results/accelerator/<device>/ (h200 for an H200).
#
#   results/accelerator/device_report.sh run -- --sections=diffusion,t2i,segmentation --peers=none
#                                                    # a second, shorter call: what the first skipped
#
# `run` installs .whl/*.whl into /tmp/site (no network needed), prints the GPU, runs the cuDNN
# attention parity test (tests/test_attention.py, skipped off-GPU), then
# `python3 -m ascan_jax.tools.accelerator_report` with --deadline_s (default 330 s: the report
# skips the rows that no longer fit and lists them) under a hard `timeout` of DEADLINE_S + 150 s,
# and copies report.json, report.md, throughput.png, attention_choices.json and the logs into
# $OUT (the device tool's output folder; ./device_out when OUT is unset). Arguments after `--`
# go to the report.
set -euo pipefail

REPO="$(cd "$(dirname "${BASH_SOURCE[0]}")/../.." && pwd)"
# Versions pinned in requirements.txt; grain needs array_record and portpicker at import.
WHEELS=("ml_collections==1.1.0" "grain==0.2.18" "array_record==0.8.6" "portpicker==1.6.0")

usage() {
  sed -n '2,22p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'
}

prepare() {
  cd "$REPO"
  mkdir -p .whl
  local platforms=()
  local n
  for n in 28 27 17; do platforms+=(--platform "manylinux_2_${n}_x86_64"); done
  platforms+=(--platform manylinux2014_x86_64 --platform manylinux1_x86_64)
  python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
    --implementation cp "${platforms[@]}" -d .whl "${WHEELS[@]}"
  ls -l .whl
  du -sh .whl
}

run() {
  cd "$REPO"
  local out="${OUT:-$REPO/device_out}"
  local deadline="${DEADLINE_S:-330}"
  mkdir -p "$out"
  if compgen -G ".whl/*.whl" > /dev/null; then
    python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
      --target /tmp/site .whl/*.whl
    export PYTHONPATH="/tmp/site:$REPO"
  else
    echo "no .whl/: run '$0 prepare' here and carry .whl; without grain the training rows fail" >&2
    export PYTHONPATH="$REPO"
  fi
  export PYTHONUNBUFFERED=1
  export JAX_PLATFORMS="cuda,cpu"  # a CUDA plugin that does not load is an error, not a CPU run.
  # JAX takes 65 % of the GPU's memory up front; PyTorch's peers live in the rest.
  export XLA_PYTHON_CLIENT_MEM_FRACTION="${XLA_PYTHON_CLIENT_MEM_FRACTION:-0.65}"
  {
    nvidia-smi --query-gpu=name,memory.total,driver_version,clocks.sm,clocks.max.sm \
      --format=csv || true
    python3 -c "import jax, flax, optax; print('jax', jax.__version__, 'flax', flax.__version__, 'optax', optax.__version__, jax.devices())"
  } 2>&1 | tee "$out/device.txt"
  timeout 120 python3 -m pytest -q -p no:cacheprovider tests/test_attention.py -k "cudnn or auto" \
    2>&1 | tee "$out/pytest_attention.txt" || true
  local status=0
  timeout "$((deadline + 150))" python3 -m ascan_jax.tools.accelerator_report \
    --out=/tmp/accelerator_report --deadline_s="$deadline" "$@" 2>&1 \
    | tee "$out/report_log.txt" || status=$?
  local f
  for f in report.json report.md throughput.png attention_choices.json; do
    if [[ -f "/tmp/accelerator_report/$f" ]]; then cp "/tmp/accelerator_report/$f" "$out/"; fi
  done
  ls -l "$out"
  return "$status"
}

case "${1:-}" in
  prepare) prepare ;;
  run) shift; if [[ "${1:-}" == "--" ]]; then shift; fi; run "$@" ;;
  -h|--help|"") usage ;;
  *) echo "unknown command '$1' (prepare | run)" >&2; usage >&2; exit 2 ;;
esac
