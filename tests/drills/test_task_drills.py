"""Task-ledger fault drills: break one part of the deployed cluster under a steady load and
prove, task by task, that nothing whose publish succeeded is lost.

Every drill: a producer on the controller publishes ``drills.ledger_record`` at a steady
rate; each accepted publish gets a unique ledger id; the fault is injected; the cluster is
brought back; then every id must have run (the worker hosts' ledger files say so), or be
parked in kombu's ``unacked`` hash, which Redis redelivers after ``visibility_timeout``
(a worker that died while holding it cannot hand it back). Duplicates are counted and
explained: acks_late means at-least-once delivery.

Waits poll with generous bounds; no assertion is about how long something took (the figures
are printed instead). The drills run in file order and each starts by waiting for a healthy
cluster, so one drill's aftermath never leaks into the next. The Redis-level drills are in
test_redis_failover.py; these are about tasks.
"""

from __future__ import annotations

import os
import shlex
import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from cluster import REPO, Cluster, Lab
from ledger import Ledger, Producer, Report, longest_gap, new_run_id, wait_until

RATE = float(os.environ.get("DRILLS_RATE", "20"))
PLAYBOOK_ARGS: list[str] = shlex.split(os.environ.get("DRILLS_PLAYBOOK_ARGS", ""))
SLOW_TASK_S = 8.0

PARKED_NOTE = (
    "parked ids sit in the broker's unacked hash: their worker died holding them, so Redis "
    "redelivers them after visibility_timeout; they are not lost"
)
DUP_NOTE = (
    "a duplicate is a task that ran, then was delivered again because its ack never reached "
    "the broker (acks_late: at-least-once delivery)"
)


def say(msg: str) -> None:
    print(f"[drills {time.strftime('%T')}] {msg}", flush=True)


class Load:
    """A ledger, its producer, and the waits the drills need around it."""

    def __init__(self, cluster: Cluster, name: str, rate: float = RATE) -> None:
        self.c = cluster
        self.ledger = Ledger(new_run_id(name))
        self.producer = Producer(self.ledger, cluster.sender(self.ledger), rate=rate)
        self.t_start = time.time()
        self._extra = 0

    def __enter__(self) -> Load:
        self.producer.start()
        self.wait_done_after(self.t_start, count=10, what="the load to flow")
        return self

    def __exit__(self, *exc: object) -> None:
        self.producer.stop()

    def done_after(self, t: float, worker: str | None = None) -> list[float]:
        return sorted(
            e.ts
            for e in self.ledger.executions("D")
            if e.ts > t and (worker is None or e.worker == worker)
        )

    def wait_done_after(
        self, t: float, count: int = 1, timeout: float = 180, what: str = "completions"
    ) -> float:
        """Poll until ``count`` tasks completed after ``t``; return the first such time."""

        def check() -> float | None:
            self.c.collect(self.ledger)
            done = self.done_after(t)
            return done[0] if len(done) >= count else None

        return float(wait_until(check, timeout, interval=1.0, what=what))  # type: ignore[arg-type]

    def publish_slow(self, sleep_s: float = SLOW_TASK_S) -> str:
        ledger_id = f"{self.ledger.run_id}-slow{self._extra}"
        self._extra += 1
        self.c.sender(self.ledger, sleep_s=sleep_s)(ledger_id)
        self.ledger.mark_published(ledger_id)
        return ledger_id

    def wait_line(self, ledger_id: str, kind: str, timeout: float = 120, after: float = 0.0):
        def check():
            self.c.collect(self.ledger)
            hits = [
                e for e in self.ledger.executions(kind) if e.ledger_id == ledger_id and e.ts > after
            ]
            return hits[0] if hits else None

        return wait_until(check, timeout, interval=0.5, what=f"{kind} line of {ledger_id}")

    def finish(self, drain_timeout: float = 240, gap_from: float | None = None) -> Report:
        self.producer.stop()
        t_stop = time.time()
        parked = self.c.wait_drained(self.ledger, timeout=drain_timeout)
        try:
            failed = self.c.failed_count(self.ledger)
        except Exception as exc:  # the result db unreachable is a finding, not a crash
            say(f"could not read task states: {exc}")
            failed = -1
        window = (gap_from, t_stop) if gap_from is not None else None
        report = self.ledger.report(parked=parked, failed=failed, gap_window=window)
        if window is not None:
            # Tells a stalled producer apart from stalled workers when the gap is long.
            pub_gap = longest_gap(self.ledger.published.values(), *window)
            report.extra["longest gap with no publish accepted"] = f"{pub_gap[0]:.2f} s"
        if self.producer.last_error:
            report.extra["last publish error"] = self.producer.last_error
        return report


