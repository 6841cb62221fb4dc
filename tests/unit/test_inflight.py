"""A worker killed as it takes a message does not lose it: the in-flight list of
celery_ha_failover.SentinelChannel and the put-back of celery_ha_redelivery, against a real
Redis server on loopback (Debian's redis-tools: make unit installs it)."""

from __future__ import annotations

import json
import time
from queue import Empty
from types import SimpleNamespace
from typing import Any

import celery_ha_failover as failover
import celery_ha_redelivery as rd
import pytest
import redis
from celery import Celery
from conftest import LocalTransport
from kombu import Connection, Exchange, Queue
from support.ledger import wait_until


@pytest.fixture
def client(redis_url: str) -> redis.Redis:
    client = redis.Redis.from_url(redis_url)
    client.flushall()
    return client


def direct_queue(name: str) -> Queue:
    return Queue(name, Exchange(name, type="direct"), routing_key=name)


QUEUE = direct_queue("work")
OPTIONS = {"master_name": "unused", "priority_steps": [0]}


def publish(redis_url: str, queue: str, *bodies: str) -> None:
    q = direct_queue(queue)
    with Connection(redis_url, transport=LocalTransport, transport_options=OPTIONS) as conn:
        producer = conn.Producer()
        for body in bodies:
            producer.publish(body, exchange=q.exchange, routing_key=queue, declare=[q])


def consumer_channel(
    conn: Connection, prefix: str | None, got: list[str], *queues: Queue, no_ack: bool = False
) -> Any:
    channel = conn.channel()
    for n, q in enumerate(queues or (QUEUE,)):
        q(channel).declare()
        channel.basic_consume(q.name, no_ack, lambda m: got.append(m.body.decode()), f"tag{n}")
    if prefix is not None:
        # What celery_ha_redelivery sets for a worker's channel.
        channel.inflight_prefix = prefix
        channel.fetched_key = FETCHED
    # What kombu's poller does before its first BRPOP (MultiChannelPoller._client_registered).
    channel.client.connection = channel.client.connection_pool.get_connection()
    return channel


def kill(channel: Any) -> None:
    """The worker process dies: its socket closes, and nothing of kombu's orderly close runs
    (which would read the pending reply and put back what the channel holds)."""
    channel.client.connection.disconnect()
    channel._in_poll = None
    channel.qos._delivered.clear()


PREFIX = rd.inflight_prefix("w@h")
FETCHED = rd.fetched_key("w@h")
WORK_LIST = f"{PREFIX}:work"
OTHER = direct_queue("other")


def fetch(channel: Any) -> bool:
    """One turn of kombu's poller: send the fetch, read its reply (False: nothing came)."""
    channel._brpop_start()
    try:
        return bool(channel._brpop_read())
    except Empty:
        return False


def assert_recorded_as_kombu_does(client: redis.Redis, tag: str) -> None:
    """Recorded as unacked (kombu's ack emulation) as kombu writes it: restorable by kombu's
    own sweep."""
    assert client.zscore("unacked_index", tag) is not None
    entry = json.loads(client.hget("unacked", tag))
    assert entry[0]["properties"]["delivery_tag"] == tag and entry[1:] == ["work", "work"]


def test_a_message_waiting_is_fetched_and_recorded_in_one_step(
    redis_url: str, client: redis.Redis
) -> None:
    publish(redis_url, "work", "a")
    got: list[str] = []
    with Connection(redis_url, transport=LocalTransport, transport_options=OPTIONS) as conn:
        channel = consumer_channel(conn, PREFIX, got)
        assert channel.inflight_sources() == ["work"]
        assert fetch(channel)
        assert got == ["a"]
        (tag,) = channel.qos._delivered
        assert_recorded_as_kombu_does(client, tag)
        assert client.hlen("unacked") == 1 and client.get(FETCHED) == tag.encode()
        assert client.llen("work") == 0 and client.llen(WORK_LIST) == 0
        channel.basic_ack(tag)
        assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0


