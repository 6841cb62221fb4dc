"""Worker and beat drills (issue 12): a dead worker's tasks run elsewhere within the redelivery
bound while a live worker's long task never runs twice, and periodic tasks survive the beat
host and a broker failover.

The ground truth is the drills' ledger (tests/support/ledger.py): ``drills.ledger_record``
writes an ``S`` line when a slow task starts and a ``D`` line when it is done, on the worker
host's disk; the periodic drill task ``drills.beat_tick`` writes one ``D`` line per run, its
ledger id carrying the task id (two beats sending the same run make two ids; a redelivered
message makes the same id twice). The beat drills turn that periodic entry on with a systemd
drop-in on the beat hosts and take it away afterwards.

Timings are printed and recorded (``drill_figures``); the only bounds asserted are the issue's
own: redelivery within the bound, takeover within the lock's, no run doubled, nothing lost.
The long-task drill (2) runs 3 x the bound, over 3 minutes: it is marked soak, so `make soak`
runs it and `make test` does not. Within make test, drill 4 holds long tasks of 1.5 x the bound
on live workers through a master crash and asserts that none of them runs twice. The other
three take about 6 minutes together.
"""

from __future__ import annotations

import re
import time
from collections import Counter
from datetime import UTC, datetime
from itertools import pairwise
from typing import Any

import pytest
from celery_ha_exec import parse_env
from support.cluster import Cluster, Lab
from support.drillkit import restore_lab, say, wait_healthy
from support.ledger import Ledger, new_run_id, wait_until

TASK_S = 30.0
BEAT_EVERY_S = 3.0
BEAT_DROPIN = "/etc/systemd/system/celery-beat.service.d/zz-drill.conf"
# Picking a task up once it is back in its queue: a free pool process, the ledger's write.
PICKUP_SLACK_S = 10.0


# -- helpers ---------------------------------------------------------------------------------
def redelivery_bound(c: Cluster) -> tuple[float, float]:
    return (
        float(c.settings["celery_ha_redelivery_timeout"]),
        float(c.settings["celery_ha_redelivery_interval"]),
    )


def default_slots(c: Cluster) -> dict[str, int]:
    """Pool slots consuming the drill queue per worker host (each instance prefetches as
    many messages as it has slots: worker_prefetch_multiplier is 1)."""
    slots: dict[str, int] = {}
    for host in c.worker_hosts:
        listing = c.lab.ssh(host, "ls /etc/celery-ha/")
        total = 0
        for name in listing.split():
            if name.startswith("worker-") and name.endswith(".env"):
                env = parse_env(c.lab.ssh(host, f"cat /etc/celery-ha/{name}"), f"{host}:{name}")
                if c.default_queue in env.get("CELERY_HA_WORKER_QUEUES", "").split(","):
                    total += int(env.get("CELERY_HA_WORKER_CONCURRENCY", "1"))
        slots[host] = total
    return slots


def worker_nodes(c: Cluster) -> list[str]:
    names = []
    for host in c.worker_hosts:
        for entry in c.lab.ssh(host, "ls /etc/celery-ha/").split():
            if entry.startswith("worker-") and entry.endswith(".env"):
                names.append(f"{entry[len('worker-') : -len('.env')]}@{host}")
    return sorted(names)


def healthy(c: Cluster) -> str:
    restore_lab(c)
    return wait_healthy(c, worker_nodes(c))


def publish(c: Cluster, ledger: Ledger, count: int, sleep_s: float) -> list[str]:
    send = c.sender(ledger, sleep_s=sleep_s)
    ids = []
    for seq in range(count):
        ledger_id = ledger.ledger_id(seq)
        send(ledger_id)
        ledger.mark_published(ledger_id)
        ids.append(ledger_id)
    return ids


def lines_by_id(ledger: Ledger, kind: str) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {}
    for e in sorted(ledger.executions(kind), key=lambda e: e.ts):
        out.setdefault(e.ledger_id, []).append(e)
    return out


def beat_hosts(c: Cluster) -> list[str]:
    return c.lab.group("celery_beat")


