#!/usr/bin/env python3
"""celery-ha benchmarks (`make bench`; not part of CI). Prints a table, writes JSON.

Every figure is the median of --runs runs (default 3), and the things compared are measured
side by side in the same invocation on the same lab:

  bringup   lab up from the cached base, and from nothing (base cache removed; skip with
            --skip-from-nothing); destroys and recreates the lab at LAB_DIR
  deploy    cold site.yml on fresh lab hosts, then a re-run (must report changed=0)
  throughput  no-op tasks/s through the deployed cluster (production settings) vs a bare
            `celery worker` with default settings on a throwaway plain Redis on one lab host,
            vs that Redis' ceiling (redis-benchmark LPUSH/RPOP); plus the ratios
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
import json
import os
import re
import shlex
import shutil
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import redis
from support.cluster import Cluster, Lab, parse_recap
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
SECTIONS = ("bringup", "deploy", "throughput", "connections", "failover")
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


def playbook_cmd(lab: Lab) -> list[str]:
    bindir = Path(sys.executable).parent
    return [
        str(bindir / "ansible-playbook"),
        "-i",
        str(lab.inventory),
        str(REPO / "ansible" / "site.yml"),
    ]


def bench_deploy(lab: Lab, runs: int) -> dict[str, Any]:
    env = dict(lab.env, ANSIBLE_CONFIG=str(REPO / "ansible.cfg"), ANSIBLE_FORCE_COLOR="0")
    env["PATH"] = f"{Path(sys.executable).parent}:{env.get('PATH', '')}"
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
        n_changed = sum(r.get("changed", 0) for r in recap.values())
        rerun.append(took2)
        changed.append(n_changed)
        say(f"run {i + 1}: cold site.yml {took:.1f} s; re-run {took2:.1f} s changed={n_changed}")
    return {
        "cold_site_yml_s": median(cold),
        "rerun_site_yml_s": median(rerun),
        "rerun_changed": changed,
        "runs": {"cold": cold, "rerun": rerun},
    }


# ------------------------------------------------------------------------------------------
# throughput
# ------------------------------------------------------------------------------------------
def publish_fill(conf: dict[str, Any], n: int) -> None:
    """Publish n no-op task messages into FILL_QUEUE, which no worker consumes.

    conf: the task_* and broker_* settings (URL, transport options, TLS) to publish with. The
    publishing app has no result backend, so the controller does not subscribe to each
    result; the workers still store results exactly as their own settings say.
    """
    from celery import Celery

    app = Celery("bench-fill", set_as_current=False)
    app.conf.update(conf)
    with app.producer_or_acquire() as producer:
        for _i in range(n):
            app.send_task(NOOP_TASK, queue=FILL_QUEUE, producer=producer)


def ping_bare(url: str) -> bool:
    from celery import Celery

    app = Celery("bench-ping", broker=url, set_as_current=False)
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


def bench_throughput(lab: Lab, runs: int, n: int) -> dict[str, Any]:
    c = Cluster(lab)
    host = c.worker_hosts[1] if len(c.worker_hosts) > 1 else c.worker_hosts[0]
    addr = c.addresses[host]
    bare_url = f"redis://{addr}:{BARE_PORT}/0"
    cluster_rates: list[float] = []
    bare_rates: list[float] = []
    lpush: list[float] = []
    rpop: list[float] = []

    # The classic single-server setup, thrown away at the end: plain Redis (no auth, no
    # persistence) bound to the host's lab address, and a bare worker with default settings.
    bare_app = (
        "from celery import Celery\n"
        f"app = Celery('bare', broker='redis://{addr}:{BARE_PORT}/0')\n"
        f"@app.task(name='{NOOP_TASK}')\n"
        "def noop():\n    return None\n"
    )
    # Transient systemd units: nothing inherits the ssh session's descriptors, and stopping
    # them removes every process they started.
    setup = (
        "set -e; mkdir -p /tmp/bench-bare; "
        f"printf %s {shlex.quote(bare_app)} > /tmp/bench-bare/bare_app.py; "
        "systemd-run --quiet --unit=bench-redis /usr/bin/redis-server "
        f"--port {BARE_PORT} --bind {addr} --protected-mode no --save '' --appendonly no; "
        "systemd-run --quiet --unit=bench-worker --working-directory=/tmp/bench-bare "
        "/opt/celery-ha/venv/bin/celery -A bare_app worker --loglevel=WARNING"
    )
    teardown = (
        "systemctl stop bench-worker bench-redis 2>/dev/null; "
        "systemctl reset-failed bench-worker bench-redis 2>/dev/null; rm -rf /tmp/bench-bare; true"
    )
    lab.ssh(host, teardown, check=False)
    try:
        lab.ssh(host, setup, timeout=60)
        bare = redis.Redis(host=addr, port=BARE_PORT, socket_timeout=10)
        wait_until(lambda: bare.ping(), 60, what="the throwaway Redis")
        master = c.master_client(c.broker_db)
        cluster_conf = {k: v for k, v in c.settings.items() if k.startswith(("task_", "broker_"))}
        for i in range(runs):
            # Deployed cluster, production settings (the settings the workers run with).
            master.delete(FILL_QUEUE)
            publish_fill(cluster_conf, n)
            rate = drain_rate(c.master_client(c.broker_db), c.default_queue, n)
            cluster_rates.append(rate)
            # Bare worker on plain Redis: default settings, default queue "celery".
            bare.delete(FILL_QUEUE)
            publish_fill({"broker_url": bare_url}, n)
            wait_until(lambda: ping_bare(bare_url), 90, interval=1, what="the bare worker")
            brate = drain_rate(bare, "celery", n)
            bare_rates.append(brate)
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
    finally:
        lab.ssh(host, teardown, check=False)
    cm, bm = median(cluster_rates), median(bare_rates)
    ceiling = median([min(a, b) for a, b in zip(lpush, rpop, strict=False)])
    return {
        "host": host,
        "tasks_per_run": n,
        "cluster_tasks_per_s": cm,
        "bare_worker_tasks_per_s": bm,
        "redis_lpush_per_s": median(lpush),
        "redis_rpop_per_s": median(rpop),
        "cluster_vs_bare": round(cm / bm, 3) if cm and bm else None,
        "bare_vs_broker_ceiling": round(bm / ceiling, 4) if bm and ceiling else None,
        "cluster_vs_broker_ceiling": round(cm / ceiling, 4) if cm and ceiling else None,
        "runs": {"cluster": cluster_rates, "bare": bare_rates, "lpush": lpush, "rpop": rpop},
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
def journal_count(c: Cluster, since: float, needle: str) -> int:
    """How many lines with ``needle`` the reachable Sentinels logged after ``since``."""
    total = 0
    for host in c.sentinel_hosts:
        out = c.lab.ssh(
            host,
            f"journalctl -u {c.flavor.sentinel_unit} --since @{since:.3f} --no-pager | grep -cF -- "
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
        "retried": journal_count(c, t_crash - 1, "-failover-abort-not-elected") > 0,
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
        if "throughput" in args.only:
            results["throughput"] = bench_throughput(lab, args.runs, args.tasks)
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
