#!/usr/bin/env bash
# Start a one-node SLURM cluster on this machine (as root), for tests/integration/test_slurm.py.
#
# Idempotent: a cluster whose daemons run and whose node answers is left alone; a daemon that is
# not running is started; a changed slurm.conf restarts both. It installs nothing: CI installs
# the Debian packages first (`apt-get install -y slurm-wlm munge`). The recipe follows DESIGN.md's
# "Measured facts": a munge key, munged as the munge user, a small slurm.conf naming this host,
# slurmctld and slurmd. Daemons are tracked by their pid files (no procps needed).
set -euo pipefail

if [ "$(id -u)" -ne 0 ]; then
  echo "slurm-up: must run as root (it starts munged, slurmctld and slurmd)" >&2
  exit 1
fi
for cmd in munged munge slurmctld slurmd sinfo scontrol; do
  command -v "$cmd" >/dev/null || { echo "slurm-up: $cmd not found; apt-get install -y slurm-wlm munge" >&2; exit 1; }
done

HOST=$(hostname -s)  # slurmd finds its NodeName by the short host name
CONF=/etc/slurm/slurm.conf
LOG_DIR=/var/log/slurm
MUNGE_PID=/run/munge/munged.pid
CTLD_PID=/run/slurmctld.pid
SLURMD_PID=/run/slurmd.pid

running() { [ -s "$1" ] && kill -0 "$(cat "$1")" 2>/dev/null; }
node_ready() {
  # "idle", "mix" or "alloc": the node may already be running a job.
  sinfo --noheader --nodes="$HOST" -o '%t' 2>/dev/null | grep -qE '^(idle|mix|alloc)'
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

# --- slurm.conf: this host at 127.0.0.1 (no DNS needed), all its CPUs, 90% of its memory.
CPUS=$(nproc)
REAL_MEM=$(awk '/^MemTotal:/ {print int($2 / 1024 * 0.9)}' /proc/meminfo)
install -d -m 0755 /etc/slurm "$LOG_DIR" /var/spool/slurmctld /var/spool/slurmd
cat >"$CONF.new" <<EOF
# Written by acceltrain .ci/slurm-up.sh: a one-node cluster on localhost for tests.
ClusterName=acceltrain-ci
SlurmctldHost=$HOST(127.0.0.1)
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=$CTLD_PID
SlurmdPidFile=$SLURMD_PID
SlurmctldLogFile=$LOG_DIR/slurmctld.log
SlurmdLogFile=$LOG_DIR/slurmd.log
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
MpiDefault=none
JobRequeue=1
ReturnToService=2
MinJobAge=600
NodeName=$HOST NodeAddr=127.0.0.1 CPUs=$CPUS RealMemory=$REAL_MEM State=UNKNOWN
PartitionName=debug Nodes=$HOST Default=YES MaxTime=INFINITE State=UP
EOF
if cmp -s "$CONF.new" "$CONF"; then
  rm -f "$CONF.new"
  if running "$CTLD_PID" && running "$SLURMD_PID" && node_ready; then
    echo "slurm-up: cluster already up ($(sinfo --noheader -o '%P %t %N' | head -n1))"
    exit 0
  fi
else
  # A new or changed config: daemons started with another one stop and start again.
  mv "$CONF.new" "$CONF"
  for pidfile in "$SLURMD_PID" "$CTLD_PID"; do
    if running "$pidfile"; then
      pid=$(cat "$pidfile")
      kill "$pid"
      for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    fi
  done
fi

# --- daemons (both fork into the background and write their pid files).
running "$CTLD_PID" || slurmctld
running "$SLURMD_PID" || slurmd

for _ in $(seq 60); do
  if node_ready; then
    echo "slurm-up: cluster up ($(sinfo --noheader -o '%P %t %N' | head -n1))"
    exit 0
  fi
  # A node left DOWN/DRAIN by an earlier unclean stop comes back on request.
  if sinfo --noheader --nodes="$HOST" -o '%t' 2>/dev/null | grep -qE '^(down|drain)'; then
    scontrol update NodeName="$HOST" State=RESUME 2>/dev/null || true
  fi
  sleep 0.5
done
echo "slurm-up: node $HOST did not become idle within 30 s" >&2
sinfo -N -l >&2 || true
tail -n 20 "$LOG_DIR/slurmctld.log" "$LOG_DIR/slurmd.log" >&2 || true
exit 1
