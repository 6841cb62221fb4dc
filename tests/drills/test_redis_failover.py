"""Redis/Sentinel failover drills of issue 3, on a deployed lab (no Celery needed).

1. Master crash: Sentinels elect a new master (time printed); re-running the playbook then
   changes nothing and keeps that master; the old master comes back as a replica.
2. Master partitioned from the other hosts: a new master is elected; the isolated old
   master starts refusing writes (NOREPLICAS) once its replicas' lag passes
   min-replicas-max-lag; after `heal` it rejoins as a replica.
3. (REDIS_DRILL_GROW=1, needs a spare host) a host added to the redis and sentinel groups
   joins as a replica of the CURRENT master, not of the inventory's first host.

Run: LAB_DIR=... pytest -s tests/drills/test_redis_failover.py
DRILLS_PLAYBOOK picks the playbook re-run by the drills (default ansible/site.yml).
Times are printed and recorded, never asserted.
"""

from __future__ import annotations

import os
import shutil
import time
from collections.abc import Iterator
from typing import Any, TypeVar

import pytest
import redis
from support.cluster import Lab
from support.labtls import tls_kwargs
from support.ledger import wait_until

MASTER_NAME = "celery"
REDIS_PORT = 6379
SENTINEL_PORT = 26379
MIN_REPLICAS_MAX_LAG = 3

T = TypeVar("T")


def say(msg: str) -> None:
    print(f"[redis-drill {time.strftime('%T')}] {msg}", flush=True)


class RedisCluster:
    """The Redis/Sentinel side of a lab, reached from the controller with the lab's secrets."""

    def __init__(self, lab: Lab) -> None:
        self.lab = lab
        self.addresses = lab.addresses()
        self.redis_hosts = lab.group("redis")
        self.sentinel_hosts = lab.group("sentinel")
        secrets = lab.lab_dir / "secrets"
        self.admin_password = (secrets / "redis_admin_password").read_text().split()[0]
        self.celery_password = (secrets / "redis_celery_password").read_text().split()[0]
        self.sentinel_password = (secrets / "sentinel_password").read_text().split()[0]
        self.tls = tls_kwargs(secrets)

    def host_of(self, address: str) -> str:
        return self.lab.host_of(address)

    def _client(self, host: str, port: int, **kwargs: Any) -> redis.Redis:
        return redis.Redis(
            host=self.addresses[host],
            port=port,
            socket_timeout=2,
            socket_connect_timeout=2,
            decode_responses=True,
            **self.tls,
            **kwargs,
        )

    def admin(self, host: str) -> redis.Redis:
        return self._client(host, REDIS_PORT, username="admin", password=self.admin_password)

    def celery(self, host: str) -> redis.Redis:
        return self._client(host, REDIS_PORT, username="celery", password=self.celery_password)

    def sentinel(self, host: str) -> redis.Redis:
        return self._client(host, SENTINEL_PORT, password=self.sentinel_password)

    def try_write(self, host: str, key: str) -> bool:
        client = self.celery(host)
        try:
            return bool(client.set(key, "1", ex=60))
        except redis.RedisError:
            return False
        finally:
            client.close()

    def sentinel_views(self, hosts: list[str]) -> dict[str, str | None]:
        views: dict[str, str | None] = {}
        for host in hosts:
            client = self.sentinel(host)
            try:
                addr = client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
                views[host] = addr[0] if addr else None
            except redis.RedisError:
                views[host] = None
            finally:
                client.close()
        return views

    def agreed_master(self, hosts: list[str]) -> str | None:
        """The master host if every listed Sentinel answers and names the same one."""
        views = self.sentinel_views(hosts)
        named = set(views.values())
        if len(named) != 1 or None in named:
            return None
        return self.host_of(str(next(iter(named))))

    def replication(self, host: str) -> dict[str, Any] | None:
        client = self.admin(host)
        try:
            return client.info("replication")
        except redis.RedisError:
            return None
        finally:
            client.close()

    def is_replica_of(self, host: str, master: str) -> bool:
        info = self.replication(host)
        return bool(
            info
            and info["role"] == "slave"
            and info["master_host"] == self.addresses[master]
            and info["master_link_status"] == "up"
        )

    def healthy(self, timeout: float = 120) -> str:
        """Wait until all Sentinels agree, CKQUORUM is OK and every replica is in sync."""

        def check() -> str | None:
            master = self.agreed_master(self.sentinel_hosts)
            if master is None:
                return None
            info = self.replication(master)
            if not info or info["role"] != "master":
                return None
            replicas = [h for h in self.redis_hosts if h != master]
            if not all(self.is_replica_of(h, master) for h in replicas):
                return None
            for host in self.sentinel_hosts:
                client = self.sentinel(host)
                try:
                    if not str(
                        client.execute_command("SENTINEL", "CKQUORUM", MASTER_NAME)
                    ).startswith("OK"):
                        return None
                except redis.RedisError:
                    return None
                finally:
                    client.close()
            return master

        return wait_until(
            check,
            timeout,
            what="a healthy Redis cluster (one master, replicas in sync)",
            interval=0.2,
        )