def test_a_message_waited_for_goes_through_the_in_flight_list(
    redis_url: str, client: redis.Redis
) -> None:
    got: list[str] = []
    with Connection(redis_url, transport=LocalTransport, transport_options=OPTIONS) as conn:
        channel = consumer_channel(conn, PREFIX, got)
        # The queue is empty: the look finds nothing, and the next fetch waits.
        assert not fetch(channel)
        channel._brpop_start()
        assert channel._fetching == "work"
        publish(redis_url, "work", "a")
        assert channel._brpop_read()
        assert got == ["a"]
        (tag,) = channel.qos._delivered
        # Out of the in-flight list in the script that records it: nowhere twice, never
        # nowhere.
        assert_recorded_as_kombu_does(client, tag)
        assert client.llen("work") == 0 and client.llen(WORK_LIST) == 0
        # A message waiting again: the next fetch looks instead of waiting.
        publish(redis_url, "work", "b")
        assert fetch(channel) and got == ["a", "b"] and client.hlen("unacked") == 2


def test_a_consumer_without_acks_leaves_no_record(redis_url: str, client: redis.Redis) -> None:
    publish(redis_url, "work", "a")
    got: list[str] = []
    with Connection(redis_url, transport=LocalTransport, transport_options=OPTIONS) as conn:
        channel = consumer_channel(conn, PREFIX, got, no_ack=True)
        assert fetch(channel) and got == ["a"]
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0


def test_a_message_no_script_can_read_is_dropped_as_kombu_drops_it(
    redis_url: str, client: redis.Redis
) -> None:
    client.lpush("work", "not a message")
    with Connection(redis_url, transport=LocalTransport, transport_options=OPTIONS) as conn:
        channel = consumer_channel(conn, PREFIX, [])
        with pytest.raises(ValueError):
            fetch(channel)
    assert client.llen("work") == 0 and client.hlen("unacked") == 0


def wait_for_list(client: redis.Redis, key: str, length: int) -> None:
    wait_until(lambda: client.llen(key) == length, 5, interval=0.01, what=f"{key} at {length}")


def test_a_worker_killed_as_it_takes_a_message_gets_it_back_at_its_restart(
    redis_url: str, client: redis.Redis
) -> None:
    publish(redis_url, "work", "a", "b")
    with Connection(redis_url, transport=LocalTransport, transport_options=OPTIONS) as conn:
        channel = consumer_channel(conn, PREFIX, [])
        rd.adopt_inflight(client, PREFIX, {WORK_LIST: "work"}, time.time())
        channel._block_next = True  # the fetch waits for a message
        channel._brpop_start()
        # The server has moved "a"; the worker dies before it reads the reply.
        wait_for_list(client, WORK_LIST, 1)
        kill(channel)
    assert client.llen(WORK_LIST) == 1 and client.hlen("unacked") == 0
    # The same worker starts again: its earlier run's message goes back first in line.
    assert rd.adopt_inflight(client, PREFIX, {WORK_LIST: "work"}, time.time()) == 1
    assert client.llen(WORK_LIST) == 0
    with Connection(redis_url, transport=LocalTransport, transport_options=OPTIONS) as conn:
        got: list[str] = []
        channel = consumer_channel(conn, PREFIX, got)
        assert fetch(channel) and fetch(channel)
        assert got == ["a", "b"]
        kill(channel)


def restore_last_fetched(channel: Any, client: redis.Redis, held: list[str]) -> str | None:
    return rd.restore_last_fetched(client, FETCHED, "unacked", held, channel.qos.restore_by_tag)


def killed_before_its_fetch_reply(redis_url: str, client: redis.Redis) -> None:
    """A worker sends a fetch that finds a message; the server takes it and records it, and
    the worker dies before it reads the reply."""
    with Connection(redis_url, transport=LocalTransport, transport_options=OPTIONS) as conn:
        channel = consumer_channel(conn, PREFIX, [])
        channel._brpop_start()
        wait_until(lambda: client.hlen("unacked") == 1, 5, interval=0.01, what="recorded")
        kill(channel)


