"""Tasks the fault drills and benchmarks use (tests/drills, bench/).

``ledger_record`` appends one line per execution to a file in the worker's state directory,
not to Redis: the drills break Redis on purpose, and a record written to a master that dies
before replicating it would make a task that did run look lost. Lines are written with a
single ``os.write`` on an O_APPEND descriptor so the pool processes of one host never
interleave them, and they survive the worker being SIGKILLed (the kernel has them).

Format (tests/support/ledger.py parses it): ``<S|D> <ledger_id> <unix_time> <worker> <pid>``.
"""

from __future__ import annotations

import os
import re
import time

from celery import Task

from celery_ha_app.main import app

LEDGER_DIR_ENV = "CELERY_HA_DRILL_LEDGER_DIR"
DEFAULT_LEDGER_DIR = "/var/lib/celery-ha/drill-ledger"
_SAFE = re.compile(r"^[A-Za-z0-9_-]{1,80}$")


def _append(kind: str, ledger_id: str, run_id: str, worker: str) -> None:
    if not (_SAFE.match(ledger_id) and _SAFE.match(run_id)):
        # Names become a file path: refuse anything that could leave the ledger folder.
        raise ValueError("ledger_id and run_id must match [A-Za-z0-9_-]{1,80}")
    folder = os.environ.get(LEDGER_DIR_ENV) or DEFAULT_LEDGER_DIR
    os.makedirs(folder, mode=0o750, exist_ok=True)
    line = f"{kind} {ledger_id} {time.time():.6f} {worker} {os.getpid()}\n".encode()
    fd = os.open(
        os.path.join(folder, f"{run_id}.log"), os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o640
    )
    try:
        os.write(fd, line)
    finally:
        os.close(fd)


@app.task(bind=True, name="drills.ledger_record")
def ledger_record(self: Task, ledger_id: str, run_id: str, sleep_s: float = 0.0) -> str:
    """Record that ``ledger_id`` ran; a slow one first records its start (and its pid)."""
    worker = self.request.hostname or "unknown"
    if sleep_s > 0:
        _append("S", ledger_id, run_id, worker)
        time.sleep(sleep_s)
    _append("D", ledger_id, run_id, worker)
    return ledger_id


@app.task(bind=True, name="drills.beat_tick")
def beat_tick(self: Task, run_id: str) -> str:
    """One run of the beat drill's periodic entry. The ledger id carries the time beat sent it
    (ms) and the task id: two beats sending the same run make two ids, one message redelivered
    makes the same id twice."""
    sent = self.request.get("celery_ha_sent_at") or "0"
    ledger_id = f"{run_id}-{int(float(sent) * 1000)}-{self.request.id}"
    _append("D", ledger_id, run_id, self.request.hostname or "unknown")
    return ledger_id


@app.task(name="drills.noop")
def noop(*_payload: object) -> None:
    """Does nothing: throughput benchmarks measure the plumbing, not the work (the bench's
    payload rows pass it a payload to carry)."""


@app.task(name="drills.pause")
def pause(seconds: float) -> None:
    """Waits, as a task waiting on I/O does: the bench's pool rows (threads against
    processes) need tasks that take time without holding the GIL."""
    time.sleep(seconds)
