#!/usr/bin/env python3
"""Queue-depth exporter for a Celery broker behind Redis Sentinel (Prometheus text format).

Why it exists: Flower 2.2.0's broker view with a sentinel:// broker asks only the FIRST
Sentinel of the URL (MasterNotFoundError when that one is down) and never passes the db
number to the master connection (flower/utils/broker.py, RedisSentinel._get_redis_client),
so its queue lengths are wrong or missing; its /metrics has no queue depth at all.

This exporter asks every configured Sentinel at once for the current master on EACH scrape
(so it follows a failover at once; celery_ha_failover.FastSentinel, as the workers do), then
LLENs each queue in the broker db with the Celery ACL user.
A queue's depth is the sum over kombu's priority sub-queues, as Flower and kombu count it.

The cluster's side of the configuration (Sentinels, master name, broker db, the Celery ACL
user, timeouts, TLS) is celery.env's CELERY_HA_* variables, read by celery_ha_settings as
every Celery process of the host reads them, so the exporter cannot drift from the workers.
Its own options are QUEUE_DEPTH_* variables in queue-depth.env:
  QUEUE_DEPTH_QUEUES           queues always reported, comma-separated (default none)
  QUEUE_DEPTH_DISCOVER         also report queues bound in kombu's _kombu.binding.* sets
                               ("true"/"false", default true)
  QUEUE_DEPTH_PRIORITY_STEPS   kombu priority steps (default "0,3,6,9")
  QUEUE_DEPTH_KEY_PREFIX       kombu global_keyprefix (default empty)
  QUEUE_DEPTH_TIMEOUT          socket timeout of a scrape's links, in seconds (default 1.0)
  QUEUE_DEPTH_ADDRESS / _PORT  where to serve /metrics (default 127.0.0.1:9808)
Both come from the environment (the unit's two EnvironmentFile= lines) or from KEY=value
files given as --env-file, once per file (supervisord has no EnvironmentFile=).
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Protocol

# The exporter runs in the app's venv, next to celery_ha_boot.
from celery_ha_exec import read_env_file
from celery_ha_settings import BrokerLink, broker_link, log_level, parse_bool

log = logging.getLogger("queue_depth")

# kombu's redis transport: priority sub-queue separator and the set holding an exchange's
# bindings (members are "routing_key<SEP>pattern<SEP>queue").
KOMBU_SEP = "\x06\x16"
KOMBU_BINDING_PREFIX = "_kombu.binding."
# Exchanges whose "queues" are not lists in Redis (fanout over PUB/SUB): events and
# remote-control replies. Reporting them would only add noise of permanent zeros.
NOISE_EXCHANGE = re.compile(r"^(celeryev|.*\.pidbox)$")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"


class RedisLike(Protocol):
    def llen(self, name: str) -> int: ...
    def smembers(self, name: str) -> Iterable[bytes | str]: ...
    def scan_iter(
        self, match: str | None = None, count: int | None = None
    ) -> Iterable[bytes | str]: ...


@dataclass
class Config:
    link: BrokerLink
    queues: list[str] = field(default_factory=list)
    discover: bool = True
    priority_steps: list[int] = field(default_factory=lambda: [0, 3, 6, 9])
    key_prefix: str = ""
    timeout: float = 1.0
    address: str = "127.0.0.1"
    port: int = 9808

    def timeouts(self) -> dict[str, float]:
        return {"socket_timeout": self.timeout, "socket_connect_timeout": self.timeout}


def _bool(value: str) -> bool:
    flag = parse_bool(value) if value.strip() else False
    if flag is None:
        raise ValueError(f"QUEUE_DEPTH_DISCOVER: not a boolean: {value!r}")
    return flag


def config_from_env(env: Mapping[str, str]) -> Config:
    def get(name: str, default: str = "") -> str:
        return env.get(f"QUEUE_DEPTH_{name}", default)

    return Config(
        link=broker_link(env),
        queues=[q.strip() for q in get("QUEUES").split(",") if q.strip()],
        discover=_bool(get("DISCOVER", "true")),
        priority_steps=[int(p) for p in get("PRIORITY_STEPS", "0,3,6,9").split(",") if p.strip()],
        key_prefix=get("KEY_PREFIX"),
        timeout=float(get("TIMEOUT", "1.0")),
        address=get("ADDRESS", "127.0.0.1"),
        port=int(get("PORT", "9808")),
    )


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def priority_keys(queue: str, steps: Sequence[int], prefix: str = "") -> list[str]:
    """The Redis lists kombu uses for one queue: the bare name for priority 0."""
    return [prefix + (f"{queue}{KOMBU_SEP}{step}" if step else queue) for step in steps]


def discover_queues(client: RedisLike, prefix: str = "") -> set[str]:
    """Queues bound to any non-fanout exchange in kombu's binding sets."""
    queues: set[str] = set()
    pattern = f"{prefix}{KOMBU_BINDING_PREFIX}*"
    for raw_key in client.scan_iter(match=pattern, count=1000):
        exchange = _text(raw_key)[len(prefix) + len(KOMBU_BINDING_PREFIX) :]
        if NOISE_EXCHANGE.match(exchange):
            continue
        for member in client.smembers(_text(raw_key)):
            queue = _text(member).split(KOMBU_SEP)[-1]
            if queue:
                queues.add(queue)
    return queues


