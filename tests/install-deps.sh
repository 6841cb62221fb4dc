#!/usr/bin/env bash
# Debian packages the controller needs beyond Python: the lab's (systemd-nspawn, mmdebstrap,
# nftables, zstd) and a real browser for the Flower test. Installs only what is missing.
set -euo pipefail
# python3-venv: the celery role builds wheels with the hosts' Python (Debian's), see its defaults.
packages=(systemd-container mmdebstrap nftables zstd openssh-client iproute2 python3-venv chromium chromium-driver)
missing=()
for p in "${packages[@]}"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
((${#missing[@]} == 0)) && exit 0
[[ $(id -u) -eq 0 ]] || { echo "install-deps: needs root to install: ${missing[*]}" >&2; exit 1; }
echo "install-deps: installing ${missing[*]}"
apt-get update -qq
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
