"""Day-2 operation 2 (issue 14): replace a dead Redis/Sentinel host with a new host at a new
address while the cluster serves (ansible/replace_redis_host.yml).

The replacement is the lab's stranger (node5 in a lab of five: a running host that no
inventory knows, so that no firewall admits it yet; the spare node4 is admitted already as
a second app's client). The drill writes its own inventory ($LAB_DIR/replace-inventory.ini:
the dead host gone from every group, the stranger in redis and sentinel) and leaves the
lab's generated one alone.

First, changing nothing: the playbook refuses a missing replace_dead_host, and refuses while
the host to replace still answers. Then, under load (a producer on the controller and one on
a worker host), a Redis/Sentinel host that is not the master is crashed and replaced.
Asserted: the new host is a linked replica holding a key written before the crash; every
Sentinel lists exactly the other two Sentinels and the two replicas, none down, not the
dead address; every Redis/Sentinel host's firewall admits the new address and no longer the
old; celery.env on every client names the new Sentinel list; site.yml with the new
inventory then reports changed=0. The lab is then put back the same way (the spare's Redis
and Sentinel stopped for good, the crashed host booted again, the playbook with the lab's
own inventory), still under load, and checked the same way, so the other drills find the
cluster they expect (the stranger keeps Redis and Sentinel installed but stopped and
disabled, and an nft table of its own that only guards its own ports).
lost = 0, failed = 0 over the whole run; the longest gap with no task completing (from the
crash) is printed and recorded (test-artifacts/soak.json).
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import celery_ha_settings
from celery_ha_exec import parse_env
from opskit import OpsDrill, run_playbook
from support.cluster import CELERY_ENV, Cluster, Lab
from support.drillkit import expected_workers, say, wait_healthy
from support.ledger import wait_until

PLAYBOOK = "replace_redis_host.yml"
# site.yml on a fresh host (packages, venv) and every worker host's rolling restart: 20 min
# were not enough once with three labs busy on two cores (load average ~35).
PLAYBOOK_TIMEOUT = 3600
PROBE_KEY = "drills:replace-probe"


def stranger(lab: Lab) -> tuple[str, str]:
    """(name, address) of a running lab host that the lab's inventory does not know."""
    known = lab.addresses()
    hosts = [line.split() for line in lab.run("status").stdout.splitlines()]
    strangers = [
        (h[0], h[1]) for h in hosts if len(h) > 2 and h[2] == "running" and h[0] not in known
    ]
    assert strangers, "no lab host outside the inventory: raise the lab with tests/lab/lab up 5"
    return strangers[-1]


def replacement_inventory(lab: Lab, dead: str, new: str, new_address: str) -> Path:
    """The lab's inventory with ``dead`` gone from every section and ``new`` (a host it did
    not know) in [lab] with its address and in the redis and sentinel groups."""
    out: list[str] = []
    for raw in lab.inventory.read_text().splitlines():
        line = raw.strip()
        if line.startswith("[") and line.endswith("]"):
            out.append(raw)
            section = line[1:-1]
            if section == "lab":
                out.append(f"{new} ansible_host={new_address}")
            elif section in ("redis", "sentinel"):
                out.append(new)
            continue
        name = line.split()[0] if line and line[0] not in "#;" else ""
        if name != dead:
            out.append(raw)
    path = lab.lab_dir / "replace-inventory.ini"
    path.write_text("\n".join(out) + "\n")
    return path


def peers(c: Cluster, host: str) -> dict[str, list[dict[str, Any]]]:
    """SENTINEL SENTINELS and REPLICAS of host's Sentinel: ip, flags (a set) per entry. Raw
    replies, parsed here: redis-py 6.4's sentinel_sentinels() fails on its own callback."""
    client = c.sentinel_client(host)
    view: dict[str, list[dict[str, Any]]] = {}
    try:
        for kind in ("SENTINELS", "REPLICAS"):
            entries = []
            for flat in client.execute_command("SENTINEL", kind, c.master_name):
                entry = {
                    (k.decode() if isinstance(k, bytes) else k): (
                        v.decode() if isinstance(v, bytes) else v
                    )
                    for k, v in zip(flat[::2], flat[1::2], strict=True)
                }
                entries.append({"ip": entry["ip"], "flags": set(entry["flags"].split(","))})
            view[kind.lower()] = entries
    finally:
        client.close()
    return view


