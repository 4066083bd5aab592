#!/usr/bin/env bash
# start.sh: start a real SLURM cluster on this machine (Debian 12, root), with fake nodes n1..nN
# that are all slurmd daemons on 127.0.0.1, fake GPUs, and accounting (slurmdbd + MariaDB).
# Then: source "$SLURM_LOCAL_DIR/env.sh" (exports SLURM_CONF) and use sbatch/squeue/sacct.
# Stop with stop.sh (--purge deletes the directory). Idempotent: when the cluster already runs
# with the same config this is a quick no-op; it refuses to change the config of a running one.
#
# Settings (environment variables, default in brackets):
#   SLURM_LOCAL_DIR             [/tmp/slurm-local] config, state, logs, pid files (run/), env.sh
#   SLURM_LOCAL_NODES           [2]     number of fake nodes n1..nN (one slurmd each)
#   SLURM_LOCAL_NODE_PREFIX     [n]     node names: <prefix>1..<prefix>N (a second cluster: e.g. c)
#   SLURM_LOCAL_JOB_REQUEUE     [1]     JobRequeue: 0 makes jobs not requeueable unless they ask
#                                       for it (a cluster without requeue, for chain tests)
#   SLURM_LOCAL_MAX_TIME        [INFINITE] MaxTime of the default partition `debug`, in minutes
#   SLURM_LOCAL_CPUS            [2]     CPUs per node (scheduling numbers only; nothing enforced)
#   SLURM_LOCAL_MEM_MB          [4000]  RealMemory per node; --mem above it is rejected at submit
#   SLURM_LOCAL_GPUS            [2]     fake GPUs per node (symlinks to /dev/null); 0 for none
#   SLURM_LOCAL_ACCOUNTING      [1]     1: slurmdbd + MariaDB, sacct works; 0: no accounting
#                                       (only `sacct -c`, finished jobs; submitit cannot see states)
#   SLURM_LOCAL_INSTALL         [1]     1: apt-get install the missing Debian packages
#   SLURM_LOCAL_ETC_HOSTS       [1]     1: add "127.0.0.1 n1 n2 ... # slurm-local-nodes <dir>"
#                                       to /etc/hosts so the node names resolve
#   SLURM_LOCAL_CRED_EXPIRE     [10]    seconds; a requeued job waits this + 1 s before it restarts
#   SLURM_LOCAL_KILL_WAIT       [10]    KillWait: seconds from SIGTERM to SIGKILL
#   SLURM_LOCAL_SLURMD_TIMEOUT  [60]    SlurmdTimeout: seconds before a silent node is DOWN and
#                                       its jobs end NODE_FAIL; tests of node failure use e.g. 10
#   SLURM_LOCAL_CTLD_PORT       [6817]  slurmctld
#   SLURM_LOCAL_DBD_PORT        [6819]  slurmdbd
#   SLURM_LOCAL_DB_PORT         [13306] MariaDB (127.0.0.1 only)
#   SLURM_LOCAL_NODE_PORT       [17001] slurmd of n1; node i listens on NODE_PORT + i - 1
#   SLURM_LOCAL_WAIT            [60]    seconds to wait for each daemon and for the nodes
set -euo pipefail

HERE="$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)"
export SLURM_LOCAL_DIR="${SLURM_LOCAL_DIR:-/tmp/slurm-local}"
# shellcheck source-path=SCRIPTDIR source=lib.sh
source "$HERE/lib.sh"

NODES="${SLURM_LOCAL_NODES:-2}"
NODE_PREFIX="${SLURM_LOCAL_NODE_PREFIX:-n}"
JOB_REQUEUE="${SLURM_LOCAL_JOB_REQUEUE:-1}"
MAX_TIME="${SLURM_LOCAL_MAX_TIME:-INFINITE}"
CPUS="${SLURM_LOCAL_CPUS:-2}"
MEM_MB="${SLURM_LOCAL_MEM_MB:-4000}"
GPUS="${SLURM_LOCAL_GPUS:-2}"
ACCOUNTING="${SLURM_LOCAL_ACCOUNTING:-1}"
INSTALL="${SLURM_LOCAL_INSTALL:-1}"
ETC_HOSTS="${SLURM_LOCAL_ETC_HOSTS:-1}"
CRED_EXPIRE="${SLURM_LOCAL_CRED_EXPIRE:-10}"
KILL_WAIT="${SLURM_LOCAL_KILL_WAIT:-10}"
SLURMD_TIMEOUT="${SLURM_LOCAL_SLURMD_TIMEOUT:-60}"
CTLD_PORT="${SLURM_LOCAL_CTLD_PORT:-6817}"
DBD_PORT="${SLURM_LOCAL_DBD_PORT:-6819}"
DB_PORT="${SLURM_LOCAL_DB_PORT:-13306}"
NODE_PORT="${SLURM_LOCAL_NODE_PORT:-17001}"
WAIT="${SLURM_LOCAL_WAIT:-60}"

