#!/usr/bin/env bash
# Start a SLURM cluster on this machine (as root), for tests/integration/test_slurm*.py.
#
#   .ci/slurm-up.sh            two nodes, n1 and n2 (the default: what CI runs)
#   .ci/slurm-up.sh --nodes 1  one node named after this host
#
# Two nodes on one host: one slurmctld and two `slurmd -N n1|n2`, each node with its own loopback
# address (127.0.0.2, 127.0.0.3), port, spool directory, pid and log file (`%n` in slurm.conf),
# as DESIGN.md's second-round measured facts describe. The node names go into /etc/hosts, so the
# first node's name (the main process address `acceltrain slurm` renders) resolves as it does on
# a real cluster. Nothing leaves this machine.
#
# Idempotent: a cluster whose daemons run and whose nodes answer is left alone; a daemon that is
# not running is started; a changed slurm.conf restarts them all. It installs nothing: CI installs
# the Debian packages first (`apt-get install -y slurm-wlm munge`). The recipe follows DESIGN.md's
# "Measured facts": a munge key, munged as the munge user, a small slurm.conf, slurmctld, slurmd.
# Daemons are tracked by their pid files (no procps needed).
set -euo pipefail

NODES=2
while [ $# -gt 0 ]; do
  case "$1" in
    --nodes) NODES="${2:-}"; shift 2 || shift ;;
    --nodes=*) NODES="${1#--nodes=}"; shift ;;
    *) echo "slurm-up: unknown argument '$1' (usage: slurm-up.sh [--nodes 1|2])" >&2; exit 2 ;;
  esac
done
case "$NODES" in
  1|2) ;;
  *) echo "slurm-up: --nodes must be 1 or 2, got '$NODES'" >&2; exit 2 ;;
esac

if [ "$(id -u)" -ne 0 ]; then
  echo "slurm-up: must run as root (it starts munged, slurmctld and slurmd)" >&2
  exit 1
fi
for cmd in munged munge slurmctld slurmd sinfo scontrol; do
  command -v "$cmd" >/dev/null || { echo "slurm-up: $cmd not found; apt-get install -y slurm-wlm munge" >&2; exit 1; }
done

HOST=$(hostname -s)  # one node: slurmd finds its NodeName by the short host name
CONF=/etc/slurm/slurm.conf
LOG_DIR=/var/log/slurm
MUNGE_PID=/run/munge/munged.pid
CTLD_PID=/run/slurmctld.pid
if [ "$NODES" -eq 2 ]; then
  NODE_NAMES=(n1 n2)
  NODE_LIST="n[1-2]"
else
  NODE_NAMES=("$HOST")
  NODE_LIST="$HOST"
fi
# Each node's slurmd pid file (`%n` in SlurmdPidFile is the node's name). A switch between the
# layouts stops the other layout's daemons too, so all three names are known.
slurmd_pid() { if [ "$NODES" -eq 2 ]; then echo "/run/slurmd-$1.pid"; else echo /run/slurmd.pid; fi; }
ALL_SLURMD_PIDS=(/run/slurmd.pid /run/slurmd-n1.pid /run/slurmd-n2.pid)

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
nodes_ready() {
  # Every node "idle", "mix" or "alloc" (a node may already be running a job).
  local states
  states=$(sinfo --noheader --nodes="$NODE_LIST" -N -o '%t' 2>/dev/null) || return 1
  [ "$(grep -cE '^(idle|mix|alloc)' <<<"$states")" -eq "${#NODE_NAMES[@]}" ]
}
all_running() {
  running "$CTLD_PID" || return 1
  local node
  for node in "${NODE_NAMES[@]}"; do running "$(slurmd_pid "$node")" || return 1; done
}

# --- munge: a key (the Debian package usually generates one) and the daemon as the munge user.
install -d -o munge -g munge -m 0700 /etc/munge /var/lib/munge /var/log/munge
install -d -o munge -g munge -m 0755 /run/munge
if [ ! -s /etc/munge/munge.key ]; then
  if command -v mungekey >/dev/null; then
    mungekey --create --keyfile=/etc/munge/munge.key
  else
    dd if=/dev/urandom of=/etc/munge/munge.key bs=1 count=1024 status=none
  fi
  chown munge:munge /etc/munge/munge.key
  chmod 0400 /etc/munge/munge.key