def lock_holders(lab: Lab, hosts: list[str]) -> dict[str, bool]:
    """Per beat host: has its running beat process logged that it took redbeat's lock?
    (A crashed host answers nothing and holds nothing.)"""
    holders = {}
    for host in hosts:
        out = lab.ssh(
            host,
            'pid=$(systemctl show -p MainPID --value celery-beat); [ "$pid" != 0 ] && '
            "journalctl --no-pager -o cat _PID=$pid | grep -c 'beat: Acquired lock' || true",
            check=False,
        )
        lines = out.strip().splitlines()
        holders[host] = bool(lines) and lines[-1].isdigit() and int(lines[-1]) > 0
    return holders


def one_holder(c: Cluster, timeout: float = 120) -> str:
    hosts = beat_hosts(c)

    def check() -> str | None:
        holders = [h for h, held in lock_holders(c.lab, hosts).items() if held]
        return holders[0] if len(holders) == 1 else None

    return str(wait_until(check, timeout, interval=2, what="exactly one beat holding the lock"))


def lock_taken_at(lab: Lab, host: str) -> float | None:
    """Wall time at which host's running beat logged that it took the lock (hosts log UTC)."""
    out = lab.ssh(
        host,
        "pid=$(systemctl show -p MainPID --value celery-beat); "
        "journalctl --no-pager -o cat _PID=$pid | grep 'beat: Acquired lock' | tail -n 1",
        check=False,
    )
    match = re.match(r"\[(\d{4}-\d\d-\d\d \d\d:\d\d:\d\d),(\d{3})", out.strip())
    if not match:
        return None
    stamp = datetime.strptime(match.group(1), "%Y-%m-%d %H:%M:%S").replace(tzinfo=UTC)
    return stamp.timestamp() + int(match.group(2)) / 1000


def restart_beats(c: Cluster, active: str | None) -> None:
    """Standbys first, the active one last: the lock changes hands once, cleanly."""
    for host in sorted(beat_hosts(c), key=lambda h: h == active):
        c.lab.ssh(host, "systemctl restart celery-beat")


def set_drill_beat(c: Cluster, run_id: str | None) -> None:
    """Turn the periodic drill entry on (run_id) or off (None) on every beat host."""
    active = next((h for h, held in lock_holders(c.lab, beat_hosts(c)).items() if held), None)
    for host in beat_hosts(c):
        if run_id:
            body = (
                "[Service]\\n"
                f"Environment=CELERY_HA_DRILL_BEAT_EVERY={BEAT_EVERY_S:g}\\n"
                f"Environment=CELERY_HA_DRILL_BEAT_RUN={run_id}\\n"
            )
            command = f"printf '{body}' > {BEAT_DROPIN}"
        else:
            command = f"rm -f {BEAT_DROPIN}"
        c.lab.ssh(host, f"mkdir -p {BEAT_DROPIN.rsplit('/', 1)[0]} && {command}")
        c.lab.ssh(host, "systemctl daemon-reload")
    restart_beats(c, active)


def tick_times(ledger: Ledger, sent: bool = True) -> tuple[list[float], int]:
    """When beat sent each periodic run (from its ledger id; ``sent=False``: when it first
    ran), and how many ran more than once (one message redelivered, not a doubled schedule)."""
    runs = lines_by_id(ledger, "D")
    prefix = len(ledger.run_id) + 1
    times = []
    for ledger_id, execs in runs.items():
        sent_ms = ledger_id[prefix:].split("-", 1)[0]
        times.append(int(sent_ms) / 1000 if sent and sent_ms.isdigit() else execs[0].ts)
    return sorted(times), sum(1 for v in runs.values() if len(v) > 1)


def tick_stats(times: list[float], every: float) -> dict[str, float]:
    """Longest gap, runs missed (gaps of several periods) and doubled (two runs closer than
    half a period) in a sorted series of periodic runs."""
    gaps = [b - a for a, b in pairwise(times)]
    return {
        "runs": len(times),
        "longest_gap_s": round(max(gaps, default=0.0), 2),
        "missed": sum(max(0, round(g / every) - 1) for g in gaps),
        "doubled": sum(1 for g in gaps if g < every / 2),
    }