def sentinel_problems(c: Cluster, gone: str) -> dict[str, str]:
    """Every Sentinel must list exactly the other Sentinels and the replicas, none down, and
    not ``gone``; what is wrong per host (empty: all good)."""
    master_ip = c.addresses[c.master_host()]
    replicas = sorted(c.addresses[h] for h in c.redis_hosts if c.addresses[h] != master_ip)
    problems: dict[str, str] = {}
    for host in c.sentinel_hosts:
        view = peers(c, host)
        want = sorted(c.addresses[h] for h in c.sentinel_hosts if h != host)
        got_s = sorted(p["ip"] for p in view["sentinels"])
        got_r = sorted(p["ip"] for p in view["replicas"])
        down = [
            p["ip"]
            for p in view["sentinels"] + view["replicas"]
            if p["flags"] & {"s_down", "o_down", "disconnected"}
        ]
        if got_s != want or got_r != replicas or down or gone in got_s + got_r:
            problems[host] = f"sentinels {got_s} (want {want}), replicas {got_r} "
            problems[host] += f"(want {replicas}), down {down}"
    return problems


def admits(c: Cluster, host: str, address: str) -> bool:
    """Whether host's firewall lets address reach Redis and Sentinel (its client set)."""
    probe = f"nft get element inet celery_ha clients_v4 '{{ {address} }}'"
    return c.lab.run("ssh", host, probe, check=False).returncode == 0


def client_sentinels(c: Cluster) -> dict[str, list[str]]:
    """The Sentinel addresses celery.env names on every client host of c's inventory."""
    clients = set(c.worker_hosts) | set(c.lab.group("celery_beat")) | set(c.lab.group("flower"))
    out = {}
    for host in sorted(clients):
        env = parse_env(c.lab.ssh(host, f"cat {CELERY_ENV}"), f"{host}:{CELERY_ENV}")
        sentinels = celery_ha_settings.parse_sentinels(env["CELERY_HA_SENTINELS"])
        out[host] = sorted(h for h, _ in sentinels)
    return out


def check_membership(c: Cluster, gone: str, gone_address: str) -> None:
    """The cluster of c's inventory is whole and knows nothing of gone_address any more."""
    live = sorted({c.addresses[h] for h in c.redis_hosts + c.sentinel_hosts})

    def whole() -> bool:
        problems = sentinel_problems(c, gone_address)
        # An error is "not yet" to wait_until, and the last one is what its timeout reports.
        assert not problems, problems
        return True

    wait_until(whole, 60, interval=3, what=f"every Sentinel listing the live peers, not {gone}")
    firewall = {
        h: [a for a in live if not admits(c, h, a)]
        + ([gone_address] if admits(c, h, gone_address) else [])
        for h in sorted(set(c.redis_hosts + c.sentinel_hosts))
    }
    assert not any(firewall.values()), f"firewall: wrongly refused/admitted addresses {firewall}"
    want = sorted(c.addresses[h] for h in c.sentinel_hosts)
    wrong = {h: got for h, got in client_sentinels(c).items() if got != want}
    assert not wrong, f"celery.env names another Sentinel list than {want}: {wrong}"


def replace(
    drill: OpsDrill, lab: Lab, dead: str, dead_address: str
) -> tuple[float, dict[str, dict[str, int]]]:
    t0 = time.time()
    rc, recap, tail = drill.operate(
        PLAYBOOK,
        "-e",
        f"replace_dead_host={dead}",
        "-e",
        f"replace_dead_address={dead_address}",
        lab=lab,
        timeout=PLAYBOOK_TIMEOUT,
    )
    assert rc == 0, tail
    return round(time.time() - t0, 1), recap


def wait_seen_down(c: Cluster, address: str, hosts: list[str]) -> None:
    """Until every Sentinel of hosts flags address down (the playbook refuses before)."""

    def down() -> bool:
        for host in hosts:
            view = peers(c, host)
            entries = [p for p in view["sentinels"] + view["replicas"] if p["ip"] == address]
            if not entries or not all("s_down" in p["flags"] for p in entries):
                return False
        return True

    wait_until(down, 60, interval=1, what=f"every live Sentinel flagging {address} down")


