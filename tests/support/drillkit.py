"""What every task drill uses: the load (ledger + producers), a healthy-cluster wait, figures,
and the faults' own helpers (earliest +switch-master, choosing the master, a producer on a
worker host).

Waits poll with generous bounds; figures are printed and recorded, never asserted here.
"""

from __future__ import annotations

import base64
import os
import shlex
import time
from pathlib import Path
from typing import Any, Self

import redis

from support.cluster import Cluster
from support.ledger import Ledger, Producer, Report, longest_gap, new_run_id, wait_until

HERE = Path(__file__).resolve().parent


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

    def __init__(
        self, cluster: Cluster, name: str, rate: float = RATE, max_seconds: float = 900.0
    ) -> None:
        self.c = cluster
        self.ledger = Ledger(new_run_id(name))
        self.producer = Producer(
            self.ledger, cluster.sender(self.ledger), rate=rate, max_seconds=max_seconds
        )
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

    def finish(
        self,
        drain_timeout: float = 240,
        gap_from: float | None = None,
        parked_ok: bool = True,
        stop_at: float | None = None,
    ) -> Report:
        """Stop publishing, wait for every accepted task, report. ``parked_ok=False``: a task
        still parked in the unacked hash at the end counts as lost. ``stop_at``: where the
        gap window ends when another producer ran on after this one stopped."""
        self.producer.stop()
        t_stop = stop_at or time.time()
        parked = self.c.wait_drained(self.ledger, timeout=drain_timeout, parked_ok=parked_ok)
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
            report.extra["its traceback"] = self.producer.last_traceback
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


# --------------------------------------------------------------------------------------
# Failover helpers
# --------------------------------------------------------------------------------------
def earliest_switch(c: Cluster, since: float, hosts: list[str] | None = None) -> float | None:
    """Unix time of the first +switch-master any reachable Sentinel logged after ``since``."""
    found: list[float] = []
    for host in hosts or c.sentinel_hosts:
        out = c.lab.ssh(
            host,
            f"journalctl -u {c.flavor.sentinel_unit} --since @{since:.3f} -o short-unix --no-pager "
            "| grep -F '+switch-master' || true",
            check=False,
            timeout=20,
        )
        for line in out.splitlines():
            try:
                found.append(float(line.split()[0]))
            except (ValueError, IndexError):
                continue
    return min(found) if found else None


class TwoProducers:
    """A drill's load: the controller's producer (``load``) and one on a worker host
    (``remote``), publishing into the same ledger; entered once both are flowing."""

    def __init__(
        self, c: Cluster, name: str, remote_host: str, remote_seconds: float = 600
    ) -> None:
        self.c = c
        # The controller's producer lasts at least as long as the remote one: an operation
        # that outlasted its default 900 s (a rotation on a loaded machine) showed as a stall.
        self.load = Load(c, name, max_seconds=max(remote_seconds, 900.0))
        self.remote = RemoteProducer(c, remote_host, self.load.ledger)
        self._remote_seconds = remote_seconds

    def __enter__(self) -> Self:
        self.remote.start(max_seconds=self._remote_seconds)
        self.load.__enter__()

        def remote_flowing() -> bool:
            self.remote.collect()
            return bool(self.remote.published_times())

        wait_until(remote_flowing, 60, what=f"the producer on {self.remote.host}")
        return self

    def __exit__(self, *exc: object) -> None:
        self.load.producer.stop()
        self.remote.stop()

    def publish_stalls(self, start: float, end: float) -> dict[str, Any]:
        """Each producer's longest stall inside [start, end], and when it began (s after
        ``start``): a stall long after the fault points at the repair, not at the switch."""
        controller = [
            t
            for i, t in self.load.ledger.published.items()
            if f"{self.load.ledger.run_id}-r" not in i
        ]
        figures: dict[str, Any] = {}
        for name, times in (
            ("controller", controller),
            ("worker_host", self.remote.published_times()),
        ):
            gap, began, _ = longest_gap(times, start, end)
            figures[f"{name}_publish_stall_s"] = round(gap, 2)
            figures[f"{name}_publish_stall_began_s"] = round(began - start, 2)
        return figures


def wait_new_master(c: Cluster, old: str, timeout: float = 120) -> str:
    """The host that every Sentinel but old's names as master once it is not ``old``."""
    others = [h for h in c.sentinel_hosts if h != old]

    def elected() -> str | None:
        named = {v for v in c.sentinel_views(others).values() if v}
        if len(named) == 1 and c.addresses[old] not in named:
            return c.lab.host_of(named.pop())
        return None

    # Sentinel retries a split vote after 2 x failover-timeout: well inside the default bound.
    return str(wait_until(elected, timeout, interval=0.2, what="a new master"))


def ineligible_seen(c: Cluster, sentinel: redis.Redis, hosts: list[str]) -> bool:
    """Whether ``sentinel`` lists every one of ``hosts`` with replica-priority 0."""
    priorities = {r["ip"]: r["slave-priority"] for r in sentinel.sentinel_slaves(c.master_name)}
    return all(priorities.get(c.addresses[h]) == 0 for h in hosts)