def wait_ticks(c: Cluster, ledger: Ledger, after: float, count: int, timeout: float) -> float:
    """Wait until ``count`` periodic runs happened after ``after``; the first one's time."""

    def check() -> float | None:
        c.collect(ledger)
        later = [t for t in tick_times(ledger, sent=False)[0] if t > after]
        return later[0] if len(later) >= count else None

    return float(wait_until(check, timeout, interval=2, what=f"{count} periodic runs"))


@pytest.fixture
def drill_beat(drill_cluster: Cluster):
    """The periodic drill entry on for one drill: yields its ledger; off again afterwards."""
    c = drill_cluster
    ledger = Ledger(new_run_id("beat"))
    set_drill_beat(c, ledger.run_id)
    try:
        yield ledger
    finally:
        restore_lab(c)
        set_drill_beat(c, None)


# -- 1. A worker host crashes with a 30 s task on every slot ---------------------------------
def test_worker_host_crash_tasks_run_elsewhere_within_the_bound(
    drill_cluster: Cluster, drill_figures: list[dict[str, Any]]
) -> None:
    c, lab = drill_cluster, drill_cluster.lab
    master = healthy(c)
    bound, _ = redelivery_bound(c)
    slots = default_slots(c)
    # A worker host that is neither the master (no failover in this drill) nor, if possible,
    # a beat host.
    target = sorted(
        (h for h in c.worker_hosts if h != master and slots[h] > 0),
        key=lambda h: h in beat_hosts(c),
    )[0]
    ledger = Ledger(new_run_id("rd-crash"))
    total = sum(slots.values())
    ids = publish(c, ledger, total, TASK_S)

    def all_started() -> bool:
        c.collect(ledger)
        started = lines_by_id(ledger, "S")
        on_target = [i for i, v in started.items() if v[0].host == target]
        return len(started) == total and len(on_target) == slots[target]

    wait_until(all_started, 60, interval=1, what=f"a task on each of {total} slots")
    held = sorted(i for i, v in lines_by_id(ledger, "S").items() if v[0].host == target)
    t_crash = time.time()
    lab.run("crash", target)
    say(f"crashed {target} holding {held} ({slots[target]} slots); bound {bound:g} s")

    def done() -> bool:
        c.collect(ledger, [h for h in c.worker_hosts if h != target])
        return not ledger.pending()

    wait_until(done, bound + 2 * TASK_S + 90, interval=2, what="every task done")
    started, finished = lines_by_id(ledger, "S"), lines_by_id(ledger, "D")
    per_task = {}
    for ledger_id in held:
        again = [e for e in started[ledger_id] if e.host != target]
        end = [e for e in finished.get(ledger_id, []) if e.host != target]
        assert again and end, f"{ledger_id} did not run again on another host"
        per_task[ledger_id] = (round(again[0].ts - t_crash, 1), round(end[0].ts - t_crash, 1))
        say(
            f"{ledger_id}: crash -> running on {again[0].host} {per_task[ledger_id][0]} s, "
            f"-> completed {per_task[ledger_id][1]} s"
        )
    lab.run("start", target, timeout=300)
    c.collect(ledger)
    report = ledger.report()
    say(report.summary())
    healthy(c)
    redelivered = [v[0] for v in per_task.values()]
    drill_figures.append(
        {
            "drill": "12.1 worker host crash, 30 s tasks",
            "host": target,
            "tasks_held": len(held),
            "bound_s": bound,
            "redelivered_s": max(redelivered),
            "completed_s": max(v[1] for v in per_task.values()),
            "lost": len(report.lost),
            "duplicates": len(report.duplicates),
        }
    )
    assert not report.lost, f"lost: {report.lost}"
    # Tasks of the live hosts ran once; only the dead host's ran again (it never acked them).
    live_dups = {i: n for i, n in report.duplicates.items() if i not in held}
    assert not live_dups, f"tasks of live workers ran twice: {live_dups}"
    assert max(redelivered) <= bound + PICKUP_SLACK_S, per_task
    assert len(ids) == total


