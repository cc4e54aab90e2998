#!/usr/bin/env bash
# A real two-node SLURM cluster on this one machine, for tests and for trying the sbatch scripts.
#
#   scripts/slurm_cluster.sh up   [STATE_DIR]   # munge + slurmctld + slurmd node1, node2; prints SLURM_CONF
#   scripts/slurm_cluster.sh down [STATE_DIR]   # cancels its jobs, stops exactly the daemons `up` started
#
# Needs root and Debian's packages (scripts/system_deps.sh installs them: slurmctld slurmd slurm-client munge).
# Everything lives in STATE_DIR (default /tmp/sft-slurm): slurm.conf, state, spool, logs and the PIDs started.
# STATE_DIR is never followed if it is a symlink, and must be a directory of our own: `up` refuses anything else
# (a symlink planted in /tmp would otherwise have root's `rm -rf` delete its target), `down` too (it kills the
# PIDs the directory lists).
# Nothing in /etc is changed; point the client commands at the cluster with `export SLURM_CONF=STATE_DIR/slurm.conf`.
# Ports: SLURM_CLUSTER_CTLD_PORT (default 16817) and SLURM_CLUSTER_NODE_PORT..+1 (default 17001).
set -euo pipefail

action=${1:-}
state_arg=${2:-${SLURM_CLUSTER_DIR:-/tmp/sft-slurm}}
# Resolve the parent only: the last component is checked as it is, never followed.
state=$(realpath -m -- "$(dirname -- "$state_arg")")/$(basename -- "$state_arg")
ctld_port=${SLURM_CLUSTER_CTLD_PORT:-16817}
node_port=${SLURM_CLUSTER_NODE_PORT:-17001}
conf=$state/slurm.conf
pids=$state/pids
export SLURM_CONF=$conf

die() { echo "slurm_cluster: $*" >&2; exit 1; }

# STATE_DIR must not be a symlink, and if it exists must be a directory owned by us.
check_state_dir() {
    if [ -L "$state" ]; then
        die "$state is a symlink; refusing to use it (remove it, or pass another STATE_DIR)"
    fi
    if [ -e "$state" ] && { [ ! -d "$state" ] || [ ! -O "$state" ]; }; then
        die "$state is not a directory owned by $(id -un); refusing to use it (pass another STATE_DIR)"
    fi
}

# Wait up to $1 seconds for the command after it to succeed.
wait_for() {
    local limit=$1 t=0
    shift
    until "$@" >/dev/null 2>&1; do
        sleep 0.5
        t=$((t + 1))
        [ "$t" -lt $((limit * 2)) ] || return 1
    done
}

is_alive() { [ -n "$1" ] && kill -0 "$1" 2>/dev/null; }
pid_from() { [ -s "$1" ] && cat "$1"; }

write_conf() {
    local cpus mem_mb
    cpus=$(nproc)
    # RealMemory must be set or every --mem request fails; both simulated nodes claim ~80% of this host.
    mem_mb=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.8)}' /proc/meminfo)
    cat >"$conf" <<EOF
# Written by scripts/slurm_cluster.sh: two simulated nodes on one host, no cgroups, no accounting.
ClusterName=sftci
SlurmctldHost=$(hostname -s)(127.0.0.1)
SlurmctldPort=$ctld_port
SlurmdPort=$node_port
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
# A requeued job may start again only after cred_expire+1 s (default 121 s).
AuthInfo=cred_expire=10
StateSaveLocation=$state/ctld
SlurmctldPidFile=$state/slurmctld.pid
SlurmctldLogFile=$state/slurmctld.log
SlurmdSpoolDir=$state/slurmd-%n
SlurmdPidFile=$state/slurmd-%n.pid
SlurmdLogFile=$state/slurmd-%n.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SelectType=select/cons_tres
SelectTypeParameters=CR_Core
MpiDefault=none
SwitchType=switch/none
MailProg=/bin/true
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=15
SchedulerParameters=sched_interval=2
PreemptType=preempt/partition_prio
PreemptMode=REQUEUE
SlurmctldParameters=preempt_send_user_signal
NodeName=node[1-2] NodeHostname=localhost NodeAddr=127.0.0.1 Port=[$node_port-$((node_port + 1))] CPUs=$cpus RealMemory=$mem_mb State=UNKNOWN
PartitionName=low Nodes=node[1-2] Default=YES MaxTime=INFINITE State=UP PriorityTier=1 PreemptMode=REQUEUE GraceTime=30
PartitionName=high Nodes=node[1-2] MaxTime=INFINITE State=UP PriorityTier=10 PreemptMode=OFF
EOF
}

