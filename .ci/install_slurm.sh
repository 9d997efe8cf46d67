#!/usr/bin/env bash
# Install Debian's SLURM and munge so tests/integration/test_slurm.py can start a real
# one-machine cluster. Idempotent: does nothing when the binaries are already there.
# Runs as root on a fresh CI machine (uses sudo otherwise).
set -euo pipefail
# The daemons land in /usr/sbin, which a non-root PATH may lack.
export PATH=$PATH:/usr/sbin:/sbin

if command -v sbatch >/dev/null && command -v slurmctld >/dev/null \
   && command -v slurmd >/dev/null && command -v munged >/dev/null; then
    echo "install_slurm: already installed"
    exit 0
fi

SUDO=""
[ "$(id -u)" -eq 0 ] || SUDO="sudo"

export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
# slurm-wlm pulls slurmctld, slurmd and the client tools; munge authenticates them.
$SUDO apt-get install -y -qq --no-install-recommends slurm-wlm munge >/dev/null
# Debian's postinst may start the packaged services; the test fixture runs its own daemons
# with a private config, so stop any that came up (harmless where there is no init system).
for svc in slurmctld slurmd munge; do
    $SUDO service "$svc" stop >/dev/null 2>&1 || true
done
# `sbatch --version` would need a slurm.conf; ask dpkg instead.
echo "install_slurm: slurm-wlm $(dpkg-query -W -f='${Version}' slurm-wlm) installed"
