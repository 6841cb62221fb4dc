"""A client's broker connection that was closed while it waited in kombu's pool (the master's
host crashed, Sentinel killed the clients of an instance it reconfigured, the failover watcher
cut it) is reconnected at its next use instead of failing it: celery does not retry a control
broadcast (ping, inspect), and kombu's poller sends the next BRPOP on the connection it holds
without looking at it (celery_ha_failover.IdleCheckingPoller). Against a real Redis server on
loopback (Debian's redis-tools: make unit installs it)."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from types import SimpleNamespace
from typing import Any

import celery_ha_failover as failover
import pytest
import redis
from conftest import LocalTransport
from kombu import Connection, Exchange, Queue
from kombu.transport import redis as kombu_redis


class StockPollerTransport(LocalTransport):
    """The same, with kombu's own poller."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = kombu_redis.MultiChannelPoller()


QUEUE = Queue("replies", Exchange("replies", type="direct"), routing_key="replies")
OPTIONS = {"master_name": "unused", "priority_steps": [0]}


def publish(redis_url: str, body: str) -> None:
    with Connection(redis_url, transport=LocalTransport, transport_options=OPTIONS) as conn:
        conn.Producer().publish(
            body, exchange=QUEUE.exchange, routing_key="replies", declare=[QUEUE]
        )


def server_kills_its_clients(redis_url: str, held: redis.connection.Connection) -> None:
    """What Sentinel sends to an instance it reconfigures (CLIENT KILL TYPE normal)."""
    redis.Redis.from_url(redis_url).client_kill_filter(_type="normal")


def watcher_cuts(redis_url: str, held: redis.connection.Connection) -> None:
    """What sever_connections does to a connection to a former master."""
    socket.socket.shutdown(held._sock, socket.SHUT_RDWR)


@pytest.fixture
def consumer(redis_url: str) -> Iterator[tuple[Connection, list[str]]]:
    """A client that consumed one reply: kombu's poller holds its channel's BRPOP connection."""
    redis.Redis.from_url(redis_url).flushall()
    got: list[str] = []
    conn = Connection(redis_url, transport=LocalTransport, transport_options=OPTIONS)
    consumer = conn.Consumer(QUEUE, callbacks=[lambda body, message: got.append(body)])
    consumer.consume()
    publish(redis_url, "first")
    conn.drain_events(timeout=5)
    assert got == ["first"]
    yield conn, got
    conn.release()


def held_connection(conn: Connection) -> redis.connection.Connection:
    return conn.default_channel.client.connection


@pytest.mark.parametrize("close", [server_kills_its_clients, watcher_cuts])
def test_a_connection_closed_while_idle_is_reconnected_at_its_next_use(
    redis_url: str, consumer: tuple[Connection, list[str]], close: Any
) -> None:
    conn, got = consumer
    held = held_connection(conn)
    before = held._sock
    close(redis_url, held)
    publish(redis_url, "second")
    conn.drain_events(timeout=5)
    assert got == ["first", "second"]
    assert held._sock is not None and held._sock is not before


def test_a_live_idle_connection_is_used_as_it_is(
    redis_url: str, consumer: tuple[Connection, list[str]]
) -> None:
    conn, got = consumer
    held = held_connection(conn)
    before = held._sock
    publish(redis_url, "second")
    conn.drain_events(timeout=5)
    assert got == ["first", "second"]
    assert held._sock is before


@pytest.mark.parametrize("close", [server_kills_its_clients, watcher_cuts])
def test_kombus_poller_would_have_failed_the_next_use(redis_url: str, close: Any) -> None:
    redis.Redis.from_url(redis_url).flushall()
    got: list[str] = []
    with Connection(redis_url, transport=StockPollerTransport, transport_options=OPTIONS) as conn:
        consumer = conn.Consumer(QUEUE, callbacks=[lambda body, message: got.append(body)])
        consumer.consume()
        publish(redis_url, "first")
        conn.drain_events(timeout=5)
        close(redis_url, held_connection(conn))
        publish(redis_url, "second")
        with pytest.raises(redis.exceptions.ConnectionError):
            conn.drain_events(timeout=5)
    assert got == ["first"]


def test_a_brpop_under_way_is_left_alone() -> None:
    class Held:
        _sock = object()

        def can_read(self, timeout: float) -> bool:
            raise AssertionError("the socket holds the BRPOP's reply, not to be read here")

    held = Held()
    channel = SimpleNamespace(_in_poll=held, client=SimpleNamespace(connection=held))
    assert failover.drop_if_closed(channel) is False