def test_a_worker_killed_before_its_fetch_reply_gets_the_message_back_at_its_restart(
    redis_url: str, client: redis.Redis
) -> None:
    publish(redis_url, "work", "a", "b")
    killed_before_its_fetch_reply(redis_url, client)
    with Connection(redis_url, transport=LocalTransport, transport_options=OPTIONS) as conn:
        got: list[str] = []
        channel = consumer_channel(conn, PREFIX, got)
        (tag,) = client.hkeys("unacked")
        # A message this worker still holds (its task runs on) stays where it is.
        assert restore_last_fetched(channel, client, [tag.decode()]) is None
        assert client.hlen("unacked") == 1
        assert restore_last_fetched(channel, client, []) == tag.decode()
        assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
        assert fetch(channel) and fetch(channel)
        assert sorted(got) == ["a", "b"]
        # Taken and acked: nothing left to put back at the next start.
        for delivered in list(channel.qos._delivered):
            channel.basic_ack(delivered)
        assert restore_last_fetched(channel, client, []) is None
        kill(channel)


def test_kombus_brpop_would_have_lost_it(redis_url: str, client: redis.Redis) -> None:
    """Why the in-flight lists exist: stock BRPOP takes the message off the server at once."""
    publish(redis_url, "work", "a")
    with Connection(redis_url, transport=LocalTransport, transport_options=OPTIONS) as conn:
        channel = consumer_channel(conn, None, [])
        channel._brpop_start()
        wait_for_list(client, "work", 0)
        kill(channel)
    assert client.llen("work") == 0 and client.hlen("unacked") == 0  # nowhere: lost


def test_a_worker_of_several_queues_takes_from_each_and_waits_on_each_in_turn(
    redis_url: str, client: redis.Redis
) -> None:
    got: list[str] = []
    with Connection(redis_url, transport=LocalTransport, transport_options=OPTIONS) as conn:
        channel = consumer_channel(conn, PREFIX, got, QUEUE, OTHER)
        assert sorted(channel.inflight_sources()) == ["other", "work"]
        # All empty: one look at every queue, then a short wait on one, then on the other.
        t0 = time.monotonic()
        assert not fetch(channel) and not fetch(channel)
        waited_on = channel._fetching
        assert not fetch(channel) and not fetch(channel)
        assert {waited_on, channel._fetching} == {"work", "other"}
        assert time.monotonic() - t0 < 4 * failover.MULTI_QUEUE_WAIT
        publish(redis_url, "other", "o")
        publish(redis_url, "work", "w")
        assert fetch(channel) and fetch(channel)
        assert sorted(got) == ["o", "w"]
        assert client.hlen("unacked") == 2
        assert client.llen(f"{PREFIX}:work") == 0 and client.llen(f"{PREFIX}:other") == 0
        # Killed while waiting on one queue: the message is in that queue's in-flight list.
        channel._block_next = True
        channel._brpop_start()
        source = channel._fetching
        publish(redis_url, source, "late")
        wait_for_list(client, f"{PREFIX}:{source}", 1)
        kill(channel)
    lists = {f"{PREFIX}:work": "work", f"{PREFIX}:other": "other"}
    assert rd.adopt_inflight(client, PREFIX, lists, time.time()) == 1
    assert client.llen(source) == 1 and not any(client.llen(k) for k in lists)


def test_kombus_priority_steps_wait_on_each_list_too(redis_url: str) -> None:
    with Connection(
        redis_url, transport=LocalTransport, transport_options={"master_name": "unused"}
    ) as conn:
        # kombu's default priority steps: four lists per queue.
        channel = consumer_channel(conn, PREFIX, [])
        assert len(channel.inflight_sources()) == 4