@pytest.fixture(scope="module")
def rc() -> RedisCluster:
    lab = Lab()
    if not lab.exists():
        pytest.fail(f"no lab at {lab.lab_dir} (LAB_DIR): raise and deploy one first")
    return RedisCluster(lab)


@pytest.fixture(scope="module")
def figures() -> Iterator[list[dict[str, Any]]]:
    rows: list[dict[str, Any]] = []
    yield rows
    if rows:
        print("\n===== Redis failover drills: figures")
        for row in rows:
            print("  " + "  ".join(f"{k}={v}" for k, v in row.items()))


def assert_rerun_changes_nothing(
    rc: RedisCluster, down: set[str], inventory_note: str = ""
) -> dict[str, dict[str, int]]:
    started = time.monotonic()
    code, recap, tail = rc.lab.playbook()
    say(f"re-run{inventory_note}: rc={code} in {time.monotonic() - started:.0f} s: {recap}")
    assert recap, f"no PLAY RECAP in the playbook output:\n{tail}"
    for host, counts in recap.items():
        if host in down:
            assert counts.get("unreachable", 0) > 0 or counts.get("ok", 0) == 0, (host, counts)
            continue
        assert counts.get("failed", 0) == 0, f"{host} failed on re-run: {counts}\n{tail}"
        assert counts.get("unreachable", 0) == 0, f"{host} unreachable: {counts}\n{tail}"
        assert counts.get("changed", 0) == 0, f"re-run changed {host}: {counts}\n{tail}"
    return recap


def wait_rejoined(
    rc: RedisCluster, old: str, new: str, since: float, timeout: float, event: str
) -> float:
    """Wait until the old master is a replica of the new one and the cluster is whole again;
    the seconds since ``event`` (at monotonic ``since``)."""
    wait_until(
        lambda: rc.is_replica_of(old, new),
        timeout,
        what=f"{old} to rejoin as a replica of {new}",
        interval=0.2,
    )
    rejoin_s = time.monotonic() - since
    say(f"{old} is back as a replica of {new}, {rejoin_s:.1f} s after {event}")
    assert rc.healthy() == new
    return rejoin_s


def test_master_crash_then_rerun_then_old_master_rejoins(
    rc: RedisCluster, figures: list[dict[str, Any]]
) -> None:
    lab = rc.lab
    old = rc.healthy()
    others = [h for h in rc.sentinel_hosts if h != old]
    say(f"master is {old}; crashing its host")
    t0 = time.monotonic()
    lab.run("crash", old)

    def switched() -> str | None:
        master = rc.agreed_master(others)
        return master if master and master != old else None

    # Two Sentinels left can split their votes; Sentinel then waits 2 x failover-timeout
    # (2 x 60 s) before it tries again. The drill must see that retry, and prints the time.
    new = wait_until(switched, 180, what="the Sentinels to elect a new master", interval=0.2)
    elected_s = time.monotonic() - t0
    say(f"new master {new} elected {elected_s:.1f} s after the crash of {old}")
    wait_until(
        lambda: rc.try_write(new, "drill:crash"), 60, what="writes on the new master", interval=0.2
    )

    # Re-running the playbook with the old master down must not touch anything, and above
    # all must not push the cluster back to the inventory's first host.
    assert_rerun_changes_nothing(rc, down={old})
    assert rc.agreed_master(others) == new, "the re-run moved the master"
    assert (rc.replication(new) or {}).get("role") == "master"

    t1 = time.monotonic()
    lab.run("start", old, timeout=300)
    rejoin_s = wait_rejoined(rc, old, new, t1, 180, "its start")
    figures.append(
        {
            "drill": "master crash",
            "old": old,
            "new": new,
            "elected_s": round(elected_s, 2),
            "rejoined_s": round(rejoin_s, 2),
        }
    )


