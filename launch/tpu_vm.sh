#!/usr/bin/env bash
# Runs ega_jax training on a Cloud TPU VM or pod slice, from your own machine.
#
#   launch/tpu_vm.sh --name ega-v4-32 --zone us-central2-b --accelerator v4-32 \
#       --workdir gs://BUCKET/runs/cifar100_ega --data_dir gs://BUCKET/tfds \
#       --teacher gs://BUCKET/teachers/clip_vit_b32 -- --config.batch_size=512
#
# Steps (each printed before it runs; --dry_run prints them and runs nothing):
#   1. describe the TPU VM; create it if it does not exist, reuse it if it does;
#   2. copy this checkout to every worker (or git-clone --repo_url there);
#   3. create .venv on every worker and install requirements.txt + jax[tpu];
#   4. copy (rsync) a gs:// teacher directory onto every worker;
#   5. run the same `python -m ega_jax.main ...` on all workers at once and
#      stream their output (optionally appended to --log as well).
# See docs/cluster.md.
set -euo pipefail

usage() {
  cat <<'EOF'
Usage: launch/tpu_vm.sh --name NAME --zone ZONE --workdir DIR [options] [-- --config.FIELD=VALUE ...]

Creates (or reuses) a Cloud TPU VM / pod slice, puts this code on every worker,
installs it, and runs `python -m ega_jax.main` on all workers at once.
Arguments after `--` are passed to ega_jax.main unchanged (config overrides).
Every option can also come from the environment variable in brackets;
`--opt value` and `--opt=value` both work.

Required:
  --name NAME          TPU VM name                                  [TPU_NAME]
  --zone ZONE          zone, e.g. us-central2-b                     [ZONE]
  --workdir DIR        run directory seen by every worker, e.g.
                       gs://BUCKET/runs/NAME (checkpoints, metrics)  [WORKDIR]
TPU VM:
  --accelerator TYPE   e.g. v4-8, v4-32, v5litepod-16, v6e-8; needed to
                       create the VM, checked against an existing one [ACCELERATOR_TYPE]
  --version RUNTIME    TPU software version; default by accelerator:
                       v2-v4 tpu-ubuntu2204-base, v5litepod v2-alpha-tpuv5-lite,
                       v5p v2-alpha-tpuv5, v6e v2-alpha-tpuv6e     [RUNTIME_VERSION]
  --project ID         Google Cloud project (default: gcloud's)     [PROJECT_ID]
  --spot               create the VM as a Spot VM                    [SPOT=1]
Code and environment on the workers:
  --repo_dir DIR       code directory, relative to the home directory
                       (default: ega_jax)                            [REPO_DIR]
  --repo_url URL       git-clone URL on the workers instead of copying
                       this checkout (tracked + untracked, not ignored) [REPO_URL]
  --ref REF            branch, tag or commit for --repo_url          [REPO_REF]
  --python EXE         interpreter for .venv (default: python3.11; it is
                       apt-installed when missing; jax needs >= 3.11) [REMOTE_PYTHON]
  --skip_setup         only train: code, .venv and teacher are already there [SKIP_SETUP=1]
Training:
  --config FILE        config file (default: configs/cifar100.py)    [CONFIG]
  --data_dir DIR       TFDS data_dir, e.g. gs://BUCKET/tfds           [DATA_DIR]
  --teacher DIR        converted teacher directory: a gs:// path is copied to
                       REPO_DIR/teachers/<name> on every worker; any other
                       path must already exist on every worker        [TEACHER]
  --log FILE           also append the streamed output to FILE here   [LOG_FILE]
  --dry_run            print every command, run none (gcloud not needed;
                       when gcloud works, its read-only `describe`
                       still runs to pick create or reuse)           [DRY_RUN=1]
  -h, --help           this text
EOF
}

die() {
  echo "tpu_vm.sh: error: $*" >&2
  exit 2
}

# --- options --------------------------------------------------------------
name=${TPU_NAME:-}
zone=${ZONE:-}
workdir=${WORKDIR:-}
accelerator=${ACCELERATOR_TYPE:-}
runtime_version=${RUNTIME_VERSION:-}
project=${PROJECT_ID:-}
spot=${SPOT:-0}
repo_dir=${REPO_DIR:-ega_jax}
repo_url=${REPO_URL:-}
repo_ref=${REPO_REF:-}
remote_python=${REMOTE_PYTHON:-python3.11}
skip_setup=${SKIP_SETUP:-0}
config=${CONFIG:-configs/cifar100.py}
data_dir=${DATA_DIR:-}
teacher=${TEACHER:-}
log_file=${LOG_FILE:-}
dry_run=${DRY_RUN:-0}
overrides=()

while (($#)); do
  option=$1
  value=""
  if [[ $option == --*=* ]]; then
    value=${option#*=}
    option=${option%%=*}
    shift
  else
    shift
    case $option in
      --spot | --skip_setup | --dry_run | -h | --help | --) ;;
      --*)
        (($#)) || die "$option needs a value (see --help)."
        value=$1
        shift
        ;;
    esac
  fi
  case $option in
    --name) name=$value ;;
    --zone) zone=$value ;;
    --workdir) workdir=$value ;;
    --accelerator) accelerator=$value ;;
    --version) runtime_version=$value ;;
    --project) project=$value ;;
    --spot) spot=1 ;;
    --repo_dir) repo_dir=$value ;;
    --repo_url) repo_url=$value ;;
    --ref) repo_ref=$value ;;
    --python) remote_python=$value ;;
    --skip_setup) skip_setup=1 ;;
    --config) config=$value ;;
    --data_dir) data_dir=$value ;;
    --teacher) teacher=$value ;;
    --log) log_file=$value ;;
    --dry_run) dry_run=1 ;;
    -h | --help) usage; exit 0 ;;
    --) overrides=("$@"); break ;;
    *) die "unknown option '$option'; valid: --name --zone --workdir --accelerator --version --project --spot --repo_dir --repo_url --ref --python --skip_setup --config --data_dir --teacher --log --dry_run --help (config overrides go after --)." ;;
  esac
