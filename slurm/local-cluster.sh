#!/usr/bin/env bash
# Slurm clusters on this machine, for the tests: slurm/local-cluster.sh start|stop|status
#
# Runs as root on a machine without systemd or cgroups (CI, containers). Installs Debian's
# slurmctld, slurmd, slurm-client and munge when missing, writes /etc/slurm/slurm.conf and
# starts a private munged, slurmctld and slurmd whose state, logs and pid files live under
# $SHARDFORGE_SLURM_STATE (default /var/tmp/shardforge-slurm). `stop` kills them by pid file.
#
# Two-node mode (also started by `start`, when `ip` is there): a second cluster whose two nodes
# are hosts of their own, sfnode0 (10.213.1.10) and sfnode1 (10.213.1.11): one network namespace
# each (a veth named sfeth, on the bridge sfbr at 10.213.1.1) and one UTS namespace (its
# hostname), each with its own slurmd (`slurmd -N`). Its controller listens on the bridge, port
# 6917; its config is $TWO_CONF: use it with SLURM_CONF=$TWO_CONF (partition `two`). The nodes
# share the filesystem (the run directory), as cluster nodes share one; /etc/hosts names them.
set -euo pipefail

STATE=${SHARDFORGE_SLURM_STATE:-/var/tmp/shardforge-slurm}
CONF=/etc/slurm/slurm.conf
HOST=$(hostname -s)
CPUS=${SHARDFORGE_SLURM_CPUS:-8}   # advertised; SlurmdParameters=config_overrides lets it exceed the real count
TWO_STATE=$STATE-two
TWO_CONF=/etc/slurm-two/slurm.conf

log() { echo "local-cluster: $*"; }

install_packages() {
  command -v slurmctld >/dev/null && command -v slurmd >/dev/null && command -v munged >/dev/null && return
  log "installing slurmctld slurmd slurm-client munge"
  export DEBIAN_FRONTEND=noninteractive
  apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null 2>&1 \
    || { apt-get update -q >/dev/null && apt-get install -y -q slurmctld slurmd slurm-client munge >/dev/null; }
}

write_config() {
  mkdir -p /etc/slurm "$STATE"/{munge,ctld,slurmd,log}
  chmod 755 "$STATE" "$STATE/munge"   # munge clients refuse a socket directory others cannot read
  { cat <<CONF
# Written by slurm/local-cluster.sh: a one-node test cluster on localhost.
ClusterName=shardforge
SlurmctldHost=$HOST(127.0.0.1)
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
CONF
    common_config
    cat <<CONF
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
  } > "$CONF"
}

common_config() {  # what both clusters share
  cat <<CONF
AuthType=auth/munge
CredType=cred/munge
# cred_expire=5, Slurm's minimum: a requeued job may start again only cred_expire + 1 s later
AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=5
SlurmUser=root
SlurmdUser=root
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
SchedulerType=sched/backfill
SchedulerParameters=sched_interval=2,bf_interval=1
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
SlurmdParameters=config_overrides
ReturnToService=2
JobRequeue=1
MinJobAge=600
KillWait=30
MpiDefault=none
CONF
}

write_two_config() {
  mkdir -p /etc/slurm-two "$TWO_STATE"/{ctld,log}
  { cat <<CONF
# Written by slurm/local-cluster.sh: two nodes, each in network and UTS namespaces of its own.
ClusterName=shardforge2
SlurmctldHost=$HOST(10.213.1.1)
SlurmctldPort=6917
SlurmdPort=6918
StateSaveLocation=$TWO_STATE/ctld
SlurmdSpoolDir=$TWO_STATE/slurmd-%n
SlurmctldPidFile=$TWO_STATE/slurmctld.pid
SlurmdPidFile=$TWO_STATE/slurmd-%n.pid
SlurmctldLogFile=$TWO_STATE/log/slurmctld.log
SlurmdLogFile=$TWO_STATE/log/slurmd-%n.log
CONF
    common_config
    cat <<CONF
NodeName=sfnode0 NodeAddr=10.213.1.10 CPUs=$CPUS RealMemory=4000 State=UNKNOWN
NodeName=sfnode1 NodeAddr=10.213.1.11 CPUs=$CPUS RealMemory=4000 State=UNKNOWN
PartitionName=two Nodes=sfnode0,sfnode1 Default=YES MaxTime=INFINITE State=UP
CONF
  } > "$TWO_CONF"
}