T0="$(sl_now)"

check_int() { # <name> <value> <min> <max>
  if [[ ! "$2" =~ ^[0-9]+$ ]] || (($2 < $3 || $2 > $4)); then
    sl_die "$1 must be an integer from $3 to $4, got '$2'"
  fi
}
check_int SLURM_LOCAL_NODES "$NODES" 1 64
check_int SLURM_LOCAL_CPUS "$CPUS" 1 1024
check_int SLURM_LOCAL_MEM_MB "$MEM_MB" 1 100000000
check_int SLURM_LOCAL_GPUS "$GPUS" 0 64
check_int SLURM_LOCAL_ACCOUNTING "$ACCOUNTING" 0 1
check_int SLURM_LOCAL_INSTALL "$INSTALL" 0 1
check_int SLURM_LOCAL_ETC_HOSTS "$ETC_HOSTS" 0 1
check_int SLURM_LOCAL_CRED_EXPIRE "$CRED_EXPIRE" 1 100000
check_int SLURM_LOCAL_KILL_WAIT "$KILL_WAIT" 0 65533
# NOTE: 22.05 accepts any SlurmdTimeout (1 s was tried) and 0 means "never mark a silent node
# DOWN". Detection is never faster than one failed ping round (~12 s, see README.md).
check_int SLURM_LOCAL_SLURMD_TIMEOUT "$SLURMD_TIMEOUT" 0 65533
check_int SLURM_LOCAL_CTLD_PORT "$CTLD_PORT" 1 65535
check_int SLURM_LOCAL_DBD_PORT "$DBD_PORT" 1 65535
check_int SLURM_LOCAL_DB_PORT "$DB_PORT" 1 65535
check_int SLURM_LOCAL_NODE_PORT "$NODE_PORT" 1 $((65536 - NODES))
check_int SLURM_LOCAL_WAIT "$WAIT" 1 3600
check_int SLURM_LOCAL_JOB_REQUEUE "$JOB_REQUEUE" 0 1
[[ "$NODE_PREFIX" =~ ^[a-z][a-z0-9-]*$ ]] || sl_die "SLURM_LOCAL_NODE_PREFIX must be lower-case letters, digits and -, starting with a letter; got '$NODE_PREFIX'"
[[ "$MAX_TIME" == INFINITE || "$MAX_TIME" =~ ^[1-9][0-9]*$ ]] || sl_die "SLURM_LOCAL_MAX_TIME must be INFINITE or minutes (an integer >= 1); got '$MAX_TIME'"
sl_check_dir
[[ "$(id -u)" == 0 ]] || sl_die "start.sh runs the daemons as root (SlurmUser=root); run it as root"

D="$SL_DIR"
NODE_NAMES=()
for ((i = 1; i <= NODES; i++)); do NODE_NAMES+=("$NODE_PREFIX$i"); done
if ((NODES == 1)); then NODE_SET="${NODE_PREFIX}1"; else NODE_SET="$NODE_PREFIX[1-$NODES]"; fi

# ---------------------------------------------------------------- packages
need_pkgs=(slurmctld slurmd slurm-client munge)
need_cmds=(slurmctld slurmd sbatch munged mungekey)
if ((ACCOUNTING)); then
  need_pkgs+=(slurmdbd mariadb-server)
  need_cmds+=(slurmdbd mariadbd mariadb-install-db)
fi
missing=()
for p in "${need_pkgs[@]}"; do
  if [[ "$(dpkg-query -W -f='${Status}' "$p" 2>/dev/null)" != "install ok installed" ]]; then
    missing+=("$p")
  fi
