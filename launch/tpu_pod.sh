#!/usr/bin/env bash
# Runs ascan_jax on a Cloud TPU VM pod slice (v4-32, v5p-64, ...): the same code version and the
# same `python main.py ...` command on every worker at once. Steps, each printed before it runs
# (--dry_run prints them all, including what each worker will do, and runs none):
#   1. pack this checkout's git-tracked and untracked-but-not-ignored files into one .tar.gz, once
#      per launch: a --spot restart reuses it, so it runs the same code even if you edit files;
#   2. copy the archive to every worker: gcloud compute tpus tpu-vm scp ... --worker=all;
#   3. on every worker (gcloud ... ssh --worker=all): unpack it into REMOTE_DIR/code-RUN_ID, stop
#      a run that a previous launch left behind (SIGTERM, so it checkpoints), and install
#      requirements.txt plus "jax[tpu]==<the jax pin of requirements.txt>" into REMOTE_DIR/venv,
#      skipped when the venv holds a marker file with the same requirements hash;
#   4. on every worker at once: python main.py --workdir=W --config=C [ARGS after --], each worker
#      appending to its own REMOTE_DIR/logs/RUN_ID/worker-<i>.log; worker 0's log is streamed here;
#   5. copy the logs back to ./logs/<tpu_name>/worker-<i>.log: one scp --worker=<i> per worker
#      (whole files, no interleaving; works even when some workers failed);
#   --spot: if the run failed or the slice was preempted or recreated, wait until it is READY
#      (running --recreate_cmd when it is PREEMPTED/TERMINATED or gone) and repeat 2-5: main.py
#      resumes from the checkpoint in --workdir. At most --max_restarts restarts.
# Ctrl-C stops the run on every worker with SIGTERM (main.py writes a checkpoint) and gathers logs.
#
# Example:
#   launch/tpu_pod.sh --tpu_name=my-v4-32 --zone=us-central2-b --project=my-project \
#       --workdir=gs://my-bucket/ascan_l --config=configs/ascan_l.py --spot -- --config.seed=1
#
# Needs here: gcloud (logged in), git, tar, and the gcloud SSH key in ssh-agent
# (`ssh-add ~/.ssh/google_compute_engine`, needed by --worker=all). Keep this script running for the
# whole run (tmux/screen, or a small VM in the same region). Works with bash >= 3.2 (macOS).
set -euo pipefail

SCRIPT_PATH="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)/$(basename "${BASH_SOURCE[0]}")"
REPO="$(cd "$(dirname "$SCRIPT_PATH")/.." && pwd)"
SCRIPT_REL="${SCRIPT_PATH#"$REPO/"}"
PROG="launch/tpu_pod.sh"

# Timings (seconds); the environment overrides them.
POLL_SECONDS="${ASCAN_LAUNCH_POLL_SECONDS:-60}"
MAX_WAIT_SECONDS="${ASCAN_LAUNCH_MAX_WAIT_SECONDS:-21600}"
RESTART_DELAY_SECONDS="${ASCAN_LAUNCH_RESTART_DELAY_SECONDS:-30}"
STOP_TIMEOUT_SECONDS="${ASCAN_LAUNCH_STOP_TIMEOUT_SECONDS:-300}"
GATHER_PARALLEL=8

# Options.
TPU_NAME="" ZONE="" PROJECT="" WORKDIR="" CONFIG=""
# shellcheck disable=SC2088  # a literal ~: it is expanded on the workers, not here
PYTHON="python3" REMOTE_DIR="~/ascan_jax" MAX_RESTARTS=10 RECREATE_CMD="" NUM_WORKERS=""
SPOT=0 DRY_RUN=0 INTERNAL_IP=0 MODE="launch" RUN_ID=""
EXTRA_ARGS=()  # after --
MAIN_ARGS=()   # main.py's arguments

