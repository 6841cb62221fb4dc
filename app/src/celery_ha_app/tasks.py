"""The tasks a team tries first, each one exercising a delivery behaviour."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime
from typing import Any

from celery import Task

from celery_ha_app.main import app

# Where `reminder` leaves its last run, in the result backend, so a test or an operator can
# see that beat is alive without knowing the ids of the tasks beat sent.
REMINDER_KEY = "celery-ha:reminder:last"

FLAKY_MAX_RETRIES = 3
SLEEPY_TIME_LIMIT = 5


class FlakyError(RuntimeError):
    """Raised by `flaky` on each planned failure (and as its final error when it gives up)."""


@app.task
def add(x: int, y: int) -> int:
    return x + y


@app.task
def mul(x: int, y: int) -> int:
    return x * y


@app.task
def xsum(numbers: list[int]) -> int:
    return sum(numbers)


@app.task(bind=True, max_retries=FLAKY_MAX_RETRIES, default_retry_delay=1)
def flaky(self: Task, fail_times: int) -> dict[str, int]:
    """Fail the first ``fail_times`` attempts, then succeed.

    Deterministic on purpose (it counts ``request.retries`` instead of rolling dice), so a
    test knows the outcome: ``fail_times <= 3`` succeeds on attempt ``fail_times + 1``;
    ``fail_times > 3`` exhausts ``max_retries`` and ends FAILED with FlakyError.
    """
    attempt = self.request.retries + 1
    if self.request.retries < fail_times:
        raise self.retry(exc=FlakyError(f"planned failure {attempt} of {fail_times}"), countdown=1)
    return {"attempts": attempt, "retries": self.request.retries}


@app.task(time_limit=SLEEPY_TIME_LIMIT, rate_limit="60/m")
def sleepy(seconds: float) -> float:
    """Sleep, but never past ``time_limit``: the worker kills the call at 5 s (hard limit,
    enforced by the prefork pool) and the task fails with TimeLimitExceeded. ``rate_limit``
    caps each worker at 60 starts a minute, whatever the queue holds."""
    time.sleep(seconds)
    return seconds


@app.task(bind=True)
def reminder(self: Task) -> dict[str, Any]:
    """Run by beat every minute; records when it ran where anyone can read it back."""
    record = {
        "ran_at": datetime.now(UTC).isoformat(),
        "ran_at_epoch": time.time(),
        "hostname": self.request.hostname,
        "task_id": self.request.id,
    }
    # backend.set() is the key-value API every KV result backend (Redis included) has, so
    # this works through the Sentinel-managed connection without another client. The key
    # expires with result_expires, like the results themselves.
    self.backend.set(REMINDER_KEY, json.dumps(record))
    return record


def last_reminder(backend: Any = None) -> dict[str, Any] | None:
    """The record the last `reminder` stored, or None if it never ran (or it expired)."""
    raw = (backend or app.backend).get(REMINDER_KEY)
    if raw is None:
        return None
    return json.loads(raw)
