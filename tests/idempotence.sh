#!/usr/bin/env bash
# Runs a playbook and fails unless every host reports changed=0: a converged cluster must
# be left alone by a re-run (no config rewritten, no service restarted), and a --check --diff
# run on it must announce no change either.
set -euo pipefail
log=$(mktemp)
trap 'rm -f "$log"' EXIT
ansible-playbook "$@" | tee "$log"
if grep -E '^\S+\s+:\s+ok=' "$log" | grep -vqE '\schanged=0\s'; then
    echo "idempotence: FAILED, the re-run changed something:" >&2
    grep -E '^\S+\s+:\s+ok=' "$log" | grep -vE '\schanged=0\s' >&2
    exit 1
fi
echo "idempotence: OK, changed=0 on every host"