done
if ((${#missing[@]})); then
  ((INSTALL)) || sl_die "missing Debian packages: ${missing[*]}. Install them (apt-get install --no-install-recommends ${missing[*]}) or run with SLURM_LOCAL_INSTALL=1"
  sl_log "installing ${missing[*]}"
  TI="$(sl_now)"
  policy_created=0
  if [[ ! -e /usr/sbin/policy-rc.d ]]; then
    # NOTE: keeps the packages' postinst from starting the system munge/slurm/mariadb services.
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod 755 /usr/sbin/policy-rc.d
    policy_created=1
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
  fi
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq >"${TMPDIR:-/tmp}/slurm-local-apt.log" 2>&1 ||
    sl_die "apt-get update failed; see ${TMPDIR:-/tmp}/slurm-local-apt.log"
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >>"${TMPDIR:-/tmp}/slurm-local-apt.log" 2>&1 ||
    sl_die "apt-get install ${missing[*]} failed; see ${TMPDIR:-/tmp}/slurm-local-apt.log"
  if ((policy_created)); then
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT
  fi
  sl_log "installed in $(sl_since "$TI") s"
fi
for c in "${need_cmds[@]}"; do
  PATH="$PATH:/usr/sbin:/sbin" command -v "$c" >/dev/null || sl_die "command '$c' not found after installing ${need_pkgs[*]}"
done
export PATH="$PATH:/usr/sbin:/sbin"

sl_lock

# ---------------------------------------------------------------- config
mkdir -p "$D"/{etc,run,log,state,spool,munge,dev}
chmod 700 "$D/munge"
for ((g = 0; g < GPUS; g++)); do ln -sfn /dev/null "$D/dev/gpu$g"; done
: >"$D/.slurm-local" # marks the directory as ours; stop.sh --purge deletes only such directories

NEW="$(mktemp -d)"
trap 'rm -rf "$NEW"' EXIT
{
  cat <<EOF
# Generated by tools/slurm-local/start.sh. Edits are overwritten; change the settings instead.
ClusterName=local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$D/run/munge.socket,cred_expire=$CRED_EXPIRE
SlurmctldPort=$CTLD_PORT
StateSaveLocation=$D/state
SlurmdSpoolDir=$D/spool/%n
SlurmctldPidFile=$D/run/slurmctld.pid
SlurmdPidFile=$D/run/slurmd-%n.pid
SlurmctldLogFile=$D/log/slurmctld.log
SlurmdLogFile=$D/log/slurmd-%n.log
SlurmctldDebug=info
SlurmdDebug=info
MailProg=/bin/true
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SchedulerType=sched/backfill
SchedulerParameters=bf_interval=5,sched_interval=5
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
JobRequeue=$JOB_REQUEUE
ReturnToService=2
MinJobAge=600
InactiveLimit=0
KillWait=$KILL_WAIT
SlurmctldTimeout=60
SlurmdTimeout=$SLURMD_TIMEOUT
EOF
  if ((ACCOUNTING)); then
    cat <<EOF
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoragePort=$DBD_PORT
AccountingStoragePass=$D/run/munge.socket
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
EOF
  else
    cat <<EOF
AccountingStorageType=accounting_storage/none
JobAcctGatherType=jobacct_gather/none
EOF
  fi
  cat <<EOF
JobCompType=jobcomp/filetxt
JobCompLoc=$D/log/jobcomp.txt
EOF
  gres=""
  if ((GPUS)); then
    echo "GresTypes=gpu"
    gres=" Gres=gpu:$GPUS"
  fi
  for ((i = 1; i <= NODES; i++)); do
    echo "NodeName=$NODE_PREFIX$i NodeHostname=localhost NodeAddr=127.0.0.1 Port=$((NODE_PORT + i - 1)) CPUs=$CPUS RealMemory=$MEM_MB$gres State=UNKNOWN"
  done
  cat <<EOF
PartitionName=debug Nodes=ALL Default=YES MaxTime=$MAX_TIME State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=urgent Nodes=ALL MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
} >"$NEW/slurm.conf"

if ((GPUS == 1)); then gpu_files="$D/dev/gpu0"; else gpu_files="$D/dev/gpu[0-$((GPUS - 1))]"; fi
if ((GPUS)); then
  # NOTE: GPUs need File= pointing at character devices; without it the nodes go INVAL/DRAIN.
  echo "NodeName=$NODE_SET Name=gpu File=$gpu_files" >"$NEW/gres.conf"
else
  : >"$NEW/gres.conf"
fi

# slurmdbd finds slurmdbd.conf next to $SLURM_CONF; it has no -f option.
cat >"$NEW/slurmdbd.conf" <<EOF
AuthType=auth/munge
AuthInfo=socket=$D/run/munge.socket
DbdHost=localhost
DbdPort=$DBD_PORT
SlurmUser=root
StorageType=accounting_storage/mysql
StorageHost=127.0.0.1
StoragePort=$DB_PORT
StorageUser=slurm
StoragePass=slurm
StorageLoc=slurm_acct_db
LogFile=$D/log/slurmdbd.log
PidFile=$D/run/slurmdbd.pid
DebugLevel=info
EOF

# Which of our daemons run now.
alive_any=0
alive_all=1
check_alive() { # <pidfile> <comm>
  if sl_alive "$1" "$2"; then alive_any=1; else alive_all=0; fi
}
check_alive "$D/run/munged.pid" munged
if ((ACCOUNTING)); then
  check_alive "$D/run/mysqld.pid" mariadbd
  check_alive "$D/run/slurmdbd.pid" slurmdbd
fi
check_alive "$D/run/slurmctld.pid" slurmctld
for n in "${NODE_NAMES[@]}"; do check_alive "$D/run/slurmd-$n.pid" slurmd; done
# Nodes of an older, larger config that still run also count as running.
for f in "$D"/run/slurmd-*.pid; do
  if [[ -e "$f" ]] && sl_alive "$f" slurmd; then alive_any=1; fi
done

changed=()
for f in slurm.conf gres.conf slurmdbd.conf; do
  cmp -s "$NEW/$f" "$D/etc/$f" || changed+=("$f")
done
if ((${#changed[@]})); then
  if ((alive_any)); then
    for f in "${changed[@]}"; do
      diff -u "$D/etc/$f" "$NEW/$f" >&2 || true
    done
    sl_die "these settings would change ${changed[*]} of the cluster running in $D (diff above); run tools/slurm-local/stop.sh first, or use the settings it was started with"
  fi
  for f in "${changed[@]}"; do
    install -m 644 "$NEW/$f" "$D/etc/$f"
  done
fi
chmod 600 "$D/etc/slurmdbd.conf" # slurmdbd refuses a readable one

export SLURM_CONF="$D/etc/slurm.conf"
printf '# Generated by tools/slurm-local/start.sh\nexport SLURM_CONF=%q\n' "$SLURM_CONF" >"$D/env.sh.tmp"
mv "$D/env.sh.tmp" "$D/env.sh"
hosts_line="127.0.0.1 ${NODE_NAMES[*]} $SL_HOSTS_MARK"
if ((ETC_HOSTS)); then
  sl_hosts_line_present "$hosts_line" || sl_hosts_set "$hosts_line"
fi

ctld_up() { scontrol ping 2>/dev/null | grep -q 'is UP'; }

if ((alive_all)) && ctld_up; then
  sl_log "already running in $D ($(sl_since "$T0") s); source $D/env.sh"
  exit 0
fi

# ---------------------------------------------------------------- daemons
# wait_for <what> <log> <pidfile> <comm> <command>...: poll the command for up to $WAIT s;
# fail at once, showing the log, if the daemon exits.
wait_for() {
  local what="$1" logf="$2" pidf="$3" comm="$4" i
  shift 4
  for ((i = 0; i < WAIT * 10; i++)); do
    "$@" >/dev/null 2>&1 && return 0
    if ((i % 10 == 9)) && [[ -n "$pidf" ]] && ! sl_alive "$pidf" "$comm"; then
      tail -n 20 "$logf" >&2 2>/dev/null || true
      sl_die "$what exited while starting; see $logf"
    fi
    sleep 0.1
  done
  tail -n 20 "$logf" >&2 2>/dev/null || true
  sl_die "$what not ready after ${WAIT} s; see $logf"
}

# munge
if [[ ! -s "$D/munge/munge.key" ]]; then
  mungekey --create --keyfile="$D/munge/munge.key"
fi
chmod 600 "$D/munge/munge.key"
if ! sl_alive "$D/run/munged.pid" munged; then
  rm -f "$D/run/munge.socket" "$D/run/munge.socket.lock"
  sl_spawn "$D/log/munged.out" munged --key-file="$D/munge/munge.key" --socket="$D/run/munge.socket" \
    --pid-file="$D/run/munged.pid" --log-file="$D/log/munged.log" --seed-file="$D/munge/munge.seed" ||
    sl_die "munged failed to start; see $D/log/munged.log and $D/log/munged.out"
fi
munge_ok() { munge -n -S "$D/run/munge.socket" | unmunge -S "$D/run/munge.socket"; }
wait_for munged "$D/log/munged.log" "$D/run/munged.pid" munged munge_ok

if ((ACCOUNTING)); then
  # MariaDB with a private datadir; only slurmdbd uses it.
  mysql_sock="$D/run/mysqld.sock"
  if [[ ! -d "$D/mysql/data/mysql" ]]; then
    rm -rf "$D/mysql/data"
    mkdir -p "$D/mysql/data"
    mariadb-install-db --no-defaults --datadir="$D/mysql/data" --user=root \
      --auth-root-authentication-method=socket --skip-test-db >"$D/log/mariadb-install.log" 2>&1 ||
      sl_die "mariadb-install-db failed; see $D/log/mariadb-install.log"
  fi
  if ! sl_alive "$D/run/mysqld.pid" mariadbd; then
    rm -f "$mysql_sock"
    # mariadbd does not daemonize itself: setsid + & detaches it (no descriptor of ours: sl_spawn).
    (
      sl_close_fds
      exec setsid mariadbd --no-defaults --datadir="$D/mysql/data" --port="$DB_PORT" \
        --bind-address=127.0.0.1 --socket="$mysql_sock" --pid-file="$D/run/mysqld.pid" --user=root \
        --log-error="$D/log/mariadb.log" --innodb-lock-wait-timeout=900 \
        </dev/null >>"$D/log/mariadb.out" 2>&1
    ) &
    disown
  fi
  mysql_ok() { mariadb-admin --no-defaults --socket="$mysql_sock" -uroot ping; }
  wait_for MariaDB "$D/log/mariadb.log" "" "" mysql_ok
  mariadb --no-defaults --socket="$mysql_sock" -uroot -e \
    "CREATE USER IF NOT EXISTS 'slurm'@'127.0.0.1' IDENTIFIED BY 'slurm';
     GRANT ALL ON slurm_acct_db.* TO 'slurm'@'127.0.0.1';" ||
    sl_die "could not create the MariaDB user 'slurm'; see $D/log/mariadb.log"

  if ! sl_alive "$D/run/slurmdbd.pid" slurmdbd; then
    sl_spawn "$D/log/slurmdbd.out" slurmdbd || sl_die "slurmdbd failed to start; see $D/log/slurmdbd.log"
  fi
  dbd_ok() { sacctmgr -n -P list cluster format=cluster; }
  wait_for slurmdbd "$D/log/slurmdbd.log" "$D/run/slurmdbd.pid" slurmdbd dbd_ok
  # NOTE: registering the cluster before slurmctld starts avoids a first-start race
  # ("Table 'slurm_acct_db.local_job_table' doesn't exist").
  if ! sacctmgr -n -P list cluster format=cluster | grep -qx local; then
    sacctmgr -i add cluster local >/dev/null || sl_die "sacctmgr add cluster local failed; see $D/log/slurmdbd.log"
  fi
fi

if ! sl_alive "$D/run/slurmctld.pid" slurmctld; then
  sl_spawn "$D/log/slurmctld.out" slurmctld -f "$SLURM_CONF" ||
    sl_die "slurmctld failed to start; see $D/log/slurmctld.log and $D/log/slurmctld.out"
fi
wait_for slurmctld "$D/log/slurmctld.log" "$D/run/slurmctld.pid" slurmctld ctld_up

for n in "${NODE_NAMES[@]}"; do
  mkdir -p "$D/spool/$n"
  if ! sl_alive "$D/run/slurmd-$n.pid" slurmd; then
    sl_spawn "$D/log/slurmd-$n.out" slurmd -f "$SLURM_CONF" -N "$n" ||
      sl_die "slurmd -N $n failed to start; see $D/log/slurmd-$n.log and $D/log/slurmd-$n.out"
  fi
done

# Ready: every node answers and is usable (idle, or allocated to jobs kept in the saved state).
nodes_ok() {
  local states
  states="$(sinfo -h -N -o '%N %t' | sort -u)" || return 1
  [[ "$(wc -l <<<"$states")" -eq "$NODES" ]] || return 1
  ! grep -qvE "^$NODE_PREFIX[0-9]+ (idle|alloc|mix|comp)\$" <<<"$states"
}
for ((i = 0; ; i++)); do
  nodes_ok && break
  if ((i >= WAIT * 10)); then
    sinfo -N -l >&2 || true
    sinfo -R >&2 || true
    sl_die "nodes not all up after ${WAIT} s (sinfo above); see $D/log/slurmd-<node>.log and $D/log/slurmctld.log"
  fi
  sleep 0.1
done
if ((ACCOUNTING)); then
  wait_for sacct "$D/log/slurmdbd.log" "$D/run/slurmdbd.pid" slurmdbd sacct -n -X
fi

sl_log "cluster up in $(sl_since "$T0") s: nodes ${NODE_NAMES[*]}, partitions debug (default) and urgent; source $D/env.sh"
