#!/usr/bin/env bash
# A single-node Slurm cluster on this machine, for tests/test_slurm.py (Debian/Ubuntu, root).
#   bash .ci/slurm-cluster.sh
# Installs munge, slurm-wlm, slurmdbd and mariadb-server, writes /etc/slurm/{slurm,gres,slurmdbd}.conf
# for one node named after `hostname` with its real CPUs and memory (plus one placeholder GPU, so
# `sbatch --gpus=1` jobs schedule), starts the daemons without systemd and waits until the node is
# idle. Partitions: "debug" (default) and "gpu", both on this node. Idempotent: exits at once when
# the node already answers. One line per step on stdout; exit 1 with one line on failure.
set -euo pipefail

CLUSTER=nidl
DB_PASS=nidl-slurm-test # local test database only
T0=$(date +%s)
step() { echo "[slurm-cluster +$(($(date +%s) - T0))s] $*"; }
die() {
    echo "[slurm-cluster] ERROR: $*" >&2
    exit 1
}

[ "$(id -u)" -eq 0 ] || die "must run as root (apt-get and daemons)"
command -v apt-get >/dev/null || die "needs apt-get (Debian/Ubuntu)"
NODE=$(hostname -s)

node_state() { sinfo -h -n "$NODE" -o %T 2>/dev/null | head -1 || true; }
# Up means the node answers AND accounting answers (sacct needs mariadb and slurmdbd, which can
# die on their own, e.g. with the session that started them): otherwise (re)start what is down.
if command -v sinfo >/dev/null && [[ "$(node_state)" =~ ^(idle|mixed|allocated) ]] &&
    sacct -n -X -S now-1hours >/dev/null 2>&1; then
    step "already running: node $NODE is $(node_state), accounting answers"
    exit 0
fi

# ---------------------------------------------------------------- packages
PKGS=(munge slurm-wlm slurmdbd mariadb-server mariadb-client)
missing=()
for p in "${PKGS[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
    if [ -z "$(find /var/lib/apt/lists -maxdepth 1 -name '*Packages*' -mmin -1440 2>/dev/null | head -1)" ]; then
        step "apt-get update"
        apt-get update -qq >/dev/null || die "apt-get update failed"
    fi
    step "apt-get install ${missing[*]}"
    # No service starts from the packages' scripts: the daemons are started below, without systemd.
    printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d
    chmod +x /usr/sbin/policy-rc.d
    trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" \
        >/tmp/slurm-cluster-apt.log 2>&1 || die "apt-get install failed (see /tmp/slurm-cluster-apt.log)"
    rm -f /usr/sbin/policy-rc.d
    trap - EXIT
fi
step "packages installed ($(slurmd -V))"

