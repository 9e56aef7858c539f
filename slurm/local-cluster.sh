#!/usr/bin/env bash
# A one-node Slurm cluster on localhost, for the tests: slurm/local-cluster.sh start|stop|status
#
# Runs as root on a machine without systemd or cgroups (CI, containers). Installs Debian's
# slurmctld, slurmd, slurm-client and munge when missing, writes /etc/slurm/slurm.conf and
# starts a private munged, slurmctld and slurmd whose state, logs and pid files live under
# $SHARDFORGE_SLURM_STATE (default /var/tmp/shardforge-slurm). `stop` kills them by pid file.
set -euo pipefail

STATE=${SHARDFORGE_SLURM_STATE:-/var/tmp/shardforge-slurm}
CONF=/etc/slurm/slurm.conf
HOST=$(hostname -s)
CPUS=${SHARDFORGE_SLURM_CPUS:-8}   # advertised; SlurmdParameters=config_overrides lets it exceed the real count

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
  cat > "$CONF" <<CONF
# Written by slurm/local-cluster.sh: a one-node test cluster on localhost.
ClusterName=shardforge
SlurmctldHost=$HOST(127.0.0.1)
AuthType=auth/munge
CredType=cred/munge
AuthInfo=socket=$STATE/munge/munge.socket,cred_expire=10
SlurmUser=root
SlurmdUser=root
StateSaveLocation=$STATE/ctld
SlurmdSpoolDir=$STATE/slurmd
SlurmctldPidFile=$STATE/slurmctld.pid
SlurmdPidFile=$STATE/slurmd.pid
SlurmctldLogFile=$STATE/log/slurmctld.log
SlurmdLogFile=$STATE/log/slurmd.log
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
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=4000 State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
CONF
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
  start) start ;;
  stop) stop ;;
  status) sinfo && squeue ;;
  *) echo "usage: $0 start|stop|status" >&2; exit 2 ;;
esac
