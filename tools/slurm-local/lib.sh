# shellcheck shell=bash
# lib.sh: helpers shared by start.sh, stop.sh and node.sh. Source it; do not run it.
# Needs SLURM_LOCAL_DIR to be set (the callers give it its default).

SL_DIR="${SLURM_LOCAL_DIR:-/tmp/slurm-local}"
SL_LOG="$SL_DIR/log"
SL_CONF="$SL_DIR/etc/slurm.conf"
SL_HOSTS_MARK="# slurm-local-nodes $SL_DIR"

sl_log() { printf 'slurm-local: %s\n' "$*" >&2; }
sl_die() { printf 'slurm-local: error: %s\n' "$*" >&2; exit 1; }

# Seconds since the epoch with a fraction, for timings.
sl_now() { date +%s.%N; }
sl_since() { awk -v a="$1" -v b="$(sl_now)" 'BEGIN { printf "%.1f", b - a }'; }

# sl_check_dir: SLURM config files cannot quote paths, so refuse anything odd.
sl_check_dir() {
  case "$SL_DIR" in
    /*) ;;
    *) sl_die "SLURM_LOCAL_DIR must be an absolute path, got '$SL_DIR'" ;;
  esac
  if [[ ! "$SL_DIR" =~ ^/[A-Za-z0-9._/-]+$ ]] || [[ "$SL_DIR" == / ]]; then
    sl_die "SLURM_LOCAL_DIR may only contain letters, digits and . _ / - (SLURM config files cannot quote paths); got '$SL_DIR'. Example: SLURM_LOCAL_DIR=/tmp/slurm-local2"
  fi
}

# sl_pid <pidfile>: print the pid stored in the file, or nothing.
sl_pid() {
  local pid=""
  if [[ -r "$1" ]]; then read -r pid <"$1" 2>/dev/null || true; fi
  if [[ "$pid" =~ ^[0-9]+$ ]]; then printf '%s\n' "$pid"; fi
}

# sl_pid_state <pid>: one-letter process state from /proc (R, S, Z, ...), or nothing.
sl_pid_state() {
  local stat
  stat="$(cat "/proc/$1/stat" 2>/dev/null)" || return 0
  stat="${stat##*) }"
  printf '%s\n' "${stat%% *}"
}

# sl_alive <pidfile> <comm>: true when the pid in the file runs the program <comm> and is not a
# zombie. Checking the name keeps a stale pid file from pointing at an unrelated, reused pid.
sl_alive() {
  local pid state comm
  pid="$(sl_pid "$1")"
  [[ -n "$pid" ]] || return 1
  state="$(sl_pid_state "$pid")"
  [[ -n "$state" && "$state" != Z && "$state" != X ]] || return 1
  comm="$(cat "/proc/$pid/comm" 2>/dev/null)" || return 1
  [[ "$comm" == "$2" ]]
}

# sl_gone <pid>: true when the pid no longer exists or is a zombie (PID 1 may reap late).
sl_gone() {
  local state
  state="$(sl_pid_state "$1")"
  [[ -z "$state" || "$state" == Z || "$state" == X ]]
}

# sl_kill_wait <pid> <seconds>: SIGTERM, wait up to <seconds>, then SIGKILL and wait 5 s more.
sl_kill_wait() {
  local pid="$1" limit="$2" i
  sl_gone "$pid" && return 0
  kill -TERM "$pid" 2>/dev/null || true
  for ((i = 0; i < limit * 10; i++)); do
    sl_gone "$pid" && return 0
    sleep 0.1
  done
  sl_log "pid $pid ignored SIGTERM for ${limit}s; sending SIGKILL"
  kill -KILL "$pid" 2>/dev/null || true
  for ((i = 0; i < 50; i++)); do
    sl_gone "$pid" && return 0
    sleep 0.1
  done
  sl_log "pid $pid still exists after SIGKILL"
  return 1
}

# sl_stop_pidfile <pidfile> <comm> <seconds>: stop the daemon named in the pid file, if it is
# still that daemon, then remove the pid file.
sl_stop_pidfile() {
  local f="$1" comm="$2" limit="$3" pid
  pid="$(sl_pid "$f")"
  if [[ -n "$pid" ]] && sl_alive "$f" "$comm"; then
    sl_kill_wait "$pid" "$limit" || return 1
  fi
  rm -f "$f"
}

# sl_node_names: the node names in the current slurm.conf, one a line.
sl_node_names() {
  [[ -r "$SL_CONF" ]] || return 0
  sed -n 's/^NodeName=\([^ ]*\) .*/\1/p' "$SL_CONF"
}