# -- 2. A live worker's task three times longer than the bound ------------------------------
@pytest.mark.soak
def test_a_live_workers_long_task_runs_once(
    drill_cluster: Cluster, drill_figures: list[dict[str, Any]]
) -> None:
    c = drill_cluster
    healthy(c)
    bound, _ = redelivery_bound(c)
    long_s = 3 * bound
    ledger = Ledger(new_run_id("rd-long"))
    # One per slot: every worker, systemd's and supervisor's, holds one all along.
    total = sum(default_slots(c).values())
    publish(c, ledger, total, long_s)
    t0 = time.time()

    def done() -> bool:
        c.collect(ledger)
        return not ledger.pending()

    wait_until(done, long_s + 120, interval=5, what=f"{total} tasks of {long_s:g} s done")
    starts = Counter(e.ledger_id for e in ledger.executions("S"))
    report = ledger.report()
    say(report.summary() + f"; starts per task: {dict(starts)}")
    drill_figures.append(
        {
            "drill": "12.2 live worker, task 3x the bound",
            "task_s": long_s,
            "tasks": total,
            "took_s": round(time.time() - t0, 1),
            "started_twice": sum(1 for n in starts.values() if n > 1),
            "duplicates": len(report.duplicates),
        }
    )
    assert not report.lost
    assert all(n == 1 for n in starts.values()), f"started more than once: {starts}"
    assert not report.duplicates


# -- 3. The active beat's host crashes --------------------------------------------------------
def test_active_beat_host_crash_standby_takes_over(
    drill_cluster: Cluster, drill_beat: Ledger, drill_figures: list[dict[str, Any]]
) -> None:
    c, lab, ledger = drill_cluster, drill_cluster.lab, drill_beat
    master = healthy(c)
    lock_timeout = float(
        parse_env(lab.ssh(beat_hosts(c)[0], "cat /etc/celery-ha/beat.env"), "beat.env").get(
            "CELERY_HA_BEAT_LOCK_TIMEOUT", "30"
        )
    )
    active = one_holder(c)
    if active == master:
        # This drill is about beat: hand the lock over so that the crash is not a failover.
        # Stopped until the standby holds it, not restarted: a restarted beat can take the lock
        # straight back before the standby's next try (it did once, on a clean clone).
        lab.ssh(active, "systemctl stop celery-beat")
        wait_until(
            lambda: one_holder(c, timeout=5) != active,
            lock_timeout + 60,
            what="the lock handed over",
        )
        lab.ssh(active, "systemctl start celery-beat")
        active = one_holder(c)
    t_warm = time.time()
    wait_ticks(c, ledger, t_warm, 4, 60)
    t_crash = time.time()
    lab.run("crash", active)
    say(f"crashed {active}, the active beat")
    t_resume = wait_ticks(c, ledger, t_crash, 1, lock_timeout + 60)
    wait_ticks(c, ledger, t_resume, 4, 60)
    t_end = time.time()
    taken = lock_taken_at(lab, one_holder(c))
    lab.run("start", active, timeout=300)
    holder = one_holder(c)
    healthy(c)
    c.collect(ledger)
    times, redelivered = tick_times(ledger)
    stats = tick_stats([t for t in times if t_warm - 1 <= t <= t_end], BEAT_EVERY_S)
    # Sent times: the run after the takeover is the first one sent after the crash.
    t_resume = min((t for t in times if t > t_crash), default=t_resume)
    takeover = t_resume - t_crash
    lock_s = (taken - t_crash) if taken else float("nan")
    say(
        f"lock taken by the standby {lock_s:.1f} s after the crash (lock {lock_timeout:g} s), "
        f"first run sent {takeover:.1f} s after the crash, {stats}, holder now {holder}, "
        f"messages run twice {redelivered}"
    )
    drill_figures.append(
        {
            "drill": "12.3 active beat host crash",
            "host": active,
            "every_s": BEAT_EVERY_S,
            "lock_taken_s": round(lock_s, 1),
            "first_run_s": round(takeover, 1),
            **stats,
            "holder_after": holder,
        }
    )
    assert stats["doubled"] == 0, stats
    # Missed only while no beat was active.
    assert stats["missed"] <= takeover / BEAT_EVERY_S + 1, stats
    # The standby becomes active within the lock's timeout plus one poll (max interval, at
    # most the lock / 3). Its first send can take longer while the dead host is the first
    # Sentinel in the list (a connect timeout per new connection; issue 11): printed above.
    assert taken is not None, "no 'Acquired lock' line from the new holder"
    assert lock_s <= lock_timeout + lock_timeout / 3 + 5, lock_s
    assert sum(lock_holders(lab, beat_hosts(c)).values()) == 1