def test_ops2_replace_dead_replica_host(
    drill_cluster: Cluster, workers: list[str], drill_figures: list[dict[str, Any]]
) -> None:
    c = drill_cluster
    master = wait_healthy(c, workers)
    new, new_address = stranger(c.lab)
    remote_host = c.worker_hosts[0]
    # A replica's host, not the remote producer's; flower and beat hosts last.
    busy = set(c.lab.group("flower")) | set(c.lab.group("celery_beat")) | {master, remote_host}
    candidates = [
        h for h in c.redis_hosts if h in c.sentinel_hosts and h not in {master, remote_host}
    ]
    dead = sorted(candidates, key=lambda h: (h in busy, h))[0]
    dead_address = c.addresses[dead]
    new_lab = Lab(
        str(c.lab.lab_dir), inventory=replacement_inventory(c.lab, dead, new, new_address)
    )

    # Refusals first, while nothing is broken: they must change nothing.
    rc, recap, tail = run_playbook(c, PLAYBOOK, lab=new_lab)
    assert rc != 0 and "replace_dead_host" in tail, tail
    assert not any(r.get("changed") for r in recap.values()), recap
    rc, recap, tail = run_playbook(
        c,
        PLAYBOOK,
        "-e",
        f"replace_dead_host={dead}",
        "-e",
        f"replace_dead_address={dead_address}",
        lab=new_lab,
    )
    assert rc != 0 and "still answers" in tail, tail
    assert not any(r.get("changed") for r in recap.values()), recap
    # What the firewall checks below must see change.
    assert all(
        admits(c, h, dead_address) and not admits(c, h, new_address)
        for h in c.redis_hosts
        if h != dead
    )

    token = f"{time.time()}"
    c.master_client(c.broker_db).set(PROBE_KEY, token, ex=3600)
    with OpsDrill(c, "ops2-replace", remote_host, remote_seconds=2 * PLAYBOOK_TIMEOUT) as drill:
        drill.t_fault = time.time()
        c.lab.run("crash", dead)
        say(f"crashed {dead} ({dead_address}), a replica's host; master {master}")
        wait_seen_down(c, dead_address, [h for h in c.sentinel_hosts if h != dead])
        replace_s, _ = replace(drill, new_lab, dead, dead_address)

        n = Cluster(new_lab)
        wait_healthy(n, expected_workers(n))
        assert n.role_of(new) == "replica:connected", n.role_of(new)
        assert n.redis_on(new, admin=True).get(PROBE_KEY) == token.encode(), (
            "the new replica lacks the data"
        )
        check_membership(n, dead, dead_address)
        rc, recap, tail = run_playbook(n, "site.yml", lab=new_lab, timeout=PLAYBOOK_TIMEOUT)
        assert rc == 0, tail
        rerun_changed = {h: r.get("changed", 0) for h, r in recap.items() if r.get("changed")}
        assert not rerun_changed, f"site.yml with the new inventory changed {rerun_changed}"
        say(f"{dead} replaced by {new} in {replace_s} s; site.yml re-run changed=0")

        # Back to the lab's own inventory: the stranger's Redis and Sentinel go for good, the
        # crashed host comes back with what it had and takes its place again.
        units = f"{c.flavor.server_unit} {c.flavor.sentinel_unit}"
        c.lab.ssh(new, f"systemctl disable --now {units}")
        c.lab.run("start", dead, timeout=300)
        wait_seen_down(n, new_address, [h for h in n.sentinel_hosts if h != new])
        back_s, _ = replace(drill, c.lab, new, new_address)
        wait_healthy(c, workers)
        check_membership(c, new, new_address)
        row = drill.finish(
            drill_figures,
            "ops 2: replace a dead replica host, and back",
            dead=dead,
            new=new,
            master=master,
            replace_s=replace_s,
            back_s=back_s,
        )
    say(f"ops 2: {dead} -> {new} -> {dead}: gap {row.get('gap_s')} s")
