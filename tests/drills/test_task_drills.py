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

import shutil
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
from support.cluster import REPO, Cluster, Lab, recap_total
from support.drillkit import PLAYBOOK_ARGS, RATE, Load, record, say, wait_healthy
from support.ledger import wait_until


def proc_ppid(lab: Lab, host: str, pid: int) -> int:
    return int(lab.ssh(host, f"ps -o ppid= -p {pid}").strip())


def proc_args(lab: Lab, host: str, pid: int) -> str:
    return lab.ssh(host, f"ps -o args= -p {pid}", check=False).strip()


def pids_of_worker(load: Load, worker: str) -> set[int]:
    return {e.pid for e in load.ledger.executions("D") if e.worker == worker}


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
            lab.ssh(first_down, f"systemctl stop {c.flavor.sentinel_unit}")
            stopped.append(first_down)
            t1 = time.time()
            say(f"one Sentinel down ({first_down})")
            load.wait_done_after(t1, count=int(RATE * 8), what="tasks flowing, one Sentinel down")
            assert c.master_host(exclude=stopped) == master, "a failover happened"

            lab.ssh(second_down, f"systemctl stop {c.flavor.sentinel_unit}")
            stopped.append(second_down)
            t2 = time.time()
            say(f"two Sentinels down ({first_down}, {second_down}); {survivor} alone")
            load.wait_done_after(t2, count=int(RATE * 8), what="tasks flowing, two down")
            flowing_2down = len(load.done_after(t2))

            lab.ssh(master, f"systemctl stop {c.flavor.server_unit}")
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
                lab.ssh(host, f"systemctl start {c.flavor.sentinel_unit}")
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
            lab.ssh(master, f"systemctl start {c.flavor.server_unit}")
            wait_until(
                lambda: c.role_of(master) == "replica:connected",
                180,
                what=f"{master} to rejoin as a replica",
            )
            wait_healthy(c, workers)
            report = load.finish(gap_from=t3)
    finally:
        for host in stopped:
            lab.ssh(host, f"systemctl start {c.flavor.sentinel_unit}", check=False)
        lab.ssh(master, f"systemctl start {c.flavor.server_unit}", check=False)
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
    figures["changed"] = recap_total(recap, "changed")
    drill_figures.append(figures)
    assert rc == 0, tail
    assert recap, f"no PLAY RECAP in the output:\n{tail}"
    changed = {h: r for h, r in recap.items() if r.get("changed") or r.get("failed")}
    assert not changed, f"site.yml changed something after the drills: {changed}\n{tail}"
    assert c.master_host() == master, "site.yml moved the master"


if __name__ == "__main__":  # pragma: no cover - convenience: run one drill by name
    sys.exit(subprocess.call([sys.executable, "-m", "pytest", "-s", __file__, *sys.argv[1:]]))