fi
running "$MUNGE_PID" || runuser -u munge -- munged
for _ in $(seq 50); do munge -n >/dev/null 2>&1 && break; sleep 0.1; done
munge -n | unmunge >/dev/null || { echo "slurm-up: munged does not answer" >&2; exit 1; }

# --- slurm.conf: the controller at 127.0.0.1 (no DNS needed). One node: this host, all its CPUs,
# 90% of its memory. Two nodes: each declares all the CPUs (they share them) and 45% of the memory.
CPUS=$(nproc)
install -d -m 0755 /etc/slurm "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
if [ "$NODES" -eq 2 ]; then
  REAL_MEM=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.45)}' /proc/meminfo)
  install -d -m 0755 /var/spool/slurmd/n1 /var/spool/slurmd/n2
  # n1 and n2 resolve like a cluster's node names. Only their own lines of /etc/hosts change.
  if ! grep -qE '^127\.0\.0\.2[[:space:]]+n1$' /etc/hosts || ! grep -qE '^127\.0\.0\.3[[:space:]]+n2$' /etc/hosts; then
    hosts=$(grep -vE '[[:space:]](n1|n2)$' /etc/hosts || true)
    printf '%s\n127.0.0.2 n1\n127.0.0.3 n2\n' "$hosts" >/etc/hosts
  fi
  SPOOL=/var/spool/slurmd/%n
  SLURMD_PID_CONF=/run/slurmd-%n.pid
  SLURMD_LOG=$LOG_DIR/slurmd-%n.log
  NODE_LINES="NodeName=n1 NodeHostname=$HOST NodeAddr=127.0.0.2 Port=17001 CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN
NodeName=n2 NodeHostname=$HOST NodeAddr=127.0.0.3 Port=17002 CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN"
else
  REAL_MEM=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
  SPOOL=/var/spool/slurmd
  SLURMD_PID_CONF=/run/slurmd.pid
  SLURMD_LOG=$LOG_DIR/slurmd.log
  NODE_LINES="NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN"
fi
cat >"$CONF.new" <<EOF
# Written by acceltrain .ci/slurm-up.sh: a $NODES-node cluster on this machine for tests.
ClusterName=acceltrain-ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=$SPOOL
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID_CONF
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$SLURMD_LOG
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobRequeue=1
ReturnToService=2
MinJobAge=600
# A loaded CI machine can take more than the default 60 s to reap a killed step; past this, slurmd
# would drain the node and every later job would wait for it.
UnkillableStepTimeout=180
$NODE_LINES
PartitionName=debug Nodes=$NODE_LIST Default=YES MaxTime=INFINITE State=UP
EOF
if cmp -s "$CONF.new" "$CONF"; then
  rm -f "$CONF.new"
  if all_running && nodes_ready; then
    echo "slurm-up: cluster already up ($(sinfo --noheader -o '%P %t %D %N' | head -n1))"
    exit 0
  fi
else
  # A new or changed config: daemons started with another one stop and start again.
  mv "$CONF.new" "$CONF"
  for pidfile in "${ALL_SLURMD_PIDS[@]}" "$CTLD_PID"; do
    if running "$pidfile"; then
      pid=$(cat "$pidfile")
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  done
fi

# --- daemons (each forks into the background and writes its pid file).
running "$CTLD_PID" || slurmctld
for node in "${NODE_NAMES[@]}"; do
  if ! running "$(slurmd_pid "$node")"; then
    if [ "$NODES" -eq 2 ]; then slurmd -N "$node"; else slurmd; fi
  fi
done

for _ in $(seq 60); do
  if nodes_ready; then
    echo "slurm-up: cluster up ($(sinfo --noheader -o '%P %t %D %N' | head -n1))"
    exit 0
  fi
  # A node left DOWN/DRAIN by an earlier unclean stop comes back on request.
  for node in "${NODE_NAMES[@]}"; do
    if sinfo --noheader --nodes="$node" -o '%t' 2>/dev/null | grep -qE '^(down|drain)'; then
      scontrol update NodeName="$node" State=RESUME 2>/dev/null || true
    fi
  done
  sleep 0.5
done
echo "slurm-up: nodes $NODE_LIST did not become idle within 30 s" >&2
sinfo -N -l >&2 || true
tail -n 20 "$LOG_DIR"/slurmctld.log "$LOG_DIR"/slurmd*.log >&2 || true
exit 1