done

[[ -n $name ]] || die "--name (or TPU_NAME) is required: the TPU VM to create or reuse."
[[ -n $zone ]] || die "--zone (or ZONE) is required, e.g. --zone us-central2-b."
[[ -n $workdir ]] || die "--workdir (or WORKDIR) is required: a directory every worker sees, e.g. gs://BUCKET/runs/NAME."
for override in ${overrides[@]+"${overrides[@]}"}; do
  [[ $override == --* ]] || die "'$override' after -- is not a flag; pass config overrides as --config.FIELD=VALUE."
done
# The code lives relative to the worker's home directory (where ssh starts).
repo_dir=${repo_dir#\~/}
[[ -n $repo_dir ]] || repo_dir=ega_jax

if [[ -z $runtime_version && -n $accelerator ]]; then
  case $accelerator in
    v2-* | v3-* | v4-*) runtime_version=tpu-ubuntu2204-base ;;
    v5litepod-*) runtime_version=v2-alpha-tpuv5-lite ;;
    v5p-*) runtime_version=v2-alpha-tpuv5 ;;
    v6e-*) runtime_version=v2-alpha-tpuv6e ;;
  esac
fi

# --- helpers --------------------------------------------------------------
# Quotes one word for a POSIX shell: plain words stay as they are.
quote() {
  if [[ $1 =~ ^[A-Za-z0-9_./:=@%+,-]+$ ]]; then
    printf '%s' "$1"
  else
    printf "'%s'" "${1//\'/\'\\\'\'}"
  fi
}

quote_all() {
  local words=() word
  for word in "$@"; do
    words+=("$(quote "$word")")
  done
  printf '%s\n' "${words[*]}"
}

# Prints a command; runs it unless this is a dry run.
run() {
  if ((dry_run)); then
    quote_all "$@"
  else
    echo "+ $(quote_all "$@")" >&2
    "$@"
  fi
}

temp_files=()
remove_temp_files() {
  local path
  for path in ${temp_files[@]+"${temp_files[@]}"}; do
    rm -f "$path"
  done
}
trap remove_temp_files EXIT

gcloud_flags=(--zone="$zone")
[[ -z $project ]] || gcloud_flags+=(--project="$project")

# Runs COMMAND (one shell string) on every worker of the slice.
on_all_workers() {
  run gcloud compute tpus tpu-vm ssh "$name" "${gcloud_flags[@]}" --worker=all --command "$1"
}

if ! ((dry_run)); then
  command -v gcloud >/dev/null ||
    die "gcloud not found; install the Google Cloud CLI (https://cloud.google.com/sdk/docs/install) or use --dry_run."
fi

# --- 1. create or reuse the TPU VM -----------------------------------------
describe=(gcloud compute tpus tpu-vm describe "$name" "${gcloud_flags[@]}"
  "--format=value(state,acceleratorType)")
exists=0
if command -v gcloud >/dev/null; then
  # Read-only, so it runs in a dry run too: it decides create or reuse.
  echo "+ $(quote_all "${describe[@]}")" >&2
  describe_errors=$(mktemp)
  temp_files+=("$describe_errors")
  if answer=$("${describe[@]}" 2>"$describe_errors"); then
    exists=1
    read -r state existing_accelerator <<<"$answer"
    if [[ -n $accelerator && -n $existing_accelerator && $existing_accelerator != "$accelerator" ]]; then
      die "TPU VM $name exists with accelerator $existing_accelerator, not $accelerator; use another --name or drop --accelerator."
    fi
    [[ $state == READY ]] ||
      die "TPU VM $name is $state, not READY; start it (gcloud compute tpus tpu-vm start $name --zone=$zone) or, if it was preempted, delete it and rerun."
    echo "# TPU VM $name exists ($existing_accelerator, $state): reusing it" >&2
  elif grep -qi 'not_found\|not found' "$describe_errors"; then
    echo "# TPU VM $name does not exist: creating it" >&2
  else
    cat "$describe_errors" >&2
    reason=$(grep -m 1 '^ERROR' "$describe_errors" || tail -n 1 "$describe_errors")
    ((dry_run)) || die "could not describe TPU VM $name: $reason"
    echo "# describe failed (see above): assuming TPU VM $name does not exist" >&2
  fi
