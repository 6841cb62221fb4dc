#!/usr/bin/env python3
"""celery-ha benchmarks (`make bench`; not part of CI). Prints a table, writes JSON.

Every figure is the median of --runs runs (default 3), and the things compared are measured
side by side in the same invocation on the same lab:

  bringup   lab up from the cached base, and from nothing (base cache removed; skip with
            --skip-from-nothing); destroys and recreates the lab at LAB_DIR
  deploy    cold site.yml on fresh lab hosts, then a re-run (must report changed=0)
  rerun     re-runs of site.yml on the converged lab (changed=0), their task starts and
            host results (ok, skipped), against Ansible's own floor on this controller:
            playbooks of trivial tasks (a stat) on one host and on the three Redis hosts, and
            skipped ones on the three, give what a task start and a host's result cost with
            nothing of ours in them, and so the least any playbook with the re-run's counts
            could take here; and a loop of the same stat, what a host result costs as a
            loop item instead
  throughput  no-op tasks/s through the deployed cluster (production settings) vs a bare
            `celery worker` with default settings on a throwaway plain Redis on one lab host,
            vs that Redis' ceiling (redis-benchmark LPUSH/RPOP); plus the ratios, and each
            side's broker commands per task (INFO commandstats around one more drain)
  costs     the cost table: from the deployed defaults, one setting changed at a time on
            every worker and Flower (events, result storage, prefetch, acks_late, compression,
            log level, pool and concurrency, the publish's WAIT), each as tasks/s and a ratio
            to the bare worker run with as many pool processes, plus CPU seconds per 1000
            tasks by component (workers, master, replicas, Sentinels, Flower, exporter, beat,
            journald) from each process's own accounting (/proc/PID/stat); the settings go
            back to the defaults at the end. The defaults run again after every two
            variants, each time right after the bare worker (the machine runs faster after a
            rest than under sustained load), and each variant is a ratio to the bare and the
            defaults runs around it. Also the bare worker over mutual TLS (the
            price of TLS alone) and the idle cluster's CPU per minute (heartbeats, gossip,
            Sentinel, Flower's polls)
  pools     the threads pool against prefork with as many slots, for tasks that wait 0, 20
            and 200 ms (a sleep, which holds no GIL): tasks/s and the most the slots allow
  connections  the connections each client process holds on the master, each replica and
            each Sentinel (CLIENT LIST on the servers, matched to the process that owns each
            source port on its host): the per-unit costs behind README's Scaling section
  failover  --crashes (default 20) master host crashes in a row under a steady load, one in
            four while the master is also the first Sentinel: the distribution of Sentinel's
            election (earliest +switch-master), how many needed a second round, the longest
            gap with no task completing and the longest publish stall

Sections run in that order; --only picks some. Without bringup/deploy the lab at LAB_DIR
must already be deployed. Traffic goes only to the lab's addresses.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import celery_ha_settings
import redis
from support.cluster import Cluster, Lab, parse_recap, recap_total
from support.drillkit import (
    Load,
    earliest_switch,
    expected_workers,
    make_master,
    wait_healthy,
    wait_new_master,
)
from support.ledger import NOOP_TASK, longest_gap, wait_until

REPO = Path(__file__).resolve().parents[1]

RESULTS = REPO / "bench-results"
SECTIONS = ("bringup", "deploy", "rerun", "throughput", "costs", "pools", "connections", "failover")
BARE_PORT = 6390
FILL_QUEUE = "bench-fill"


def say(msg: str) -> None:
    print(f"[bench {time.strftime('%T')}] {msg}", flush=True)


def median(values: list[float]) -> float | None:
    return round(statistics.median(values), 3) if values else None


def timed(cmd: list[str], env: dict[str, str], timeout: float = 1800) -> tuple[float, str, int]:
    t0 = time.monotonic()
    proc = subprocess.run(
        cmd, env=env, capture_output=True, text=True, timeout=timeout, stdin=subprocess.DEVNULL
    )
    return time.monotonic() - t0, proc.stdout + proc.stderr, proc.returncode


# ------------------------------------------------------------------------------------------
# bring-up and deploy
# ------------------------------------------------------------------------------------------
def lab_cmd(lab: Lab, *args: str) -> list[str]:
    return [str(lab.script), *args]


def bench_bringup(lab: Lab, runs: int, from_nothing: bool) -> dict[str, Any]:
    cached: list[float] = []
    nothing: list[float] = []
    cache_dir = Path(lab.env.get("LAB_CACHE") or lab.lab_dir / "cache")
    for i in range(runs):
        if from_nothing:
            subprocess.run(lab_cmd(lab, "down"), env=lab.env, check=True, capture_output=True)
            shutil.rmtree(cache_dir, ignore_errors=True)
            took, out, rc = timed(lab_cmd(lab, "up"), lab.env)
            if rc != 0:
                raise RuntimeError(f"lab up from nothing failed:\n{out[-2000:]}")
            nothing.append(took)
            say(f"run {i + 1}: lab up from nothing {took:.1f} s")
        subprocess.run(lab_cmd(lab, "down"), env=lab.env, check=True, capture_output=True)
        took, out, rc = timed(lab_cmd(lab, "up"), lab.env)
        if rc != 0:
            raise RuntimeError(f"lab up failed:\n{out[-2000:]}")
        cached.append(took)
        say(f"run {i + 1}: lab up from the cached base {took:.1f} s")
    return {
        "lab_up_cached_s": median(cached),
        "lab_up_from_nothing_s": median(nothing),
        "runs": {"cached": cached, "from_nothing": nothing},
    }


def playbook_cmd(lab: Lab, playbook: Path = REPO / "ansible" / "site.yml") -> list[str]:
    bindir = Path(sys.executable).parent
    return [str(bindir / "ansible-playbook"), "-i", str(lab.inventory), str(playbook)]


def bench_deploy(lab: Lab, runs: int) -> dict[str, Any]:
    env = lab.playbook_env()
    cold: list[float] = []
    rerun: list[float] = []
    changed: list[int] = []
    for i in range(runs):
        # Fresh hosts every run (the cached base stays): a cold deploy, not a warm one.
        subprocess.run(lab_cmd(lab, "down"), env=env, check=True, capture_output=True)
        subprocess.run(lab_cmd(lab, "up"), env=env, check=True, capture_output=True)
        took, out, rc = timed(playbook_cmd(lab), env)
        if rc != 0:
            raise RuntimeError(f"cold site.yml failed:\n{out[-3000:]}")
        cold.append(took)
        took2, out2, rc2 = timed(playbook_cmd(lab), env)
        if rc2 != 0:
            raise RuntimeError(f"site.yml re-run failed:\n{out2[-3000:]}")
        recap = parse_recap(out2)
        n_changed = recap_total(recap, "changed")
        rerun.append(took2)
        changed.append(n_changed)
        say(f"run {i + 1}: cold site.yml {took:.1f} s; re-run {took2:.1f} s changed={n_changed}")
    return {
        # The Makefile's (Mitogen's) unless the caller chose another: it halves the re-run.
        "ansible_strategy": env.get("ANSIBLE_STRATEGY", "linear"),
        "cold_site_yml_s": median(cold),
        "rerun_site_yml_s": median(rerun),
        "rerun_changed": changed,
        "runs": {"cold": cold, "rerun": rerun},
    }


def trivial_task_s(
    lab: Lab,
    env: dict[str, str],
    hosts: list[str],
    skipped: bool = False,
    looped: bool = False,
    tasks: int = 60,
) -> float:
    """What one trivial task (a stat; or one skipped by `when: false`; or, looped, one item
    of a stat's loop) costs on `hosts`: Ansible's own cost, nothing of ours.

    A playbook of one stat holds the start-up and the first contact with the hosts; the
    difference to one with `tasks` more (or a loop of `tasks` items) is `tasks` of them."""
    stat = "    - ansible.builtin.stat:\n        path: /etc/hostname\n"
    task = stat + ("      when: false\n" if skipped else "")
    took: list[float] = []
    for n in (0, tasks):
        more = f"{stat}      loop: {list(range(n))}\n" if looped and n else task * n
        play = f"- hosts: {','.join(hosts)}\n  gather_facts: false\n  tasks:\n" + stat + more
        with tempfile.NamedTemporaryFile("w", suffix=".yml", dir=RESULTS) as f:
            f.write(play)
            f.flush()
            seconds, out, rc = timed(playbook_cmd(lab, Path(f.name)), env)
        if rc != 0:
            raise RuntimeError(f"trivial playbook failed:\n{out[-2000:]}")
        took.append(seconds)
    return (took[1] - took[0]) / tasks


def bench_rerun(lab: Lab, runs: int) -> dict[str, Any]:
    env = lab.playbook_env()
    RESULTS.mkdir(exist_ok=True)
    rerun: list[float] = []
    changed: list[int] = []
    task_starts = ran = skipped = 0
    for i in range(runs):
        took, out, rc = timed(playbook_cmd(lab), env)
        if rc != 0:
            raise RuntimeError(f"site.yml re-run failed:\n{out[-3000:]}")
        recap = parse_recap(out)
        changed.append(recap_total(recap, "changed"))
        # Every task and handler start prints one header; every host's result is counted
        # in the recap as ok or skipped.
        task_starts = len(re.findall(r"^(?:TASK|RUNNING HANDLER) \[", out, re.M))
        ran = recap_total(recap, "ok")
        skipped = recap_total(recap, "skipped")
        rerun.append(took)
        say(f"re-run {i + 1}: {took:.1f} s changed={changed[-1]} ({task_starts} task starts)")
    redis_hosts = lab.group("redis")
    one: list[float] = []
    three: list[float] = []
    three_skipped: list[float] = []
    three_looped: list[float] = []
    for i in range(runs):
        one.append(trivial_task_s(lab, env, redis_hosts[:1]))
        three.append(trivial_task_s(lab, env, redis_hosts))
        three_skipped.append(trivial_task_s(lab, env, redis_hosts, skipped=True))
        three_looped.append(trivial_task_s(lab, env, redis_hosts, looped=True))
        say(
            f"floor {i + 1}: a trivial task {one[-1]:.3f} s on 1 host, {three[-1]:.3f} s on 3, "
            f"{three_skipped[-1]:.3f} s skipped on 3, a loop item {three_looped[-1]:.3f} s on 3"
        )
    per_task_1, per_task_3 = statistics.median(one), statistics.median(three)
    # A task costs its start plus each host's result: solved from the 1- and 3-host figures.
    per_ran = (per_task_3 - per_task_1) / 2
    per_start = per_task_1 - per_ran
    per_skipped = (statistics.median(three_skipped) - per_start) / 3
    return {
        "ansible_strategy": env.get("ANSIBLE_STRATEGY", "linear"),
        "rerun_site_yml_s": median(rerun),
        "rerun_changed": changed,
        "task_starts": task_starts,
        "host_results_ok": ran,
        "host_results_skipped": skipped,
        "trivial_task_start_s": round(per_start, 4),
        "trivial_host_result_s": round(per_ran, 4),
        "trivial_host_skipped_s": round(per_skipped, 4),
        "floor_for_rerun_s": round(
            per_start * task_starts + per_ran * ran + per_skipped * skipped, 1
        ),
        # What a host result costs as one item of a loop instead of a task of its own.
        "trivial_loop_item_s": round(statistics.median(three_looped) / 3, 4),
        "runs": {
            "rerun": rerun,
            "trivial_1_host": one,
            "trivial_3_hosts": three,
            "trivial_3_hosts_skipped": three_skipped,
            "trivial_3_hosts_loop_item": three_looped,
        },
    }


# ------------------------------------------------------------------------------------------
# throughput
# ------------------------------------------------------------------------------------------
def payload_of(size: int) -> str:
    """A JSON-like text of about ``size`` bytes, compressible the way real task arguments are
    (repeated keys, growing numbers), not random bytes."""
    text, i = [], 0
    while sum(map(len, text)) < size:
        text.append(
            f'{{"id": {i}, "sku": "item-{i:06d}", "qty": {i % 7}, "price": {i * 1.25:.2f}}},'
        )
        i += 1
    return "".join(text)[:size]


def publish_fill(
    conf: dict[str, Any],
    n: int,
    payload: str | None = None,
    task: str = NOOP_TASK,
    args: list[Any] | None = None,
) -> None:
    """Publish n no-op task messages (or ``task`` with ``args``) into FILL_QUEUE, which no
    worker consumes.

    conf: the task_* and broker_* settings (URL, transport options, TLS) to publish with. The
    publishing app has no result backend, so the controller does not subscribe to each
    result; the workers still store results exactly as their own settings say.
    """
    from celery import Celery

    app = Celery("bench-fill", set_as_current=False)
    app.conf.update(conf)
    with app.producer_or_acquire() as producer:
        for _i in range(n):
            app.send_task(
                task,
                args=args if args is not None else [payload] if payload else [],
                queue=FILL_QUEUE,
                producer=producer,
            )


def ping_bare(conf: dict[str, Any]) -> bool:
    from celery import Celery

    app = Celery("bench-ping", set_as_current=False)
    app.conf.update(conf)
    try:
        return bool(app.control.ping(timeout=1.0))
    finally:
        app.close()


def drain_rate(client: redis.Redis, queue: str, n: int, timeout: float = 600) -> float:
    """Atomically hand the pre-filled messages to the workers' queue; tasks/s until drained.

    RENAME makes all n messages appear at once, so the figure is the workers' rate and not
    the single controller-side publisher's.
    """
    assert client.llen(FILL_QUEUE) == n, f"expected {n} messages in {FILL_QUEUE}"
    # Messages parked by earlier faults stay in unacked until visibility_timeout: count
    # only what this run adds.
    parked = client.hlen("unacked")
    t0 = time.monotonic()
    client.rename(FILL_QUEUE, queue)
    deadline = t0 + timeout
    while client.llen(queue) or client.hlen("unacked") > parked:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{queue} not drained in {timeout} s")
        time.sleep(0.02)
    return n / (time.monotonic() - t0)


# The lab's Redis certificates (the redis role), which the bare Redis over TLS borrows; its
# worker takes the cluster's own client TLS settings, from celery.env through
# celery_ha_settings: the same mutual TLS as the cluster's links.
BARE_SERVER_TLS = (
    "--tls-cert-file /etc/redis/tls/server/cert.crt --tls-key-file /etc/redis/tls/server/cert.key "
    "--tls-ca-cert-file /etc/redis/tls/server/ca.crt"
)
BARE_CLIENT_TLS = (
    "import celery_ha_settings\n"
    "from celery_ha_exec import CONFIG_DIR, parse_env\n"
    "env = parse_env((CONFIG_DIR / 'celery.env').read_text(), 'celery.env')\n"
    "app.conf.broker_use_ssl = celery_ha_settings.load(env)['broker_use_ssl']\n"
)


@contextlib.contextmanager
def bare_worker(
    c: Cluster, processes: int, tls: bool = False
) -> Iterator[tuple[str, redis.Redis, dict[str, Any]]]:
    """The classic single-server setup on one lab host, thrown away at the end: plain Redis
    (no auth, no persistence) bound to the host's lab address, and a bare `celery worker`
    with default settings and ``processes`` pool processes. ``tls``: the same over mutual TLS
    with the cluster's certificates, which prices TLS alone. Yields (host, client, the
    publisher's broker settings)."""
    host = c.worker_hosts[1] if len(c.worker_hosts) > 1 else c.worker_hosts[0]
    addr = c.addresses[host]
    url = f"{'rediss' if tls else 'redis'}://{addr}:{BARE_PORT}/0"
    bare_app = (
        "from celery import Celery\n"
        f"app = Celery('bare', broker='{url}')\n"
        + (BARE_CLIENT_TLS if tls else "")
        + f"@app.task(name='{NOOP_TASK}')\n"
        "def noop(*payload):\n    return None\n"
    )
    listen = f"--port 0 --tls-port {BARE_PORT} {BARE_SERVER_TLS}" if tls else f"--port {BARE_PORT}"
    # Transient systemd units: nothing inherits the ssh session's descriptors, and stopping
    # them removes every process they started.
    setup = (
        "set -e; mkdir -p /tmp/bench-bare; "
        f"printf %s {shlex.quote(bare_app)} > /tmp/bench-bare/bare_app.py; "
        "systemd-run --quiet --unit=bench-redis /usr/bin/redis-server "
        f"{listen} --bind {addr} --protected-mode no --save '' --appendonly no; "
        "systemd-run --quiet --unit=bench-worker --working-directory=/tmp/bench-bare "
        "/opt/celery-ha/venv/bin/celery -A bare_app worker --loglevel=WARNING "
        f"--concurrency={processes}"
    )
    teardown = (
        "systemctl stop bench-worker bench-redis 2>/dev/null; "
        "systemctl reset-failed bench-worker bench-redis 2>/dev/null; rm -rf /tmp/bench-bare; true"
    )
    conf: dict[str, Any] = {"broker_url": url}
    if tls:
        conf["broker_use_ssl"] = c.settings["broker_use_ssl"]
    c.lab.ssh(host, teardown, check=False)
    try:
        c.lab.ssh(host, setup, timeout=60)
        client = redis.Redis(host=addr, port=BARE_PORT, socket_timeout=10, **(c.tls if tls else {}))
        wait_until(lambda: client.ping(), 60, what="the throwaway Redis")
        wait_until(lambda: ping_bare(conf), 90, interval=1, what="the bare worker")
        yield host, client, conf
    finally:
        c.lab.ssh(host, teardown, check=False)


def cluster_publish_conf(c: Cluster, overrides: dict[str, str] | None = None) -> dict[str, Any]:
    """The task_* and broker_* settings the workers run with (plus ``overrides``, CELERY_HA_*
    lines), for a controller publisher: a variant without task events sends no task-sent
    event either, one with compression compresses."""
    settings = celery_ha_settings.load(c.env | (overrides or {})) if overrides else c.settings
    return {k: v for k, v in settings.items() if k.startswith(("task_", "broker_"))}


def cluster_drain(c: Cluster, conf: dict[str, Any], n: int, payload: str | None = None) -> float:
    master = c.master_client(c.broker_db)
    master.delete(FILL_QUEUE)
    publish_fill(conf, n, payload)
    return drain_rate(master, c.default_queue, n)


def bare_drain(
    client: redis.Redis,
    bare_conf: dict[str, Any],
    n: int,
    payload: str | None = None,
    compression: str | None = None,
) -> float:
    client.delete(FILL_QUEUE)
    conf = dict(bare_conf)
    if compression:
        conf["task_compression"] = compression
    publish_fill(conf, n, payload)
    return drain_rate(client, "celery", n)


def commands_per_task(stats: redis.Redis, drain: Callable[[], float], n: int) -> dict[str, float]:
    """The server's commands per task while ``drain`` drains n no-op tasks, from INFO
    commandstats before and after: each round trip a worker makes, and, inside a script
    (EVALSHA, EVAL), the commands the script runs. Commands below one per 20 tasks (the
    other clients' heartbeats and polls meanwhile) are left out."""
    before = stats.info("commandstats")
    drain()
    after = stats.info("commandstats")
    per_task: dict[str, float] = {}
    for name, stat in after.items():
        calls = stat["calls"] - before.get(name, {}).get("calls", 0)
        if calls >= n / 20:
            per_task[name.removeprefix("cmdstat_")] = round(calls / n, 2)
    return dict(sorted(per_task.items(), key=lambda kv: -kv[1]))


def bench_throughput(lab: Lab, runs: int, n: int) -> dict[str, Any]:
    """The cluster's rate and the bare worker's, run with as many pool processes as the
    cluster's instances that consume the default queue, and the broker's ceiling."""
    c = Cluster(lab)
    processes = _default_queue_processes(c)
    cluster_rates: list[float] = []
    bare_rates: list[float] = []
    lpush: list[float] = []
    rpop: list[float] = []
    with bare_worker(c, processes) as (host, bare, bare_conf):
        conf = cluster_publish_conf(c)
        for i in range(runs):
            rate = cluster_drain(c, conf, n)
            cluster_rates.append(rate)
            brate = bare_drain(bare, bare_conf, n)
            bare_rates.append(brate)
            addr = c.addresses[host]
            out = lab.ssh(
                host,
                f"redis-benchmark -h {addr} -p {BARE_PORT} -t lpush,rpop -n 100000 -q",
                timeout=300,
            )
            for name, value in re.findall(
                r"^(LPUSH|RPOP): ([0-9.]+) requests per second", out.replace("\r", "\n"), re.M
            ):
                (lpush if name == "LPUSH" else rpop).append(float(value))
            say(
                f"run {i + 1}: cluster {rate:.0f}/s, bare worker {brate:.0f}/s, "
                f"redis-benchmark LPUSH {lpush[-1] if lpush else '?'}/s "
                f"RPOP {rpop[-1] if rpop else '?'}/s"
            )
        master = c.master_client(c.broker_db)
        master.delete(FILL_QUEUE)
        publish_fill(conf, n)
        # The celery user may not run INFO.
        with c.redis_on(c.master_host(), admin=True) as admin:
            cluster_commands = commands_per_task(
                admin, lambda: drain_rate(master, c.default_queue, n), n
            )
        bare.delete(FILL_QUEUE)
        publish_fill(bare_conf, n)
        bare_commands = commands_per_task(bare, lambda: drain_rate(bare, "celery", n), n)
    cm, bm = median(cluster_rates), median(bare_rates)
    ceiling = median([min(a, b) for a, b in zip(lpush, rpop, strict=False)])
    return {
        "host": host,
        "worker_processes_each_side": processes,
        "tasks_per_run": n,
        "cluster_tasks_per_s": cm,
        "bare_worker_tasks_per_s": bm,
        "redis_lpush_per_s": median(lpush),
        "redis_rpop_per_s": median(rpop),
        "cluster_vs_bare": round(cm / bm, 3) if cm and bm else None,
        "bare_vs_broker_ceiling": round(bm / ceiling, 4) if bm and ceiling else None,
        "cluster_vs_broker_ceiling": round(cm / ceiling, 4) if cm and ceiling else None,
        "cluster_commands_per_task": cluster_commands,
        "bare_commands_per_task": bare_commands,
        "runs": {"cluster": cluster_rates, "bare": bare_rates, "lpush": lpush, "rpop": rpop},
    }


def publish_rate(conf: dict[str, Any], producers: int, n: int) -> float:
    """Publishes/s of ``producers`` threads publishing n messages each at once into
    FILL_QUEUE, each with its own app and connection. Threads, not processes: a forked child
    inherits the parent's connection pools and locks and hung here; a publish spends most of
    its time waiting for the broker (and its replica), so threads do overlap."""
    import threading

    start = threading.Barrier(producers + 1)
    errors: list[BaseException] = []

    def produce() -> None:
        try:
            start.wait()
            publish_fill(conf, n)
        except BaseException as exc:  # reported below, with the rate left out
            errors.append(exc)

    threads = [threading.Thread(target=produce, daemon=True) for _ in range(producers)]
    for thread in threads:
        thread.start()
    start.wait()
    t0 = time.monotonic()
    for thread in threads:
        thread.join(600)
    if errors or any(t.is_alive() for t in threads):
        raise RuntimeError(f"a producer failed or hung: {errors[:1]}")
    return producers * n / (time.monotonic() - t0)


# ------------------------------------------------------------------------------------------
# cost table
# ------------------------------------------------------------------------------------------
# One setting changed at a time from the defaults, written at the end of every worker env
# file (the last file a worker reads, so it wins over celery.env and the role's own line).
COST_VARIANTS: list[tuple[str, dict[str, str]]] = [
    ("task events on (Flower's task view)", {"CELERY_HA_TASK_EVENTS": "true"}),
    ("results not stored", {"CELERY_HA_IGNORE_RESULT": "true"}),
    ("prefetch multiplier 4", {"CELERY_HA_PREFETCH_MULTIPLIER": "4"}),
    ("prefetch multiplier 16", {"CELERY_HA_PREFETCH_MULTIPLIER": "16"}),
    ("acks_late off (loses a killed worker's tasks)", {"CELERY_HA_ACKS_LATE": "false"}),
    ("publishes not waiting for a replica", {"CELERY_HA_PUBLISH_WAIT_REPLICAS": "0"}),
    ("compression gzip", {"CELERY_HA_COMPRESSION": "gzip"}),
    ("a line per task received and succeeded", {"CELERY_HA_LOG_EACH_TASK": "true"}),
    ("log level WARNING", {"CELERY_HA_LOG_LEVEL": "WARNING"}),
    ("threads pool", {"CELERY_HA_WORKER_POOL": "threads"}),
    ("concurrency 4 per instance", {"CELERY_HA_WORKER_CONCURRENCY": "4"}),
]
# This machine runs some 30 % faster after a rest than under the sustained load of a table
# (a quarter hour), more than most settings cost: the defaults run again after every
# DEFAULTS_EVERY variants, each time right after the bare worker, and each variant is given
# against the defaults and bare runs just before and after it.
DEFAULTS_EVERY = 2


def cost_schedule() -> list[tuple[str, dict[str, str]]]:
    schedule: list[tuple[str, dict[str, str]]] = [("defaults", {})]
    for i in range(0, len(COST_VARIANTS), DEFAULTS_EVERY):
        schedule += [*COST_VARIANTS[i : i + DEFAULTS_EVERY], ("defaults", {})]
    return schedule


def relative_to_neighbours(rows: list[dict[str, Any]]) -> None:
    """A defaults row's rate over the bare worker's run just before it; a variant's over the
    mean of the bare runs and of the defaults runs before and after it."""
    for i, row in enumerate(rows):
        if not row["tasks_per_s"]:
            continue
        if not row["overrides"]:
            row["vs_bare"] = round(row["tasks_per_s"] / row["bare_tasks_per_s"], 3)
            continue
        before = next(r for r in reversed(rows[:i]) if not r["overrides"])
        after = next((r for r in rows[i + 1 :] if not r["overrides"]), before)
        for key, ratio in (("bare_tasks_per_s", "vs_bare"), ("tasks_per_s", "vs_defaults_around")):
            row[ratio] = round(row["tasks_per_s"] / ((before[key] + after[key]) / 2), 3)


BENCH_MARK = "# bench override"
# The settings the variants move, checked on every worker after each change.
VARIANT_KEYS = (
    "worker_send_task_events",
    "task_ignore_result",
    "task_acks_late",
    "worker_prefetch_multiplier",
    "task_compression",
)
# CPU ticks (utime, stime, cutime, cstime) of every process, summed by systemd unit: reaped
# children's time moves into their parent's cutime, so a unit's sum only ever grows.
CPU_CMD = r"""for d in /proc/[0-9]*; do
  u=$(sed -n 's#^[0-9]*:name=systemd:.*/##p' $d/cgroup 2>/dev/null)
  [ -n "$u" ] && awk -v u="$u" '{sub(/.*\) /, ""); print u, $12+$13+$14+$15}' $d/stat 2>/dev/null
done | awk '{t[$1] += $2} END {for (u in t) print u, t[u]}'; getconf CLK_TCK"""


def _cpu_by_unit(lab: Lab, hosts: list[str]) -> dict[tuple[str, str], float]:
    """CPU seconds so far of every unit on each host: {(host, unit): seconds}."""
    totals: dict[tuple[str, str], float] = {}
    for host in hosts:
        lines = lab.ssh(host, CPU_CMD, timeout=60).split()
        hz = float(lines[-1])
        for unit, ticks in zip(lines[:-1:2], lines[1:-1:2], strict=True):
            totals[(host, unit)] = int(ticks) / hz
    return totals


def _cpu_component(unit: str, host: str, master: str) -> str | None:
    if unit.startswith(("celery-worker@", "supervisor")):
        return "workers"
    if unit.startswith(("redis-server", "valkey-server")):
        return "master" if host == master else "replicas"
    if unit.startswith(("redis-sentinel", "valkey-sentinel")):
        return "Sentinels"
    if unit.startswith(("flower", "nginx")):
        return "Flower"
    if unit.startswith("celery-ha-queue-depth"):
        return "exporter"
    if unit.startswith("celery-beat"):
        return "beat"
    if unit == "systemd-journald.service":
        # Every host's, for every process's lines: mostly the workers' two per task at INFO.
        return "journald"
    return None


def _set_overrides(c: Cluster, overrides: dict[str, str]) -> None:
    """Put the override lines at the end of every worker env file and of Flower's (none = the
    defaults) and restart them; wait until every worker answers again. Flower gets them too
    because it follows CELERY_HA_TASK_EVENTS: with its own default it would switch task
    events back on in every worker within 5 s."""
    # An env file has no trailing comments: the mark is a line of its own, above the block.
    block = "".join(f"{k}={v}\n" for k, v in overrides.items())
    block = f"{BENCH_MARK}\n{block}" if block else ""
    for host in sorted(set(c.worker_hosts) | set(c.lab.group("flower"))):
        c.lab.ssh(
            host,
            "for f in /etc/celery-ha/worker-*.env /etc/celery-ha/flower.env; do "
            f"[ -f $f ] || continue; sed -i '/^{BENCH_MARK}$/,$d' $f; "
            f"printf %s {shlex.quote(block)} >> $f; done; "
            "if systemctl is-active --quiet supervisor; then "
            "supervisorctl restart all >/dev/null; fi; "
            "systemctl restart --no-block 'celery-worker@*'; "
            # Waited for (nothing pings Flower): the old process must be gone before the
            # next CPU reading, or its seconds would vanish from the sum.
            "if systemctl cat flower.service >/dev/null 2>&1; then "
            "systemctl restart flower.service; fi",
            timeout=300,
        )
    want = expected_workers(c)
    wait_until(lambda: c.ping_workers(timeout=2.0) == want, 300, interval=2, what=f"workers {want}")
    # Proof that the workers run the variant, from their own configuration.
    expected = celery_ha_settings.load(c.env | overrides)
    confs = c.app.control.inspect(timeout=5.0).conf(with_defaults=True) or {}
    for node, conf in confs.items():
        wrong = {k: conf.get(k) for k in VARIANT_KEYS if k in conf and conf[k] != expected.get(k)}
        if wrong:
            raise RuntimeError(f"{node} does not run the variant {overrides}: {wrong}")


def _default_queue_processes(c: Cluster) -> int:
    """Pool processes of the instances that consume the default queue, summed over hosts."""
    total = 0
    for host in c.worker_hosts:
        out = c.lab.ssh(host, "cat /etc/celery-ha/worker-*.env", timeout=60)
        for block in out.split("CELERY_HA_WORKER_NAME=")[1:]:
            env = dict(line.split("=", 1) for line in block.splitlines()[1:] if "=" in line)
            if c.default_queue in env.get("CELERY_HA_WORKER_QUEUES", "").split(","):
                total += int(env.get("CELERY_HA_WORKER_CONCURRENCY", "1"))
    return total


def _cpu_by_component(
    before: dict[tuple[str, str], float], after: dict[tuple[str, str], float], master: str
) -> dict[str, float]:
    per: dict[str, float] = {}
    for (host, unit), secs in after.items():
        component = _cpu_component(unit, host, master)
        if component:
            per[component] = per.get(component, 0.0) + secs - before.get((host, unit), 0.0)
    return per


def _cpu_per_1000(
    before: dict[tuple[str, str], float], after: dict[tuple[str, str], float], master: str, n: int
) -> dict[str, float]:
    return {k: v * 1000 / n for k, v in _cpu_by_component(before, after, master).items()}


def _bare_runs(
    lab: Lab, host: str, client: redis.Redis, conf: dict[str, Any], runs: int, n: int
) -> tuple[float | None, float | None]:
    """Median tasks/s of the bare worker, and its CPU s per 1000 tasks (worker and Redis)."""
    rates: list[float] = []
    cpu: list[float] = []
    for _ in range(runs):
        before = _cpu_by_unit(lab, [host])
        rates.append(bare_drain(client, conf, n))
        after = _cpu_by_unit(lab, [host])
        cpu.append(
            sum(
                secs - before.get(key, 0.0)
                for key, secs in after.items()
                if key[1].startswith(("bench-worker", "bench-redis"))
            )
            * 1000
            / n
        )
    return median(rates), median(cpu)


# Long enough for several heartbeats (2 s), Flower's polls (5 s) and redelivery refreshes.
IDLE_S = 30.0


PAYLOADS = ((1024, None), (1024, "gzip"), (100 * 1024, None), (100 * 1024, "gzip"))


def bench_costs(lab: Lab, runs: int, n: int, producers: int) -> dict[str, Any]:
    c = Cluster(lab)
    hosts = sorted(
        set(c.worker_hosts) | set(c.redis_hosts) | set(c.sentinel_hosts) | set(lab.group("flower"))
    )
    processes = _default_queue_processes(c)
    rows: list[dict[str, Any]] = []
    extra: list[dict[str, Any]] = []
    # TLS alone: the cluster cannot drop it (its Redis listens on TLS only), so the bare
    # worker takes it on instead, with the cluster's certificates.
    with bare_worker(c, processes, tls=True) as (tls_host, tls_client, tls_conf):
        tls_rate, tls_cpu = _bare_runs(lab, tls_host, tls_client, tls_conf, runs, n)
    with bare_worker(c, processes) as (bare_host, bare, bare_conf):
        bare_rate, bare_cpu = _bare_runs(lab, bare_host, bare, bare_conf, runs, n)
        say(
            f"bare worker, {processes} processes: {bare_rate} tasks/s, "
            f"CPU s/1000 (worker and Redis) {bare_cpu}; over mutual TLS {tls_rate} tasks/s, "
            f"CPU s/1000 {tls_cpu}"
        )
        bare_tls = {
            "tasks_per_s": tls_rate,
            "vs_bare": round(tls_rate / bare_rate, 3) if tls_rate and bare_rate else None,
            "cpu_s_per_1000": tls_cpu,
        }
        # What the cluster burns with nothing to do (heartbeats, gossip, Sentinel's pings,
        # Flower's polls, the redelivery refresh): paid per minute, not per task.
        master = c.master_host()
        before = _cpu_by_unit(lab, hosts)
        time.sleep(IDLE_S)
        idle = {
            k: round(v * 60 / IDLE_S, 3)
            for k, v in sorted(_cpu_by_component(before, _cpu_by_unit(lab, hosts), master).items())
        }
        say(f"idle cluster, CPU s per minute: {idle}")
        try:
            for name, overrides in cost_schedule():
                if not overrides:
                    bare_now = median([bare_drain(bare, bare_conf, n) for _ in range(runs)])
                since = time.time()
                _set_overrides(c, overrides)
                master = c.master_host()
                conf = cluster_publish_conf(c, overrides)
                rates: list[float] = []
                cpu_runs: dict[str, list[float]] = {}
                for _ in range(runs):
                    before = _cpu_by_unit(lab, hosts)
                    rates.append(cluster_drain(c, conf, n))
                    # Flower may still be reading the last events: give it a moment.
                    time.sleep(1.0)
                    for k, v in _cpu_per_1000(before, _cpu_by_unit(lab, hosts), master, n).items():
                        cpu_runs.setdefault(k, []).append(v)
                # What a worker logs when a remote control command (Flower's --enable_events)
                # switches its task events on: a variant without events must have none.
                enabled = journal_count(
                    c, since, "Events of group {task} enabled by remote", c.worker_hosts
                )
                if enabled:
                    raise RuntimeError(f"{name}: {enabled} worker(s) had task events switched on")
                rate = median(rates)
                cpu = {k: median(v) for k, v in sorted(cpu_runs.items())}
                rows.append(
                    {
                        "variant": name,
                        "overrides": overrides,
                        "tasks_per_s": rate,
                        "bare_tasks_per_s": bare_now,
                        "vs_bare": round(rate / bare_now, 3) if rate and bare_now else None,
                        "cpu_s_per_1000": cpu,
                        "runs": rates,
                    }
                )
                say(f"{name}: {rate} tasks/s ({rows[-1]['vs_bare']} of bare), CPU s/1000 {cpu}")
        finally:
            _set_overrides(c, {})
        relative_to_neighbours(rows)
        defaults_rate = median([r["tasks_per_s"] for r in rows if not r["overrides"]])
        defaults_vs_bare = median([r["vs_bare"] for r in rows if not r["overrides"]])
        # Payloads and compression are the publisher's choice (a worker decompresses what it
        # receives), with the deployed defaults on both sides.
        conf = cluster_publish_conf(c)
        for size, compression in PAYLOADS:
            payload = payload_of(size)
            cconf = dict(conf, task_compression=compression) if compression else conf
            # At most ~32 MiB of messages at once: redis_maxmemory (256mb) holds them twice.
            count = min(n, (32 << 20) // size)
            crate = median([cluster_drain(c, cconf, count, payload) for _ in range(runs)])
            brate = median(
                [bare_drain(bare, bare_conf, count, payload, compression) for _ in range(runs)]
            )
            label = f"{size // 1024} KiB payload{', ' + compression if compression else ''}"
            extra.append(
                {
                    "what": label,
                    "tasks": count,
                    "cluster_tasks_per_s": crate,
                    "bare_tasks_per_s": brate,
                }
            )
            say(f"{label}: cluster {crate}/s, bare {brate}/s")
        # Several producers at once: the publish side (WAIT for a replica, TLS, Sentinel).
        per = max(n // producers, 1)
        master = c.master_client(c.broker_db)
        cpub, bpub = [], []
        for _ in range(runs):
            master.delete(FILL_QUEUE)
            cpub.append(publish_rate(conf, producers, per))
            master.delete(FILL_QUEUE)
            bare.delete(FILL_QUEUE)
            bpub.append(publish_rate(bare_conf, producers, per))
            bare.delete(FILL_QUEUE)
        extra.append(
            {
                "what": f"{producers} producers publishing at once (publishes/s)",
                "cluster_tasks_per_s": median(cpub),
                "bare_tasks_per_s": median(bpub),
            }
        )
        say(f"{producers} producers: cluster {median(cpub)}/s, bare {median(bpub)}/s")
    return {
        "tasks_per_run": n,
        "bare_processes": processes,
        "bare_worker_tasks_per_s": bare_rate,
        "bare_cpu_s_per_1000": bare_cpu,
        "bare_over_tls": bare_tls,
        "defaults_tasks_per_s": defaults_rate,
        "defaults_vs_bare": defaults_vs_bare,
        "idle_cpu_s_per_min": idle,
        "variants": rows,
        "side_by_side": extra,
    }


# ------------------------------------------------------------------------------------------
# connections
# ------------------------------------------------------------------------------------------
# ss's established TCP sockets with their owner, and each pid's unit: one ssh round trip.
SOCKETS_CMD = (
    "ss -Htnp state established; echo ==units; ps -eo pid=,unit=,comm= 2>/dev/null || true"
)


def _client_processes(lab: Lab, host: str) -> dict[tuple[str, int], str]:
    """(source address, source port) of every TCP socket on host -> the unit that owns it."""
    out = lab.ssh(host, SOCKETS_CMD, timeout=60)
    sockets_part, _, units_part = out.partition("==units")
    units: dict[str, str] = {}
    for line in units_part.splitlines():
        fields = line.split()
        if len(fields) >= 2:
            units[fields[0]] = fields[1] if fields[1] != "-" else fields[-1]
    owners: dict[tuple[str, int], str] = {}
    for line in sockets_part.splitlines():
        fields = line.split()
        pid = re.search(r"pid=(\d+)", line)
        if len(fields) < 4 or not pid:
            continue
        local_addr, _, local_port = fields[2].rpartition(":")
        owners[(local_addr.strip("[]"), int(local_port))] = units.get(pid.group(1), "?")
    return owners


def _component(unit: str) -> str:
    """A unit name as the Scaling section counts it: one worker instance, beat, Flower ..."""
    for prefix, name in (
        ("celery-worker@", "worker instance "),
        ("celery-beat", "beat"),
        ("flower", "Flower"),
        ("celery-ha-queue-depth", "queue-depth exporter"),
        ("redis-sentinel", "Sentinel"),
        ("valkey-sentinel", "Sentinel"),
        ("redis-server", "Redis replica"),
        ("valkey-server", "Redis replica"),
        ("supervisor", "worker under supervisor"),
    ):
        if unit.startswith(prefix):
            return (
                name + unit[len(prefix) :].removesuffix(".service") if name.endswith(" ") else name
            )
    return unit


PAUSE_TASK = "drills.pause"
POOL_TASK_SECONDS = (0.0, 0.02, 0.2)
POOL_TASKS = 300


def bench_pools(lab: Lab, runs: int) -> dict[str, Any]:
    """Tasks/s of the threads pool against prefork with the same count, for tasks that wait
    (sleep: no GIL held) 0, 20 and 200 ms; the ideal is slots / duration."""
    c = Cluster(lab)
    slots = _default_queue_processes(c)
    rows = []
    try:
        for pool in ("prefork", "threads"):
            overrides = {"CELERY_HA_WORKER_POOL": pool}
            _set_overrides(c, overrides)
            conf = cluster_publish_conf(c, overrides)
            master = c.master_client(c.broker_db)
            for seconds in POOL_TASK_SECONDS:
                rates = []
                for _ in range(runs):
                    master.delete(FILL_QUEUE)
                    publish_fill(conf, POOL_TASKS, task=PAUSE_TASK, args=[seconds])
                    rates.append(drain_rate(master, c.default_queue, POOL_TASKS))
                row = {
                    "pool": pool,
                    "task_s": seconds,
                    "tasks_per_s": median(rates),
                    "ideal": round(slots / seconds, 1) if seconds else None,
                }
                say(f"{pool}, {seconds} s tasks: {row['tasks_per_s']} tasks/s")
                rows.append(row)
    finally:
        _set_overrides(c, {})
    return {"slots": slots, "tasks_per_run": POOL_TASKS, "rows": rows}


def bench_connections(lab: Lab) -> dict[str, Any]:
    """Connections per client process on the master, a replica and a Sentinel, counted from
    the servers' side (CLIENT LIST) and matched to their owners on the client hosts."""
    c = Cluster(lab)
    master = c.master_host()
    owners: dict[tuple[str, int], str] = {}
    for host in sorted(set(c.lab.addresses()) - {"node5"}):
        owners |= _client_processes(lab, host)
    servers: dict[str, list[dict[str, Any]]] = {}
    memory: dict[str, dict[str, int]] = {}
    for host in c.redis_hosts:
        role = "master" if host == master else "replica"
        admin = c.redis_on(host, admin=True)
        servers[f"{role} {host}"] = admin.client_list()
        info = admin.info("memory") | admin.info("clients")
        memory[f"{role} {host}"] = {
            k: int(info[k]) for k in ("connected_clients", "mem_clients_normal", "maxclients")
        }
    sentinel_auth = {k: v for k, v in c.sentinel_kwargs.items() if k in ("username", "password")}
    for host in c.sentinel_hosts:
        port = dict(c.sentinels).get(c.addresses[host], 26379)
        client = redis.Redis(
            host=c.addresses[host], port=port, socket_timeout=5, **sentinel_auth, **c.tls
        )
        try:
            servers[f"Sentinel {host}"] = client.client_list()
        finally:
            client.close()
    counts: dict[str, dict[str, int]] = {}
    for server, clients in servers.items():
        per: dict[str, int] = {}
        for entry in clients:
            addr, _, port = str(entry.get("addr", "")).rpartition(":")
            if not port.isdigit():
                continue
            unit = owners.get((addr, int(port)))
            # Our own CLIENT LIST connection comes from the controller.
            name = (
                "this bench"
                if unit is None and addr.endswith(".1")
                else (f"{_component(unit)} on {c.lab.host_of(addr)}" if unit else f"unknown {addr}")
            )
            per[name] = per.get(name, 0) + 1
        counts[server] = dict(sorted(per.items()))
        say(f"{server}: {sum(per.values())} connections: {counts[server]}")
    # The idle cluster's own traffic on the master (heartbeats, gossip, events, the
    # redelivery refresh, Sentinel's pings), which grows with the number of workers.
    admin = c.redis_on(master, admin=True)
    window = 10.0
    before = admin.info("commandstats")
    time.sleep(window)
    after = admin.info("commandstats")
    idle_rates = {
        name.removeprefix("cmdstat_"): round(
            (stats["calls"] - before.get(name, {}).get("calls", 0)) / window, 1
        )
        for name, stats in after.items()
    }
    idle_rates = {k: v for k, v in sorted(idle_rates.items(), key=lambda kv: -kv[1]) if v > 0}
    say(f"idle master, commands/s over {window:.0f} s: {idle_rates}")
    for server, mem in memory.items():
        per_client = mem["mem_clients_normal"] // max(mem["connected_clients"], 1)
        say(f"{server}: {mem} ({per_client} B per client)")
    return {
        "master": master,
        "connections": counts,
        "memory": memory,
        "idle_master_commands_per_s": idle_rates,
    }


# ------------------------------------------------------------------------------------------
# failover
# ------------------------------------------------------------------------------------------
def journal_count(
    c: Cluster, since: float, needle: str, hosts: list[str], unit: str | None = None
) -> int:
    """How many lines with ``needle`` the reachable ``hosts`` logged after ``since`` (in
    ``unit``'s journal, or all of it)."""
    total = 0
    only = f"-u {unit} " if unit else ""
    for host in hosts:
        out = c.lab.ssh(
            host,
            f"journalctl {only}--since @{since:.3f} --no-pager | grep -cF -- "
            f"{shlex.quote(needle)} || true",
            check=False,
        )
        total += int(out.strip() or 0)
    return total


def failover_once(c: Cluster, workers: list[str], first_sentinel: bool) -> dict[str, Any]:
    """One master host crash under load: the election, the gap and the publish stall."""
    if first_sentinel:
        make_master(c, c.lab.host_of(c.sentinels[0][0]), workers)
    master = wait_healthy(c, workers)
    with Load(c, "bench-fo") as load:
        t_crash = time.time()
        c.lab.run("crash", master)
        wait_new_master(c, master, timeout=180)
        load.wait_done_after(time.time(), count=40, what="tasks on the new master")
        t_end = time.time()
        c.lab.run("start", master, timeout=300)
        wait_until(lambda: c.role_of(master) == "replica:connected", 180, what="rejoin")
        wait_healthy(c, workers)
        report = load.finish(gap_from=t_crash, parked_ok=False, stop_at=t_end)
    switch = earliest_switch(c, t_crash - 1)
    stall = longest_gap(load.ledger.published.values(), t_crash, t_end)[0]
    return {
        "crashed": master,
        "first_sentinel": first_sentinel,
        "election_s": None if switch is None else round(switch - t_crash, 2),
        # A second round: an election that was abandoned (split vote, no leader in time).
        "retried": journal_count(
            c, t_crash - 1, "-failover-abort-not-elected", c.sentinel_hosts, c.flavor.sentinel_unit
        )
        > 0,
        "gap_s": round(report.gap[0], 2) if report.gap else None,
        "publish_stall_s": round(stall, 2),
        "lost": len(report.lost),
        "failed": report.failed,
    }


def bench_failover(lab: Lab, crashes: int) -> dict[str, Any]:
    """``crashes`` master host crashes in a row; every fourth first makes the first Sentinel's
    host the master, the state of a fresh deployment and the worst case for clients."""
    c = Cluster(lab)
    workers = expected_workers(c)
    rows: list[dict[str, Any]] = []
    for i in range(crashes):
        row = failover_once(c, workers, first_sentinel=i % 4 == 0)
        rows.append(row)
        say(f"crash {i + 1}/{crashes}: {row}")
    elections = [r["election_s"] for r in rows if r["election_s"] is not None]
    gaps = [r["gap_s"] for r in rows if r["gap_s"] is not None]
    stalls = [r["publish_stall_s"] for r in rows]
    after = [g - e for g, e in zip(gaps, elections, strict=False)]
    return {
        "crashes": crashes,
        "election_median_s": median(elections),
        "election_worst_s": max(elections, default=None),
        "elections_retried": sum(1 for r in rows if r["retried"]),
        "elections_over_30_s": sum(1 for e in elections if e > 30),
        "gap_median_s": median(gaps),
        "gap_worst_s": max(gaps, default=None),
        "gap_after_switch_worst_s": round(max(after), 2) if after else None,
        "publish_stall_median_s": median(stalls),
        "publish_stall_worst_s": max(stalls, default=None),
        "lost": sum(r["lost"] for r in rows),
        "failed": sum(r["failed"] for r in rows),
        "runs": rows,
    }


# ------------------------------------------------------------------------------------------
def table(results: dict[str, Any]) -> str:
    rows: list[tuple[str, Any]] = []
    b = results.get("bringup", {})
    rows += [
        ("lab up, cached base (s)", b.get("lab_up_cached_s")),
        ("lab up, from nothing (s)", b.get("lab_up_from_nothing_s")),
    ]
    d = results.get("deploy", {})
    rows += [
        ("cold site.yml (s)", d.get("cold_site_yml_s")),
        ("site.yml re-run (s)", d.get("rerun_site_yml_s")),
        ("re-run changed (per run)", d.get("rerun_changed")),
    ]
    r = results.get("rerun", {})
    rows += [
        ("converged re-run of site.yml (s)", r.get("rerun_site_yml_s")),
        ("  its task starts", r.get("task_starts")),
        (
            "  its host results, ok / skipped",
            r.get("task_starts") and f"{r['host_results_ok']} / {r['host_results_skipped']}",
        ),
        ("  Ansible's own cost: a task start (s)", r.get("trivial_task_start_s")),
        ("  Ansible's own cost: a host result, ok (s)", r.get("trivial_host_result_s")),
        ("  Ansible's own cost: a host result, skipped (s)", r.get("trivial_host_skipped_s")),
        ("  Ansible's floor for those counts (s)", r.get("floor_for_rerun_s")),
        ("  Ansible's own cost: a host result as a loop item (s)", r.get("trivial_loop_item_s")),
    ]
    t = results.get("throughput", {})
    rows += [
        ("cluster no-op tasks/s (production settings)", t.get("cluster_tasks_per_s")),
        ("bare worker tasks/s (defaults, plain Redis)", t.get("bare_worker_tasks_per_s")),
        ("redis-benchmark LPUSH/s", t.get("redis_lpush_per_s")),
        ("redis-benchmark RPOP/s", t.get("redis_rpop_per_s")),
        ("ratio cluster / bare worker", t.get("cluster_vs_bare")),
        ("ratio bare worker / broker ceiling", t.get("bare_vs_broker_ceiling")),
        ("ratio cluster / broker ceiling", t.get("cluster_vs_broker_ceiling")),
    ]
    if t:
        rows.append(("worker processes on each side", t.get("worker_processes_each_side")))
        for side in ("cluster", "bare"):
            commands = t.get(f"{side}_commands_per_task") or {}
            rows.append(
                (
                    f"{side}: the broker's commands per task (scripts' own inside)",
                    ", ".join(f"{k} {v}" for k, v in commands.items()),
                )
            )
    costs = results.get("costs", {})
    if costs:
        rows.append(
            (
                f"cost table: bare worker, {costs['bare_processes']} processes",
                f"{costs['bare_worker_tasks_per_s']} tasks/s; CPU s per 1000 tasks (its worker "
                f"and Redis): {costs.get('bare_cpu_s_per_1000')}",
            )
        )
        tls = costs.get("bare_over_tls") or {}
        rows.append(
            (
                "  the bare worker over mutual TLS",
                f"{tls.get('tasks_per_s')} tasks/s, {tls.get('vs_bare')} of bare; CPU s per "
                f"1000 tasks: {tls.get('cpu_s_per_1000')}",
            )
        )
        idle = ", ".join(f"{k} {v}" for k, v in (costs.get("idle_cpu_s_per_min") or {}).items())
        rows.append(("  idle cluster (heartbeats, gossip, polls), CPU s per minute", idle))
        rows.append(
            (
                "  the defaults, median of all their rows (each against the bare run before it)",
                f"{costs.get('defaults_tasks_per_s')} tasks/s, "
                f"{costs.get('defaults_vs_bare')} of bare",
            )
        )
        for row in costs["variants"]:
            cpu = ", ".join(f"{k} {v}" for k, v in row["cpu_s_per_1000"].items())
            around = (
                f", {row['vs_defaults_around']} of the defaults around it"
                if "vs_defaults_around" in row
                else ""
            )
            rows.append(
                (
                    f"  {row['variant']}",
                    f"{row['tasks_per_s']} tasks/s, {row['vs_bare']} of bare{around}; "
                    f"CPU s per 1000 tasks: {cpu}",
                )
            )
        for row in costs["side_by_side"]:
            rows.append(
                (
                    f"  {row['what']}",
                    f"cluster {row['cluster_tasks_per_s']}, bare {row['bare_tasks_per_s']}",
                )
            )
    pools = results.get("pools")
    if pools:
        rows.append((f"pools: {pools['slots']} slots, {pools['tasks_per_run']} tasks", "tasks/s"))
        for row in pools["rows"]:
            ideal = f" (at most {row['ideal']})" if row["ideal"] else ""
            rows.append(
                (f"  {row['pool']}, tasks of {row['task_s']} s", f"{row['tasks_per_s']}{ideal}")
            )
    f = results.get("failover", {})
    rows += [
        ("master host crashes in a row (failover)", f.get("crashes")),
        ("  crash -> earliest +switch-master, median (s)", f.get("election_median_s")),
        ("  crash -> earliest +switch-master, worst (s)", f.get("election_worst_s")),
        ("  elections that needed a second round", f.get("elections_retried")),
        ("  elections over 30 s", f.get("elections_over_30_s")),
        ("  longest gap with no task completing, median (s)", f.get("gap_median_s")),
        ("  longest gap with no task completing, worst (s)", f.get("gap_worst_s")),
        ("  worst gap minus its election (s)", f.get("gap_after_switch_worst_s")),
        ("  longest publish stall, median (s)", f.get("publish_stall_median_s")),
        ("  longest publish stall, worst (s)", f.get("publish_stall_worst_s")),
        ("  lost / failed tasks", f"{f.get('lost')} / {f.get('failed')}" if f else None),
    ]
    width = max(len(k) for k, _ in rows)
    lines = [f"{'figure (median of ' + str(results['runs']) + ' runs)':<{width}}  value"]
    lines += [f"{k:<{width}}  {'-' if v is None else v}" for k, v in rows]
    return "\n".join(lines)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--runs", type=int, default=3, help="runs per figure (median; >= 3)")
    parser.add_argument("--only", nargs="+", choices=SECTIONS, default=list(SECTIONS))
    parser.add_argument(
        "--skip-from-nothing",
        action="store_true",
        help="do not remove the cached base to time a bring-up from nothing",
    )
    parser.add_argument("--tasks", type=int, default=3000, help="no-op tasks per throughput run")
    parser.add_argument(
        "--producers", type=int, default=4, help="producers publishing at once (costs section)"
    )
    parser.add_argument("--keep-lab", action="store_true", help="leave the lab up at the end")
    parser.add_argument(
        "--crashes", type=int, default=20, help="master host crashes in the failover section"
    )
    args = parser.parse_args()
    if args.runs < 3:
        parser.error("--runs must be >= 3: the figures are medians")
    lab = Lab()
    results: dict[str, Any] = {
        "when": time.strftime("%FT%T%z"),
        "runs": args.runs,
        "lab_dir": str(lab.lab_dir),
        "host": os.uname().nodename,
        "cpus": os.cpu_count(),
    }
    raised = False
    try:
        if "bringup" in args.only:
            results["bringup"] = bench_bringup(lab, args.runs, not args.skip_from_nothing)
            raised = True
        if "deploy" in args.only:
            results["deploy"] = bench_deploy(lab, args.runs)
            raised = True
        if not lab.exists():
            raise SystemExit(f"no lab at {lab.lab_dir}: run with bringup/deploy or deploy one")
        if "rerun" in args.only:
            results["rerun"] = bench_rerun(lab, args.runs)
        if "throughput" in args.only:
            results["throughput"] = bench_throughput(lab, args.runs, args.tasks)
        if "costs" in args.only:
            results["costs"] = bench_costs(lab, args.runs, args.tasks, args.producers)
        if "pools" in args.only:
            results["pools"] = bench_pools(lab, args.runs)
        if "connections" in args.only:
            results["connections"] = bench_connections(lab)
        if "failover" in args.only:
            results["failover"] = bench_failover(lab, args.crashes)
    finally:
        RESULTS.mkdir(exist_ok=True)
        out = RESULTS / f"bench-{time.strftime('%Y%m%d-%H%M%S')}.json"
        out.write_text(json.dumps(results, indent=2))
        shutil.copyfile(out, RESULTS / "latest.json")
        print()
        print(table(results))
        print(f"\nwritten to {out}")
        if raised and not args.keep_lab:
            subprocess.run(lab_cmd(lab, "down"), env=lab.env, check=False, capture_output=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