usage() {
  cat <<EOF
Usage: $PROG --tpu_name=NAME --zone=ZONE --project=PROJECT --workdir=DIR --config=FILE[:ARG]
                          [options] [-- MAIN_PY_ARGS...]

Runs python main.py on every worker of a Cloud TPU VM pod slice (same code, same command), then
copies each worker's log to ./logs/NAME/worker-<i>.log.

Required:
  --tpu_name=NAME       the TPU VM (pod slice) name
  --zone=ZONE           its zone, e.g. us-central2-b
  --project=PROJECT     its Google Cloud project
  --workdir=DIR         main.py --workdir; must be shared by all workers: gs://BUCKET/PATH
  --config=FILE[:ARG]   main.py --config, relative to the repository root, e.g. configs/ascan_l.py

Optional:
  --spot                the slice is spot/preemptible: after a failed or preempted run, wait until
                        the TPU is READY again and re-run (main.py resumes from --workdir)
  --max_restarts=N      with --spot, at most N restarts (default: $MAX_RESTARTS)
  --recreate_cmd=CMD    with --spot, a local shell command run when the TPU is PREEMPTED, TERMINATED
                        or gone (spot TPUs do not come back by themselves), e.g. a delete + create
  --python=PY           python (>= 3.11) on the workers that creates the venv (default: $PYTHON)
  --remote_dir=DIR      directory on the workers for code, venv and logs (default: ~/ascan_jax)
  --num_workers=N       number of workers, for gathering logs (default: from gcloud describe)
  --internal_ip         connect to the workers by internal IP (running from a VM in the same VPC)
  --dry_run             print every command, one per line, and run none
  -h, --help            print this help and exit
  -- ARGS...            everything after -- is passed to main.py, e.g. --mode=eval --config.seed=1

Environment (seconds): ASCAN_LAUNCH_POLL_SECONDS ($POLL_SECONDS) between TPU state checks,
ASCAN_LAUNCH_MAX_WAIT_SECONDS ($MAX_WAIT_SECONDS) to wait for READY, ASCAN_LAUNCH_RESTART_DELAY_SECONDS
($RESTART_DELAY_SECONDS) before a restart, ASCAN_LAUNCH_STOP_TIMEOUT_SECONDS ($STOP_TIMEOUT_SECONDS) for a
stopped run to checkpoint before it is killed.

Internal (run on the workers by this script): --worker_setup, --worker_run, --worker_stop,
--run_id=ID.

Example:
  $PROG --tpu_name=my-v4-32 --zone=us-central2-b --project=my-project \\
      --workdir=gs://my-bucket/ascan_l --config=configs/ascan_l.py --spot -- --config.seed=1
EOF
}

# ---------------------------------------------------------------------------------------------
# Messages, quoting and running.

log() { printf '[tpu_pod] %s\n' "$*" >&2; }
die() { log "error: $*"; exit 1; }
die_usage() {
  printf '%s: %s\n' "$PROG" "$*" >&2
  printf "Run '%s --help' for usage.\n" "$PROG" >&2
  exit 2
}

# One shell word, single-quoted unless it is plainly safe (POSIX: also used for remote shells).
quote_word() {
  local word="$1" q="'\\''"
  if [[ "$word" =~ ^(~/)?[A-Za-z0-9_./:=,@%+-]+$ ]]; then
    printf '%s' "$word"
  else
    printf "'%s'" "${word//\'/$q}"
  fi
}

quote_cmd() {
  local out="" word
  for word in "$@"; do out="$out${out:+ }$(quote_word "$word")"; done
  printf '%s' "$out"
}

LINE_PREFIX=""
show() { printf '%s%s\n' "$LINE_PREFIX" "$(quote_cmd "$@")"; }
show_line() { printf '%s%s\n' "$LINE_PREFIX" "$*"; }
note() { printf '%s# %s\n' "$LINE_PREFIX" "$*"; }
run() {
  show "$@"
  if ((DRY_RUN)); then return 0; fi
  "$@"
}

sha256_of() {  # stdin -> hex digest
  if command -v sha256sum >/dev/null 2>&1; then sha256sum | cut -d' ' -f1
  else shasum -a 256 | cut -d' ' -f1; fi
}