# ---------------------------------------------------------------- configuration
mkdir -p /etc/slurm /var/spool/slurmctld /var/spool/slurmd /var/log/slurm /run/slurm /run/munge
# The node's real CPUs and memory as slurmd sees them (first line: NodeName=... CPUs=... RealMemory=...).
NODE_LINE=$(slurmd -C | head -1)
[[ "$NODE_LINE" == NodeName=* ]] || die "slurmd -C printed no node line"
touch /etc/slurm/gpu-placeholder # no device: enough for Slurm to schedule --gpus=1
cat >/etc/slurm/gres.conf <<EOF
NodeName=$NODE Name=gpu File=/etc/slurm/gpu-placeholder
EOF
cat >/etc/slurm/slurm.conf <<EOF
# Written by .ci/slurm-cluster.sh: a one-node test cluster.
ClusterName=$CLUSTER
SlurmctldHost=$NODE
SlurmUser=root
SlurmdUser=root
AuthType=auth/munge
StateSaveLocation=/var/spool/slurmctld
SlurmdSpoolDir=/var/spool/slurmd
SlurmctldPidFile=/run/slurm/slurmctld.pid
SlurmdPidFile=/run/slurm/slurmd.pid
SlurmctldLogFile=/var/log/slurm/slurmctld.log
SlurmdLogFile=/var/log/slurm/slurmd.log
ProctrackType=proctrack/linuxproc
TaskPlugin=task/none
SchedulerType=sched/backfill
SelectType=select/cons_tres
SelectTypeParameters=CR_Core_Memory
GresTypes=gpu
ReturnToService=2
SlurmdTimeout=300
MinJobAge=300
DefMemPerCPU=1000
KillWait=10
JobAcctGatherType=jobacct_gather/linux
JobAcctGatherFrequency=30
AccountingStorageType=accounting_storage/slurmdbd
AccountingStorageHost=localhost
AccountingStoreFlags=job_comment
AccountingStorageTRES=gres/gpu
$NODE_LINE Gres=gpu:1 State=UNKNOWN
PartitionName=debug Nodes=$NODE Default=YES MaxTime=INFINITE State=UP
PartitionName=gpu Nodes=$NODE Default=NO MaxTime=INFINITE State=UP
EOF
cat >/etc/slurm/slurmdbd.conf <<EOF
DbdHost=localhost
SlurmUser=root
AuthType=auth/munge
PidFile=/run/slurm/slurmdbd.pid
LogFile=/var/log/slurm/slurmdbd.log
StorageType=accounting_storage/mysql
StorageHost=localhost
StorageUser=slurm
StoragePass=$DB_PASS
StorageLoc=slurm_acct_db
EOF
chmod 600 /etc/slurm/slurmdbd.conf
step "wrote /etc/slurm/slurm.conf: $NODE_LINE Gres=gpu:1; partitions debug (default), gpu"

wait_for() { # seconds, description, command...
    local n=$1 what=$2
    shift 2
    for _ in $(seq "$n"); do
        "$@" >/dev/null 2>&1 && return 0
        sleep 1
    done
    die "$what did not come up in ${n}s"
}

# ---------------------------------------------------------------- daemons
if ! pgrep -x munged >/dev/null; then
    chown munge:munge /run/munge
    [ -s /etc/munge/munge.key ] || { mungekey --create --force 2>/dev/null || /usr/sbin/create-munge-key -f; }
    chown munge:munge /etc/munge/munge.key
    runuser -u munge -- /usr/sbin/munged
fi
wait_for 20 munged bash -c "munge -n | unmunge"
step "munged running"

if ! mysqladmin ping >/dev/null 2>&1; then
    mkdir -p /run/mysqld && chown mysql:mysql /run/mysqld
    (mysqld_safe >/dev/null 2>&1 &)
fi
wait_for 60 mariadb mysqladmin ping
mysql -e "CREATE DATABASE IF NOT EXISTS slurm_acct_db;
  CREATE USER IF NOT EXISTS 'slurm'@'localhost' IDENTIFIED BY '$DB_PASS';
  GRANT ALL ON slurm_acct_db.* TO 'slurm'@'localhost'; FLUSH PRIVILEGES;"
step "mariadb running, database slurm_acct_db ready"

pgrep -x slurmdbd >/dev/null || slurmdbd
wait_for 60 slurmdbd sacctmgr -n list cluster
sacctmgr -n list cluster format=cluster | grep -qw "$CLUSTER" || sacctmgr -i add cluster "$CLUSTER" >/dev/null
step "slurmdbd running, cluster $CLUSTER registered"

pgrep -x slurmctld >/dev/null || slurmctld
wait_for 30 slurmctld scontrol ping
pgrep -x slurmd >/dev/null || slurmd
step "slurmctld and slurmd started"

for _ in $(seq 60); do
    [[ "$(node_state)" =~ ^idle ]] && break
    # a node left down or drained by an earlier run (e.g. a reboot) is put back into service
    [[ "$(node_state)" =~ ^(down|drain) ]] && scontrol update nodename="$NODE" state=resume >/dev/null 2>&1
    sleep 1
done
[[ "$(node_state)" =~ ^idle ]] || die "node $NODE is '$(node_state)', not idle (see /var/log/slurm/)"
step "ready: node $NODE idle ($(sinfo -h -o '%P %c CPUs %m MB %G' | tr '\n' ';'))"
