"""Broker failover drills (issue 11): how long the cluster stands still, under load, when the
Redis master fails in each realistic way, measured against Sentinel's own switch.

Every drill: a producer on the controller and one on a worker host (not the faulted one)
publish ledger tasks at a steady rate; the fault hits; the cluster is repaired; every accepted
publish must then have run (parked in kombu's unacked hash counts as lost: that is an hour's
delay). Recorded per drill (test-artifacts/drills.json): the earliest +switch-master that any
Sentinel logged, the longest gap with no task completing, each producer's longest stall,
lost, failed (FAILURE results), duplicates. Asserted: lost = 0, failed = 0, and gaps under a
regression guard far from the goal; the goal itself (gap <= switch + 1 s) is shown by the
figures.

1. The master's host crashes while it is also the first Sentinel of every client's list (the
   state of a fresh deployment).
2. The master's host crashes while it is not.
3. The master's redis-server alone is SIGKILLed (the host stays up; systemd restarts it).
4. The master's host is isolated from the other hosts (the controller still reaches it, as an
   app server elsewhere might) while workers on it consume. A third producer on the
   controller publishes with celery_publish_wait_replicas 0: its losses are the publishes the
   old master accepted and threw away, reported, not asserted.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator
from typing import Any

import celery_ha_settings
import pytest
from celery import Celery
from support import secret_search
from support.cluster import Cluster
from support.drillkit import (
    RATE,
    TwoProducers,
    earliest_switch,
    make_master,
    record,
    restore_lab,
    say,
    wait_healthy,
    wait_new_master,
)
from support.ledger import RECORD_TASK, Ledger, Producer, new_run_id, wait_until

# A regression guard (the 70 s of issue 11), not the goal: the figures show the goal.
GAP_GUARD_S = 30.0


def first_sentinel_host(c: Cluster) -> str:
    return c.lab.host_of(c.sentinels[0][0])


def other_host(c: Cluster, *not_these: str) -> str:
    return next(h for h in c.worker_hosts if h not in not_these)


class Drill(TwoProducers):
    """The load, both producers and the clocks of one failover drill."""

    def __init__(self, c: Cluster, name: str, target: str) -> None:
        super().__init__(c, name, other_host(c, target))
        self.target = target
        self.t_fault = 0.0
        self.t_switch: float | None = None

    def fault(self, action: Callable[[], object], what: str) -> None:
        self.t_fault = time.time()
        action()
        say(f"{what} at {time.strftime('%T')}")

    def wait_new_master(self, old: str) -> str:
        new = wait_new_master(self.c, old)
        say(f"new master {new}")
        return new

    def finish(self, figures: list[dict[str, Any]], name: str, **extra: Any) -> dict[str, Any]:
        t_stop = time.time()
        self.remote.stop()
        report = self.load.finish(gap_from=self.t_fault, parked_ok=False, stop_at=t_stop)
        switch = earliest_switch(self.c, self.t_fault - 1)
        row_extra: dict[str, Any] = {
            "target": self.target,
            "switch_s": None if switch is None else round(switch - self.t_fault, 2),
            **self.publish_stalls(self.t_fault, t_stop),
            "worker_host_publish_failures": self.remote.failures,
            **extra,
        }
        record(figures, name, report, **row_extra)
        row = figures[-1]
        say(
            f"{name}: earliest +switch-master {row['switch_s']} s, longest gap "
            f"{row.get('gap_s')} s, publish stalls {row['controller_publish_stall_s']} s "
            f"(controller) / {row['worker_host_publish_stall_s']} s ({self.remote.host})"
        )
        assert not report.lost, f"lost tasks (parked ones included): {report.lost[:20]}"
        assert report.failed == 0, f"{report.failed} task(s) ended as FAILURE"
        assert report.publish_failures == 0, "a publish failed after all its retries"
        for key in ("gap_s", "controller_publish_stall_s", "worker_host_publish_stall_s"):
            assert row[key] <= GAP_GUARD_S, f"{key} = {row[key]} s: the cluster stood still"
        return row


def crash_and_restart(drill: Drill, workers: list[str]) -> str:
    c, old = drill.c, drill.target
    drill.fault(lambda: c.lab.run("crash", old), f"crashed {old}, the master's host")
    new = drill.wait_new_master(old)
    drill.load.wait_done_after(time.time(), count=int(RATE * 3), what="tasks on the new master")
    c.lab.run("start", old, timeout=300)
    wait_until(lambda: c.role_of(old) == "replica:connected", 180, what=f"{old} as a replica")
    wait_healthy(c, workers)
    return new


def test_failover1_crash_master_that_is_the_first_sentinel(
    drill_cluster: Cluster, workers: list[str], drill_figures: list[dict[str, Any]]
) -> None:
    c = drill_cluster
    target = first_sentinel_host(c)
    make_master(c, target, workers)
    with Drill(c, "f1-first", target) as drill:
        new = crash_and_restart(drill, workers)
        drill.finish(drill_figures, "failover 1: master+first Sentinel host crash", new=new)


def test_failover2_crash_master_that_is_not_the_first_sentinel(
    drill_cluster: Cluster, workers: list[str], drill_figures: list[dict[str, Any]]
) -> None:
    c = drill_cluster
    master = wait_healthy(c, workers)
    first = first_sentinel_host(c)
    if master == first:
        make_master(c, next(h for h in c.redis_hosts if h != first), workers)
        master = wait_healthy(c, workers)
    with Drill(c, "f2-other", master) as drill:
        new = crash_and_restart(drill, workers)
        drill.finish(drill_figures, "failover 2: master host crash", new=new)


def test_failover3_sigkill_master_redis_server(
    drill_cluster: Cluster, workers: list[str], drill_figures: list[dict[str, Any]]
) -> None:
    c = drill_cluster
    master = wait_healthy(c, workers)
    with Drill(c, "f3-kill", master) as drill:
        unit = c.flavor.server_unit
        pid = c.lab.ssh(master, f"systemctl show -p MainPID --value {unit}").strip()
        drill.fault(lambda: c.lab.ssh(master, f"kill -KILL {pid}"), f"SIGKILLed {unit} on {master}")
        # systemd restarts it within a second, long before Sentinel's down-after: the same
        # master comes back with its data (AOF), and no failover is expected.
        wait_until(
            lambda: (
                c.lab.ssh(master, f"systemctl show -p MainPID --value {unit}").strip()
                not in ("", "0", pid)
            ),
            60,
            interval=0.2,
            what="redis-server restarted",
        )
        restarted_s = time.time() - drill.t_fault
        drill.load.wait_done_after(time.time(), count=int(RATE * 3), what="tasks flowing again")
        now_master = wait_healthy(c, workers)
        drill.finish(
            drill_figures,
            "failover 3: master redis-server SIGKILL",
            restarted_s=round(restarted_s, 2),
            master_after=now_master,
        )


def test_failover4_isolate_master_while_its_workers_consume(
    drill_cluster: Cluster, workers: list[str], drill_figures: list[dict[str, Any]]
) -> None:
    c = drill_cluster
    master = wait_healthy(c, workers)
    assert master in c.worker_hosts, "the drill needs workers on the master's host"
    # The same producer without the publish acknowledgement, to count what it would lose.
    unsafe_settings = celery_ha_settings.load(dict(c.env, CELERY_HA_PUBLISH_WAIT_REPLICAS="0"))
    unsafe_app = Celery("celery-ha-drills-unsafe", set_as_current=False)
    unsafe_app.conf.update(unsafe_settings)
    unsafe = Ledger(new_run_id("f4-nowait"))

    def unsafe_send(ledger_id: str) -> None:
        unsafe_app.send_task(RECORD_TASK, args=(ledger_id, unsafe.run_id, 0.0), task_id=ledger_id)

    unsafe_producer = Producer(unsafe, unsafe_send, rate=RATE / 2)
    refusal: list[tuple[float, str]] = []
    probing = threading.Event()

    def probe() -> None:
        # From the controller, which still reaches the isolated old master: when does it stop
        # taking writes (min-replicas-to-write)?
        while probing.is_set() and not refusal:
            answer = c.write_probe(master)
            if answer != "ok":
                refusal.append((time.time(), answer))
            time.sleep(0.1)

    with Drill(c, "f4-isolate", master) as drill:
        unsafe_producer.start()
        probing.set()
        prober = threading.Thread(target=probe, daemon=True)
        drill.fault(lambda: c.lab.run("isolate", master), f"isolated {master}, the master's host")
        prober.start()
        try:
            new = drill.wait_new_master(master)
            wait_until(lambda: refusal, 60, what=f"{master} to refuse writes")
            refused_s = refusal[0][0] - drill.t_fault
            say(f"old master refuses writes {refused_s:.1f} s after the cut: {refusal[0][1]}")
            drill.load.wait_done_after(
                time.time(), count=int(RATE * 3), what="tasks on the new master"
            )
        finally:
            probing.clear()
            c.lab.run("heal", master)
        wait_until(
            lambda: c.role_of(master) == "replica:connected", 180, what=f"{master} rejoining"
        )
        wait_healthy(c, workers)
        unsafe_producer.stop()
        unsafe_drained = c.wait_drained(unsafe, timeout=120, parked_ok=False, settle_s=10)
        unsafe_report = unsafe.report(parked=unsafe_drained)
        say(
            f"without the acknowledgement: {len(unsafe_report.lost)} of "
            f"{unsafe_report.published} publishes accepted by the old master and lost"
        )
        drill.finish(
            drill_figures,
            "failover 4: master host isolated",
            new=new,
            old_master_refuses_writes_s=round(refused_s, 2),
            lost_without_publish_ack=len(unsafe_report.lost),
            published_without_publish_ack=unsafe_report.published,
        )


@pytest.fixture(autouse=True)
def _lab_whole_again(drill_cluster: Cluster) -> Iterator[None]:
    """A drill that failed halfway must not leave its host down for the next one."""
    yield
    restore_lab(drill_cluster)


def test_failover5_no_secret_in_any_journal(
    drill_cluster: Cluster, drill_figures: list[dict[str, Any]]
) -> None:
    """After the failovers above (and every retry and error they logged), no password or key
    of the cluster is in the journal of any of its hosts: redis-py's MasterNotFoundError would
    have put the Sentinel password there (tests/unit/test_failover.py)."""
    c = drill_cluster
    hosts = sorted(set(c.worker_hosts) | set(c.redis_hosts) | set(c.sentinel_hosts))
    journals = {h: c.lab.ssh(h, "journalctl --no-pager -o cat", timeout=120) for h in hosts}
    secrets = c.lab.lab_dir / "secrets"
    assert secret_search.needles(secrets), f"no secrets under {secrets}: nothing to prove"
    leaked = {
        h: found for h, text in journals.items() if (found := secret_search.search(text, secrets))
    }
    size = sum(len(t) for t in journals.values())
    say(f"searched {size} characters of journal on {len(hosts)} hosts: {leaked or 'no secret'}")
    drill_figures.append({"drill": "failover 5: secrets in journals", "leaked": sorted(leaked)})
    assert not leaked, f"secrets in the journals (names only): {leaked}"
