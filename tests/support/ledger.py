"""Task ledger and steady-load producer for the fault drills.

The promise under test is "no task whose publish succeeded is ever lost". To check it the
producer gives every task a unique ledger id and remembers it only once the broker accepted the
publish. The drill task (``drills.ledger_record`` in the sample app) appends one line per
execution to a file on the worker host, so the ground truth of "it ran" does not depend on the
Redis that is being broken: a record written to Redis just before a failover could vanish with
the old master and make a task that did run look lost.

Ledger line format, one ``write()`` per line (O_APPEND keeps concurrent pool processes from
interleaving): ``<kind> <ledger_id> <unix_time> <worker_hostname> <pid>`` where kind is ``S``
(started, only written by slow tasks so a drill can find the process running them) or ``D``
(done).

This module has no dependency on the lab or on Celery so the accounting can be unit tested.
"""

from __future__ import annotations

import re
import threading
import time
import traceback
from collections import Counter
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from itertools import pairwise
from typing import Self

RUN_ID_RE = re.compile(r"^[A-Za-z0-9_-]{1,64}$")

# Where the drill task writes; must match app/*/drill_tasks.py (it reads the same env var).
LEDGER_DIR_ENV = "CELERY_HA_DRILL_LEDGER_DIR"
DEFAULT_LEDGER_DIR = "/var/lib/celery-ha/drill-ledger"
RECORD_TASK = "drills.ledger_record"
NOOP_TASK = "drills.noop"


def new_run_id(prefix: str) -> str:
    run_id = f"{prefix}-{time.strftime('%H%M%S')}-{int(time.time() * 1000) % 100000:05d}"
    if not RUN_ID_RE.match(run_id):
        raise ValueError(f"bad run id {run_id!r}")
    return run_id


@dataclass(frozen=True)
class Execution:
    kind: str  # "S" started, "D" done
    ledger_id: str
    ts: float
    worker: str
    pid: int
    host: str = ""  # lab host the line was read from


def parse_lines(text: str, host: str = "") -> list[Execution]:
    """Parse ledger lines; a torn last line (host crashed mid-write) is skipped, not fatal."""
    out: list[Execution] = []
    for line in text.splitlines():
        parts = line.split()
        if len(parts) != 5 or parts[0] not in ("S", "D"):
            continue
        try:
            out.append(
                Execution(parts[0], parts[1], float(parts[2]), parts[3], int(parts[4]), host)
            )
        except ValueError:
            continue
    return out


def longest_gap(times: Iterable[float], start: float, end: float) -> tuple[float, float, float]:
    """Longest interval inside [start, end] with no completion: (gap, gap_start, gap_end)."""
    points = sorted(t for t in times if start <= t <= end)
    edges = [start, *points, end]
    best = (0.0, start, start)
    for a, b in pairwise(edges):
        if b - a > best[0]:
            best = (b - a, a, b)
    return best


@dataclass
class Report:
    run_id: str
    published: int
    publish_failures: int
    ran: int
    lost: list[str]
    duplicates: dict[str, int]
    parked: list[str]  # in the broker's unacked hash: redelivered after visibility_timeout
    failed: int = 0
    gap: tuple[float, float, float] | None = None
    extra: dict[str, object] = field(default_factory=dict)

    def summary(self) -> str:
        lines = [
            (
                f"[{self.run_id}] published={self.published} "
                f"publish_failures={self.publish_failures} ran={self.ran} "
                f"lost={len(self.lost)} duplicates={len(self.duplicates)} "
                f"parked={len(self.parked)} failed={self.failed}"
            ),
        ]
        if self.gap is not None:
            lines.append(
                f"[{self.run_id}] longest gap with no task completing: {self.gap[0]:.2f} s"
            )
        for key, value in self.extra.items():
            lines.append(f"[{self.run_id}] {key}: {value}")
        if self.lost:
            lines.append(f"[{self.run_id}] lost ids (first 20): {self.lost[:20]}")
        if self.duplicates:
            sample = dict(list(self.duplicates.items())[:10])
            lines.append(f"[{self.run_id}] duplicate executions (id: times, first 10): {sample}")
        if self.parked:
            lines.append(f"[{self.run_id}] parked in unacked (first 10): {self.parked[:10]}")
        return "\n".join(lines)