def make_master(c: Cluster, host: str, workers: list[str]) -> None:
    """Fail over (SENTINEL FAILOVER) until ``host`` is the master, then wait for health.

    The other replicas are made ineligible (replica-priority 0) for the election and given
    their priority back afterwards, saved with CONFIG REWRITE as Sentinel saves its changes.
    """
    if wait_healthy(c, workers) == host:
        return
    others = [h for h in c.redis_hosts if h != host and c.role_of(h) != "master"]
    try:
        for other in others:
            c.redis_on(other, admin=True).config_set("replica-priority", 0)
        sentinel = c.sentinel_client(c.lab.host_of(c.sentinels[0][0]))
        try:
            # Sentinel elects from the priorities it last read in each replica's INFO, every
            # 10 s outside a failover: fail over before it has read the 0 and another replica
            # may win (a clean-clone run made node2 the master instead of node1 so).
            wait_until(
                lambda: ineligible_seen(c, sentinel, others),
                30,
                interval=0.5,
                what=f"the Sentinel to read replica-priority 0 on {others}",
            )
            sentinel.execute_command("SENTINEL", "FAILOVER", c.master_name)
        finally:
            sentinel.close()
        wait_until(lambda: c.master_host() == host, 60, interval=0.5, what=f"{host} as master")
    finally:
        for other in others:
            admin = c.redis_on(other, admin=True)
            admin.config_set("replica-priority", 100)
            admin.execute_command("CONFIG", "REWRITE")
    wait_healthy(c, workers)
    say(f"made {host} the master")


class RemoteProducer:
    """remote_producer.py on a worker host, publishing into the same ledger run."""

    DIR = "/tmp/celery-ha-drill"

    def __init__(self, c: Cluster, host: str, ledger: Ledger, rate: float = RATE) -> None:
        self.c, self.host, self.ledger, self.rate = c, host, ledger, rate
        self.out = f"{self.DIR}/{ledger.run_id}-producer.log"
        self.failures = 0
        self.stopped = False

    def start(self, max_seconds: float = 600) -> None:
        ship = " && ".join(
            f"echo {base64.b64encode((HERE / name).read_bytes()).decode()} | base64 -d "
            f"> {self.DIR}/{name}"
            for name in ("ledger.py", "remote_producer.py")
        )
        args = shlex.join([str(self.ledger.run_id), str(self.rate), str(max_seconds), self.out])
        self.c.lab.ssh(
            self.host,
            f"install -d -o celery -g celery {self.DIR} && {ship} && cd {self.DIR} && "
            # Detached, and nothing of it on ssh's channel, or ssh waits for it to end.
            f"{{ setsid runuser -u celery -- /opt/celery-ha/venv/bin/python "
            f"remote_producer.py {args} > {self.out}.err 2>&1 < /dev/null & }}",
        )

    def _pattern(self) -> str:
        # This run's producer only: one left hanging by an earlier drill must not be taken
        # for this one, nor keep this one's stop waiting.
        return shlex.quote(f"[r]emote_producer.py {self.ledger.run_id} ")

    def stop(self) -> None:
        if self.stopped:
            return
        self.stopped = True
        pattern = self._pattern()
        # SIGUSR1 first: every thread's stack goes to the .err file, so a publish that hangs
        # shows where it hangs.
        self.c.lab.ssh(
            self.host, f"pkill -USR1 -f {pattern}; sleep 0.5; touch {self.out}.stop", check=False
        )
        try:
            wait_until(
                lambda: (
                    not self.c.lab.ssh(
                        self.host, f"pgrep -f {pattern} || true", check=False
                    ).strip()
                ),
                150,
                what=f"the producer on {self.host} to stop",
            )
        except TimeoutError:
            say(f"producer on {self.host} did not stop; its threads: {self._stderr(20000)}")
            self.c.lab.ssh(self.host, f"pkill -KILL -f {pattern}", check=False)
            raise
        finally:
            self.collect()

    def collect(self) -> None:
        text = self.c.lab.ssh(self.host, f"cat {self.out} 2>/dev/null || true", check=False)
        self.failures = 0
        for line in text.splitlines():
            parts = line.split()
            if len(parts) != 3:
                continue
            if parts[0] == "P":
                self.ledger.mark_published(parts[1], float(parts[2]))
            elif parts[0] == "F":
                self.failures += 1
                self.ledger.mark_failed_publish(parts[1], "failed on " + self.host)
        err = self._stderr(3000)
        if err:
            say(f"producer on {self.host} said: {err}")

    def _stderr(self, limit: int) -> str:
        return self.c.lab.ssh(
            self.host, f"tail -c {limit} {self.out}.err 2>/dev/null", check=False
        ).strip()

    def published_times(self) -> list[float]:
        prefix = f"{self.ledger.run_id}-r"
        return [t for i, t in self.ledger.published.items() if i.startswith(prefix)]