# -- 4. The master crashes while beat and long tasks run -------------------------------------
def test_master_crash_with_beat_and_long_tasks(
    drill_cluster: Cluster, drill_beat: Ledger, drill_figures: list[dict[str, Any]]
) -> None:
    c, lab, ticks = drill_cluster, drill_cluster.lab, drill_beat
    master = healthy(c)
    bound, _ = redelivery_bound(c)
    long_s = 1.5 * bound
    one_holder(c)
    t_warm = time.time()
    wait_ticks(c, ticks, t_warm, 3, 60)
    ledger = Ledger(new_run_id("rd-master"))
    # One per worker host, not one per slot: the periodic runs need free slots to show up.
    total = sum(1 for n in default_slots(c).values() if n > 0)
    publish(c, ledger, total, long_s)

    def all_started() -> bool:
        c.collect(ledger)
        return len(lines_by_id(ledger, "S")) == total

    wait_until(all_started, 60, interval=1, what=f"{total} long tasks started")
    on_master = {i for i, v in lines_by_id(ledger, "S").items() if v[0].host == master}
    t_crash = time.time()
    lab.run("crash", master)
    say(f"crashed {master} (Redis master; {len(on_master)} long task(s) on its workers)")
    survivors = [h for h in c.worker_hosts if h != master]

    def new_master() -> str | None:
        try:
            found = c.master_host(exclude=[master])
        except RuntimeError:
            return None
        return found if found != master else None

    promoted = wait_until(new_master, 180, interval=1, what="a new master")
    t_switch = time.time()
    t_resume = wait_ticks(c, ticks, t_crash, 1, 180)

    def done() -> bool:
        c.collect(ledger, survivors)
        return not ledger.pending()

    wait_until(done, 2 * bound + 2 * long_s + 120, interval=3, what="every long task done")
    lab.run("start", master, timeout=300)
    holder = one_holder(c)
    healthy(c)
    c.collect(ledger)
    c.collect(ticks)
    starts = Counter(e.ledger_id for e in ledger.executions("S"))
    live_twice = {i: n for i, n in starts.items() if i not in on_master and n > 1}
    times, _ = tick_times(ticks)
    stats = tick_stats([t for t in times if t >= t_warm - 1], BEAT_EVERY_S)
    ran, _ = tick_times(ticks, sent=False)
    stats["longest_gap_ran_s"] = tick_stats([t for t in ran if t >= t_warm - 1], BEAT_EVERY_S)[
        "longest_gap_s"
    ]
    report = ledger.report()
    say(
        f"{report.summary()}\nnew master {promoted} after {t_switch - t_crash:.1f} s; periodic "
        f"runs back after {t_resume - t_crash:.1f} s; {stats}; lock holder {holder}"
    )
    drill_figures.append(
        {
            "drill": "12.4 master crash, beat + long tasks",
            "master": master,
            "switch_s": round(t_switch - t_crash, 1),
            "beat_back_s": round(t_resume - t_crash, 1),
            **stats,
            "live_tasks_redelivered": len(live_twice),
            "dead_host_tasks": len(on_master),
            "lost": len(report.lost),
        }
    )
    assert sum(lock_holders(lab, beat_hosts(c)).values()) == 1
    assert stats["doubled"] == 0, stats
    # A periodic run waits for the broker, never for a long task on a busy pool process: a
    # free slot on a survivor runs it (celery 5.6 handed it to the busy process after the
    # reconnect, and nothing ran for 91 s).
    assert stats["longest_gap_ran_s"] <= stats["longest_gap_s"] + PICKUP_SLACK_S, stats
    assert not live_twice, f"live workers' tasks started twice: {live_twice}"
    assert not report.lost, report.lost
