#!/usr/bin/env bash
# Installs the Debian packages named as arguments that are not installed yet. The one
# installer of the project's controller packages: the Makefile passes what the tests need
# (see its deps target), tests/lab/lab what the lab needs.
set -euo pipefail
missing=()
for p in "$@"; do
    dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q 'ok installed' || missing+=("$p")
done
((${#missing[@]} == 0)) && exit 0
die() { printf 'install-deps: error: %s\n' "$*" >&2; exit 1; }
[[ $(id -u) -eq 0 ]] || die "needs root to install: ${missing[*]}"
echo "install-deps: installing ${missing[*]}"
apt-get update -qq || die "apt-get update failed: check this machine's apt sources and network"
DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null \
    || die "could not install ${missing[*]} with apt-get"
