# celery-ha: every entry point an operator or CI uses. `make help` lists them.
SHELL := /bin/bash
.DEFAULT_GOAL := help

VENV      := .venv
BIN       := $(VENV)/bin
LAB       := tests/lab/lab
export LAB_DIR ?= $(CURDIR)/.lab
INVENTORY := $(LAB_DIR)/inventory.ini
# The venv's tools (ansible, testinfra) must be found by the tests' subprocesses too.
export PATH := $(CURDIR)/$(BIN):$(PATH)
export ANSIBLE_CONFIG := $(CURDIR)/ansible.cfg
export ANSIBLE_FORCE_COLOR ?= 0
# Mitogen runs each task over one kept Python per host instead of a fresh one per task: a
# converged re-run of site.yml takes half the time. `make ... ANSIBLE_STRATEGY=linear` runs
# without it; ansible-playbook run by hand uses it only if told so (README, "Deploy speed").
export ANSIBLE_STRATEGY ?= mitogen_linear
export ANSIBLE_STRATEGY_PLUGINS ?= $(CURDIR)/$(VENV)/mitogen-strategy

.PHONY: help venv deps lint unit lab-test lab-up lab-down deploy idempotence check-mode infra e2e drills soak test demo bench clean

# What the lab targets run; tests/suite.sh passes other values for its Debian 13 part.
DEPLOY_ARGS ?=
E2E_TESTS   ?= tests/e2e tests/browser
DRILLS      ?= -m "not soak" tests/drills
INFRA_ARGS  ?=

help: ## list the targets
	@awk 'BEGIN {FS = ":.*## "} /^[a-z0-9-]+:.*## / {printf "  make %-12s %s\n", $$1, $$2}' $(MAKEFILE_LIST)

$(BIN)/.installed: requirements-dev.txt
	python3 -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -r requirements-dev.txt
	touch $@

# The repository's own Python roots, importable by the tests, the demo and the bench (the
# test-support package is tests/support) without a sys.path insert anywhere.
PTH := $(VENV)/celery-ha-repo.pth.installed
$(PTH): Makefile $(BIN)/.installed
	printf '%s\n' $(CURDIR)/app/boot/src $(CURDIR)/app/src $(CURDIR)/tests \
		> "$$($(BIN)/python -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/celery-ha-repo.pth"
	ln -sfn "$$($(BIN)/python -c 'import ansible_mitogen, os; print(os.path.dirname(ansible_mitogen.__file__))')/plugins/strategy" \
		$(VENV)/mitogen-strategy
	touch $@

venv: $(BIN)/.installed $(PTH) ## controller tools, pinned, in .venv/

# python3-venv: the celery role builds wheels with the hosts' Python (Debian's); chromium and
# its driver: the Flower browser test; shellcheck: make lint, which installs only its own so
# that linting does not pull in a browser. The lab installs its own packages (tests/lab/lab up).
LINT_DEPS   := shellcheck
# redis-tools: a real Redis server (its redis-check-rdb) for the unit tests of the in-flight list.
UNIT_DEPS   := redis-tools
DEBIAN_DEPS := python3-venv chromium chromium-driver $(LINT_DEPS) $(UNIT_DEPS)
# Every shell script in the repository, found by its shebang so that a new one is linted too.
SHELL_SCRIPTS = $(shell git ls-files -z | xargs -0 awk 'FNR == 1 && /^\#!.*[\/ ](ba)?sh( |$$)/ {print FILENAME} {nextfile}')

deps: venv ## Debian packages the tests need (the lab installs its own)
	@tests/install-deps.sh $(DEBIAN_DEPS)

lint: venv ## ansible-lint (production profile), yamllint, ruff, shellcheck
	@tests/install-deps.sh $(LINT_DEPS)
	shellcheck $(SHELL_SCRIPTS)
	$(BIN)/yamllint -s .
	$(BIN)/ansible-lint ansible/ tests/
	$(BIN)/ruff check .
	$(BIN)/ruff format --check .

unit: venv ## unit tests (no hosts needed)
	@tests/install-deps.sh $(UNIT_DEPS)
	$(BIN)/pytest -q tests/unit

lab-test: venv ## the lab script itself, on a subnet of its own (a killed lab's leftovers)
	$(BIN)/pytest -q tests/lab

lab-up: deps ## raise the local lab of three hosts
	$(LAB) up

lab-down: ## tear the lab down, leaving nothing behind
	$(LAB) down

deploy: venv ## site.yml onto the lab
	$(BIN)/ansible-playbook $(DEPLOY_ARGS) -i $(INVENTORY) ansible/site.yml

idempotence: venv ## site.yml again: must report changed=0
	tests/idempotence.sh -i $(INVENTORY) ansible/site.yml

check-mode: venv ## site.yml --check --diff on the converged lab: must report changed=0
	tests/idempotence.sh -i $(INVENTORY) ansible/site.yml --check --diff

infra: venv ## testinfra on every lab host
	$(BIN)/pytest -q -n 4 tests/infra --hosts=ansible://all --ansible-inventory=$(INVENTORY) $(INFRA_ARGS)

e2e: venv ## end-to-end tasks through the Sentinels, Flower, the browser
	$(BIN)/pytest -q --durations=8 $(E2E_TESTS)

drills: venv ## fault drills on the lab (needs a deployed lab)
	$(BIN)/pytest -q -s $(DRILLS)

# Not part of make test (too long for its 60 minutes): the day-2 operations under load, worker
# main processes killed again and again, and the fault drills marked soak.
soak: venv ## day-2 operation drills, the worker-kill storm and the long-task drill, on a deployed lab (not in make test)
	$(BIN)/pytest -q -s tests/soak
	DRILLS_RESULTS=test-artifacts/soak-drills.json $(BIN)/pytest -q -s -m soak tests/drills

test: deps lint unit ## everything: lint, unit, the Debian 12 lab (deploy, idempotence, testinfra, e2e, drills), then a Debian 13 lab with Valkey
	tests/suite.sh

demo: lab-up deploy ## raise the lab, deploy the whole stack, run sample tasks, show how to open Flower
	$(BIN)/python tests/demo.py

bench: venv ## benchmarks (not in CI): prints a table, writes bench-results/
	$(BIN)/python bench/run.py

clean: lab-down ## lab down and remove the venv
	rm -rf $(VENV)
