"""A second, different app deployed by the same role (tests/e2e/other_app.yml) onto a spare
lab host in wheelhouse mode, then used from the controller through the Sentinels."""

from __future__ import annotations

import re
import shlex

import pytest
from celery import Celery
from support.e2e_lab import LAB_DIR, REPO, LabInventory, client_settings, run

HOST = "node4"
LAB = str(REPO / "tests" / "lab" / "lab")


def _ssh(address: str, command: str) -> str:
    """A command on a lab host over the lab's own key (works whatever LAB_NET is)."""
    key = str(LAB_DIR / "ssh" / "id_ed25519")
    opts = [
        "-o",
        "StrictHostKeyChecking=no",
        "-o",
        "UserKnownHostsFile=/dev/null",
        "-o",
        "LogLevel=ERROR",
        "-o",
        "BatchMode=yes",
    ]
    proc = run(["ssh", "-i", key, *opts, f"root@{address}", command], timeout=60)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout


@pytest.fixture(scope="module")
def other_app_deployed(lab: LabInventory) -> LabInventory:
    """Raise the spare host when the lab has none (it joins no cluster group), then deploy."""
    if HOST not in lab.addresses:
        proc = run([LAB, "up", "4"], timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lab = LabInventory(LAB_DIR)
    inventory = str(LAB_DIR / "inventory.ini")
    playbook = ["ansible-playbook", "-i", inventory, "tests/e2e/other_app.yml"]
    first = run(playbook)
    print(first.stdout[-1500:])
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    again = run(playbook)
    assert again.returncode == 0, again.stdout[-4000:]
    recap = re.search(rf"^{HOST}\s+:.*changed=(\d+)", again.stdout, re.M)
    assert recap and recap.group(1) == "0", f"second run changed something:\n{again.stdout[-3000:]}"
    return lab


@pytest.fixture(scope="module")
def inventory_client(other_app_deployed: LabInventory):
    """A client for the second app: only task names and queue, no code of it imported."""
    app = Celery("inventory-client", set_as_current=False)
    app.conf.update(
        client_settings(other_app_deployed, CELERY_HA_APP="inventory_app.worker:inventory")
    )
    app.conf.update(task_default_queue="inventory")
    yield app
    app.close()


def test_second_app_answers(inventory_client: Celery) -> None:
    result = inventory_client.send_task("inventory.count_items", args=[["a", "b", "a"]])
    assert result.get(timeout=60) == {"a": 2, "b": 1}
    assert inventory_client.send_task("inventory.total", args=[["x", "y"]]).get(timeout=60) == 2


def test_second_app_worker_answers_ping(inventory_client: Celery) -> None:
    replies = inventory_client.control.ping(destination=[f"inventory@{HOST}"], timeout=5)
    assert replies and replies[0][f"inventory@{HOST}"]["ok"] == "pong"


def test_second_app_was_installed_offline_from_the_wheelhouse(
    other_app_deployed: LabInventory,
) -> None:
    addr = other_app_deployed.addresses[HOST]
    wheels = _ssh(addr, "ls /opt/celery-ha/wheels").split()
    # The whole dependency tree was shipped, not only the app: the host never needed an index.
    for name in ("inventory_app-", "celery_ha_boot-", "celery-", "kombu-", "redis-"):
        assert any(w.startswith(name) for w in wheels), f"{name}* not in the wheelhouse: {wheels}"
    freeze = _ssh(addr, "/opt/celery-ha/venv/bin/pip freeze")
    assert re.search(r"^inventory-app @ file:///opt/celery-ha/wheels/", freeze, re.M) or (
        "inventory-app==" in freeze
    ), freeze
    unit = _ssh(addr, "systemctl is-active celery-worker@inventory")
    assert unit.strip() == "active"
    app_env = _ssh(addr, f"grep ^CELERY_HA_APP= {shlex.quote('/etc/celery-ha/celery.env')}")
    assert app_env.strip() == "CELERY_HA_APP=inventory_app.worker:inventory"