# ---------------------------------------------------------------------------------------------
# Arguments.

is_value_option() {
  case "$1" in
    --tpu_name | --zone | --project | --workdir | --config | --python | --remote_dir | \
      --max_restarts | --recreate_cmd | --num_workers | --run_id) return 0 ;;
    *) return 1 ;;
  esac
}

set_option() {
  case "$1" in
    --tpu_name) TPU_NAME="$2" ;;
    --zone) ZONE="$2" ;;
    --project) PROJECT="$2" ;;
    --workdir) WORKDIR="$2" ;;
    --config) CONFIG="$2" ;;
    --python) PYTHON="$2" ;;
    --remote_dir) REMOTE_DIR="$2" ;;
    --max_restarts) MAX_RESTARTS="$2" ;;
    --recreate_cmd) RECREATE_CMD="$2" ;;
    --num_workers) NUM_WORKERS="$2" ;;
    --run_id) RUN_ID="$2" ;;
    *) die_usage "unknown option: $1" ;;
  esac
}

set_flag() {
  case "$1" in
    --spot) SPOT=1 ;;
    --dry_run) DRY_RUN=1 ;;
    --internal_ip) INTERNAL_IP=1 ;;
    --worker_setup) MODE="worker_setup" ;;
    --worker_run) MODE="worker_run" ;;
    --worker_stop) MODE="worker_stop" ;;
    *) die_usage "unknown option: $1" ;;
  esac
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

