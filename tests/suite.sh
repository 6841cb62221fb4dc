#!/usr/bin/env bash
# The lab half of `make test`: raise the lab, converge it twice (the second run must change
# nothing), prove every host with testinfra, run the end-to-end tests and the fault drills.
# The lab is torn down at the end, also on failure, unless KEEP_LAB=1.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
export PATH=$PWD/.venv/bin:$PATH
LAB=tests/lab/lab
INVENTORY=${LAB_DIR:-$PWD/.lab}/inventory.ini

teardown() {
    local rc=$?
    if [[ ${KEEP_LAB:-0} == 1 ]]; then
        echo "suite: KEEP_LAB=1, the lab stays up ($LAB status)"
    else
        $LAB down || true
    fi
    exit "$rc"
}
trap teardown EXIT

step() { printf '\n===== %s (%s)\n' "$1" "$(date +%T)"; }

# A fourth host stays outside the cluster: the second app is deployed there, and it is
# the outsider for reachability checks.
step "lab up";        $LAB up 5
step "deploy";        ansible-playbook -i "$INVENTORY" ansible/site.yml
step "idempotence";   tests/idempotence.sh -i "$INVENTORY" ansible/site.yml
step "check mode";    tests/idempotence.sh -i "$INVENTORY" ansible/site.yml --check --diff
step "testinfra";     pytest -q tests/infra --hosts=ansible://all --ansible-inventory="$INVENTORY"
step "end to end";    pytest -q tests/e2e tests/browser
step "fault drills";  pytest -q -s tests/drills