def queue_depths(client: RedisLike, cfg: Config) -> dict[str, int]:
    names = set(cfg.queues)
    if cfg.discover:
        names |= discover_queues(client, cfg.key_prefix)
    return {
        name: sum(
            int(client.llen(key)) for key in priority_keys(name, cfg.priority_steps, cfg.key_prefix)
        )
        for name in sorted(names)
    }


def _escape_label(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


def render(
    master: tuple[str, int] | None,
    depths: Mapping[str, int],
    duration: float,
    error: str | None = None,
) -> str:
    """Prometheus text exposition. On error, no depth is reported: a stale or guessed
    figure would be worse than a gap, and `up 0` says why."""
    lines = [
        "# HELP celery_ha_queue_depth_up 1 if a master was found and every queue read.",
        "# TYPE celery_ha_queue_depth_up gauge",
        f"celery_ha_queue_depth_up {0 if error else 1}",
        "# HELP celery_ha_queue_depth_scrape_duration_seconds Seconds spent on the scrape.",
        "# TYPE celery_ha_queue_depth_scrape_duration_seconds gauge",
        f"celery_ha_queue_depth_scrape_duration_seconds {duration:.6f}",
    ]
    if master is not None:
        label = _escape_label(f"{master[0]}:{master[1]}")
        lines += [
            "# HELP celery_ha_queue_depth_master_info The master named by the Sentinels.",
            "# TYPE celery_ha_queue_depth_master_info gauge",
            f'celery_ha_queue_depth_master_info{{master="{label}"}} 1',
        ]
    if not error:
        lines += [
            "# HELP celery_ha_queue_depth Messages waiting in a queue on the current master.",
            "# TYPE celery_ha_queue_depth gauge",
        ]
        lines += [
            f'celery_ha_queue_depth{{queue="{_escape_label(q)}"}} {n}'
            for q, n in sorted(depths.items())
        ]
    return "\n".join(lines) + "\n"


class Collector:
    """One scrape = ask the Sentinels for the master, then read the queues on it."""

    def __init__(
        self,
        cfg: Config,
        find_master: Callable[[], tuple[str, int]] | None = None,
        connect: Callable[[str, int], Any] | None = None,
    ) -> None:
        self.cfg = cfg
        self._find_master = find_master or self._sentinel_master
        self._connect = connect or self._redis_client
        self._sentinel: Any = None

    def _sentinel_master(self) -> tuple[str, int]:
        # The workers' own discovery (same venv): every Sentinel asked at once, the highest
        # config-epoch wins, and its errors carry no password (redis-py's carry its pool's repr).
        from celery_ha_failover import FastSentinel as Sentinel

        if self._sentinel is None:
            # No connection kwargs for the master here: we only use Sentinel to discover it.
            self._sentinel = Sentinel(
                self.cfg.link.sentinels,
                sentinel_kwargs={**self.cfg.link.sentinel_kwargs, **self.cfg.timeouts()},
            )
        # A fresh answer every scrape, naming only a master the Sentinels see as up.
        host, port = self._sentinel.discover_master(self.cfg.link.master_name)
        return str(host), int(port)

    def _redis_client(self, host: str, port: int) -> Any:
        import redis

        link = self.cfg.link
        return redis.Redis(
            host=host,
            port=port,
            db=link.db,
            username=link.username,
            password=link.password,
            **self.cfg.timeouts(),
            **link.tls,
        )

    def collect(self) -> str:
        started = time.monotonic()
        master: tuple[str, int] | None = None
        try:
            master = self._find_master()
            client = self._connect(*master)
            try:
                depths = queue_depths(client, self.cfg)
            finally:
                close = getattr(client, "close", None)
                if close is not None:
                    close()
        except Exception as exc:  # any failure must become up=0, never a crash of the exporter
            log.warning("scrape failed (master=%s): %s", master, exc)
            return render(master, {}, time.monotonic() - started, error=str(exc))
        return render(master, depths, time.monotonic() - started)


def make_handler(collector: Collector) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            if self.path.split("?", 1)[0] != "/metrics":
                self.send_error(404)
                return
            body = collector.collect().encode()
            self.send_response(200)
            self.send_header("Content-Type", CONTENT_TYPE)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            log.debug(format, *args)

    return Handler


def main(argv: Sequence[str] | None = None) -> int:
    logging.basicConfig(format="%(levelname)s %(message)s")
    args = list(sys.argv[1:] if argv is None else argv)
    env = dict(os.environ)
    try:
        while args[:1] == ["--env-file"] and len(args) >= 2:
            env.update(read_env_file(Path(args[1])))
            del args[:2]
        if args:
            raise ValueError("usage: queue_depth.py [--env-file PATH]...")
        log.setLevel(log_level(env))
        cfg = config_from_env(env)
    except (OSError, ValueError) as exc:
        log.error("bad configuration: %s", exc)
        return 2
    server = ThreadingHTTPServer((cfg.address, cfg.port), make_handler(Collector(cfg)))
    log.info(
        "serving /metrics on %s:%d, sentinels %s, master %s, db %d",
        cfg.address,
        cfg.port,
        cfg.link.sentinels,
        cfg.link.master_name,
        cfg.link.db,
    )
    with contextlib.suppress(KeyboardInterrupt):
        server.serve_forever()
    return 0


if __name__ == "__main__":
    sys.exit(main())
