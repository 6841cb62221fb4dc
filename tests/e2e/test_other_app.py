"""A second, different app deployed by the same role (tests/e2e/other_app.yml) onto a spare
lab host in both install modes, online then wheelhouse, and used from the controller through
the Sentinels after each. On Debian 13 hosts the lab's Debian 12 controller has another Python,
so their wheelhouse is the cross build (celery_wheelhouse_build: auto); on Debian 12 the
native one."""

from __future__ import annotations

import os
import re
import shlex
import subprocess

import pytest
from celery import Celery
from support.e2e_lab import LAB_DIR, REPO, LabInventory, client_settings, run

HOST = "node4"
# Both by default; the suite's Debian 12 part runs only the wheelhouse (OTHER_APP_MODES).
MODES = tuple(os.environ.get("OTHER_APP_MODES", "online wheelhouse").split())
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


def controller_python() -> str:
    """The version of the Python the role builds with (celery_controller_python's default)."""
    cmd = ["/usr/bin/python3", "-c", "import platform; print(platform.python_version())"]
    return subprocess.run(cmd, capture_output=True, text=True, check=True).stdout.strip()


@pytest.fixture(scope="module", params=MODES)
def other_app_deployed(request: pytest.FixtureRequest, lab: LabInventory) -> LabInventory:
    """Raise the spare host when the lab has none (it joins no cluster group), then deploy in
    the mode of this round (the second round switches the host over: one reinstall)."""
    mode = request.param
    if HOST not in lab.addresses:
        proc = run([LAB, "up", "4"], timeout=300)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        lab = LabInventory(LAB_DIR)
    inventory = str(LAB_DIR / "inventory.ini")
    playbook = ["ansible-playbook", "-i", inventory, "tests/e2e/other_app.yml"]
    playbook += ["-e", f"celery_install_mode={mode}"]
    first = run(playbook)
    print(first.stdout[-1500:])
    assert first.returncode == 0, first.stdout[-4000:] + first.stderr[-2000:]
    if mode == "wheelhouse":
        # Built the way auto picks for this host: native when its Python is the
        # controller's, else fetched for its Python (cross).
        host_python = _ssh(
            lab.addresses[HOST], "python3 -c 'import platform; print(platform.python_version())'"
        )
        build = "native" if host_python.strip() == controller_python() else "cross"
        task = re.search(r"build the wheels to ship[^\n]*\n(.*?)\n\n", first.stdout, re.S)
        assert task, first.stdout[-3000:]
        # Nothing to build when the host was in wheelhouse mode already (a re-run of this file).
        assert f"-wheelhouse {build})" in task.group(1) or task.group(1).startswith("skipping"), (
            f"expected a {build} build for Python {host_python.strip()}:\n{task.group(1)}"
        )
    again = run(playbook)
    assert again.returncode == 0, again.stdout[-4000:]
    recap = re.search(rf"^{HOST}\s+:.*changed=(\d+)", again.stdout, re.M)
    assert recap and recap.group(1) == "0", f"second run changed something:\n{again.stdout[-3000:]}"
    lab.install_mode = mode  # type: ignore[attr-defined]
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


def test_second_app_was_installed_as_its_mode_says(other_app_deployed: LabInventory) -> None:
    addr = other_app_deployed.addresses[HOST]
    mode = other_app_deployed.install_mode  # type: ignore[attr-defined]
    wheels = _ssh(addr, "ls /opt/celery-ha/wheels").split()
    shipped = {
        n
        for n in ("inventory_app-", "celery_ha_boot-", "celery-", "kombu-", "redis-")
        if any(w.startswith(n) for w in wheels)
    }
    if mode == "wheelhouse":
        # The whole dependency tree was shipped, not only the app: the host never needed an index.
        assert shipped == {"inventory_app-", "celery_ha_boot-", "celery-", "kombu-", "redis-"}, (
            wheels
        )
    else:
        # Online: only our own wheels travel, the host's pip fetched the rest from its index.
        assert shipped == {"inventory_app-", "celery_ha_boot-"}, wheels
    freeze = _ssh(addr, "/opt/celery-ha/venv/bin/pip freeze")
    assert re.search(r"^inventory-app @ file:///opt/celery-ha/wheels/", freeze, re.M) or (
        "inventory-app==" in freeze
    ), freeze
    assert re.search(r"^celery==5\.6\.", freeze, re.M), freeze
    unit = _ssh(addr, "systemctl is-active celery-worker@inventory")
    assert unit.strip() == "active"
    app_env = _ssh(addr, f"grep ^CELERY_HA_APP= {shlex.quote('/etc/celery-ha/celery.env')}")
    assert app_env.strip() == "CELERY_HA_APP=inventory_app.worker:inventory"


def test_a_native_wheelhouse_for_another_python_is_refused(lab: LabInventory) -> None:
    """celery_wheelhouse_build: native with a controller whose Python is not the host's stops
    before anything is shipped, naming the variables (on Debian 12 hosts there is no such
    host in the lab: the controller is Debian 12 too)."""
    if HOST not in lab.addresses:
        pytest.skip(f"no {HOST} in this lab")
    host_python = _ssh(
        lab.addresses[HOST], "python3 -c 'import platform; print(platform.python_version())'"
    )
    if host_python.strip() == controller_python():
        pytest.skip("the host's Python is the controller's: native is what auto builds")
    inventory = str(LAB_DIR / "inventory.ini")
    playbook = ["ansible-playbook", "-i", inventory, "tests/e2e/other_app.yml"]
    refused = run(
        [*playbook, "-e", "celery_install_mode=wheelhouse", "-e", "celery_wheelhouse_build=native"]
    )
    assert refused.returncode != 0
    assert "celery_wheelhouse_build is native, but celery_controller_python" in refused.stdout
    assert f"is not this host's Python (cpython {host_python.strip()} linux-" in refused.stdout
    # Stopped before the build and before anything was shipped to the host.
    assert "build the wheels to ship" not in refused.stdout
    assert "the wheels the host can install from" not in refused.stdout
    assert re.search(rf"^{HOST}\s+:.*failed=1", refused.stdout, re.M), refused.stdout[-3000:]
