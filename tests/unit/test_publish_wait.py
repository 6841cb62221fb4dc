"""A publish that waits for a replica (celery_publish_wait_replicas) pushes its message once and
waits on that same connection (celery_ha_failover.push_acknowledged): a replica that lags, or
a master cut off from its replicas, must not get the message again and again, and a master
demoted during the wait ends it at once. Against a real master and replica on loopback
(Debian's redis-tools: make unit installs it); the replica "lags" by being stopped (SIGSTOP).
"""

from __future__ import annotations

import contextlib
import os
import signal
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import celery_ha_failover as failover
import pytest
import redis
from conftest import LocalChannel, LocalTransport, redis_server
from kombu import Connection, Exchange, Queue
from support.ledger import wait_until


class MasterAwareChannel(LocalChannel):
    # As the Sentinel pool's connections: a master's refusals read as a lost connection.
    connection_class = failover._not_master_aware(redis.Connection)


class MasterAwareTransport(LocalTransport):
    Channel = MasterAwareChannel


QUEUE = Queue("waited", Exchange("waited", type="direct"), routing_key="waited")


class Pair:
    def __init__(self, master_url: str, replica_url: str) -> None:
        self.master_url = master_url
        self.master = redis.Redis.from_url(master_url)
        self.replica = redis.Redis.from_url(replica_url)
        self.replica_pid = int(self.replica.info("server")["process_id"])

    @contextlib.contextmanager
    def replica_stopped(self, for_s: float | None = None) -> Iterator[None]:
        """The replica frozen (it acknowledges nothing), for ``for_s`` seconds or the block."""
        os.kill(self.replica_pid, signal.SIGSTOP)
        timer = threading.Timer(for_s, os.kill, (self.replica_pid, signal.SIGCONT))
        if for_s is not None:
            timer.start()
        try:
            yield
        finally:
            timer.cancel()
            os.kill(self.replica_pid, signal.SIGCONT)

    def queued(self) -> int:
        return int(self.master.llen("waited"))


@pytest.fixture
def pair(tmp_path: Path) -> Iterator[Pair]:
    (tmp_path / "m").mkdir()
    (tmp_path / "r").mkdir()
    with redis_server(tmp_path / "m") as master_url:
        port = str(redis.Redis.from_url(master_url).connection_pool.connection_kwargs["port"])
        with redis_server(tmp_path / "r", "--replicaof", "127.0.0.1", port) as replica_url:
            pair = Pair(master_url, replica_url)
            wait_until(
                lambda: pair.master.info("replication")["connected_slaves"] == 1,
                10,
                interval=0.05,
                what="the replica to attach",
            )
            yield pair


def publish(pair: Pair, wait_timeout_ms: int) -> float:
    """One publish that waits for one replica, without kombu's retries; its duration."""
    options = {
        "master_name": "unused",
        "priority_steps": [0],
        "publish_wait_replicas": 1,
        "publish_wait_timeout": wait_timeout_ms,
        # A WAIT longer than this would read as a dead link: push_acknowledged waits in steps.
        "socket_timeout": 1.0,
    }
    started = time.monotonic()
    with Connection(
        pair.master_url, transport=MasterAwareTransport, transport_options=options
    ) as c:
        c.Producer().publish(
            "task", exchange=QUEUE.exchange, routing_key="waited", declare=[QUEUE], retry=False
        )
    return time.monotonic() - started


def test_a_publish_waits_out_a_lagging_replica_and_is_pushed_once(pair: Pair) -> None:
    with pair.replica_stopped(for_s=2.0):
        took = publish(pair, wait_timeout_ms=8000)
    # It returned when the replica had it, not at the end of its wait, and once: publishing
    # again after each WAIT step would have queued one copy per step.
    assert 1.8 < took < 6, took
    assert pair.queued() == 1


def test_a_publish_no_replica_acknowledges_fails_after_its_wait_pushed_once(pair: Pair) -> None:
    with pair.replica_stopped():
        started = time.monotonic()
        with pytest.raises(failover.NotMasterError, match="acknowledged by 0 of 1 replica"):
            publish(pair, wait_timeout_ms=2500)
        took = time.monotonic() - started
    assert 2.4 < took < 5, took
    assert pair.queued() == 1


def test_a_master_demoted_during_the_wait_ends_it_as_a_lost_connection(pair: Pair) -> None:
    failed: list[BaseException] = []
    took: list[float] = []

    def publish_and_record() -> None:
        started = time.monotonic()
        try:
            publish(pair, wait_timeout_ms=20_000)
        except BaseException as exc:  # recorded for the assertion below
            failed.append(exc)
        took.append(time.monotonic() - started)

    with pair.replica_stopped():
        publisher = threading.Thread(target=publish_and_record)
        publisher.start()
        time.sleep(1.0)
        # Sentinel demotes a rejoining old master with REPLICAOF; Redis answers every client
        # blocked on it (this WAIT) with UNBLOCKED.
        replica_port = pair.replica.connection_pool.connection_kwargs["port"]
        pair.master.replicaof("127.0.0.1", replica_port)
        publisher.join(10)
    assert not publisher.is_alive()
    assert len(failed) == 1 and isinstance(failed[0], failover.NotMasterError), failed
    assert "UNBLOCKED" in str(failed[0])
    assert took[0] < 5, took
