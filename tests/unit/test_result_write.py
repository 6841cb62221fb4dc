"""The bundle's result write (celery_ha_failover.FirstResultInOneTrip) does what celery's own
does, in one round trip when the task has no state stored yet: against a real Redis server on
loopback (make unit installs redis-tools)."""

from __future__ import annotations

import json
from collections.abc import Iterator

import celery_ha_failover as failover
import pytest
import redis
from celery import Celery, states
from celery.backends.redis import RedisBackend

EXPIRES = 600


class LocalBackend(failover.FirstResultInOneTrip, RedisBackend):
    """The bundle's result write on one Redis server, no Sentinel."""


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    return client


@pytest.fixture
def backend(redis_url: str, client: redis.Redis) -> Iterator[LocalBackend]:
    app = Celery("t", set_as_current=False)
    app.conf.update(result_backend=redis_url, result_expires=EXPIRES)
    yield LocalBackend(app=app, url=redis_url)
    app.close()


def stored(client: redis.Redis, task_id: str) -> dict:
    return json.loads(client.get(f"celery-task-meta-{task_id}"))


def test_a_first_result_is_stored_with_its_expiry_and_published(
    backend: LocalBackend, client: redis.Redis
) -> None:
    listener = client.pubsub(ignore_subscribe_messages=True)
    listener.subscribe("celery-task-meta-t1")
    backend.store_result("t1", 42, states.SUCCESS)
    meta = stored(client, "t1")
    assert (meta["status"], meta["result"], meta["task_id"]) == (states.SUCCESS, 42, "t1")
    assert 0 < client.ttl("celery-task-meta-t1") <= EXPIRES
    # The first read may return the subscription's own confirmation (None here).
    messages = [listener.get_message(timeout=2) for _ in range(2)]
    published = [json.loads(m["data"]) for m in messages if m]
    assert [m["result"] for m in published] == [42]
    # What a caller's AsyncResult reads.
    assert backend.get_task_meta("t1")["result"] == 42


def test_a_later_state_replaces_an_earlier_one(backend: LocalBackend, client: redis.Redis) -> None:
    backend.store_result("t2", None, states.STARTED)
    backend.store_result("t2", "done", states.SUCCESS)
    assert stored(client, "t2")["status"] == states.SUCCESS
    assert stored(client, "t2")["result"] == "done"


def test_a_success_is_never_overwritten(backend: LocalBackend, client: redis.Redis) -> None:
    # celery's guard for a task that ran twice (a redelivery after a lost ack): the run that
    # failed second does not replace the result of the one that succeeded.
    backend.store_result("t3", 1, states.SUCCESS)
    backend.store_result("t3", ValueError("second run"), states.FAILURE)
    assert stored(client, "t3")["status"] == states.SUCCESS


def test_without_expiry_the_result_stays(backend: LocalBackend, client: redis.Redis) -> None:
    backend.expires = None
    backend.store_result("t4", 1, states.SUCCESS)
    assert client.ttl("celery-task-meta-t4") == -1


def test_a_master_that_cannot_write_gets_nothing(
    backend: LocalBackend, client: redis.Redis
) -> None:
    # The write guard of an isolated master: Redis refuses the whole script up front, so the
    # refusal reaches the caller (as NotMasterError through the bundle's connections, which
    # celery retries on the new master) and nothing is half written.
    client.config_set("min-replicas-to-write", 1)
    try:
        with pytest.raises(redis.exceptions.ResponseError, match=r"^NOREPLICAS"):
            failover._STORE_FIRST_RESULT(client, ["celery-task-meta-t5"], ["x", 0])
    finally:
        client.config_set("min-replicas-to-write", 0)
    assert client.get("celery-task-meta-t5") is None