parse_args() {
  while (($#)); do
    case "$1" in
      --) shift; EXTRA_ARGS=("$@"); return 0 ;;
      --*=*)
        is_value_option "${1%%=*}" || die_usage "unknown option: ${1%%=*} (in $1)"
        set_option "${1%%=*}" "${1#*=}" ;;
      --spot | --dry_run | --internal_ip | --worker_setup | --worker_run | --worker_stop)
        set_flag "$1" ;;
      *)
        is_value_option "$1" || die_usage "unknown option: $1"
        (($# >= 2)) || die_usage "option $1 needs a value"
        set_option "$1" "$2"
        shift ;;
    esac
    shift
  done
}

is_count() { [[ "$1" =~ ^[0-9]+$ ]]; }

validate_launch_args() {
  local missing=() config_file="${CONFIG%%:*}"
  [[ -n "$TPU_NAME" ]] || missing+=(--tpu_name)
  [[ -n "$ZONE" ]] || missing+=(--zone)
  [[ -n "$PROJECT" ]] || missing+=(--project)
  [[ -n "$WORKDIR" ]] || missing+=(--workdir)
  [[ -n "$CONFIG" ]] || missing+=(--config)
  ((${#missing[@]} == 0)) || die_usage "missing required option(s): ${missing[*]}"
  is_count "$MAX_RESTARTS" || die_usage "--max_restarts must be a number >= 0, got '$MAX_RESTARTS'"
  [[ -z "$NUM_WORKERS" ]] || { is_count "$NUM_WORKERS" && ((NUM_WORKERS > 0)); } ||
    die_usage "--num_workers must be a number >= 1, got '$NUM_WORKERS'"
  [[ "$REMOTE_DIR" =~ ^[A-Za-z0-9_./~+-]+$ ]] ||
    die_usage "--remote_dir may hold only letters, digits and _ . / ~ + -, got '$REMOTE_DIR'"
  [[ "$config_file" != /* && -f "$REPO/$config_file" ]] ||
    die_usage "--config: '$config_file' is not a file under $REPO (give it relative to the repository root, e.g. configs/ascan_l.py)"
  if [[ "$WORKDIR" != gs://* ]]; then
    log "warning: --workdir '$WORKDIR' is not gs://...; on a multi-worker slice every worker must see the same workdir"
  fi
}

# ---------------------------------------------------------------------------------------------
# Paths on the workers. REMOTE_DIR is ~/..., /abs/... or relative to the home directory.

# shellcheck disable=SC2088  # literal ~ on purpose in these two functions
remote_rel() {  # REMOTE_DIR relative to $HOME ("" for $HOME itself), or the absolute path
  case "$REMOTE_DIR" in
    "~") printf '' ;;
    "~/"*) printf '%s' "${REMOTE_DIR#"~/"}" ;;
    *) printf '%s' "$REMOTE_DIR" ;;
  esac
}

# shellcheck disable=SC2088
remote_word() {  # a word for a remote shell naming REMOTE_DIR/$1 (~ left to the remote shell)
  local rel
  rel="$(remote_rel)"
  if [[ "$rel" == /* ]]; then printf '%s' "$rel${1:+/$1}"; else printf '~/%s' "$rel${1:+/$1}"; fi
}

remote_scp_path() {  # REMOTE_DIR/$1 as scp wants it (relative paths are relative to $HOME)
  local rel
  rel="$(remote_rel)"
  printf '%s' "${rel:+$rel/}$1"
}

# ---------------------------------------------------------------------------------------------
# The launcher.

GCLOUD_FLAGS=() SSH_FLAGS=() DESCRIBE_CMD=()
set_gcloud_flags() {
  GCLOUD_FLAGS=("--zone=$ZONE" "--project=$PROJECT" --quiet)
  if ((INTERNAL_IP)); then SSH_FLAGS=(--internal-ip); fi
  DESCRIBE_CMD=(gcloud compute tpus tpu-vm describe "$TPU_NAME" "${GCLOUD_FLAGS[@]}"
    '--format=value[separator=","](state,id,networkEndpoints.len())')
}

worker_args() {  # the options every --worker_* call gets; the remote shell expands the ~
  printf '%s --remote_dir %s' "$(quote_cmd --run_id="$RUN_ID" --python="$PYTHON")" "$(remote_word "")"
}

preflight() {
  local tool
  for tool in gcloud git tar; do
    command -v "$tool" >/dev/null 2>&1 || die "'$tool' is not on PATH"
  done
  if ! ssh-add -l >/dev/null 2>&1; then
    log "warning: ssh-agent has no keys; --worker=all needs 'ssh-add ~/.ssh/google_compute_engine'"
  fi
}

pack_code() {
  local list
  list="git -C $(quote_word "$REPO") ls-files -z --cached --others --exclude-standard"
  note "1. pack the code (a tracked file deleted but not 'git rm'ed makes tar fail)"
  show_line "$list | tar -czf $(quote_word "$ARCHIVE") -C $(quote_word "$REPO") --null -T -"
  if ((DRY_RUN)); then return 0; fi
  local rc=0
  git -C "$REPO" ls-files -z --cached --others --exclude-standard |
    tar -czf "$ARCHIVE" -C "$REPO" --null -T - || rc=$?
  # GNU tar exits 1 when a file changed while it was read (it is packed anyway); 2 is an error.
  ((rc <= 1)) || die "packing the code failed (see 'git status': restore or 'git rm' deleted files)"
  log "packed $(git -C "$REPO" describe --always --dirty 2>/dev/null || echo 'the code') into $ARCHIVE ($(du -h "$ARCHIVE" | cut -f1))"
}

gcloud_ssh_all() {  # runs a remote shell command on every worker at once
  run gcloud compute tpus tpu-vm ssh "$TPU_NAME" --worker=all "${GCLOUD_FLAGS[@]}" \
    ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"} --command="$1"
}

copy_code() {
  note "2. copy the code to every worker"
  run gcloud compute tpus tpu-vm scp "$ARCHIVE" "$TPU_NAME:$REMOTE_ARCHIVE" --worker=all \
    "${GCLOUD_FLAGS[@]}" ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"}
}

show_worker_steps() {  # dry run: what the --worker_* call does on each worker
  local prefix="$LINE_PREFIX"
  LINE_PREFIX="#     "
  note "on every worker:"
  RD="$REMOTE_DIR" HOME_DIR="~"
  "$@"
  LINE_PREFIX="$prefix"
}

setup_workers() {
  local code
  code="$(remote_word "code-$RUN_ID")"
  note "3. unpack and install on every worker"
  gcloud_ssh_all "mkdir -p $code && tar -xzf ~/$REMOTE_ARCHIVE -C $code && bash $code/$SCRIPT_REL --worker_setup $(worker_args)" ||
    return
  if ((DRY_RUN)); then show_worker_steps worker_setup; fi
}

run_workers() {
  note "4. run main.py on every worker at once"
  gcloud_ssh_all "bash $(remote_word "code-$RUN_ID")/$SCRIPT_REL --worker_run $(worker_args) -- $(quote_cmd "${MAIN_ARGS[@]}")" ||
    return
  if ((DRY_RUN)); then show_worker_steps worker_run; fi
}

stop_workers() {
  gcloud_ssh_all "bash $(remote_word "code-$RUN_ID")/$SCRIPT_REL --worker_stop $(worker_args)"
}

TPU_STATE="" TPU_ID="" TPU_WORKERS=""
read_tpu_info() {  # sets TPU_STATE (READY, PREEMPTED, ..., NOT_FOUND, UNKNOWN), TPU_ID, TPU_WORKERS
  local out err_file
  err_file="$(mktemp)"
  TPU_STATE="UNKNOWN" TPU_ID="" TPU_WORKERS=""
  if out="$("${DESCRIBE_CMD[@]}" 2>"$err_file")"; then
    IFS=, read -r TPU_STATE TPU_ID TPU_WORKERS <<<"$out" || true
  elif grep -q "NOT_FOUND" "$err_file"; then
    TPU_STATE="NOT_FOUND"
  fi
  rm -f "$err_file"
}

gather_logs() {
  local n="${NUM_WORKERS:-$TPU_WORKERS}" dest="logs/$TPU_NAME" i src
  src="$(remote_scp_path "logs/$RUN_ID")"
  note "5. copy every worker's log to $dest/worker-<i>.log"
  if ((DRY_RUN)) && [[ -z "$n" ]]; then
    show "${DESCRIBE_CMD[@]}"
    note "then for each worker i in 0..N-1 (N: the last field printed above):"
    show gcloud compute tpus tpu-vm scp "$TPU_NAME:$src/worker-<i>.log" "$dest/worker-<i>.log" \
      --worker="<i>" "${GCLOUD_FLAGS[@]}" ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"}
    return 0
  fi
  if [[ -z "$n" ]]; then
    log "warning: cannot gather logs: the number of workers is unknown (TPU state $TPU_STATE)"
    return 1
  fi
  run mkdir -p "$dest"
  for ((i = 0; i < n; i++)); do
    local scp=(gcloud compute tpus tpu-vm scp "$TPU_NAME:$src/worker-$i.log" "$dest/worker-$i.log"
      --worker="$i" "${GCLOUD_FLAGS[@]}" ${SSH_FLAGS[@]+"${SSH_FLAGS[@]}"})
    if ((DRY_RUN)); then show "${scp[@]}"; continue; fi
    "${scp[@]}" >/dev/null 2>&1 &  # a few at a time; a worker that is gone only loses its log
    if (((i + 1) % GATHER_PARALLEL == 0)); then wait; fi
  done
  ((DRY_RUN)) && return 0
  wait
  for ((i = 0; i < n; i++)); do
    [[ -f "$dest/worker-$i.log" ]] || log "warning: no log from worker $i"
  done
  log "logs: $dest/worker-<i>.log"
}

wait_until_ready() {  # waits for READY; runs --recreate_cmd once per wait when the TPU is gone
  local waited=0 recreated=0
  while :; do
    read_tpu_info
    case "$TPU_STATE" in
      READY) return 0 ;;
      PREEMPTED | TERMINATED | NOT_FOUND)
        if [[ -n "$RECREATE_CMD" ]] && ((!recreated)); then
          log "TPU $TPU_NAME is $TPU_STATE: running --recreate_cmd"
          recreated=1
          bash -c "$RECREATE_CMD" || log "warning: --recreate_cmd failed"
          continue
        fi ;;
    esac
    if ((waited >= MAX_WAIT_SECONDS)); then
      log "TPU $TPU_NAME still $TPU_STATE after ${waited}s; giving up"
      return 1
    fi
    log "TPU $TPU_NAME is $TPU_STATE; checking again in ${POLL_SECONDS}s"
    sleep "$POLL_SECONDS"
    waited=$((waited + POLL_SECONDS))
  done
}

run_attempt() {  # copy, set up and run; returns the run's exit status
  copy_code || return
  setup_workers || return
  run_workers
}

on_interrupt() {
  trap - INT TERM
  log "interrupted: stopping main.py on every worker (SIGTERM: it writes a checkpoint)"
  stop_workers || true
  read_tpu_info
  gather_logs || true
  exit 130
}

show_spot_plan() {
  note "--spot: before each attempt and after it, the TPU state is read with:"
  show "${DESCRIBE_CMD[@]}"
  note "a failed run, or a TPU that is not READY or has a new id, is retried from step 2 once it"
  note "is READY again (--recreate_cmd runs when it is PREEMPTED/TERMINATED/gone); at most $MAX_RESTARTS restarts"
}

launch() {
  validate_launch_args
  set_gcloud_flags
  MAIN_ARGS=("--workdir=$WORKDIR" "--config=$CONFIG" ${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
  RUN_ID="$(date -u +%Y%m%d-%H%M%S)-$$"
  ARCHIVE="${TMPDIR:-/tmp}/ascan_jax-$RUN_ID.tar.gz"
  REMOTE_ARCHIVE="ascan_jax-$RUN_ID.tar.gz"  # in the workers' home directories
  if ((DRY_RUN)); then
    note "dry run: nothing below is executed (run id $RUN_ID)"
    pack_code
    ((SPOT)) && show_spot_plan
    run_attempt
    gather_logs
    return 0
  fi
  preflight
  trap 'rm -f "$ARCHIVE"' EXIT
  pack_code
  trap on_interrupt INT TERM
  local restarts=0 rc id_before=""
  while :; do
    if ((SPOT)); then
      wait_until_ready || return 1
      id_before="$TPU_ID"
    fi
    log "run $RUN_ID on $TPU_NAME (attempt $((restarts + 1)))"
    rc=0
    run_attempt || rc=$?
    read_tpu_info
    gather_logs || true
    if ((rc == 0)) && { ((!SPOT)) || [[ "$TPU_STATE" == READY && "$TPU_ID" == "$id_before" ]]; }; then
      log "done: main.py exited 0 on every worker"
      return 0
    fi
    log "the run ended with status $rc; TPU $TPU_NAME is $TPU_STATE (id ${TPU_ID:-?}, was ${id_before:-?})"
    if ((!SPOT)); then return "$rc"; fi
    if ((restarts >= MAX_RESTARTS)); then
      log "giving up after $restarts restarts (--max_restarts=$MAX_RESTARTS)"
      return $((rc == 0 ? 1 : rc))
    fi
    restarts=$((restarts + 1))
    log "--spot: restarting in ${RESTART_DELAY_SECONDS}s (restart $restarts of at most $MAX_RESTARTS)"
    sleep "$RESTART_DELAY_SECONDS"
  done
}

# ---------------------------------------------------------------------------------------------
# On the workers (bash >= 4, Linux). RD is REMOTE_DIR with ~ expanded (left as is in a dry run).

RD="" HOME_DIR="${HOME:-}" CHILD_PID="" TAIL_PID=""

expand_remote_dir() {
  local rel
  rel="$(remote_rel)"
  if [[ "$rel" == /* ]]; then RD="$rel"; else RD="$HOME${rel:+/$rel}"; fi
}

# gs:// workdirs: etils paths (config, metrics) go through gcsfs, TensorBoard through
# google-cloud-storage; orbax checkpoints need neither (tensorstore).
GCS_PACKAGES=("gcsfs==2026.10.1" "google-cloud-storage==3.17.1")

tpu_jax_spec() {  # jax[tpu]==X from the jax==X pin in requirements.txt
  local version
  version="$(sed -n 's/^jax==\([^[:space:]#;]*\).*/\1/p' "$1" | head -n 1)"
  [[ -n "$version" ]] || die "no 'jax==VERSION' line in $1"
  printf 'jax[tpu]==%s' "$version"
}

process_is_main_py() { [[ -r "/proc/$1/cmdline" ]] && tr '\0' ' ' <"/proc/$1/cmdline" | grep -q 'main\.py'; }

process_alive() {  # running, not a zombie waiting for its parent
  kill -0 "$1" 2>/dev/null && [[ "$(ps -o stat= -p "$1" 2>/dev/null)" != Z* ]]
}

worker_stop() {  # stops the run this script started here, if any: SIGTERM, then SIGKILL
  local pidfile="$RD/run.pid" pid waited=0
  if ((DRY_RUN)); then
    note "if $pidfile names a live main.py: kill -TERM it, wait up to ${STOP_TIMEOUT_SECONDS}s, then kill -KILL"
    return 0
  fi
  [[ -f "$pidfile" ]] || return 0
  pid="$(cat "$pidfile")"
  if [[ "$pid" =~ ^[0-9]+$ ]] && process_alive "$pid" && process_is_main_py "$pid"; then
    log "stopping main.py (pid $pid) with SIGTERM"
    kill -TERM "$pid" 2>/dev/null || true
    while process_alive "$pid" && ((waited < STOP_TIMEOUT_SECONDS)); do
      sleep 1
      waited=$((waited + 1))
    done
    if process_alive "$pid"; then
      log "main.py (pid $pid) still running after ${STOP_TIMEOUT_SECONDS}s: SIGKILL"
      kill -KILL "$pid" 2>/dev/null || true
    fi
  fi
  rm -f "$pidfile"
}

check_python() {
  local version_ok='import sys; sys.exit(sys.version_info < (3, 11))'
  if ((DRY_RUN)); then run "$PYTHON" -c "$version_ok"; return 0; fi
  command -v "$PYTHON" >/dev/null 2>&1 || die "'$PYTHON' not found on this worker (--python)"
  "$PYTHON" -c "$version_ok" || die "$("$PYTHON" --version 2>&1) on this worker; jax needs Python >= 3.11: install one (e.g. python3.11 and python3.11-venv) and pass --python=python3.11"
}

install_requirements() {
  local code="$RD/code-$RUN_ID" venv="$RD/venv" spec hash marker
  spec="$(tpu_jax_spec "$REPO/requirements.txt")"
  hash="$({ cat "$REPO/requirements.txt"; printf '%s\n' "$spec" "$PYTHON" "${GCS_PACKAGES[@]}"; } | sha256_of)"
  marker="$venv/.ascan-requirements-${hash:0:16}"
  if ((!DRY_RUN)) && [[ -f "$marker" ]]; then
    log "requirements already installed in $venv"
    return 0
  fi
  ((DRY_RUN)) && note "skipped when $marker exists:"
  run "$PYTHON" -m venv --clear "$venv"
  run "$venv/bin/python" -m pip install --quiet --upgrade pip
  run "$venv/bin/python" -m pip install --quiet -r "$code/requirements.txt" "$spec" "${GCS_PACKAGES[@]}"
  run touch "$marker"
}

worker_setup() {
  worker_stop
  run find "$RD" -maxdepth 1 -name 'code-*' ! -name "code-$RUN_ID" -exec rm -rf {} +
  run rm -f "$HOME_DIR/ascan_jax-$RUN_ID.tar.gz"
  check_python
  install_requirements
}

worker_id() {  # this worker's index: TPU_WORKER_ID, else the GCE metadata, else the hostname
  local url="http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number"
  if [[ -n "${TPU_WORKER_ID:-}" ]]; then printf '%s' "$TPU_WORKER_ID"; return 0; fi
  curl -sf -m 5 -H 'Metadata-Flavor: Google' "$url" 2>/dev/null || hostname
}

forward_stop() {  # the ssh session or the VM is going away: let main.py checkpoint and exit
  trap '' HUP INT TERM
  [[ -n "$CHILD_PID" ]] && kill -TERM "$CHILD_PID" 2>/dev/null
  return 0
}

worker_run() {
  local id log_dir="$RD/logs/$RUN_ID" log cmd rc=0 start
  # ASCAN_DISTRIBUTED=1: main.py then calls jax.distributed.initialize(), which finds the other
  # workers through the TPU metadata (jax 0.10.2 does not set TPU_WORKER_HOSTNAMES by itself).
  # Unbuffered output: the log is live. No compilation cache by default: JAX writes it from
  # process 0 only, so it helps a pod only in a directory all workers share (pass
  # -- --compilation_cache_dir=gs://BUCKET/jax_cache where your setup can write there).
  cmd=(env "ASCAN_DISTRIBUTED=${ASCAN_DISTRIBUTED:-1}" PYTHONUNBUFFERED=1
    "$RD/venv/bin/python" main.py "${MAIN_ARGS[@]}")
  if ((DRY_RUN)); then
    show cd "$RD/code-$RUN_ID"
    show "${cmd[@]}"
    note "  with output appended to $log_dir/worker-<i>.log (<i>: TPU_WORKER_ID or the GCE metadata"
    note "  agent-worker-number); the pid goes to $RD/run.pid; worker 0 streams its log to this terminal"
    return 0
  fi
  id="$(worker_id)"
  log="$log_dir/worker-$id.log"
  mkdir -p "$log_dir"
  printf '=== %s worker %s: %s (code %s)\n' "$(date -u +%FT%TZ)" "$id" "$(quote_cmd "${cmd[@]}")" \
    "$RD/code-$RUN_ID" >>"$log"
  start=$(($(wc -c <"$log") + 1))
  (cd "$RD/code-$RUN_ID" && exec "${cmd[@]}") >>"$log" 2>&1 </dev/null &
  CHILD_PID=$!
  echo "$CHILD_PID" >"$RD/run.pid"
  trap forward_stop HUP INT TERM
  if [[ "$id" == 0 ]]; then
    tail -c "+$start" -f --pid="$CHILD_PID" "$log" &
    TAIL_PID=$!
  fi
  while :; do
    if wait "$CHILD_PID"; then rc=0; else rc=$?; fi
    # A trapped signal interrupts wait (status > 128) while main.py still runs: keep waiting.
    if ((rc > 128)) && kill -0 "$CHILD_PID" 2>/dev/null; then continue; fi
    break
  done
  [[ -z "$TAIL_PID" ]] || wait "$TAIL_PID" 2>/dev/null || true
  rm -f "$RD/run.pid"
  if ((rc != 0)); then
    echo "[worker $id] main.py exited with status $rc; the end of $log:"
    tail -n 30 "$log" | sed "s/^/[worker $id] /"
  else
    echo "[worker $id] main.py exited with status 0"
  fi
  return "$rc"
}

worker_main() {
  [[ -n "$RUN_ID" ]] || die_usage "$MODE needs --run_id"
  MAIN_ARGS=(${EXTRA_ARGS[@]+"${EXTRA_ARGS[@]}"})
  if ((DRY_RUN)); then RD="$REMOTE_DIR" HOME_DIR="~"; else expand_remote_dir; fi
  case "$MODE" in
    worker_setup) worker_setup ;;
    worker_run) worker_run ;;
    worker_stop) worker_stop ;;
  esac
}

main() {
  if wants_help "$@"; then usage; exit 0; fi
  parse_args "$@"
  if [[ "$MODE" == launch ]]; then launch; else worker_main; fi
}

main "$@"
