#!/usr/bin/env bash
# Debian packages for the cluster tests (tests/test_slurm.py, tests/test_multihost.py): SLURM 22.05
# daemons and clients, munge, and rsync (used by snakemake-storage-plugin-fs). Needs root; no daemon
# is started here (the tests start their own, in a private network namespace, and stop them).
set -euo pipefail
need=()
for b in slurmctld slurmd munged sbatch rsync unshare nsenter ip; do
    command -v "$b" >/dev/null 2>&1 || [ -x "/usr/sbin/$b" ] || need+=("$b")
done
[ ${#need[@]} -eq 0 ] && exit 0
if [ "$(id -u)" != 0 ]; then
    echo "install-slurm: missing ${need[*]}; run as root" >&2
    exit 1
fi
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends slurmctld slurmd slurm-client munge rsync util-linux iproute2 >/dev/null