class Ledger:
    """Thread-safe record of accepted publishes and observed executions."""

    def __init__(self, run_id: str) -> None:
        if not RUN_ID_RE.match(run_id):
            raise ValueError(f"run id must match {RUN_ID_RE.pattern}: {run_id!r}")
        self.run_id = run_id
        self._lock = threading.Lock()
        self.published: dict[str, float] = {}
        self.publish_failures: list[tuple[str, float, str]] = []
        self._by_host: dict[str, list[Execution]] = {}

    def ledger_id(self, seq: int, tag: str = "") -> str:
        """``tag`` tells producers of one run apart (``r``: the one on a worker host)."""
        return f"{self.run_id}-{tag}{seq:07d}"

    def mark_published(self, ledger_id: str, ts: float | None = None) -> None:
        with self._lock:
            self.published[ledger_id] = time.time() if ts is None else ts

    def mark_failed_publish(self, ledger_id: str, error: str) -> None:
        with self._lock:
            self.publish_failures.append((ledger_id, time.time(), error))

    def set_host_lines(self, host: str, text: str) -> None:
        """Replace what we know from one host (files only grow, so the latest read wins)."""
        execs = [e for e in parse_lines(text, host) if e.ledger_id.startswith(self.run_id + "-")]
        with self._lock:
            if len(execs) >= len(self._by_host.get(host, [])):
                self._by_host[host] = execs

    def executions(self, kind: str = "D") -> list[Execution]:
        with self._lock:
            return [e for execs in self._by_host.values() for e in execs if e.kind == kind]

    def done_counts(self) -> Counter[str]:
        return Counter(e.ledger_id for e in self.executions("D"))

    def pending(self) -> set[str]:
        """Published ids not yet seen done."""
        done = self.done_counts()
        with self._lock:
            return {i for i in self.published if i not in done}

    def completion_times(self) -> list[float]:
        return sorted(e.ts for e in self.executions("D"))

    def report(
        self,
        parked: Iterable[str] = (),
        failed: int = 0,
        gap_window: tuple[float, float] | None = None,
    ) -> Report:
        done = self.done_counts()
        parked_set = set(parked)
        with self._lock:
            published = dict(self.published)
            failures = len(self.publish_failures)
        lost = sorted(i for i in published if i not in done and i not in parked_set)
        dups = {i: n for i, n in sorted(done.items()) if n > 1}
        gap = None
        if gap_window is not None:
            gap = longest_gap(self.completion_times(), *gap_window)
        return Report(
            run_id=self.run_id,
            published=len(published),
            publish_failures=failures,
            ran=sum(1 for i in published if i in done),
            lost=lost,
            duplicates=dups,
            parked=sorted(i for i in parked_set if i in published and i not in done),
            failed=failed,
            gap=gap,
        )


class Producer:
    """Publishes ledger tasks at a steady rate from a background thread.

    ``send(ledger_id)`` must return only once the broker accepted the message and raise
    otherwise. A publish that blocks (the client retrying through a failover) delays the
    schedule; the producer then carries on at the same rate rather than bursting to catch up.
    ``max_seconds`` bounds the thread even if a drill forgets to stop it.
    """

    def __init__(
        self,
        ledger: Ledger,
        send: Callable[[str], None],
        rate: float = 20.0,
        max_seconds: float = 900.0,
        tag: str = "",
    ) -> None:
        if rate <= 0:
            raise ValueError("rate must be > 0")
        self.tag = tag
        self.ledger = ledger
        self.send = send
        self.interval = 1.0 / rate
        self.max_seconds = max_seconds
        self._stop = threading.Event()
        self._seq = 0
        self._thread = threading.Thread(
            target=self._run, name=f"producer-{ledger.run_id}", daemon=True
        )
        self.last_error: str | None = None
        self.last_traceback: str | None = None

    def __enter__(self) -> Self:
        self.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 120.0) -> None:
        self._stop.set()
        self._thread.join(timeout)

    @property
    def running(self) -> bool:
        return self._thread.is_alive()

    def publish_one(self) -> str:
        ledger_id = self.ledger.ledger_id(self._seq, self.tag)
        self._seq += 1
        try:
            self.send(ledger_id)
        except Exception as exc:
            self.last_error = f"{type(exc).__name__}: {exc}"
            self.last_traceback = traceback.format_exc(limit=-12)
            self.ledger.mark_failed_publish(ledger_id, self.last_error)
        else:
            self.ledger.mark_published(ledger_id)
        return ledger_id

    def _run(self) -> None:
        deadline = time.monotonic() + self.max_seconds
        next_at = time.monotonic()
        while not self._stop.is_set() and time.monotonic() < deadline:
            self.publish_one()
            next_at = max(next_at + self.interval, time.monotonic())
            self._stop.wait(max(0.0, next_at - time.monotonic()))


def wait_until(
    predicate: Callable[[], object],
    timeout: float,
    interval: float = 1.0,
    what: str = "condition",
) -> object:
    """Poll ``predicate`` until it returns something truthy, and return that. An error it
    raises counts as "not yet" (the cluster may be down meanwhile). After ``timeout``, raise
    TimeoutError naming ``what`` and the last answer or error. The one poller of the tests."""
    deadline = time.monotonic() + timeout
    last: object = None
    while True:
        try:
            value = predicate()
        except Exception as exc:
            value, last = None, exc
        else:
            last = value
        if value:
            return value
        if time.monotonic() >= deadline:
            raise TimeoutError(
                f"timed out after {timeout:.0f} s waiting for {what} (last: {str(last)[:300]!r})"
            )
        time.sleep(interval)
