#!/usr/bin/env bash
# Starts N ddpm_jax.main processes on this machine, joined through jax.distributed
# (CPU collectives over gloo). Useful to try multi-host behaviour without a cluster.
#
#   launch/local.sh [--dry-run] NUM_PROCESSES DEVICES_PER_PROCESS -- --config=... --workdir=...
#
# PYTHON picks the interpreter (default: python on PATH).
# Each process gets DEVICES_PER_PROCESS virtual CPU devices (other XLA_FLAGS are kept); logs
# go to WORKDIR/process_I.log for I > 0 and to this terminal for process 0.
set -euo pipefail

dry_run=0
if [[ "${1:-}" == "--dry-run" ]]; then dry_run=1; shift; fi
if [[ $# -lt 3 || "$3" != "--" ]]; then
  echo "usage: $0 [--dry-run] NUM_PROCESSES DEVICES_PER_PROCESS -- ddpm_jax.main flags" >&2
  exit 2
fi
num_processes=$1
devices=$2
shift 3
port=${COORDINATOR_PORT:-$((20000 + RANDOM % 20000))}
workdir=""
for arg in "$@"; do
  case "$arg" in --workdir=*) workdir=${arg#--workdir=} ;; esac
done
[[ -n "$workdir" ]] || { echo "pass --workdir=..." >&2; exit 2; }

# XLA_FLAGS as given, with this script's device count in place of any other
xla_flags=$(printf '%s' "${XLA_FLAGS:-}" | sed -E 's/--xla_force_host_platform_device_count=[0-9]+//g')
xla_flags="$(echo $xla_flags) --xla_force_host_platform_device_count=$devices"
xla_flags=${xla_flags# }

pids=()
for ((i = num_processes - 1; i >= 0; i--)); do
  cmd=(env JAX_PLATFORMS=cpu "XLA_FLAGS=$xla_flags"
       "${PYTHON:-python}" -m ddpm_jax.main "--coordinator_address=localhost:$port"
       "--num_processes=$num_processes" "--process_id=$i" "$@")
  if ((dry_run)); then
    printf '%q ' "${cmd[@]}"; echo
    continue
  fi
  if ((i == 0)); then
    "${cmd[@]}" &
  else
    mkdir -p "$workdir"
    "${cmd[@]}" > "$workdir/process_$i.log" 2>&1 &
  fi
  pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=$?; done
exit $status