def wait_healthy(c: Cluster, workers: list[str], timeout: float = 240) -> str:
    """One master that every Sentinel names, every replica linked, every worker answering."""

    def check() -> str | None:
        views = c.sentinel_views()
        masters = set(views.values())
        if len(masters) != 1 or None in masters:
            return None
        master = c.lab.host_of(next(iter(masters)))  # type: ignore[arg-type]
        for host in c.redis_hosts:
            want = "master" if host == master else "replica:connected"
            if c.role_of(host) != want:
                return None
        if not set(workers) <= set(c.ping_workers()):
            return None
        return master

    return str(wait_until(check, timeout, interval=2.0, what="a healthy cluster"))


def record(figures: list[dict[str, Any]], drill: str, report: Report, **extra: Any) -> None:
    say(report.summary())
    if report.duplicates:
        say(DUP_NOTE)
    if report.parked:
        say(PARKED_NOTE)
    row: dict[str, Any] = {
        "drill": drill,
        "published": report.published,
        "publish_failures": report.publish_failures,
        "ran": report.ran,
        "lost": len(report.lost),
        "duplicates": len(report.duplicates),
        "parked": len(report.parked),
        "failed": report.failed,
    }
    if report.gap is not None:
        row["gap_s"] = round(report.gap[0], 2)
    if "longest gap with no publish accepted" in report.extra:
        row["publish_gap_s"] = report.extra["longest gap with no publish accepted"]
    row.update(extra)
    figures.append(row)


def proc_ppid(lab: Lab, host: str, pid: int) -> int:
    return int(lab.ssh(host, f"ps -o ppid= -p {pid}").strip())


def proc_args(lab: Lab, host: str, pid: int) -> str:
    return lab.ssh(host, f"ps -o args= -p {pid}", check=False).strip()


def pids_of_worker(load: Load, worker: str) -> set[int]:
    return {e.pid for e in load.ledger.executions("D") if e.worker == worker}


def restore_lab(c: Cluster) -> list[str]:
    """Boot stopped cluster hosts and heal cut networks that an earlier failed test left.

    Every drill needs the whole cluster to start from; a test that died halfway (its own
    cleanup skipped) must not turn all the drills after it into failures of its own.
    """
    lab = c.lab
    members = set(c.redis_hosts) | set(c.sentinel_hosts) | set(c.worker_hosts)
    actions: list[str] = []
    for line in lab.run("status", check=False).stdout.splitlines():
        parts = line.split()
        if len(parts) < 4 or parts[0] not in members:
            continue
        host, state, net = parts[0], parts[2], parts[3]
        if net != "connected":
            lab.run("heal", host)
            actions.append(f"healed {host} ({net})")
        if state != "running":
            lab.run("start", host, timeout=300)
            actions.append(f"started {host} ({state})")
    return actions


