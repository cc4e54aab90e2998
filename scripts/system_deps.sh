#!/usr/bin/env bash
# System packages the slow test tiers use: a C++ compiler for DeepSpeed's CPU op, Chromium for the dashboard
# test, and SLURM + munge for the cluster tests. Installed only when missing; needs root (CI runs as root).
set -euo pipefail
need=()
command -v g++ >/dev/null || need+=(g++)
command -v chromium >/dev/null || need+=(chromium chromium-driver)
command -v slurmctld >/dev/null || need+=(slurmctld slurmd slurm-client munge)
if [ ${#need[@]} -gt 0 ]; then
    if [ "$(id -u)" != 0 ]; then
        echo "system_deps: missing ${need[*]}; install them as root (apt-get install ${need[*]})" >&2
        exit 0
    fi
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need[@]}" >/dev/null
fi