start_munge() {
    if munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
        return  # already running (someone else's): use it, never stop it
    fi
    mkdir -p /run/munge /var/log/munge /var/lib/munge
    chown munge:munge /run/munge /var/log/munge /var/lib/munge
    runuser -u munge -- /usr/sbin/munged
    wait_for 10 bash -c 'munge -n | unmunge' || die "munged did not start (see /var/log/munge/munged.log)"
    echo "munged $(cat /run/munge/munged.pid)" >>"$pids"
}

# Start a daemon that writes its own PID file, and record that PID.
start_daemon() {
    local name=$1 pidfile=$2
    shift 2
    rm -f "$pidfile"
    "$@" || die "$name failed to start (see $state/$name.log)"
    wait_for 15 test -s "$pidfile" || die "$name wrote no PID file $pidfile (see $state/$name.log)"
    echo "$name $(cat "$pidfile")" >>"$pids"
}

up() {
    [ "$(id -u)" = 0 ] || die "needs root (slurmd runs jobs as their owner)"
    check_state_dir
    command -v slurmctld >/dev/null || die "SLURM is not installed; run scripts/system_deps.sh as root"
    if [ -s "$pids" ]; then
        while read -r name pid; do
            is_alive "$pid" && die "a cluster from $state is still up ($name pid $pid); run: $0 down $state"
        done <"$pids"
    fi
    # A fresh state directory each time: job ids restart at 1. Checked above (not a symlink, our own); made anew
    # with plain mkdir, which fails if anything (a symlink planted meanwhile) took its place.
    rm -rf -- "$state"
    mkdir -m 755 -- "$state" || die "could not create $state (something took its place?)"
    mkdir -- "$state/ctld" "$state/slurmd-node1" "$state/slurmd-node2"
    : >"$pids"
    write_conf
    start_munge
    start_daemon slurmctld "$state/slurmctld.pid" slurmctld -f "$conf" -i
    for node in node1 node2; do
        start_daemon "slurmd-$node" "$state/slurmd-$node.pid" slurmd -f "$conf" -N "$node"
    done
    wait_for 60 bash -c '[ "$(sinfo -h -N -p low -o %T | grep -cE "^idle")" = 2 ]' ||
        die "nodes did not become idle: $(sinfo -N 2>&1 | tr '\n' ' ') (see $state/*.log)"
    echo "export SLURM_CONF=$conf"
}

down() {
    check_state_dir
    [ -f "$pids" ] || { echo "slurm_cluster: nothing recorded in $state" >&2; return 0; }
    # Cancel this cluster's jobs first so their steps end before the daemons go.
    if [ -f "$conf" ] && is_alive "$(pid_from "$state/slurmctld.pid")"; then
        squeue -h -o %A 2>/dev/null | xargs -r scancel --full 2>/dev/null || true
        wait_for 20 bash -c '[ -z "$(squeue -h -o %A)" ]' || true
    fi
    # Stop in reverse order of start: slurmds, slurmctld, then munged (only if this script started it).
    local name pid
    tac "$pids" | while read -r name pid; do
        if is_alive "$pid"; then
            kill -TERM "$pid"
            wait_for 15 bash -c "! kill -0 $pid" || kill -KILL "$pid" 2>/dev/null || true
        fi
    done
    rm -f "$pids"
}

case "$action" in
    up) up ;;
    down) down ;;
    *) die "usage: $0 up|down [STATE_DIR]" ;;
esac
