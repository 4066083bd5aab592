#!/usr/bin/env bash
# stop.sh: stop the cluster that start.sh started in $SLURM_LOCAL_DIR (default /tmp/slurm-local).
# Cancels its jobs, stops only the daemons named in its pid files (SIGTERM, bounded wait, then
# SIGKILL), kills leftover job steps of its nodes, and removes its /etc/hosts line.
#   stop.sh            keep the directory: the next start.sh restarts with the saved state
#   stop.sh --purge    also delete the directory (job ids start again at 1)
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export SLURM_LOCAL_DIR="${SLURM_LOCAL_DIR:-/tmp/slurm-local}"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$HERE/lib.sh"

purge=0
for a in "$@"; do
  case "$a" in
    --purge) purge=1 ;;
    -h | --help)
      sed -n '2,6p' "$0" | sed 's/^# \{0,1\}//'
      exit 0
      ;;
    *) sl_die "unknown argument '$a'. Usage: stop.sh [--purge]" ;;
  esac
done
sl_check_dir
T0="$(sl_now)"
D="$SL_DIR"
export PATH="$PATH:/usr/sbin:/sbin"
export SLURM_CONF="$SL_CONF"

if [[ ! -d "$D" ]]; then
  sl_hosts_remove
  sl_log "nothing to stop: $D does not exist"
  exit 0
fi
if ((purge)) && [[ ! -e "$D/.slurm-local" ]] && [[ -n "$(ls -A "$D")" ]]; then
  sl_die "$D was not made by start.sh (no .slurm-local file in it); not deleting it"
fi
sl_lock

kill_wait="$(sed -n 's/^KillWait=//p' "$SL_CONF" 2>/dev/null || true)"
[[ "$kill_wait" =~ ^[0-9]+$ ]] || kill_wait=30
failed=0

# 1. Cancel the jobs while slurmctld and the slurmds still run, so the job processes are ended
#    by SLURM itself and accounting records the cancellation.
if sl_alive "$D/run/slurmctld.pid" slurmctld && scontrol ping 2>/dev/null | grep -q 'is UP'; then
  jobs="$(squeue -h -o %A 2>/dev/null | sort -u | tr '\n' ' ')" || jobs=""
  if [[ -n "${jobs// /}" ]]; then
    sl_log "cancelling jobs: $jobs"
    # shellcheck disable=SC2086
    scancel $jobs 2>/dev/null || true
    # Job processes that ignore SIGTERM get SIGKILL after KillWait.
    for ((i = 0; i < (kill_wait + 15) * 10; i++)); do
      [[ -z "$(squeue -h -o %A 2>/dev/null)" ]] && break
      sleep 0.1
    done
    left="$(squeue -h -o '%A %T' 2>/dev/null | tr '\n' ' ')" || true
    [[ -z "$left" ]] || sl_log "jobs still listed after $((kill_wait + 15)) s: $left"
  fi
fi

# 2. The daemons, in reverse start order.
for f in "$D"/run/slurmd-*.pid; do
  [[ -e "$f" ]] || continue
  sl_stop_pidfile "$f" slurmd 10 || failed=1
done
# Job steps left behind (e.g. by node.sh stop --slurmd-only) would run on without a slurmd.
for n in $(sl_node_names); do
  for p in $(sl_node_step_pids "$n"); do
    sl_log "killing leftover job step $p of node $n and its processes"
    sl_kill_tree "$p"
  done
done
sl_stop_pidfile "$D/run/slurmctld.pid" slurmctld 15 || failed=1
sl_stop_pidfile "$D/run/slurmdbd.pid" slurmdbd 10 || failed=1
sl_stop_pidfile "$D/run/mysqld.pid" mariadbd 30 || failed=1
sl_stop_pidfile "$D/run/munged.pid" munged 10 || failed=1

# 3. /etc/hosts and, with --purge, the directory.
sl_hosts_remove
if ((failed)); then
  sl_die "some daemons did not stop (see above); not purging. Pid files are in $D/run"
fi
if ((purge)); then
  rm -rf "$D"
  sl_log "stopped and deleted $D in $(sl_since "$T0") s"
else
  sl_log "stopped in $(sl_since "$T0") s; state kept in $D (start.sh restarts it, stop.sh --purge deletes it)"
fi