def expected_workers(c: Cluster) -> list[str]:
    """<instance>@<host> for every worker env file the deployment wrote."""
    names: list[str] = []
    for host in c.worker_hosts:
        out = wait_until(
            lambda h=host: c.lab.ssh(h, "ls /etc/celery-ha/"), 120, what=f"ssh to {host}"
        )
        for entry in str(out).split():
            if entry.startswith("worker-") and entry.endswith(".env"):
                names.append(f"{entry[len('worker-') : -len('.env')]}@{host}")
    return sorted(names)


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
# --------------------------------------------------------------------------------------
def test_drill1_worker_process_killed_mid_task(
    drill_cluster: Cluster, workers: list[str], drill_figures: list[dict[str, Any]]
) -> None:
    c, lab = drill_cluster, drill_cluster.lab
    wait_healthy(c, workers)
    with Load(c, "d1-kill") as load:
        # a) The pool process running a task dies: the worker's main process replaces it and,
        #    with task_reject_on_worker_lost, the message goes straight back to the queue.
        slow = load.publish_slow()
        start = load.wait_line(slow, "S")
        say(f"{slow} running in pid {start.pid} of {start.worker} on {start.host}: SIGKILL")
        t_kill = time.time()
        lab.ssh(start.host, f"kill -KILL {start.pid}")
        redone = load.wait_line(slow, "D", timeout=180, after=t_kill)
        starts = [
            e for e in load.ledger.executions("S") if e.ledger_id == slow and e.ts >= start.ts
        ]
        say(
            f"{slow} delivered again and completed by {redone.worker} pid {redone.pid} "
            f"{redone.ts - t_kill:.1f} s after the kill ({len(starts)} starts)"
        )
        assert len(starts) >= 2, "the killed task was not started again"
        assert (redone.host, redone.pid) != (start.host, start.pid)

        # b) The worker's main process dies mid-task: its unit (systemd Restart=always) or
        #    supervisor program (autorestart) must bring it back by itself.
        restarted: list[str] = []
        slow2 = load.publish_slow()
        start2 = load.wait_line(slow2, "S")
        targets = [(start2.host, start2.worker, start2.pid)]
        # Cover the other process manager too: node hosts in supervisor mode run
        # supervisord, the rest systemd; pick a worker on a host of the other kind.
        managers = {h: host_manager(lab, h) for h in c.worker_hosts}
        other = [
            e
            for e in load.ledger.executions("D")
            if managers.get(e.host) != managers.get(start2.host)
        ]
        if other:
            e = other[-1]
            targets.append((e.host, e.worker, e.pid))
        for host, worker, child in targets:
            main = proc_ppid(lab, host, child)
            args = proc_args(lab, host, main)
            assert "celery" in args, f"parent of {child} on {host} is not a celery worker: {args}"
            before = pids_of_worker(load, worker)
            say(f"SIGKILL main process {main} of {worker} on {host} ({managers[host]}): {args}")
            t_main = time.time()
            lab.ssh(host, f"kill -KILL {main}")

            def back(worker: str = worker, before: set[int] = before, t: float = t_main) -> bool:
                c.collect(load.ledger)
                return any(
                    e.worker == worker and e.ts > t and e.pid not in before
                    for e in load.ledger.executions("D")
                )

            wait_until(back, 180, what=f"{worker} restarted and completing tasks again")
            restarted.append(f"{worker}({managers[host]})")
            say(f"{worker} is back (new processes completing tasks) {time.time() - t_main:.1f} s")
        wait_until(
            lambda: set(workers) <= set(c.ping_workers()), 120, what="every worker answering ping"
        )
        report = load.finish()
    slow2_state = "ran" if slow2 in load.ledger.done_counts() else "parked"
    if slow2 in report.lost:
        slow2_state = "lost"
    say(f"the task in flight when its worker's main process died: {slow2_state}")
    record(
        drill_figures,
        "1 worker SIGKILL",
        report,
        pool_child_redelivered=True,
        main_killed_and_restarted=",".join(restarted),
        in_flight_at_main_kill=slow2_state,
    )
    assert not report.lost, f"lost tasks: {report.lost[:20]}"


def host_manager(lab: Lab, host: str) -> str:
    out = lab.ssh(
        host,
        "systemctl is-active --quiet supervisor && supervisorctl status 2>/dev/null "
        "| grep -q celery && echo supervisor || echo systemd",
        check=False,
    )
    return out.strip() or "systemd"


# --------------------------------------------------------------------------------------
# 2. The Redis master host crashes
# --------------------------------------------------------------------------------------
def test_drill2_master_host_crash(
    drill_cluster: Cluster, workers: list[str], drill_figures: list[dict[str, Any]]
) -> None:
    c, lab = drill_cluster, drill_cluster.lab
    master = wait_healthy(c, workers)
    others = [h for h in c.sentinel_hosts if h != master]
    old_addr = c.addresses[master]
    with Load(c, "d2-crash") as load:
        t_crash = time.time()
        lab.run("crash", master)
        say(f"crashed {master} (Redis master, {c.worker_hosts.count(master)} worker host)")

        def switched() -> str | None:
            views = c.sentinel_views(others)
            new = {v for v in views.values() if v}
            return next(iter(new)) if len(new) == 1 and old_addr not in new else None

        new_addr = wait_until(switched, 120, interval=0.2, what="Sentinels to elect a new master")
        t_switch = time.time()
        new_master = lab.host_of(str(new_addr))
        first = load.wait_done_after(t_switch, what="a task completed after the failover")
        say(
            f"+switch-master seen after {t_switch - t_crash:.1f} s -> {new_master}; first task "
            f"completed on the new master {first - t_crash:.1f} s after the crash"
        )
        load.wait_done_after(time.time(), count=20, what="the load to flow on the new master")
        lab.run("start", master, timeout=300)
        wait_until(
            lambda: c.role_of(master) == "replica:connected",
            180,
            what=f"{master} to rejoin as a replica",
        )
        say(f"{master} is back as a replica of {new_master}")
        wait_healthy(c, workers)
        report = load.finish(gap_from=t_crash - 1)
    record(
        drill_figures,
        "2 master crash",
        report,
        switch_s=round(t_switch - t_crash, 2),
        first_task_s=round(first - t_crash, 2),
    )
    assert not report.lost, f"lost tasks: {report.lost[:20]}"


