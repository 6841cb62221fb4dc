"""The host firewall seen from the network (roles/firewall): Redis, Sentinel, Flower and the
queue-depth exporter are closed to a lab host that is not in the inventory, Redis and
Sentinel are open to a worker host, Flower is open to the controller (flower_allowed_sources)
and to nobody else, and a re-run of site.yml puts back a table someone deleted by hand.

Needs a lab with a host outside the inventory: tests/lab/lab up 5 (the suite does).
"""

from __future__ import annotations

import json
import shlex
import socket

import pytest
from support.cluster import changed_tasks
from support.e2e_lab import LabInventory

REDIS, SENTINEL, FLOWER, EXPORTER = 6379, 26379, 5555, 9808

# Runs on a lab host: one TCP connect per target, and how it ended. A rejected port answers
# with a reset at once ("refused"); a timeout would mean packets are dropped instead.
PROBE = """
import json, socket, sys
out = []
for address, port in json.loads(sys.argv[1]):
    try:
        socket.create_connection((address, port), timeout=3).close()
        out.append("open")
    except ConnectionRefusedError:
        out.append("refused")
    except OSError as exc:
        out.append(type(exc).__name__)
print(json.dumps(out))
"""


def probe(lab: LabInventory, source: str, targets: list[tuple[str, int]]) -> dict:
    """{(address, port): 'open' | 'refused' | error name} for TCP connects from `source`."""
    command = f"python3 -c {shlex.quote(PROBE)} {shlex.quote(json.dumps(targets))}"
    answers = json.loads(lab.lab_cmd("ssh", source, command))
    return dict(zip(targets, answers, strict=True))


def from_controller(address: str, port: int) -> str:
    try:
        socket.create_connection((address, port), timeout=3).close()
        return "open"
    except ConnectionRefusedError:
        return "refused"
    except OSError as exc:
        return type(exc).__name__


@pytest.fixture(scope="module")
def outsider(lab: LabInventory) -> str:
    """A running lab host that the inventory does not know (the last one with 5+ hosts)."""
    hosts = [line.split()[0] for line in lab.lab_cmd("status").splitlines() if " running " in line]
    strangers = [h for h in hosts if h not in lab.addresses]
    if not strangers:
        pytest.skip("no lab host outside the inventory: raise the lab with tests/lab/lab up 5")
    return strangers[-1]


def cluster_ports(lab: LabInventory) -> list[tuple[str, int]]:
    """Every guarded port on every host that has it."""
    targets = [(lab.addresses[h], REDIS) for h in lab.groups["redis"]]
    targets += [(lab.addresses[h], SENTINEL) for h in lab.groups["sentinel"]]
    targets += [(lab.addresses[h], p) for h in lab.groups["flower"] for p in (FLOWER, EXPORTER)]
    return targets


def test_outsider_is_refused_everywhere(lab: LabInventory, outsider: str) -> None:
    results = probe(lab, outsider, cluster_ports(lab))
    assert results and all(state == "refused" for state in results.values()), results


def test_worker_reaches_redis_and_sentinel(lab: LabInventory) -> None:
    worker = lab.groups["celery_workers"][-1]
    targets = [(lab.addresses[h], REDIS) for h in lab.groups["redis"] if h != worker]
    targets += [(lab.addresses[h], SENTINEL) for h in lab.groups["sentinel"] if h != worker]
    results = probe(lab, worker, targets)
    assert targets and all(state == "open" for state in results.values()), results


def test_flower_only_for_its_allow_list(lab: LabInventory) -> None:
    flower = lab.addresses[lab.groups["flower"][0]]
    # The controller is in the lab's flower_allowed_sources ...
    assert from_controller(flower, FLOWER) == "open"
    # ... a worker host is a cluster host, but not in it.
    worker = next(h for h in lab.groups["celery_workers"] if h not in lab.groups["flower"])
    assert probe(lab, worker, [(flower, FLOWER)]) == {(flower, FLOWER): "refused"}


def test_controller_reaches_redis_through_firewall_client_addresses(lab: LabInventory) -> None:
    for host in lab.groups["redis"]:
        assert from_controller(lab.addresses[host], REDIS) == "open", host


def test_rerun_restores_a_table_deleted_by_hand(lab: LabInventory, outsider: str) -> None:
    host = lab.groups["redis"][0]
    target = (lab.addresses[host], REDIS)
    lab.lab_cmd("ssh", host, "nft delete table inet celery_ha")
    # The unit still says active: only the kernel knows the table is gone, and the port is open.
    assert lab.lab_cmd("ssh", host, "systemctl is-active celery-ha-firewall").strip() == "active"
    assert probe(lab, outsider, [target]) == {target: "open"}

    proc = lab.site_yml("--limit", host)
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert probe(lab, outsider, [target]) == {target: "refused"}
    # The repair is the firewall's reload, nothing else on the host.
    assert changed_tasks(proc.stdout, host) == [
        "firewall : Firewall | the table is loaded",
        "firewall : Firewall | reload",
    ]
