"""The sample app's tasks, run in-process with apply() (no broker, no worker)."""

from __future__ import annotations

import time

import pytest
from celery import Celery
from celery.schedules import crontab


def test_arithmetic(sample_app: Celery) -> None:
    from celery_ha_app.tasks import add, mul, xsum

    assert add.apply((5, 7)).get() == 12
    assert mul.apply((3, 4)).get() == 12
    assert xsum.apply(([1, 2, 3],)).get() == 6


def test_chain_returns_20(sample_app: Celery) -> None:
    from celery_ha_app.canvas import chain_example

    assert chain_example().apply().get() == 20


def test_group_returns_4_and_6_in_order(sample_app: Celery) -> None:
    from celery_ha_app.canvas import group_example

    assert group_example().apply().get() == [4, 6]


@pytest.mark.parametrize("fail_times", [0, 1, 3])
def test_flaky_succeeds_after_its_planned_failures(sample_app: Celery, fail_times: int) -> None:
    from celery_ha_app.tasks import flaky

    assert flaky.apply((fail_times,)).get() == {
        "attempts": fail_times + 1,
        "retries": fail_times,
    }


def test_flaky_fails_when_retries_are_exhausted(sample_app: Celery) -> None:
    from celery_ha_app.tasks import FLAKY_MAX_RETRIES, FlakyError, flaky

    result = flaky.apply((FLAKY_MAX_RETRIES + 1,))
    assert result.state == "FAILURE"
    with pytest.raises(FlakyError, match=f"planned failure {FLAKY_MAX_RETRIES + 1} of"):
        result.get()


def test_flaky_retry_options(sample_app: Celery) -> None:
    from celery_ha_app.tasks import FLAKY_MAX_RETRIES, flaky

    assert flaky.max_retries == FLAKY_MAX_RETRIES == 3


def test_sleepy_has_a_hard_time_limit_and_a_rate_limit(sample_app: Celery) -> None:
    from celery_ha_app.tasks import SLEEPY_TIME_LIMIT, sleepy

    assert sleepy.time_limit == SLEEPY_TIME_LIMIT
    assert sleepy.rate_limit == "60/m"
    assert sleepy.apply((0.01,)).get() == 0.01


def test_reminder_records_its_last_run(sample_app: Celery) -> None:
    from celery_ha_app.tasks import last_reminder, reminder

    before = time.time()
    returned = reminder.apply().get()
    stored = last_reminder(sample_app.backend)
    assert stored == returned
    assert stored["ran_at_epoch"] >= before
    assert stored["ran_at"].endswith("+00:00")


def test_beat_runs_reminder_every_minute(sample_app: Celery) -> None:
    entries = [e for e in sample_app.conf.beat_schedule.values() if e["task"].endswith("reminder")]
    assert len(entries) == 1
    assert entries[0]["schedule"] == crontab()  # minute="*": every minute
    assert entries[0]["task"] in sample_app.tasks


def test_routing_reports_and_default(sample_app: Celery) -> None:
    router = sample_app.amqp.router
    assert router.route({}, "reports.generate")["queue"].name == "reports"
    assert router.route({}, "celery_ha_app.tasks.add")["queue"].name == "default"


def test_report_says_where_it_ran(sample_app: Celery) -> None:
    from celery_ha_app.reports import generate

    assert generate.apply(("r1",)).get()["report_id"] == "r1"


def test_json_only(sample_app: Celery) -> None:
    # pickle from Redis would mean code execution for anyone who can write to it.
    assert sample_app.conf.accept_content == ["json"]


def test_inventory_app_counts_items() -> None:
    from inventory_app.worker import count_items, inventory, total

    inventory.conf.update(broker_url="memory://", result_backend="cache+memory://")
    assert count_items.apply((["a", "b", "a"],)).get() == {"a": 2, "b": 1}
    assert total.apply((["a", "b"],)).get() == 2