# sl_node_step_pids <node>: pids of the slurmstepd processes that belong to one fake node. Each
# slurmstepd keeps its node's slurmd log file open, which tells the nodes apart.
sl_node_step_pids() {
  local logf="$SL_LOG/slurmd-$1.log" p fd
  for p in /proc/[0-9]*; do
    [[ "$(cat "$p/comm" 2>/dev/null)" == slurmstepd ]] || continue
    for fd in "$p"/fd/*; do
      if [[ "$(readlink "$fd" 2>/dev/null)" == "$logf" ]]; then
        printf '%s\n' "${p#/proc/}"
        break
      fi
    done
  done
}

# sl_descendants <pid>...: the given pids and all their descendants.
sl_descendants() {
  local todo=("$@") found=() p c
  while ((${#todo[@]})); do
    p="${todo[0]}"
    todo=("${todo[@]:1}")
    found+=("$p")
    # shellcheck disable=SC2013 # the file holds space-separated pids
    for c in $(cat /proc/"$p"/task/*/children 2>/dev/null); do
      todo+=("$c")
    done
  done
  if ((${#found[@]})); then printf '%s\n' "${found[@]}"; fi
}

# /etc/hosts holds one line per cluster: "127.0.0.1 n1 n2 ... # slurm-local-nodes <dir>".
# The mark must end the line, so /tmp/slurm-local does not match /tmp/slurm-local2's line.
# shellcheck disable=SC2016 # awk program, not shell
SL_AWK_NOT_MARKED='{ if (!(length($0) >= length(m) && substr($0, length($0) - length(m) + 1) == m)) print }'

sl_hosts_line_present() { # <line>: true when exactly this line is in /etc/hosts
  grep -qxF -- "$1" /etc/hosts 2>/dev/null
}

# sl_hosts_set <line>: replace this cluster's line in /etc/hosts ("": just remove it).
# Rewrites in place (cat >) rather than renaming: /etc/hosts is often a bind mount.
sl_hosts_set() {
  local tmp
  tmp="$(mktemp)"
  awk -v m="$SL_HOSTS_MARK" "$SL_AWK_NOT_MARKED" /etc/hosts >"$tmp"
  if [[ -n "$1" ]]; then printf '%s\n' "$1" >>"$tmp"; fi
  if ! cmp -s "$tmp" /etc/hosts; then
    cat "$tmp" >/etc/hosts
  fi
  rm -f "$tmp"
}

# sl_lock: one start/stop/node command at a time per cluster directory. Daemons must not
# inherit fd 9 (see sl_spawn), or they would hold the lock forever.
sl_lock() {
  mkdir -p "$SL_DIR"
  exec 9>>"$SL_DIR/.lock"
  flock -w 300 9 || sl_die "another slurm-local command has held $SL_DIR/.lock for 300 s"
}

# sl_spawn <outfile> <command>...: run a self-daemonizing program detached from our stdin,
# stdout, stderr and every other descriptor, so callers that capture output (CI, subprocess) do
# not hang and no daemon holds a lock: ours (fd 9) or a caller's (`flock FILE start.sh` hands its
# lock's descriptor down; a daemon keeping it held FILE for as long as the cluster ran).
sl_spawn() {
  local outfile="$1"
  shift
  (
    sl_close_fds
    exec "$@" </dev/null >>"$outfile" 2>&1
  )
}

# sl_close_fds: close every descriptor above 2 of the current (sub)shell.
sl_close_fds() {
  local fd
  for fd in /proc/$BASHPID/fd/*; do
    fd=${fd##*/}
    if ((fd > 2)); then eval "exec $fd>&-" 2>/dev/null || true; fi
  done
}

sl_hosts_remove() { sl_hosts_set ""; }

# sl_kill_tree <pid>: SIGKILL a process and all its descendants (a job step, as a crash would).
sl_kill_tree() {
  local pids
  mapfile -t pids < <(sl_descendants "$1")
  if ((${#pids[@]})); then kill -KILL "${pids[@]}" 2>/dev/null || true; fi
}
