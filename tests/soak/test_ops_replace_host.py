"""Day-2 operation 2 (issue 14): replace a dead Redis/Sentinel host with a new host at a new
address while the cluster serves (ansible/replace_redis_host.yml).

The replacement is the lab's stranger (node5 in a lab of five: a running host that no
inventory knows, so that no firewall admits it yet; the spare node4 is admitted already as
a second app's client). The drill writes its own inventory ($LAB_DIR/replace-inventory.ini:
the dead host gone from every group, the stranger in redis and sentinel) and leaves the
lab's generated one alone.

Two variants, one test: the host that dies is a replica's, or the master's (made the first
Sentinel of every client's list too, the state of a fresh deployment: the worst host to
lose). First, changing nothing: the playbook refuses a missing replace_dead_host, and
refuses while the host to replace still answers. Then, under load (a producer on the
controller and one on a worker host), the host is crashed (its PID 1 killed); for the
master's host the drill waits for Sentinel's failover, then both replace it the same way.
Asserted: the new host is a linked replica holding a key written before the crash; every
Sentinel lists exactly the other two Sentinels and the two replicas, none down, not the
dead address; every Redis/Sentinel host's firewall admits the new address and no longer the
old; celery.env on every client names the new Sentinel list; site.yml with the new
inventory then reports changed=0. The lab is then put back the same way, still under load:
the stranger's Redis and Sentinel stopped for good and wiped, the crashed host re-installed
as far as Redis and Sentinel go (their config and data wiped on its disk while it is down:
powered on as it was, a dead master would come back a master) and booted, the playbook with
the lab's own inventory; then checked the same way, so the other drills find the cluster
they expect (the stranger keeps Redis and Sentinel installed but stopped, disabled and
without config, and an nft table of its own that only guards its own ports).
lost = 0, failed = 0 over the whole run; duplicates are reported; the longest gap with no
task completing (from the crash) is printed and recorded (test-artifacts/soak.json).
"""

from __future__ import annotations

import os
import shutil
import time
from pathlib import Path
from typing import Any

import celery_ha_settings
import pytest
from celery_ha_exec import parse_env
from opskit import OpsDrill, run_playbook
from support.cluster import CELERY_ENV, Cluster, Lab
from support.drillkit import (
    earliest_switch,
    expected_workers,
    make_master,
    say,
    wait_healthy,
    wait_new_master,
)
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


def reimage(c: Cluster, host: str) -> None:
    """Wipe host's Redis and Sentinel (config, data, start at boot) on its disk, stopped, as
    an operator re-installs a dead host before it may join again. Powered on as it
    was, a dead master would come back a master of its old data with a Sentinel that names
    it, behind firewalls that no longer admit it, so the Sentinels would disagree and the
    playbook's preflight would refuse (read from the roles, not tried). Wiped, the roles
    bootstrap it as a new host."""
    root = c.lab.lab_dir / "hosts" / host / "root"
    # Unmounted, the files below would be written under the mount point and hidden by it.
    assert os.path.ismount(root), f"{root}: the lab keeps a host's disk mounted while it is down"
    f = c.flavor
    for unit in (f.server_unit, f.sentinel_unit):
        for link in (root / "etc/systemd/system").glob(f"*.wants/{unit}"):
            link.unlink()
    for conf in (f.server_conf, f.sentinel_conf):
        (root / conf.lstrip("/")).unlink(missing_ok=True)
    data = root / f.data_dir.lstrip("/")
    for entry in data.iterdir() if data.is_dir() else []:
        if entry.is_dir() and not entry.is_symlink():
            shutil.rmtree(entry)
        else:
            entry.unlink()


def retire(c: Cluster, host: str) -> None:
    """Stop host's Redis and Sentinel for good and wipe them: the stranger, when it leaves
    the cluster, is a new host again for the next replacement. Kept as they were, its
    Sentinel's file (monitoring the old master, knowing the peers of that time) counts as
    bootstrapped, and the next replacement's Sentinel started with a peer that had died
    since (its final check failed, listing the dead host)."""
    for unit in (c.flavor.server_unit, c.flavor.sentinel_unit):
        # Not installed on a stranger that never served: nothing to stop.
        c.lab.ssh(host, f"systemctl disable --now {unit} 2>/dev/null || true")
    reimage(c, host)


