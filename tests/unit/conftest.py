"""Unit tests need no install and no broker: the sources they test are on the path (the venv's
celery-ha-repo.pth, and pytest's pythonpath in pyproject.toml for the hosts' helpers), and the
sample app gets in-memory transports before any test touches its broker or backend."""

from __future__ import annotations

import contextlib
import shutil
import socket
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import celery_ha_failover as failover
import pytest
import redis
from redis.backoff import NoBackoff
from redis.retry import Retry
from support.ledger import wait_until

# Debian's redis-tools ships the server as redis-check-rdb: run as "redis-server", it serves.
REDIS_SERVER = shutil.which("redis-server") or "/usr/bin/redis-check-rdb"


def unused_port() -> int:
    """A loopback port nobody listens on (until someone binds it)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture
def closed_port() -> int:
    """A loopback port nobody listens on: connection refused."""
    return unused_port()


@contextlib.contextmanager
def redis_server(workdir: Path, *args: str) -> Iterator[str]:
    """A Redis server of its own on loopback, in ``workdir``, with ``args`` as its settings;
    yields its URL. make unit installs redis-tools."""
    if not Path(REDIS_SERVER).exists():
        pytest.fail(f"no Redis server at {REDIS_SERVER}: make unit installs redis-tools")
    port = unused_port()
    command = ["redis-server", "--port", str(port), "--bind", "127.0.0.1", "--dir", str(workdir)]
    server = subprocess.Popen([*command, "--save", "", *args], executable=REDIS_SERVER,
                              stdout=subprocess.DEVNULL)  # fmt: skip
    url = f"redis://127.0.0.1:{port}/0"
    try:

        def answers() -> bool:
            try:
                return bool(redis.Redis(port=port, retry=Retry(NoBackoff(), 0)).ping())
            except redis.exceptions.AuthenticationError:
                return True  # up, and wants a user

        wait_until(answers, 10, interval=0.05, what=f"the Redis server on port {port}")
        yield url
    finally:
        server.kill()
        server.wait(10)


@pytest.fixture(scope="session")
def sample_app():
    from celery_ha_app.main import app

    # memory:// and the in-process cache backend: apply() runs tasks locally, and
    # reminder's backend.set()/get() work without Redis.
    app.conf.update(broker_url="memory://", result_backend="cache+memory://")
    return app


# A Redis server of this process's own, for the tests of the bundle's kombu channel against a
# real server (one per test module).
@pytest.fixture(scope="module")
def redis_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    with redis_server(tmp_path_factory.mktemp("redis")) as url:
        yield url


class LocalChannel(failover.SentinelChannel):
    """The bundle's channel on one Redis server, no Sentinel."""

    connection_class = redis.Connection

    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        return redis.ConnectionPool(**self._connparams(asynchronous))


class LocalTransport(failover.SentinelTransport):
    Channel = LocalChannel