# --------------------------------------------------------------------------------------
# 3. The master is partitioned from everyone
# --------------------------------------------------------------------------------------
def test_drill3_master_partitioned(
    drill_cluster: Cluster, workers: list[str], drill_figures: list[dict[str, Any]]
) -> None:
    c, lab = drill_cluster, drill_cluster.lab
    master = wait_healthy(c, workers)
    others = [h for h in c.sentinel_hosts if h != master]
    old_addr = c.addresses[master]
    with Load(c, "d3-part") as load:
        t_cut = time.time()
        lab.run("partition", master)
        say(f"partitioned {master} (the Redis master) from everyone")
        try:

            def switched() -> str | None:
                views = c.sentinel_views(others)
                new = {v for v in views.values() if v}
                return next(iter(new)) if len(new) == 1 and old_addr not in new else None

            new_addr = wait_until(switched, 120, interval=0.5, what="a new master")
            t_switch = time.time()
            new_master = lab.host_of(str(new_addr))
            say(f"new master {new_master} after {t_switch - t_cut:.1f} s")
            # The old master, alone, must stop taking writes (min-replicas-to-write): asked
            # from inside its own network namespace since nobody else can reach it now.
            refusal = wait_until(
                lambda: _refused(c.write_probe_in_netns(master)),
                90,
                interval=1.0,
                what=f"{master} to refuse writes",
            )
            t_refuse = time.time()
            say(f"old master refuses writes {t_refuse - t_cut:.1f} s after the cut: {refusal}")
            load.wait_done_after(t_switch, count=20, what="tasks flowing on the new master")
        finally:
            lab.run("heal", master)
        t_heal = time.time()
        wait_until(
            lambda: c.role_of(master) == "replica:connected",
            180,
            what=f"{master} to rejoin as a replica",
        )
        say(f"{master} rejoined as a replica {time.time() - t_heal:.1f} s after heal")
        wait_healthy(c, workers)
        report = load.finish(gap_from=t_cut)
    record(
        drill_figures,
        "3 master partition",
        report,
        switch_s=round(t_switch - t_cut, 2),
        old_master_refuses_writes_s=round(t_refuse - t_cut, 2),
    )
    # Lost is reported, not asserted: writes the old master accepted in the moments before it
    # noticed it was alone are discarded when it rejoins as a replica.
    if report.lost:
        say(
            f"{len(report.lost)} task(s) lost: published to the old master after the cut and "
            "before min-replicas-max-lag made it refuse writes"
        )
    if report.failed:
        say(
            f"{report.failed} task(s) ran (the ledger has them) but are marked FAILURE: workers "
            "on the partitioned host ran them from the old master, then writing the result "
            "there was refused (NOREPLICAS), which celery records as the task's failure"
        )


def _refused(probe: str) -> str | None:
    return probe if probe != "ok" and ("NOREPLICAS" in probe or "READONLY" in probe) else None


