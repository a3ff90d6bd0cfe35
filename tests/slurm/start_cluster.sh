#!/usr/bin/env bash
# Start a single-node SLURM cluster on this machine (node "localhost", partition
# "debug"), for the sweep tests and for trying `hydra/launcher=slurm` locally.
#
#   sudo bash tests/slurm/start_cluster.sh      # needs root; Debian/Ubuntu (apt)
#
# Installs Debian's slurm-wlm and munge when missing, starts munged as user munge,
# writes /etc/slurm/slurm.conf for this machine's real CPUs and memory, starts
# slurmctld and slurmd, and waits until the node is idle. Running it again on a
# healthy cluster changes nothing. Exit status 0 only when jobs can be scheduled.
set -euo pipefail

SLURM_CONF=/etc/slurm/slurm.conf
PARTITION=${RTS_THAW_SLURM_PARTITION:-debug}
WAIT_S=${RTS_THAW_SLURM_WAIT_S:-60}

log() { echo "[start_cluster] $*" >&2; }
die() { log "ERROR: $*"; exit 1; }

[[ $(id -u) -eq 0 ]] || die "must run as root (SlurmUser=root, daemons and apt need it); try: sudo bash $0"

node_state() { sinfo -h -n localhost -o %T 2>/dev/null | head -n1 | tr -d '*~#!%$@^-'; }

cluster_healthy() {
    command -v sinfo >/dev/null 2>&1 || return 1
    scontrol ping 2>/dev/null | grep -q "is UP" || return 1
    case "$(node_state)" in idle | mixed | allocated | completing) return 0 ;; *) return 1 ;; esac
}

if cluster_healthy; then
    log "cluster already up: $(sinfo -h -o '%P %D %T %N' | head -n1)"
    exit 0
fi

# --- packages -----------------------------------------------------------------
if ! command -v slurmctld >/dev/null 2>&1 || ! command -v slurmd >/dev/null 2>&1 \
    || ! command -v munged >/dev/null 2>&1; then
    command -v apt-get >/dev/null 2>&1 || die "slurm-wlm/munge are not installed and apt-get is unavailable"
    log "installing slurm-wlm and munge (apt-get)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq || die "apt-get update failed"
    # Ubuntu runners may have a newer slurm split into slurmctld/slurmd packages;
    # slurm-wlm pulls them in on both Debian and Ubuntu.
    apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null \
        || die "apt-get install slurm-wlm munge failed"
fi

# --- munge --------------------------------------------------------------------
# munged refuses to run as root and checks that its directories belong to it.
id munge >/dev/null 2>&1 || useradd --system --no-create-home --shell /usr/sbin/nologin munge
install -d -o munge -g munge -m 0700 /etc/munge /var/log/munge /var/lib/munge
install -d -o munge -g munge -m 0755 /run/munge
if [[ ! -s /etc/munge/munge.key ]]; then
    log "creating /etc/munge/munge.key"
    if command -v mungekey >/dev/null 2>&1; then
        mungekey --create --keyfile=/etc/munge/munge.key --force
    else
        dd if=/dev/urandom bs=1 count=1024 of=/etc/munge/munge.key status=none
    fi
fi
chown munge:munge /etc/munge/munge.key
chmod 0400 /etc/munge/munge.key

if ! munge -n 2>/dev/null | unmunge >/dev/null 2>&1; then
    log "starting munged"
    rm -f /run/munge/munged.pid
    if command -v runuser >/dev/null 2>&1; then
        runuser -u munge -- /usr/sbin/munged
    else
        su -s /bin/sh munge -c /usr/sbin/munged
    fi
    for _ in $(seq 1 20); do
        munge -n 2>/dev/null | unmunge >/dev/null 2>&1 && break
        sleep 0.5
    done
    munge -n | unmunge >/dev/null || die "munged does not answer (see /var/log/munge/munged.log)"
fi

