#!/usr/bin/env bash
# Trains on a Cloud TPU VM or pod slice: create (or reuse) it, install ddpm-jax on every
# worker, start ddpm_jax.main on all workers at once, and optionally delete it afterwards.
#
#   launch/tpu.sh [options] -- [ddpm_jax.main flags, e.g. --config.batch_size=256]
#
# Options (defaults in brackets):
#   --name NAME              TPU VM name [ddpm-jax]
#   --zone ZONE              [us-central2-b]
#   --accelerator TYPE       e.g. v4-8, v4-32, v5litepod-16 [v4-8]
#   --version IMAGE          TPU VM software version [tpu-ubuntu2204-base]
#   --project PROJECT        gcloud project [gcloud's default]
#   --spot                   create a Spot (preemptible) TPU
#   --repo URL               git URL of ddpm-jax to clone on the workers [this clone's origin]
#   --ref REF                git ref to check out [main]
#   --config PATH            config file, relative to the repository [configs/celeba.py]
#   --workdir gs://BUCKET/.. where checkpoints, TensorBoard logs and samples go (required)
#   --delete                 delete the TPU VM when training ends
#   --dry-run                print every command instead of running it
#
# jax.distributed needs no flags on TPU VMs: every worker discovers the others. On
# preemption the workers get SIGTERM, agree on a step, checkpoint it and exit 0; rerun
# this script to resume from the workdir.
set -euo pipefail

name=ddpm-jax zone=us-central2-b accelerator=v4-8 version=tpu-ubuntu2204-base project=""
spot=0 repo="" ref=main config=configs/celeba.py workdir="" delete=0 dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --name) name=$2; shift 2 ;;
    --zone) zone=$2; shift 2 ;;
    --accelerator) accelerator=$2; shift 2 ;;
    --version) version=$2; shift 2 ;;
    --project) project=$2; shift 2 ;;
    --spot) spot=1; shift ;;
    --repo) repo=$2; shift 2 ;;
    --ref) ref=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --workdir) workdir=$2; shift 2 ;;
    --delete) delete=1; shift ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
[[ "$workdir" == gs://* ]] || { echo "--workdir must be a gs:// path all workers can reach" >&2; exit 2; }
if [[ -z "$repo" ]]; then
  repo=$(git -C "$(dirname "$0")/.." remote get-url origin 2>/dev/null || true)
  [[ -n "$repo" ]] || { echo "pass --repo URL (this clone has no origin)" >&2; exit 2; }
fi

common=(--zone="$zone")
[[ -n "$project" ]] && common+=(--project="$project")

run() {
  if ((dry_run)); then printf '%q ' "$@"; echo; else "$@"; fi
}

exists=0
if ((!dry_run)) && gcloud compute tpus tpu-vm describe "$name" "${common[@]}" >/dev/null 2>&1; then
  exists=1
fi
if ((!exists)); then
  create=(gcloud compute tpus tpu-vm create "$name" "${common[@]}"
          --accelerator-type="$accelerator" --version="$version")
  ((spot)) && create+=(--spot)
  run "${create[@]}"
fi

install="set -e; if [ ! -d ddpm-jax ]; then git clone $repo ddpm-jax; fi; cd ddpm-jax; \
git fetch -q origin; git checkout -q $ref; python3 -m venv .venv; . .venv/bin/activate; \
pip install -q -U pip; pip install -q -e '.[tfds]' 'jax[tpu]'"
run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command="$install"

train_cmd="cd ddpm-jax && . .venv/bin/activate && python -m ddpm_jax.main --config=$config --workdir=$workdir"
for arg in "$@"; do train_cmd+=" $(printf '%q' "$arg")"; done
run gcloud compute tpus tpu-vm ssh "$name" "${common[@]}" --worker=all --command="$train_cmd"

if ((delete)); then
  run gcloud compute tpus tpu-vm delete "$name" "${common[@]}" --quiet
fi
