"""Fixtures for the fault drills: a handle on the deployed lab and a place for figures.

The drills need a lab that site.yml has converged (`make deploy`); they read everything else
from the hosts. LAB_DIR picks the lab as for tests/lab/lab.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from support.cluster import REPO, Cluster, Lab
from support.drillkit import expected_workers, restore_lab, say
from support.ledger import wait_until

ARTIFACTS = REPO / "test-artifacts"


@pytest.fixture(scope="session")
def drill_lab() -> Lab:
    lab = Lab()
    if not lab.exists():
        pytest.fail(
            f"no lab at {lab.lab_dir} (LAB_DIR): raise and deploy one first: "
            "tests/lab/lab up && ansible-playbook -i $LAB_DIR/inventory.ini ansible/site.yml"
        )
    return lab


@pytest.fixture(scope="session")
def drill_cluster(drill_lab: Lab) -> Cluster:
    return Cluster(drill_lab)


@pytest.fixture(scope="session")
def drill_figures() -> Iterator[list[dict[str, Any]]]:
    """Each drill appends its figures; printed as one table and kept as JSON at the end."""
    figures: list[dict[str, Any]] = []
    yield figures
    if not figures:
        return
    print("\n===== fault drills: figures")
    for row in figures:
        print("  " + "  ".join(f"{k}={v}" for k, v in row.items()))
    ARTIFACTS.mkdir(exist_ok=True)
    out = Path(os.environ.get("DRILLS_RESULTS", ARTIFACTS / "drills.json"))
    out.write_text(json.dumps({"when": time.strftime("%FT%T%z"), "drills": figures}, indent=2))
    print(f"  (written to {out})")


@pytest.fixture(scope="module")
def workers(drill_cluster: Cluster) -> list[str]:
    """The worker nodes of the converged cluster; every drill ends with all of them back."""
    actions = restore_lab(drill_cluster)
    if actions:
        say(f"lab left broken by an earlier test: {', '.join(actions)}")
    names = expected_workers(drill_cluster)
    assert names, "no worker env file (/etc/celery-ha/worker-*.env) on any worker host"
    wait_until(
        lambda: set(names) <= set(drill_cluster.ping_workers()),
        240,
        interval=3,
        what=f"every worker answering ping: {names}",
    )
    say(f"workers: {names}")
    return names


# --------------------------------------------------------------------------------------
# 1. A worker process SIGKILLed mid-task
