#!/usr/bin/env bash
# The Debian packages the test suite needs beyond .venv: slurm-wlm + munge, for the SLURM tests'
# single-host cluster (tests/slurm_cluster.py). Installs them as root or with passwordless sudo;
# otherwise stops before the suite with one line saying what to install.
set -uo pipefail
packages=(slurm-wlm munge)
have() { [ -x "/usr/sbin/$1" ] || command -v "$1" >/dev/null 2>&1; }
if have slurmctld && have slurmd && have munged; then
    exit 0
fi
if [ "$(id -u)" -eq 0 ]; then
    sudo=()
elif command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    sudo=(sudo -n)
else
    echo "make test: the SLURM tests need Debian's ${packages[*]}; install them as root (apt-get install -y --no-install-recommends ${packages[*]}) and rerun make test" >&2
    exit 2
fi
install=("${sudo[@]}" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${packages[@]}")
echo "make test: installing ${packages[*]} with apt-get (for the SLURM tests)"
# the package lists may be missing or stale on a fresh machine: update once, then retry
if ! "${install[@]}" >/dev/null 2>&1; then
    "${sudo[@]}" apt-get update -qq >/dev/null && "${install[@]}" >/dev/null || {
        echo "make test: apt-get could not install ${packages[*]}: install them as root and rerun make test" >&2
        exit 2
    }
fi
have slurmctld && have slurmd && have munged || {
    echo "make test: ${packages[*]} installed but slurmctld / slurmd / munged not found in /usr/sbin or PATH" >&2
    exit 2
}