make_hosts() {  # the bridge, and per node a namespace, a veth and its /etc/hosts line
  ip link show sfbr >/dev/null 2>&1 || { ip link add sfbr type bridge && ip addr add 10.213.1.1/24 dev sfbr; }
  ip link set sfbr up
  for k in 0 1; do
    local ns=sfnode$k
    if ! ip netns list | grep -qw "$ns"; then
      ip netns add "$ns"
      ip link add "sfv$k" type veth peer name sfeth
      ip link set sfeth netns "$ns"
      ip link set "sfv$k" master sfbr
      ip link set "sfv$k" up
      ip netns exec "$ns" ip addr add "10.213.1.1$k/24" dev sfeth
      ip netns exec "$ns" ip link set sfeth up
      ip netns exec "$ns" ip link set lo up
    fi
    grep -q " $ns\$" /etc/hosts || echo "10.213.1.1$k $ns" >> /etc/hosts
    mkdir -p "$TWO_STATE/slurmd-$ns"
  done
}

start_two() {
  command -v ip >/dev/null || { log "no iproute2: the two-node cluster is not started"; return; }
  if running "$TWO_STATE/slurmctld.pid" && running "$TWO_STATE/slurmd-sfnode0.pid" \
      && running "$TWO_STATE/slurmd-sfnode1.pid"; then
    log "two-node cluster already running"; return
  fi
  stop_two quiet
  make_hosts
  write_two_config
  SLURM_CONF=$TWO_CONF slurmctld -i
  for k in 0 1; do  # nsenter, not `ip netns exec`: that remounts /sys, and slurmd wants /sys/fs/cgroup
    nsenter --net=/run/netns/sfnode$k unshare --uts sh -c "hostname sfnode$k; SLURM_CONF=$TWO_CONF exec slurmd -N sfnode$k"
  done
  for _ in $(seq 60); do
    if [ "$(SLURM_CONF=$TWO_CONF sinfo -h -o %t 2>/dev/null | sort -u)" = idle ]; then
      log "nodes sfnode0 sfnode1 idle (SLURM_CONF=$TWO_CONF; state and logs in $TWO_STATE)"; return
    fi
    sleep 1
  done
  log "the two nodes did not become idle in 60 s; see $TWO_STATE/log"; SLURM_CONF=$TWO_CONF sinfo || true; exit 1
}

stop_two() {
  for pid in "$TWO_STATE"/slurmd-sfnode0.pid "$TWO_STATE"/slurmd-sfnode1.pid "$TWO_STATE"/slurmctld.pid; do
    if running "$pid"; then kill "$(cat "$pid")" 2>/dev/null || true; fi
  done
  sleep 1
  [ "${1:-}" = quiet ] || log "two-node cluster stopped"
}

running() { [ -f "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }

start() {
  install_packages
  if running "$STATE/slurmctld.pid" && running "$STATE/slurmd.pid"; then
    log "already running"; return
  fi
  stop quiet
  write_config
  if [ ! -f "$STATE/munge.key" ]; then
    dd if=/dev/urandom of="$STATE/munge.key" bs=1024 count=1 status=none
    chmod 400 "$STATE/munge.key"
  fi
  munged --force --socket="$STATE/munge/munge.socket" --key-file="$STATE/munge.key" \
    --pid-file="$STATE/munged.pid" --log-file="$STATE/log/munged.log" --seed-file="$STATE/munge.seed"
  slurmctld -i
  slurmd
  for _ in $(seq 60); do
    if sinfo -h -o %t 2>/dev/null | grep -qx idle; then
      log "node $HOST idle (state and logs in $STATE)"; return
    fi
    sleep 1
  done
  log "the node did not become idle in 60 s; see $STATE/log"; sinfo || true; exit 1
}

start_both() {
  start
  start_two
}

stop() {
  for daemon in slurmd slurmctld munged; do
    if running "$STATE/$daemon.pid"; then
      kill "$(cat "$STATE/$daemon.pid")" 2>/dev/null || true
    fi
  done
  sleep 1
  [ "${1:-}" = quiet ] || log "stopped"
}

case "${1:-}" in
  start) start_both ;;
  stop) stop_two quiet; stop ;;
  status) sinfo && squeue && SLURM_CONF=$TWO_CONF sinfo ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
