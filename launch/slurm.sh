#!/usr/bin/env bash
# Trains on several GPU nodes with Slurm: writes a batch script that starts one
# ddpm_jax.main process per GPU with srun, and submits it with sbatch.
#
#   launch/slurm.sh [options] -- [ddpm_jax.main flags]
#
# Options (defaults in brackets):
#   --nodes N                nodes [2]
#   --gpus-per-node N        GPUs per node; one process each [8]
#   --partition NAME         Slurm partition [cluster default]
#   --time HH:MM:SS          wall-clock limit [24:00:00]
#   --job-name NAME          [ddpm-jax]
#   --venv PATH              virtual environment with ddpm-jax and jax[cuda] installed [.venv]
#   --config PATH            [configs/celeba.py]
#   --workdir PATH           shared folder or gs:// path (required)
#   --dry-run                print the batch script and the sbatch command, submit nothing
#
# jax.distributed.initialize() reads the coordinator, process count and index from Slurm's
# variables. Slurm sends SIGTERM before the time limit (--signal below): the processes agree
# on a step, checkpoint it and exit 0; resubmit to resume.
set -euo pipefail

nodes=2 gpus=8 partition="" time_limit=24:00:00 job=ddpm-jax venv=.venv
config=configs/celeba.py workdir="" dry_run=0
while [[ $# -gt 0 ]]; do
  case "$1" in
    --nodes) nodes=$2; shift 2 ;;
    --gpus-per-node) gpus=$2; shift 2 ;;
    --partition) partition=$2; shift 2 ;;
    --time) time_limit=$2; shift 2 ;;
    --job-name) job=$2; shift 2 ;;
    --venv) venv=$2; shift 2 ;;
    --config) config=$2; shift 2 ;;
    --workdir) workdir=$2; shift 2 ;;
    --dry-run) dry_run=1; shift ;;
    --) shift; break ;;
    *) echo "unknown option $1 (see the header of $0)" >&2; exit 2 ;;
  esac
done
[[ -n "$workdir" ]] || { echo "pass --workdir (a folder every node can reach)" >&2; exit 2; }
repo=$(cd "$(dirname "$0")/.." && pwd)

extra=""
for arg in "$@"; do extra+=" $(printf '%q' "$arg")"; done
script="#!/usr/bin/env bash
#SBATCH --job-name=$job
#SBATCH --nodes=$nodes
#SBATCH --ntasks-per-node=$gpus
#SBATCH --gpus-per-node=$gpus
#SBATCH --time=$time_limit
#SBATCH --signal=TERM@300
#SBATCH --output=$job-%j.out
${partition:+#SBATCH --partition=$partition
}set -euo pipefail
cd $repo
. $venv/bin/activate
srun --kill-on-bad-exit=1 bash -c 'CUDA_VISIBLE_DEVICES=\$SLURM_LOCALID python -m ddpm_jax.main --config=$config --workdir=$workdir$extra'
"
if ((dry_run)); then
  printf '%s' "$script"
  echo "sbatch <the script above>"
  exit 0
fi
printf '%s' "$script" | sbatch
