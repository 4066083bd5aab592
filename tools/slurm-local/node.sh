#!/usr/bin/env bash
# node.sh: make one fake node of the slurm-local cluster fail, or bring it back.
#   node.sh stop  <node> [--slurmd-only]
#       SIGKILL the node's slurmd (from its pid file) and, unless --slurmd-only, its job steps
#       and their processes, as a crash would. slurmctld notices after SlurmdTimeout
#       (SLURM_LOCAL_SLURMD_TIMEOUT at start.sh time): the node goes DOWN and its jobs end
#       NODE_FAIL (jobs that may be requeued, the default here, go back to PENDING).
#       With --slurmd-only the job steps keep running until the slurmd comes back.
#   node.sh start <node>
#       start the node's slurmd again, wait until it registers, and resume the node when it
#       is still DOWN or DRAINED.
#   node.sh status <node>
# Uses SLURM_LOCAL_DIR (default /tmp/slurm-local) and SLURM_LOCAL_WAIT (default 60 s).
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export SLURM_LOCAL_DIR="${SLURM_LOCAL_DIR:-/tmp/slurm-local}"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$HERE/lib.sh"

usage="Usage: node.sh stop <node> [--slurmd-only] | node.sh start <node> | node.sh status <node>"
[[ $# -ge 2 ]] || sl_die "$usage"
cmd="$1"
node="$2"
slurmd_only=0
for a in "${@:3}"; do
  case "$a" in
    --slurmd-only) slurmd_only=1 ;;
    *) sl_die "unknown argument '$a'. $usage" ;;
  esac
done
sl_check_dir
WAIT="${SLURM_LOCAL_WAIT:-60}"
D="$SL_DIR"
export PATH="$PATH:/usr/sbin:/sbin"
export SLURM_CONF="$SL_CONF"
[[ -r "$SL_CONF" ]] || sl_die "no cluster config at $SL_CONF; run tools/slurm-local/start.sh first"
if ! sl_node_names | grep -qx -- "$node"; then
  sl_die "unknown node '$node'; nodes in $SL_CONF: $(sl_node_names | tr '\n' ' ')"
fi
pidf="$D/run/slurmd-$node.pid"

node_state() { sinfo -h -N -n "$node" -o %t 2>/dev/null | head -n 1; }

case "$cmd" in
  status)
    if sl_alive "$pidf" slurmd; then echo "slurmd: running (pid $(sl_pid "$pidf"))"; else echo "slurmd: stopped"; fi
    echo "state: $(node_state)"
    ;;
  stop)
    sl_lock
    if ! sl_alive "$pidf" slurmd; then
      sl_log "slurmd of $node is not running"
    else
      pid="$(sl_pid "$pidf")"
      kill -KILL "$pid"
      for ((i = 0; i < 50; i++)); do
        sl_gone "$pid" && break
        sleep 0.1
      done
      sl_gone "$pid" || sl_die "slurmd pid $pid of $node survived SIGKILL"
      rm -f "$pidf"
    fi
    if ((!slurmd_only)); then
      for p in $(sl_node_step_pids "$node"); do
        sl_kill_tree "$p"
      done
    fi
    sl_log "stopped $node; slurmctld marks it DOWN after SlurmdTimeout=$(sed -n 's/^SlurmdTimeout=//p' "$SL_CONF") s"
    ;;
  start)
    sl_lock
    if ! sl_alive "$pidf" slurmd; then
      mkdir -p "$D/spool/$node"
      sl_spawn "$D/log/slurmd-$node.out" slurmd -f "$SL_CONF" -N "$node" ||
        sl_die "slurmd -N $node failed to start; see $D/log/slurmd-$node.log"
    fi
    resumed=0
    for ((i = 0; ; i++)); do
      st="$(node_state)"
      case "$st" in
        idle | alloc | mix | comp) break ;;
        *'*' | unk* | '') ;; # not responding (yet)
        down | drain | drng | drained | fail | failg | inval)
          if ((!resumed)); then
            scontrol update nodename="$node" state=resume ||
              sl_die "scontrol update nodename=$node state=resume failed; see sinfo -R"
            resumed=1
          fi
          ;;
      esac
      if ((i >= WAIT * 10)); then
        sinfo -R >&2 || true
        sl_die "$node is '$st' after ${WAIT} s; see $D/log/slurmd-$node.log and $D/log/slurmctld.log"
      fi
      sleep 0.1
    done
    sl_log "$node is $st"
    ;;
  *) sl_die "$usage" ;;
esac