def test_the_sweep_puts_back_only_the_lists_of_workers_gone_for_the_bound(
    client: redis.Redis,
) -> None:
    now = time.time()
    for name, alive in (("dead@h1", now - 100), ("live@h2", now - 1), ("me@h3", now - 100)):
        key = f"{rd.inflight_prefix(name)}:work"
        rd.mark_alive(client, {key: "work"}, alive)
        client.lpush(key, f"msg-of-{name}")
    mine = [f"{rd.inflight_prefix('me@h3')}:work"]
    assert rd.sweep_inflight(client, now - 50, mine) == [f"{rd.inflight_prefix('dead@h1')}:work"]
    assert client.lrange("work", 0, -1) == [b"msg-of-dead@h1"]
    assert not client.hexists(rd.INFLIGHT_REGISTRY, f"{rd.inflight_prefix('dead@h1')}:work")
    assert client.llen(f"{rd.inflight_prefix('live@h2')}:work") == 1


def test_a_worker_that_came_back_meanwhile_keeps_its_list(client: redis.Redis) -> None:
    rd.mark_alive(client, {WORK_LIST: "work"}, 1.0)
    seen = client.hget(rd.INFLIGHT_REGISTRY, WORK_LIST)
    client.lpush(WORK_LIST, "m")
    rd.mark_alive(client, {WORK_LIST: "work"}, time.time())  # between read and put-back
    assert rd.put_back_list(client, WORK_LIST, seen) == -1
    assert client.llen(WORK_LIST) == 1 and client.llen("work") == 0


def test_a_restarted_worker_puts_back_its_lists_of_queues_it_no_longer_consumes(
    client: redis.Redis,
) -> None:
    old = f"{PREFIX}:retired"
    rd.mark_alive(client, {old: "retired"}, time.time())
    client.lpush(old, "m")
    client.lpush(WORK_LIST, "n")  # no registry entry: the registry was lost
    assert rd.adopt_inflight(client, PREFIX, {WORK_LIST: "work"}, time.time()) == 2
    assert client.lrange("retired", 0, -1) == [b"m"] and client.lrange("work", 0, -1) == [b"n"]
    assert list(client.hgetall(rd.INFLIGHT_REGISTRY)) == [WORK_LIST.encode()]


def test_a_live_worker_marks_its_lists_alive_at_each_refresh(client: redis.Redis) -> None:
    logic = rd.Redelivery(60, 10, clock=lambda: 5000.0)
    logic.inflight = {WORK_LIST: "work"}
    logic.refresh(client, [])
    entry = client.hget(rd.INFLIGHT_REGISTRY, WORK_LIST)
    assert entry is not None and b'"alive": 5000.0' in entry


def test_a_starting_worker_adopts_the_lists_of_the_queues_it_is_about_to_consume(
    redis_url: str, client: redis.Redis
) -> None:
    # What the killed run left, and a registry that does not know of it.
    publish(redis_url, "work", "taken by the killed run")
    killed_before_its_fetch_reply(redis_url, client)
    client.lpush(WORK_LIST, "left by the killed run")
    app = Celery(set_as_current=False)
    app.conf.update({rd.TIMEOUT_SETTING: 60, rd.INTERVAL_SETTING: 10})
    step = rd.RedeliveryStep(SimpleNamespace(app=app))
    step.logic = rd.Redelivery(60, 10)
    worker = SimpleNamespace(hostname="w@h", task_consumer=SimpleNamespace(queues=[QUEUE]))
    with Connection(redis_url, transport=LocalTransport, transport_options=OPTIONS) as conn:
        # The consumer step starts before the channel consumes anything (celery's loop does).
        channel = conn.channel()
        assert not channel.active_queues
        step._adopt_inflight(worker, channel)
        assert channel.inflight_prefix == PREFIX and channel.fetched_key == FETCHED
    assert client.hlen("unacked") == 0 and client.zcard("unacked_index") == 0
    left, restored = client.lrange("work", 0, -1)
    assert left == b"left by the killed run" and json.loads(restored)["body"]
    assert step.logic.inflight == {WORK_LIST: "work"}
    assert list(client.hgetall(rd.INFLIGHT_REGISTRY)) == [WORK_LIST.encode()]
