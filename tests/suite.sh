#!/usr/bin/env bash
# The lab half of `make test`: raise the lab, converge it twice (the second run must change
# nothing), prove every host with testinfra, run the end-to-end tests and the fault drills.
# Then the same bundle on Debian 13 with Valkey, AFTER the Debian 12 lab is down (the labs
# share the machine's cores): deploy, re-run, --check --diff, testinfra, the end-to-end tasks
# (node3 runs its worker under supervisor there too) and the master-crash drill.
# Each lab is torn down at the end, also on failure, unless KEEP_LAB=1.
#
# SUITE_PARTS picks the parts (default "bookworm trixie"). OTHER_APP_MODES: the install modes
# the second app (tests/e2e/test_other_app.py) is deployed in on each lab; "wheelhouse" by
# default (the native build on Debian 12, the cross build on Debian 13), "online wheelhouse"
# adds the online install (about 3 more minutes per lab). The Debian 13 lab has its own
# folder, subnet and bridge, so that with KEEP_LAB=1 both labs can stay up side by side:
# TRIXIE_LAB_DIR (default $LAB_DIR-trixie), TRIXIE_LAB_NET (10.88.13), TRIXIE_LAB_BRIDGE (chabr0t).
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
LAB=tests/lab/lab
# The steps are the Makefile's targets; only their order and the lab they run on are here.
run() { make --no-print-directory "$@"; }
export LAB_DIR=${LAB_DIR:-$PWD/.lab}
SUITE_PARTS=${SUITE_PARTS:-bookworm trixie}
export OTHER_APP_MODES=${OTHER_APP_MODES:-wheelhouse}
LAB_IS_UP=0

teardown() {
    local rc=$?
    if ((LAB_IS_UP == 0)); then
        :
    elif [[ ${KEEP_LAB:-0} == 1 ]]; then
        echo "suite: KEEP_LAB=1, the lab in $LAB_DIR stays up ($LAB status)"
    else
        $LAB down || true
    fi
    exit "$rc"
}
trap teardown EXIT

step() { printf '\n===== %s (%s)\n' "$1" "$(date +%T)"; }

# Two hosts outside the cluster: node4 (in the inventory, no cluster group) gets the second
# app; node5 is in no inventory at all, the stranger the firewall must keep out.
lab_up() { LAB_IS_UP=1; step "lab up ($1)"; $LAB up 5; }

# The first run is the one that generates and ships every secret: run it at -vvv, keep the
# output, and prove that none of the passwords or keys is in it.
deploy_and_converge() {
    step "deploy (-vvv)"
    local log=$LAB_DIR/deploy-vvv.log
    run deploy DEPLOY_ARGS=-vvv >"$log" 2>&1 ||
        { tail -n 200 "$log"; echo "suite: deploy failed, whole output in $log"; exit 1; }
    sed -n '/^PLAY RECAP/,$p' "$log"
    step "secret search"; .venv/bin/python tests/support/secret_search.py "$log" "$LAB_DIR/secrets"
    step "idempotence";   run idempotence
}

lab_down() {
    if [[ ${KEEP_LAB:-0} == 1 ]]; then
        echo "suite: KEEP_LAB=1, the lab in $LAB_DIR stays up"
    else
        step "lab down"; $LAB down
    fi
    LAB_IS_UP=0
}

if [[ " $SUITE_PARTS " == *" bookworm "* ]]; then
    export LAB_SUITE=bookworm
    step "lab self-test"; run lab-test
    lab_up "Debian 12, ${LAB_NET:-10.88.0}.0/24"
    deploy_and_converge
    step "check mode";    run check-mode
    step "testinfra";     run infra
    step "end to end";    run e2e
    step "fault drills";  run drills
    lab_down
fi

if [[ " $SUITE_PARTS " == *" trixie "* ]]; then
    # Debian 13's default flavor is Valkey (cluster_redis_flavor): the lab sets nothing, so the
    # default itself is what is tested. testinfra checks Valkey's own units, paths and user.
    export LAB_SUITE=trixie LAB_DIR=${TRIXIE_LAB_DIR:-$LAB_DIR-trixie}
    export LAB_NET=${TRIXIE_LAB_NET:-10.88.13} LAB_BRIDGE=${TRIXIE_LAB_BRIDGE:-chabr0t}
    unset LAB_TAG
    lab_up "Debian 13, Valkey, $LAB_NET.0/24"
    deploy_and_converge
    step "check mode";    run check-mode
    # The preflight tests (test_preflight_*) play made-up hosts on the controller's local
    # connection: Debian 12's run already proved them, and here they would repeat it (testinfra
    # took 4:37 with them, 1:32 without).
    step "testinfra";     run infra INFRA_ARGS="-k 'not test_preflight_'"
    # The tasks through the Sentinels (both process managers), Flower and its login, the
    # firewall from a stranger, the refused flavor switch, and the second app from a wheelhouse
    # the Debian 12 controller fetched for Python 3.13 (and a native one refused). The second
    # app runs last on purpose: its client shares kombu's connection pool with the sample
    # app's, whose broker connection test_flower's failover closed while it sat idle there
    # (celery_ha_failover.IdleCheckingPoller reconnects it). TLS rotation, the browser and
    # Flower's task view with task events on stay Debian 12's: the task view's two site.yml
    # runs (events on, then the defaults again) take about 4 minutes, which kept the suite
    # over its hour on a slow machine, and the events travel by pub/sub as on Debian 12.
    step "end to end";    run e2e E2E_TESTS="tests/e2e/test_sample_app.py tests/e2e/test_flower.py \
        tests/e2e/test_firewall.py tests/e2e/test_flavor.py tests/e2e/test_other_app.py \
        --deselect tests/e2e/test_flower.py::test_with_task_events_on_flower_shows_each_task"
    # The crash of the master's host in the state of a fresh deployment (it is every client's
    # first Sentinel), with its figures next to Debian 12's.
    step "master-crash drill"
    DRILLS_RESULTS=${DRILLS_RESULTS_TRIXIE:-test-artifacts/drills-trixie.json} \
        run drills DRILLS="tests/drills/test_failover_drills.py -k failover1"
    lab_down
fi