def test_master_partition_refuses_writes_then_rejoins(
    rc: RedisCluster, figures: list[dict[str, Any]]
) -> None:
    lab = rc.lab
    old = rc.healthy()
    others = [h for h in rc.sentinel_hosts if h != old]
    probe = rc.celery(old)
    probe.set("drill:partition", "before", ex=120)
    say(f"master is {old}; isolating it from the other hosts (the controller still reaches it)")
    t0 = time.monotonic()
    lab.run("isolate", old)
    accepted = 0
    new: str | None = None
    try:
        # Both clocks run at once: the election on the majority side, and the moment the
        # isolated old master stops accepting writes.
        error = None
        refused_s = elected_s = None
        deadline = time.monotonic() + MIN_REPLICAS_MAX_LAG + 60
        while (refused_s is None or new is None) and time.monotonic() < deadline:
            if refused_s is None:
                try:
                    probe.set("drill:partition", f"during-{accepted}", ex=120)
                    accepted += 1
                except redis.ResponseError as err:
                    error, refused_s = str(err), time.monotonic() - t0
            if new is None:
                master = rc.agreed_master(others)
                if master and master != old:
                    new, elected_s = master, time.monotonic() - t0
            time.sleep(0.2)
        assert new is not None and elected_s is not None, "no new master was elected"
        say(f"new master {new} elected {elected_s:.1f} s after the partition")
        assert error is not None and refused_s is not None, "the old master kept taking writes"
        say(
            f"isolated old master refuses writes {refused_s:.1f} s after the partition "
            f"(min-replicas-max-lag {MIN_REPLICAS_MAX_LAG} s; {accepted} writes accepted "
            f"before): {error}"
        )
        assert error.startswith("NOREPLICAS"), error
        wait_until(
            lambda: rc.try_write(new, "drill:partition-new"),
            60,
            what="writes on the new master",
            interval=0.2,
        )
        rc.celery(new).set("drill:partition", "after", ex=120)
    finally:
        t1 = time.monotonic()
        lab.run("heal", old)
    assert new is not None
    rejoin_s = wait_rejoined(rc, old, new, t1, 120, "heal")
    # What the old master accepted while cut off is gone: the new master's history wins.
    assert rc.celery(new).get("drill:partition") == "after"
    probe.close()
    figures.append(
        {
            "drill": "master partition",
            "old": old,
            "new": new,
            "elected_s": round(elected_s, 2),
            "noreplicas_s": round(refused_s, 2),
            "writes_accepted_while_isolated": accepted,
            "rejoined_s": round(rejoin_s, 2),
        }
    )


@pytest.mark.skipif(
    os.environ.get("REDIS_DRILL_GROW") != "1",
    reason="adds a spare host to the cluster for good: set REDIS_DRILL_GROW=1 to run",
)
def test_new_host_joins_as_replica_of_current_master(
    rc: RedisCluster, figures: list[dict[str, Any]]
) -> None:
    lab = rc.lab
    spares = lab.group("spare")
    if not spares:
        pytest.skip("no spare host in the lab (tests/lab/lab up 4)")
    newcomer = spares[0]
    master = rc.healthy()
    initial = rc.redis_hosts[0]
    if master == initial:
        # Make the point: the newcomer must follow the CURRENT master, not the first host.
        client = rc.sentinel(rc.sentinel_hosts[0])
        client.execute_command("SENTINEL", "FAILOVER", MASTER_NAME)
        client.close()
        wait_until(
            lambda: (m := rc.agreed_master(rc.sentinel_hosts)) and m != initial and m,
            120,
            what="the manual failover",
            interval=0.2,
        )
        master = rc.healthy()
    say(f"current master {master} (inventory's first redis host: {initial}); adding {newcomer}")

    # The grown inventory sits next to the lab's so group_vars/host_vars still apply.
    grown = lab.lab_dir / "inventory-grown.ini"
    text = lab.inventory.read_text()
    for group in ("redis", "sentinel"):
        text = text.replace(f"[{group}]\n", f"[{group}]\n{newcomer}\n", 1)
    grown.write_text(text)
    original = lab.inventory
    lab.inventory = grown
    try:
        started = time.monotonic()
        code, recap, tail = lab.playbook()
        say(f"grow run: rc={code} in {time.monotonic() - started:.0f} s: {recap}")
        assert code == 0, tail
        grown_rc = RedisCluster(lab)
        assert grown_rc.healthy() == master
        assert rc.is_replica_of(newcomer, master)
        n = len(grown_rc.sentinel_hosts)

        def settings_of(host: str) -> dict[str, str]:
            client = grown_rc.sentinel(host)
            try:
                flat = client.execute_command("SENTINEL", "MASTER", MASTER_NAME)
            finally:
                client.close()
            if isinstance(flat, dict):
                return flat
            return dict(zip(flat[::2], flat[1::2], strict=True))

        for host in grown_rc.sentinel_hosts:
            assert int(settings_of(host)["quorum"]) == n // 2 + 1, host
        # Sentinels find each other through hello messages every 2 s: wait for the full mesh.
        wait_until(
            lambda: all(
                int(settings_of(h)["num-other-sentinels"]) == n - 1 for h in grown_rc.sentinel_hosts
            ),
            60,
            what=f"all {n} Sentinels to know each other",
            interval=0.2,
        )
        assert_rerun_changes_nothing(grown_rc, down=set(), inventory_note=" (grown)")
    finally:
        lab.inventory = original
        shutil.copy(grown, lab.lab_dir / "inventory-grown.last.ini")
    figures.append({"drill": "new host joins", "host": newcomer, "master": master})