# --- slurm.conf ----------------------------------------------------------------
# Use what slurmd itself detects, so that the node registers without mismatch.
# Only CPUs (not sockets/cores/threads) are declared so that every CPU is a
# schedulable unit: two one-CPU jobs can run side by side on a 2-CPU machine.
hw="$(slurmd -C 2>/dev/null | head -n1 || true)"
cpus="$(sed -n 's/.*CPUs=\([0-9]*\).*/\1/p' <<<"$hw")"
mem_mb="$(sed -n 's/.*RealMemory=\([0-9]*\).*/\1/p' <<<"$hw")"
[[ -n $cpus ]] || cpus="$(nproc)"
[[ -n $mem_mb ]] || mem_mb=$(($(awk '/MemTotal/ {print $2}' /proc/meminfo) / 1024))
# Leave some memory to the OS and to slurmd's own accounting slack.
mem_mb=$((mem_mb * 95 / 100))
def_mem_per_cpu=$((mem_mb / cpus))

install -d -m 0755 /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm
new_conf="$(mktemp)"
cat >"$new_conf" <<EOF
# Written by rts_thaw tests/slurm/start_cluster.sh: a one-node cluster on localhost.
ClusterName=rts_thaw_local
SlurmctldHost=localhost
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
CredType=cred/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurmctld.pid
SlurmdPidFile=/run/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
# No cgroups: works inside containers and CI runners.
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
JobAcctGatherType=jobacct_gather/none
AccountingStorageType=accounting_storage/none
JobCompType=jobcomp/none
MpiDefault=none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_CPU_Memory
DefMemPerCPU=${def_mem_per_cpu}
# Preempted / timed-out jobs may be requeued (submitit calls scontrol requeue).
JobRequeue=1
ReturnToService=2
SlurmdTimeout=60
InactiveLimit=0
KillWait=30
MinJobAge=600
NodeName=localhost NodeAddr=127.0.0.1 CPUs=${cpus} RealMemory=${mem_mb} State=UNKNOWN
PartitionName=${PARTITION} Nodes=localhost Default=YES MaxTime=INFINITE State=UP
EOF
if ! cmp -s "$new_conf" "$SLURM_CONF"; then
    log "writing $SLURM_CONF (CPUs=${cpus} RealMemory=${mem_mb}MB)"
    cp "$new_conf" "$SLURM_CONF"
    conf_changed=1
else
    conf_changed=0
fi
rm -f "$new_conf"
chmod 0644 "$SLURM_CONF"

# --- daemons -----------------------------------------------------------------
daemon_running() { [[ -s $1 ]] && kill -0 "$(cat "$1")" 2>/dev/null; }

if daemon_running /run/slurmctld.pid && [[ $conf_changed -eq 1 ]]; then
    log "slurm.conf changed: reconfiguring"
    scontrol reconfigure || true
fi
if ! daemon_running /run/slurmctld.pid; then
    log "starting slurmctld"
    slurmctld || die "slurmctld failed to start (see /var/log/slurm/slurmctld.log)"
fi
if ! daemon_running /run/slurmd.pid; then
    log "starting slurmd"
    slurmd -N localhost || die "slurmd failed to start (see /var/log/slurm/slurmd.log)"
fi

# --- wait for the node --------------------------------------------------------
deadline=$((SECONDS + WAIT_S))
while ((SECONDS < deadline)); do
    state="$(node_state || true)"
    case "$state" in
        idle | mixed | allocated | completing)
            log "cluster up: $(sinfo -h -o '%P %D %T %N %c CPUs %m MB' | head -n1)"
            exit 0
            ;;
        down | drained | draining | fail | failing)
            # Left over from an earlier run of this machine: put it back in service.
            scontrol update NodeName=localhost State=RESUME 2>/dev/null || true
            ;;
    esac
    sleep 1
done
log "node state after ${WAIT_S}s: '$(node_state || true)'"
sinfo -N -l >&2 || true
tail -n 20 /var/log/slurm/slurmctld.log /var/log/slurm/slurmd.log >&2 || true
die "SLURM node did not become idle"
