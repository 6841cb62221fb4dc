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

# Two hosts outside the cluster: node4 (in the inventory, no cluster group) gets the second
# app; node5 is in no inventory at all, the stranger the firewall must keep out.
step "lab up";        $LAB up 5
# The first run is the one that generates and ships every secret: run it at -vvv, keep the
# output, and prove that none of the passwords or keys is in it.
step "deploy (-vvv)"
DEPLOY_LOG=${LAB_DIR:-$PWD/.lab}/deploy-vvv.log
ansible-playbook -vvv -i "$INVENTORY" ansible/site.yml >"$DEPLOY_LOG" 2>&1 ||
    { tail -n 200 "$DEPLOY_LOG"; echo "suite: deploy failed, whole output in $DEPLOY_LOG"; exit 1; }
sed -n '/^PLAY RECAP/,$p' "$DEPLOY_LOG"
step "secret search"; tests/secret_search.py "$DEPLOY_LOG" "${LAB_DIR:-$PWD/.lab}/secrets"
step "idempotence";   tests/idempotence.sh -i "$INVENTORY" ansible/site.yml
step "check mode";    tests/idempotence.sh -i "$INVENTORY" ansible/site.yml --check --diff
step "testinfra";     pytest -q -n 4 tests/infra --hosts=ansible://all --ansible-inventory="$INVENTORY"
step "end to end";    pytest -q --durations=8 tests/e2e tests/browser
step "fault drills";  pytest -q -s tests/drills