else
  echo "# gcloud not on PATH: assuming TPU VM $name does not exist" >&2
  quote_all "${describe[@]}"
fi

if ! ((exists)); then
  [[ -n $accelerator ]] ||
    die "TPU VM $name does not exist; pass --accelerator (e.g. v4-8, v4-32, v5litepod-16) to create it."
  [[ -n $runtime_version ]] ||
    die "no default TPU software version for accelerator $accelerator; pass --version (see https://cloud.google.com/tpu/docs/runtimes)."
  create=(gcloud compute tpus tpu-vm create "$name" "${gcloud_flags[@]}"
    --accelerator-type="$accelerator" --version="$runtime_version")
  ((spot == 0)) || create+=(--spot)
  run "${create[@]}"
fi

# --- 2-4. code, environment and teacher on every worker ----------------------
teacher_flag=()
if [[ -n $teacher ]]; then
  if [[ $teacher == gs://* ]]; then
    teacher_on_workers=teachers/$(basename "${teacher%/}")
  else
    teacher_on_workers=$teacher
  fi
  teacher_flag=(--config.teacher.checkpoint="$teacher_on_workers")
fi

if ! ((skip_setup)); then
  repo_dir_q=$(quote "$repo_dir")
  if [[ -n $repo_url ]]; then
    # Clone once, fetch afterwards; check out --ref (a branch, tag or commit)
    # or the remote's default branch, detached, at the fetched tip.
    fetch="if [ -d $repo_dir_q/.git ]; then git -C $repo_dir_q fetch --quiet --tags origin;"
    fetch+=" else git clone --quiet $(quote "$repo_url") $repo_dir_q; fi"
    if [[ -n $repo_ref ]]; then
      fetch+=" && { git -C $repo_dir_q checkout --quiet --detach $(quote "origin/$repo_ref") 2>/dev/null"
      fetch+=" || git -C $repo_dir_q checkout --quiet --detach $(quote "$repo_ref"); }"
    else
      fetch+=" && git -C $repo_dir_q checkout --quiet --detach origin/HEAD"
    fi
    on_all_workers "$fetch"
  else
    repo_root=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
    tarball=$(mktemp)
    temp_files+=("$tarball")
    # The checkout as git sees it: tracked and untracked files, nothing that
    # is ignored (so no .venv, runs/ or demo_out/), deleted files skipped.
    if ((dry_run)); then
      echo "git -C $(quote "$repo_root") ls-files -z --cached --others --exclude-standard | tar -C $(quote "$repo_root") --null -T - -czf $(quote "$tarball")"
    else
      echo "+ packing $repo_root into $tarball" >&2
      git -C "$repo_root" ls-files -z --cached --others --exclude-standard |
        while IFS= read -r -d '' path; do
          if [[ -e $repo_root/$path ]]; then printf '%s\0' "$path"; fi
        done |
        tar -C "$repo_root" --null -T - -czf "$tarball"
    fi
    run gcloud compute tpus tpu-vm scp "$tarball" "$name:ega_jax_src.tar.gz" "${gcloud_flags[@]}" --worker=all
    on_all_workers "mkdir -p $repo_dir_q && tar -xzf ega_jax_src.tar.gz -C $repo_dir_q && rm ega_jax_src.tar.gz"
  fi

  python_q=$(quote "$remote_python")
  install="cd $repo_dir_q"
  install+=" && { command -v $python_q >/dev/null || { sudo apt-get update -q && sudo apt-get install -y -q $python_q $python_q-venv; }; }"
  install+=" && { [ -x .venv/bin/python ] || $python_q -m venv .venv; }"
  # libtpu comes from PyPI nowadays; the -f page is where older jax releases
  # found it and does no harm.
  install+=" && .venv/bin/pip install -q -r requirements.txt 'jax[tpu]==0.10.2'"
  install+=" -f https://storage.googleapis.com/jax-releases/libtpu_releases.html"
  on_all_workers "$install"

  if [[ $teacher == gs://* ]]; then
    teacher_q=$(quote "$teacher_on_workers")
    on_all_workers "cd $repo_dir_q && mkdir -p $teacher_q && gcloud storage rsync --recursive $(quote "${teacher%/}") $teacher_q"
  fi
fi

# --- 5. train on every worker at once ---------------------------------------
train=(.venv/bin/python -m ega_jax.main --config="$config" --workdir="$workdir")
[[ -z $data_dir ]] || train+=(--config.dataset.data_dir="$data_dir")
train+=(${teacher_flag[@]+"${teacher_flag[@]}"} ${overrides[@]+"${overrides[@]}"})
train_command="cd $(quote "$repo_dir") && $(quote_all "${train[@]}")"

if [[ -n $log_file ]]; then
  if ((dry_run)); then
    echo "$(quote_all gcloud compute tpus tpu-vm ssh "$name" "${gcloud_flags[@]}" --worker=all --command "$train_command") 2>&1 | tee -a $(quote "$log_file")"
  else
    on_all_workers "$train_command" 2>&1 | tee -a "$log_file"
  fi
else
  on_all_workers "$train_command"
fi
