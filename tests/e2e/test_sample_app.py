"""The sample app on the deployed lab, from the controller through the Sentinels."""

from __future__ import annotations

import json
import time

import pytest
from celery import Celery
from celery.exceptions import TimeLimitExceeded
from support.e2e_lab import LabInventory

RESULT_TIMEOUT = 60


def test_add(sample_app: Celery) -> None:
    from celery_ha_app.tasks import add

    assert add.delay(5, 7).get(timeout=RESULT_TIMEOUT) == 12


def test_chain(sample_app: Celery) -> None:
    from celery_ha_app.canvas import chain_example

    assert chain_example().delay().get(timeout=RESULT_TIMEOUT) == 20


def test_group(sample_app: Celery) -> None:
    from celery_ha_app.canvas import group_example

    assert group_example().delay().get(timeout=RESULT_TIMEOUT) == [4, 6]


def test_retrying_task_succeeds_after_its_planned_failures(sample_app: Celery) -> None:
    from celery_ha_app.tasks import flaky

    result = flaky.delay(2).get(timeout=RESULT_TIMEOUT)
    assert result == {"attempts": 3, "retries": 2}


def test_retrying_task_fails_once_retries_are_exhausted(sample_app: Celery) -> None:
    from celery_ha_app.tasks import FLAKY_MAX_RETRIES, flaky

    res = flaky.delay(FLAKY_MAX_RETRIES + 2)
    with pytest.raises(Exception) as excinfo:
        res.get(timeout=RESULT_TIMEOUT)
    assert res.state == "FAILURE"
    assert type(excinfo.value).__name__ == "FlakyError"
    assert f"planned failure {FLAKY_MAX_RETRIES + 1} of" in str(excinfo.value)


def test_the_journal_keeps_failures_and_retries_but_no_line_per_task(
    sample_app: Celery, lab: LabInventory
) -> None:
    """celery_log_each_task is off by default: no "received" or "succeeded" line per task (at a
    few hundred tasks/s they pass journald's rate limit, which then drops errors too), while a
    failing task's retries and its failure are in the journal of the worker that ran it."""
    from celery_ha_app.tasks import FLAKY_MAX_RETRIES, add, flaky

    done, failing = add.delay(19, 23), flaky.delay(FLAKY_MAX_RETRIES + 2)
    assert done.get(timeout=RESULT_TIMEOUT) == 42
    with pytest.raises(Exception, match="planned failure"):
        failing.get(timeout=RESULT_TIMEOUT)
    # The failure is logged right after its result is stored: give journald a moment.
    deadline = time.monotonic() + 15
    while True:
        journals = "\n".join(
            lab.lab_cmd("ssh", host, "journalctl --since=-10min -o cat --no-pager")
            for host in lab.groups["celery_workers"]
        )
        failing_lines = [line for line in journals.splitlines() if failing.id in line]
        if any("raised unexpected" in line for line in failing_lines):
            break
        assert time.monotonic() < deadline, f"no failure line for {failing.id}: {failing_lines}"
        time.sleep(1)
    assert done.id not in journals
    assert any(" retry: " in line for line in failing_lines), failing_lines
    assert not [line for line in failing_lines if "received" in line or "succeeded" in line]


def test_time_limited_task_is_killed_at_its_limit(sample_app: Celery) -> None:
    from celery_ha_app.tasks import SLEEPY_TIME_LIMIT, sleepy

    started = time.monotonic()
    res = sleepy.delay(SLEEPY_TIME_LIMIT * 4)
    with pytest.raises(TimeLimitExceeded):
        res.get(timeout=RESULT_TIMEOUT)
    print(
        f"sleepy({SLEEPY_TIME_LIMIT * 4}) ended after {time.monotonic() - started:.1f} s "
        f"(time_limit {SLEEPY_TIME_LIMIT} s)"
    )
    assert res.state == "FAILURE"
    # A short call under the limit still succeeds: the limit kills, it does not refuse.
    assert sleepy.delay(0.1).get(timeout=RESULT_TIMEOUT) == 0.1


def test_beat_reminder_runs_within_70_seconds(sample_app: Celery) -> None:
    from celery_ha_app.tasks import REMINDER_KEY

    since = time.time()
    deadline = time.monotonic() + 70
    record = None
    while time.monotonic() < deadline:
        raw = sample_app.backend.get(REMINDER_KEY)
        if raw:
            record = json.loads(raw)
            if record["ran_at_epoch"] >= since:
                break
        time.sleep(2)
    assert record is not None and record["ran_at_epoch"] >= since, (
        f"no reminder run in the 70 s after {since} (last: {record})"
    )
    print(f"reminder ran on {record['hostname']} at {record['ran_at']}")


def test_report_runs_on_a_worker_of_the_reports_queue(sample_app: Celery) -> None:
    from celery_ha_app.reports import generate

    result = generate.delay("e2e").get(timeout=RESULT_TIMEOUT)
    assert result["routing_key"] == "reports"
    active = sample_app.control.inspect(timeout=5).active_queues() or {}
    consumers = {
        node for node, queues in active.items() if any(q["name"] == "reports" for q in queues)
    }
    assert consumers, f"no worker consumes reports: {active}"
    assert result["hostname"] in consumers


def test_every_worker_answers_ping(sample_app: Celery, lab: LabInventory) -> None:
    expected = lab.expected_nodes()
    answered: set[str] = set()
    for _ in range(5):  # a reply can miss one broadcast window; never the same node 5 times
        replies = sample_app.control.ping(timeout=3) or []
        answered |= {
            node for reply in replies for node, pong in reply.items() if pong.get("ok") == "pong"
        }
        if expected <= answered:
            break
    assert expected - answered == set(), f"no pong from {expected - answered}"