# --------------------------------------------------------------------------------------
# 4. Sentinels down
# --------------------------------------------------------------------------------------
def test_drill4_sentinels_down(
    drill_cluster: Cluster, workers: list[str], drill_figures: list[dict[str, Any]]
) -> None:
    c, lab = drill_cluster, drill_cluster.lab
    master = wait_healthy(c, workers)
    replicas = [h for h in c.sentinel_hosts if h != master]
    # First the Sentinel beside the master, then one beside a replica: the survivor is on a
    # replica host, so what it does alone is what a minority Sentinel would do.
    first_down, second_down = master, replicas[0]
    survivor = replicas[1]
    stopped: list[str] = []
    try:
        with Load(c, "d4-sent") as load:
            lab.ssh(first_down, "systemctl stop redis-sentinel")
            stopped.append(first_down)
            t1 = time.time()
            say(f"one Sentinel down ({first_down})")
            load.wait_done_after(t1, count=int(RATE * 8), what="tasks flowing, one Sentinel down")
            assert c.master_host(exclude=stopped) == master, "a failover happened"

            lab.ssh(second_down, "systemctl stop redis-sentinel")
            stopped.append(second_down)
            t2 = time.time()
            say(f"two Sentinels down ({first_down}, {second_down}); {survivor} alone")
            load.wait_done_after(t2, count=int(RATE * 8), what="tasks flowing, two down")
            flowing_2down = len(load.done_after(t2))

            lab.ssh(master, "systemctl stop redis-server")
            t3 = time.time()
            say(f"master Redis on {master} stopped with only {survivor}'s Sentinel up")
            # Wait well past down-after-milliseconds + failover time: nothing may change.
            time.sleep(25)
            c.collect(load.ledger)
            views = c.sentinel_views([survivor])
            roles = {h: c.role_of(h) for h in replicas}
            stalled = len(load.done_after(t3 + 10))
            say(
                f"25 s later: {survivor} still names {views[survivor]}; replicas {roles}; "
                f"tasks completed from 10 s after the stop: {stalled}"
            )
            assert views[survivor] == c.addresses[master], "a lone Sentinel failed over"
            assert all(r and r.startswith("replica") for r in roles.values()), roles
            assert stalled == 0, "tasks completed with the master down and no failover"

            for host in stopped:
                lab.ssh(host, "systemctl start redis-sentinel")
            t4 = time.time()
            stopped.clear()
            say("Sentinels back: a majority can now fail over")

            def new_master() -> str | None:
                views = c.sentinel_views(replicas)
                new = {v for v in views.values() if v}
                return next(iter(new)) if len(new) == 1 and c.addresses[master] not in new else None

            wait_until(new_master, 120, interval=0.5, what="a failover once Sentinels returned")
            t5 = time.time()
            first = load.wait_done_after(t5, what="tasks flowing after the failover")
            say(
                f"failover {t5 - t4:.1f} s after the Sentinels returned; flow resumed "
                f"{first - t3:.1f} s after the master stopped"
            )
            lab.ssh(master, "systemctl start redis-server")
            wait_until(
                lambda: c.role_of(master) == "replica:connected",
                180,
                what=f"{master} to rejoin as a replica",
            )
            wait_healthy(c, workers)
            report = load.finish(gap_from=t3)
    finally:
        for host in stopped:
            lab.ssh(host, "systemctl start redis-sentinel", check=False)
        lab.ssh(master, "systemctl start redis-server", check=False)
    record(
        drill_figures,
        "4 sentinels down",
        report,
        flowing_with_2_down=flowing_2down,
        stalled_completions=stalled,
        resumed_after_master_stop_s=round(first - t3, 2),
    )
    assert not report.lost, f"lost tasks: {report.lost[:20]}"


# --------------------------------------------------------------------------------------
# 6. A worker host rebooted
# --------------------------------------------------------------------------------------
def test_drill6_worker_host_reboot(
    drill_cluster: Cluster, workers: list[str], drill_figures: list[dict[str, Any]]
) -> None:
    c, lab = drill_cluster, drill_cluster.lab
    master = wait_healthy(c, workers)
    # Prefer a supervisor host (its programs must come back with supervisord) that is not the
    # master, so that this drill is about workers, not about a failover.
    candidates = [h for h in c.worker_hosts if h != master]
    managers = {h: host_manager(lab, h) for h in candidates}
    host = sorted(candidates, key=lambda h: managers[h] != "supervisor")[0]
    host_workers = [w for w in workers if w.endswith("@" + host)]
    with Load(c, "d6-boot") as load:
        t_stop = time.time()
        lab.run("stop", host, timeout=300)
        say(f"{host} ({managers[host]}) powered off; its workers: {host_workers}")
        load.wait_done_after(time.time(), count=20, what="tasks flowing on the other hosts")
        lab.run("start", host, timeout=300)
        t_start = time.time()
        say(f"{host} booted")
        wait_until(
            lambda: set(host_workers) <= set(c.ping_workers()),
            240,
            interval=2,
            what=f"{host_workers} answering ping after the reboot",
        )

        def completing() -> bool:
            c.collect(load.ledger)
            return all(load.done_after(t_start, worker=w) for w in host_workers)

        # Only the workers consuming the drill's queue can show completions.
        drill_workers = [w for w in host_workers if not w.startswith("reports@")]
        if drill_workers:
            wait_until(completing, 240, what=f"{host}'s workers completing tasks again")
        t_back = time.time()
        say(f"{host}'s workers back by themselves {t_back - t_start:.1f} s after boot")
        wait_healthy(c, workers)
        report = load.finish()
    record(
        drill_figures,
        "6 worker host reboot",
        report,
        host=f"{host}({managers[host]})",
        down_s=round(t_start - t_stop, 1),
        back_after_boot_s=round(t_back - t_start, 1),
    )
    assert not report.lost, f"lost tasks: {report.lost[:20]}"