def choose_dead(c: Cluster, variant: str, workers: list[str]) -> tuple[str, str, str]:
    """(dead host, remote producer's host, master) for a variant, the master made where the
    variant needs it."""
    if variant == "master":
        # The first Sentinel of every client's list (c's celery.env, read before any change):
        # after a fresh deployment, also the master's host, and the worst host to lose.
        dead = c.lab.host_of(c.sentinels[0][0])
        make_master(c, dead, workers)
        return dead, next(h for h in c.worker_hosts if h != dead), dead
    master = wait_healthy(c, workers)
    remote_host = c.worker_hosts[0]
    # A replica's host, not the remote producer's; flower and beat hosts last.
    busy = set(c.lab.group("flower")) | set(c.lab.group("celery_beat")) | {master, remote_host}
    candidates = [
        h for h in c.redis_hosts if h in c.sentinel_hosts and h not in {master, remote_host}
    ]
    return sorted(candidates, key=lambda h: (h in busy, h))[0], remote_host, master


def check_refusals(c: Cluster, new_lab: Lab, dead: str, dead_address: str) -> None:
    """While nothing is broken the playbook refuses and changes nothing: without
    replace_dead_host, and while the host to replace still answers."""
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


@pytest.mark.parametrize("variant", ["replica", "master"])
def test_ops2_replace_dead_host(
    drill_cluster: Cluster,
    workers: list[str],
    drill_figures: list[dict[str, Any]],
    variant: str,
) -> None:
    c = drill_cluster
    dead, remote_host, master = choose_dead(c, variant, workers)
    new, new_address = stranger(c.lab)
    dead_address = c.addresses[dead]
    # A variant before this one (or a run that failed) may have left the stranger serving.
    retire(c, new)
    new_lab = Lab(
        str(c.lab.lab_dir), inventory=replacement_inventory(c.lab, dead, new, new_address)
    )
    check_refusals(c, new_lab, dead, dead_address)
    # What the firewall checks below must see change.
    assert all(
        admits(c, h, dead_address) and not admits(c, h, new_address)
        for h in c.redis_hosts
        if h != dead
    )

    token = f"{time.time()}"
    c.master_client(c.broker_db).set(PROBE_KEY, token, ex=3600)
    live = [h for h in c.sentinel_hosts if h != dead]
    with OpsDrill(c, f"ops2-{variant}", remote_host, remote_seconds=2 * PLAYBOOK_TIMEOUT) as drill:
        drill.t_fault = time.time()
        c.lab.run("crash", dead)
        say(f"crashed {dead} ({dead_address}), the {variant}'s host; master {master}")
        extra: dict[str, Any] = {}
        if dead == master:
            # The playbook's refusal of a dead master is not asserted here: Sentinel fails
            # over ~6 s after the crash, before the playbook's preflight gets to ask it (tens
            # of seconds on a loaded machine), so such a run would replace the host instead.
            promoted = wait_new_master(c, dead)
            switch = earliest_switch(c, drill.t_fault - 1, live)
            extra = {
                "new_master": promoted,
                "switch_s": None if switch is None else round(switch - drill.t_fault, 2),
            }
            say(f"{promoted} is the master since {extra['switch_s']} s after the crash")
        wait_seen_down(c, dead_address, live)
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
        # crashed host comes back re-installed and takes its place again as a new host.
        retire(c, new)
        reimage(c, dead)
        c.lab.run("start", dead, timeout=300)
        wait_seen_down(n, new_address, [h for h in n.sentinel_hosts if h != new])
        back_s, _ = replace(drill, c.lab, new, new_address)
        wait_healthy(c, workers)
        check_membership(c, new, new_address)
        row = drill.finish(
            drill_figures,
            f"ops 2: replace a dead {variant}'s host, and back",
            dead=dead,
            new=new,
            master=master,
            replace_s=replace_s,
            back_s=back_s,
            **extra,
        )
    say(f"ops 2 ({variant}): {dead} -> {new} -> {dead}: gap {row.get('gap_s')} s")