# --------------------------------------------------------------------------------------
# 5. A new app version rolled out under load
# --------------------------------------------------------------------------------------
def _app_copy_with_version(dest: Path, version: str) -> Path:
    src = REPO / "app"
    shutil.copytree(
        src,
        dest,
        ignore=shutil.ignore_patterns("build", "dist", "*.egg-info", "__pycache__"),
    )
    pyproject = dest / "pyproject.toml"
    text = pyproject.read_text()
    lines = [
        f'version = "{version}"' if line.startswith("version = ") else line
        for line in text.splitlines()
    ]
    pyproject.write_text("\n".join(lines) + "\n")
    return dest


def _installed_version(lab: Lab, host: str) -> str:
    out = lab.ssh(
        host,
        "/opt/celery-ha/venv/bin/python -c "
        "\"import importlib.metadata as m; print(m.version('celery-ha-app'))\"",
        check=False,
    )
    return out.strip()


# The app drill 5 rolled out: drill 7 re-runs site.yml with it, so that a converged cluster
# is what it checks, without a third run to roll the version back.
_deployed_app_args: list[str] = []


def test_drill5_rollout_under_load(
    drill_cluster: Cluster,
    workers: list[str],
    drill_figures: list[dict[str, Any]],
    tmp_path_factory: pytest.TempPathFactory,
) -> None:
    c, lab = drill_cluster, drill_cluster.lab
    wait_healthy(c, workers)
    before = {h: _installed_version(lab, h) for h in c.worker_hosts}
    # A new local version of the release that runs (a former drill's may run: no rollback).
    release = (before[c.worker_hosts[0]] or "1.0.0").split("+")[0]
    new_version = f"{release}+drill{int(time.time())}"
    app_dir = _app_copy_with_version(tmp_path_factory.mktemp("drill5") / "app", new_version)
    app_args = ["-e", f"celery_app_path={app_dir}"]
    with Load(c, "d5-roll") as load:
        t0 = time.time()
        # The whole playbook: Flower runs the app too and follows it in its own play.
        rc, _recap, tail = lab.playbook(*PLAYBOOK_ARGS, *app_args)
        t_up = time.time()
        assert rc == 0, f"rollout failed:\n{tail}"
        _deployed_app_args[:] = app_args
        after = {h: _installed_version(lab, h) for h in c.worker_hosts}
        say(f"rolled out {new_version} in {t_up - t0:.0f} s: {after}")
        assert all(v == new_version for v in after.values()), after
        load.wait_done_after(t_up, count=20, what="tasks flowing on the new version")
        wait_healthy(c, workers)
        report = load.finish()
    record(drill_figures, "5 rollout", report, rollout_s=round(t_up - t0, 1))
    assert not report.lost, f"lost tasks: {report.lost[:20]}"
    assert report.failed == 0, f"{report.failed} task(s) failed during the rollout"


# --------------------------------------------------------------------------------------
# 7. After all drills, site.yml changes nothing
# --------------------------------------------------------------------------------------
def test_drill7_site_yml_after_drills_changes_nothing(
    drill_cluster: Cluster, workers: list[str], drill_figures: list[dict[str, Any]]
) -> None:
    c, lab = drill_cluster, drill_cluster.lab
    master = wait_healthy(c, workers)
    t0 = time.time()
    # The whole playbook, with the app version that is deployed now (drill 5's, if it ran).
    rc, recap, tail = lab.playbook(*PLAYBOOK_ARGS, *_deployed_app_args)
    took = time.time() - t0
    say(f"site.yml after the drills: rc={rc} in {took:.0f} s, recap {recap}")
    figures = {"drill": "7 site.yml again", "rc": rc, "seconds": round(took, 1)}
    figures["changed"] = sum(r.get("changed", 0) for r in recap.values())
    drill_figures.append(figures)
    assert rc == 0, tail
    assert recap, f"no PLAY RECAP in the output:\n{tail}"
    changed = {h: r for h, r in recap.items() if r.get("changed") or r.get("failed")}
    assert not changed, f"site.yml changed something after the drills: {changed}\n{tail}"
    assert c.master_host() == master, "site.yml moved the master"


if __name__ == "__main__":  # pragma: no cover - convenience: run one drill by name
    sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-s", __file__, *sys.argv[1:]]))
