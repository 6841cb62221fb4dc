"""Celery settings for a celery-ha deployment, read from ``CELERY_HA_*`` environment variables.

The deployment (Ansible) writes /etc/celery-ha/celery.env; systemd or the supervisor wrapper
exports it; :func:`load` turns it into a plain dict of Celery settings. Nothing here knows
about a particular app: ``celery_ha_boot`` applies the dict on top of whatever app
``CELERY_HA_APP`` names, so users' apps never read our variables themselves.

Every error names the variable at fault, because the only place an operator sees it is the
journal of a unit that refuses to start.
"""

from __future__ import annotations

import json
import os
import re
import socket
import ssl
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any
from urllib.parse import quote

PREFIX = "CELERY_HA_"

# The worker pools a deployment may choose. gevent/eventlet are left out on purpose: they
# need extra packages and do not enforce hard time limits, which the sample app relies on.
WORKER_POOLS = ("prefork", "threads", "solo")
# A ceiling that catches typos (20000 instead of 2) rather than a real capacity limit.
MAX_CONCURRENCY = 256
# Messages a pool process may reserve ahead: again a typo catcher.
MAX_PREFETCH = 1000
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

_HOST_RE = re.compile(r"^(?:\[[0-9A-Fa-f:.]+\]|[A-Za-z0-9_.-]+)$")
_QUEUE_RE = re.compile(r"^[A-Za-z0-9_.:-]+$")
_APP_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_.]*(?::[A-Za-z_][A-Za-z0-9_.]*)?$")


class SettingsError(ValueError):
    """A CELERY_HA_* variable is missing or invalid; the message starts with its name."""

    def __init__(self, name: str, problem: str) -> None:
        self.variable = name
        super().__init__(f"{name}: {problem}")


def parse_bool(text: str) -> bool | None:
    """true/yes/1/on or false/no/0/off, any case; None for anything else."""
    lowered = text.strip().lower()
    if lowered in ("true", "yes", "1", "on"):
        return True
    if lowered in ("false", "no", "0", "off"):
        return False
    return None


class _Env:
    """Typed access to the CELERY_HA_* variables of one environment mapping."""

    def __init__(self, environ: Mapping[str, str] | None) -> None:
        self._environ = os.environ if environ is None else environ

    def raw(self, key: str) -> str | None:
        """The stripped value, or None when unset or empty (an empty line in the env file
        written by a template means "not set", not "the empty string")."""
        value = self._environ.get(PREFIX + key)
        if value is None:
            return None
        value = value.strip()
        return value or None

    def required(self, key: str) -> str:
        value = self.raw(key)
        if value is None:
            raise SettingsError(PREFIX + key, "is required but not set")
        return value

    def string(self, key: str, default: str | None = None) -> str | None:
        value = self.raw(key)
        return default if value is None else value

    def integer(
        self, key: str, default: int | None, *, minimum: int = 0, maximum: int | None = None
    ) -> int | None:
        value = self.raw(key)
        if value is None:
            return default
        try:
            number = int(value, 10)
        except ValueError:
            raise SettingsError(PREFIX + key, f"must be an integer, got {value!r}") from None
        if number < minimum or (maximum is not None and number > maximum):
            bounds = f">= {minimum}" if maximum is None else f"between {minimum} and {maximum}"
            raise SettingsError(PREFIX + key, f"must be {bounds}, got {number}")
        return number

    def boolean(self, key: str, default: bool) -> bool:
        value = self.raw(key)
        if value is None:
            return default
        flag = parse_bool(value)
        if flag is None:
            raise SettingsError(PREFIX + key, f"must be true or false, got {value!r}")
        return flag

    def number(self, key: str, default: float, *, minimum: float = 0.0) -> float:
        value = self.raw(key)
        if value is None:
            return default
        try:
            number = float(value)
        except ValueError:
            raise SettingsError(PREFIX + key, f"must be a number, got {value!r}") from None
        if not number >= minimum:  # also rejects nan
            raise SettingsError(PREFIX + key, f"must be >= {minimum}, got {value}")
        return number


def parse_sentinels(value: str, name: str = PREFIX + "SENTINELS") -> list[tuple[str, int]]:
    """``host:port`` items separated by commas or spaces; IPv6 hosts in brackets."""
    sentinels: list[tuple[str, int]] = []
    for item in re.split(r"[,\s]+", value.strip()):
        if not item:
            continue
        host, sep, port_text = item.rpartition(":")
        if not sep or not host or not _HOST_RE.match(host):
            raise SettingsError(name, f"{item!r} is not host:port (IPv6 as [addr]:port)")
        try:
            port = int(port_text, 10)
        except ValueError:
            raise SettingsError(name, f"{item!r} has a port that is not a number") from None
        if not 0 < port < 65536:
            raise SettingsError(name, f"{item!r} has a port outside 1-65535")
        if (host, port) in sentinels:
            raise SettingsError(name, f"{item!r} is listed twice")
        sentinels.append((host, port))
    if not sentinels:
        raise SettingsError(name, "lists no sentinel")
    return sentinels


def _credentials(username: str | None, password: str | None) -> str:
    # Quoted because generated passwords may hold '@', '/', ':' or '%'; kombu and celery
    # unquote the user info of each URL.
    if password is None:
        return ""
    user = quote(username, safe="") if username else ""
    return f"{user}:{quote(password, safe='')}@"


def sentinel_url(
    sentinels: list[tuple[str, int]],
    db: int,
    username: str | None,
    password: str | None,
    *,
    credentials_in_every_url: bool = True,
) -> str:
    """One ``sentinel://`` URL per sentinel joined by ``;``: kombu and celery's
    SentinelBackend both try every listed sentinel, so losing any one of them (or any
    minority) does not stop discovery of the master.

    kombu re-reads the credentials from the next URL when it moves on to it, so the broker's
    URLs all carry them. Celery's SentinelBackend reads them from the first URL only, and
    Celery hides the password of the first URL alone when it shows its settings (`inspect
    conf`, Flower's Config tab): the result backend's URL carries them only there."""
    creds = _credentials(username, password)
    return ";".join(
        f"sentinel://{creds if credentials_in_every_url or i == 0 else ''}{host}:{port}/{db}"
        for i, (host, port) in enumerate(sentinels)
    )


def keepalive_options(dead_after: float) -> dict[int, int]:
    """TCP options that let the kernel declare a silent peer dead after about ``dead_after``
    seconds. A worker waits for the broker in its event loop, where socket_timeout does not
    apply: across a partition its connection would otherwise look alive for hours (Linux's
    keepalive starts after 2 h) and the worker would consume nothing until restarted.
    Options this platform lacks are left out."""
    interval = max(1, int(dead_after) // 6)
    wanted = {
        "TCP_KEEPIDLE": interval * 3,
        "TCP_KEEPINTVL": interval,
        "TCP_KEEPCNT": 3,
        # Data sent and never acknowledged (a command into a cut link) fails after this, in ms.
        "TCP_USER_TIMEOUT": int(dead_after * 1000),
    }
    return {getattr(socket, k): v for k, v in wanted.items() if hasattr(socket, k)}


def redis_tls_kwargs(ca: str, cert: str | None, key: str | None) -> dict[str, Any]:
    """redis-py connection arguments for TLS: the server's certificate must come from ``ca`` and
    name the address connected to (Sentinel hands out addresses, so the certificates carry
    IP names); ``cert``/``key`` are this client's own certificate, which the servers demand."""
    return {
        "ssl": True,
        "ssl_ca_certs": ca,
        "ssl_certfile": cert,
        "ssl_keyfile": key,
        "ssl_cert_reqs": "required",
        "ssl_check_hostname": True,
    }


def _tls(env: _Env) -> dict[str, Any] | None:
    ca = env.string("TLS_CA")
    cert = env.string("TLS_CERT")
    key = env.string("TLS_KEY")
    if ca is None:
        for name, value in (("TLS_CERT", cert), ("TLS_KEY", key)):
            if value is not None:
                raise SettingsError(PREFIX + name, "is set, but CELERY_HA_TLS_CA is not")
        return None
    if (cert is None) != (key is None):
        missing = "TLS_KEY" if key is None else "TLS_CERT"
        raise SettingsError(
            PREFIX + missing, "is required when the other of TLS_CERT/TLS_KEY is set"
        )
    return redis_tls_kwargs(ca, cert, key)


def _compression(value: str | None) -> str | None:
    if value is None or value.lower() == "none":
        return None
    from kombu import compression

    try:
        compression.get_encoder(value)
    except Exception:
        # kombu registers an encoder only when its library imports; list what this venv has.
        available = ", ".join(sorted(compression.encoders())) or "none"
        raise SettingsError(
            PREFIX + "COMPRESSION",
            f"unknown or unavailable {value!r} (available: {available}, or 'none')",
        ) from None
    return value


def parse_task_routes(
    value: str | None, name: str = PREFIX + "TASK_ROUTES"
) -> dict[str, dict[str, str]]:
    """A JSON object: task name or glob -> queue name (or {"queue": name}). Empty = none."""
    if value is None:
        return {}
    try:
        routes = json.loads(value)
    except ValueError as exc:
        raise SettingsError(name, f"is not valid JSON ({exc})") from None
    if not isinstance(routes, dict):
        raise SettingsError(name, 'must be a JSON object like {"reports.*": "reports"}')
    parsed: dict[str, dict[str, str]] = {}
    for pattern, target in routes.items():
        queue = target.get("queue") if isinstance(target, dict) else target
        if not isinstance(queue, str) or not _QUEUE_RE.match(queue):
            raise SettingsError(name, f"route {pattern!r} -> {target!r} does not name a queue")
        parsed[pattern] = {"queue": queue}
    return parsed


# The beat ACL user may touch these keys only (redis role, users.acl.j2).
BEAT_KEY_PREFIX = "celery-ha:beat:"


def beat_key_prefix(app_name: str) -> str:
    """redbeat's keys of one app: two apps on one cluster must not share a lock (only one of
    their beats would run) nor a schedule (each beat drops the entries it does not know)."""
    return f"{BEAT_KEY_PREFIX}{app_name.replace(':', '.')}:"


def _beat(
    env: _Env,
    app_name: str,
    sentinels: list[tuple[str, int]],
    master_name: str,
    db: int,
    socket_timeout: float,
    sentinel_kwargs: dict[str, Any],
    master_tls: dict[str, Any] | None,
) -> dict[str, Any]:
    """celery-redbeat on beat hosts (only they have CELERY_HA_BEAT_*): the schedule and the
    lock that keeps all beats but one on standby live in the cluster's Redis, reached through
    the Sentinels with beat's own ACL user (ansible/roles/celery/README.md)."""
    username = env.string("BEAT_REDIS_USERNAME")
    if username is None:
        return {}
    password = env.required("BEAT_REDIS_PASSWORD")
    lock_timeout = env.integer("BEAT_LOCK_TIMEOUT", 30, minimum=5)
    max_interval = env.integer("BEAT_MAX_INTERVAL", 5, minimum=1)
    if lock_timeout < 3 * max_interval:
        # The active beat renews the lock once per tick, at most max_interval apart.
        raise SettingsError(
            PREFIX + "BEAT_LOCK_TIMEOUT",
            f"must be at least 3 x CELERY_HA_BEAT_MAX_INTERVAL ({lock_timeout} < "
            f"3 x {max_interval}): the active beat would lose its lock between two ticks",
        )
    options: dict[str, Any] = {
        "sentinels": sentinels,
        "service_name": master_name,
        "db": db,
        "username": username,
        "password": password,
        # redbeat passes no connect timeout; redis-py then uses socket_timeout for both.
        "socket_timeout": socket_timeout,
        "sentinel_kwargs": dict(sentinel_kwargs),
        # Retry a lost master for less than the lock lasts: an active beat cut off longer
        # exits (and comes back as a standby) instead of holding on past its lock.
        "retry_period": max(1, lock_timeout // 2),
    }
    beat: dict[str, Any] = {
        "beat_scheduler": "redbeat.RedBeatScheduler",
        # celery 5.6's name for the longest sleep between ticks (beat.Scheduler reads
        # beat_max_loop_interval); redbeat renews its lock once per tick.
        "beat_max_loop_interval": max_interval,
        # Only the prefix is looked at: the Sentinels come from redbeat_redis_options.
        "redbeat_redis_url": "redis-sentinel://",
        "redbeat_redis_options": options,
        "redbeat_key_prefix": beat_key_prefix(app_name),
        "redbeat_lock_key": beat_key_prefix(app_name) + "lock",
        "redbeat_lock_timeout": lock_timeout,
    }
    if master_tls:
        beat["redbeat_redis_use_ssl"] = dict(master_tls)
    return beat


@dataclass(frozen=True)
class BrokerLink:
    """How a client reaches the cluster: the Sentinels, the master's name, the broker db and
    the credentials, timeouts and TLS of both links. The part of the settings that every
    client shares (workers, beat, Flower, the queue-depth exporter, producers)."""

    sentinels: list[tuple[str, int]]
    master_name: str
    db: int
    username: str | None
    password: str | None
    # redis-py arguments of the Sentinel links: their own auth, timeouts and TLS.
    sentinel_kwargs: dict[str, Any]
    connect_timeout: float
    socket_timeout: float
    # redis-py TLS arguments (ssl=True ...), the same for the master links; empty without TLS.
    tls: dict[str, Any]


def broker_link(environ: Mapping[str, str] | None = None) -> BrokerLink:
    """The :class:`BrokerLink` of the CELERY_HA_* variables of ``environ``.

    Raises SettingsError naming the first variable that is missing or invalid.
    """
    env = _Env(environ)
    sentinels = parse_sentinels(env.required("SENTINELS"))
    master_name = env.required("MASTER_NAME")
    redis_username = env.string("REDIS_USERNAME")
    redis_password = env.string("REDIS_PASSWORD")
    if redis_username and not redis_password:
        raise SettingsError(
            PREFIX + "REDIS_PASSWORD", "is required when CELERY_HA_REDIS_USERNAME is set"
        )
    sentinel_username = env.string("SENTINEL_USERNAME")
    sentinel_password = env.string("SENTINEL_PASSWORD")
    if sentinel_username and not sentinel_password:
        raise SettingsError(
            PREFIX + "SENTINEL_PASSWORD", "is required when CELERY_HA_SENTINEL_USERNAME is set"
        )
    db = env.integer("BROKER_DB", 0, maximum=15)
    # Timeouts for a LAN (README, "Failover"): a connect takes well under a millisecond there,
    # so CONNECT_TIMEOUT bounds what a dead host costs each attempt, not what a live one needs.
    connect_timeout = env.number("CONNECT_TIMEOUT", 0.5, minimum=0.05)
    sentinel_timeout = env.number("SENTINEL_TIMEOUT", 0.5, minimum=0.05)
    socket_timeout = env.number("SOCKET_TIMEOUT", 5.0, minimum=0.1)
    tls = _tls(env) or {}
    # Sentinel connections get their own auth and timeouts: redis-py uses sentinel_kwargs,
    # not the Redis credentials, for them, and without a connect timeout an unreachable
    # sentinel (a cut network, not a refused port) would stall master discovery.
    sentinel_kwargs: dict[str, Any] = {
        "socket_timeout": sentinel_timeout,
        "socket_connect_timeout": connect_timeout,
        **tls,
    }
    if sentinel_password:
        sentinel_kwargs["password"] = sentinel_password
        if sentinel_username:
            sentinel_kwargs["username"] = sentinel_username
    return BrokerLink(
        sentinels=sentinels,
        master_name=master_name,
        db=db,  # type: ignore[arg-type]  # has a default, so never None
        username=redis_username,
        password=redis_password,
        sentinel_kwargs=sentinel_kwargs,
        connect_timeout=connect_timeout,
        socket_timeout=socket_timeout,
        tls=tls,
    )


def load(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """Celery settings (lowercase names) from the CELERY_HA_* variables of ``environ``.

    Raises SettingsError naming the first variable that is missing or invalid.
    """
    env = _Env(environ)
    # sentinel:// in these settings means the failover-aware classes, in this process.
    import celery_ha_failover

    celery_ha_failover.install()

    app_name = env.required("APP")
    if not _APP_RE.match(app_name):
        raise SettingsError(
            PREFIX + "APP", f"{app_name!r} is not a module path (pkg.module or pkg.module:attr)"
        )
    link = broker_link(environ)
    sentinels, master_name, broker_db = link.sentinels, link.master_name, link.db
    redis_username, redis_password = link.username, link.password
    connect_timeout, socket_timeout = link.connect_timeout, link.socket_timeout
    sentinel_kwargs = link.sentinel_kwargs
    result_db = env.integer("RESULT_DB", 1, maximum=15)
    if broker_db == result_db:
        # kombu keeps its queues and unacked hash as plain keys: results written beside them
        # make `redis-cli --scan` useless for operators and risk key clashes.
        raise SettingsError(
            PREFIX + "RESULT_DB", f"must differ from CELERY_HA_BROKER_DB (both {broker_db})"
        )

    task_time_limit = env.integer("TASK_TIME_LIMIT", None, minimum=1)
    visibility_timeout = env.integer("VISIBILITY_TIMEOUT", 3600, minimum=1)
    if task_time_limit is not None and visibility_timeout <= task_time_limit:
        # Redis redelivers an unacked message after visibility_timeout; with acks_late a
        # task still running then would run twice.
        raise SettingsError(
            PREFIX + "VISIBILITY_TIMEOUT",
            f"must be above CELERY_HA_TASK_TIME_LIMIT ({visibility_timeout} <= {task_time_limit})",
        )

    # Redelivery of a dead worker's messages (celery_ha_redelivery): live workers refresh
    # what they hold every REDELIVERY_INTERVAL s, and what nobody refreshed is handed out
    # again within REDELIVERY_TIMEOUT s. VISIBILITY_TIMEOUT stays kombu's own backstop.
    redelivery_timeout = env.number("REDELIVERY_TIMEOUT", 60.0, minimum=1.0)
    redelivery_interval = env.number("REDELIVERY_INTERVAL", 10.0, minimum=0.5)
    from celery_ha_redelivery import check_bound

    try:
        check_bound(redelivery_timeout, redelivery_interval)
    except ValueError as exc:
        raise SettingsError(PREFIX + "REDELIVERY_TIMEOUT", str(exc)) from None
    if redelivery_timeout >= visibility_timeout:
        raise SettingsError(
            PREFIX + "REDELIVERY_TIMEOUT",
            f"must be below CELERY_HA_VISIBILITY_TIMEOUT ({redelivery_timeout:g} >= "
            f"{visibility_timeout}), the backstop for clients that do not refresh",
        )

    dead_peer_timeout = env.number("DEAD_PEER_TIMEOUT", 10.0, minimum=6.0)
    # While no Sentinel names a master that is up, one connection attempt waits this long for
    # one (woken at once by +switch-master) before it counts as failed: a worker or producer
    # then resumes the moment the new master is announced, not at its next retry.
    master_wait = env.number("MASTER_WAIT", 10.0)
    result_expires = env.integer("RESULT_EXPIRES", 86400, minimum=1)
    # What each costs is in README's Performance section (make bench, the cost table).
    task_events = env.boolean("TASK_EVENTS", False)
    ignore_result = env.boolean("IGNORE_RESULT", False)
    acks_late = env.boolean("ACKS_LATE", True)
    prefetch_multiplier = env.integer("PREFETCH_MULTIPLIER", 1, minimum=1, maximum=MAX_PREFETCH)
    compression = _compression(env.string("COMPRESSION"))
    default_queue = env.string("DEFAULT_QUEUE")
    if default_queue is not None and not _QUEUE_RE.match(default_queue):
        raise SettingsError(PREFIX + "DEFAULT_QUEUE", f"{default_queue!r} is not a queue name")

    task_routes = parse_task_routes(env.string("TASK_ROUTES"))

    # Each try waits up to MASTER_WAIT for a master, so 20 outlast any election; short pauses
    # between tries keep a client from sleeping through the moment a new master is usable.
    publish_retry_policy = {
        "max_retries": env.integer("PUBLISH_RETRY_MAX_RETRIES", 20, minimum=0),
        "interval_start": env.number("PUBLISH_RETRY_INTERVAL_START", 0.0),
        "interval_step": env.number("PUBLISH_RETRY_INTERVAL_STEP", 0.2),
        "interval_max": env.number("PUBLISH_RETRY_INTERVAL_MAX", 0.5),
    }
    # A publish waits until this many replicas have the message (0 = off); see
    # celery_ha_failover.SentinelChannel._put.
    publish_wait_replicas = env.integer("PUBLISH_WAIT_REPLICAS", 1, maximum=15)
    publish_wait_timeout = env.integer("PUBLISH_WAIT_TIMEOUT", 10000, minimum=1)
    # A result write refused by an isolated old master (NOREPLICAS) fails at once and is tried
    # again: enough tries, 0.5 s apart at most, to outlast a partition of a minute or more.
    result_retry_max_retries = env.integer("RESULT_RETRY_MAX_RETRIES", 120, minimum=0)
    log_level(environ)  # validated here too so a bad value fails the same way everywhere
    log_each_task(environ)

    settings: dict[str, Any] = {
        "broker_url": sentinel_url(sentinels, broker_db, redis_username, redis_password),
        "broker_transport_options": {
            "master_name": master_name,
            "sentinel_kwargs": dict(sentinel_kwargs),
            "visibility_timeout": visibility_timeout,
            # One list per queue, not kombu's four priority sub-lists: a worker of one queue
            # then fetches with BLMOVE through an in-flight list, and a worker killed as it
            # takes a message does not lose it (celery_ha_failover.SentinelChannel). Task
            # priorities are not honoured on this broker (give urgent tasks their own queue).
            "priority_steps": [0],
            "socket_timeout": socket_timeout,
            "socket_connect_timeout": connect_timeout,
            "socket_keepalive": True,
            "socket_keepalive_options": keepalive_options(dead_peer_timeout),
            "retry_on_timeout": True,
            "publish_wait_replicas": publish_wait_replicas,
            "publish_wait_timeout": publish_wait_timeout,
            "master_wait": master_wait,
        },
        "result_backend": sentinel_url(
            sentinels, result_db, redis_username, redis_password, credentials_in_every_url=False
        ),
        "result_backend_transport_options": {
            "master_name": master_name,
            "sentinel_kwargs": dict(sentinel_kwargs),
            "master_wait": master_wait,
        },
        "redis_socket_timeout": socket_timeout,
        "redis_socket_connect_timeout": connect_timeout,
        "redis_socket_keepalive": True,
        "redis_retry_on_timeout": True,
        # Writing a result must wait out a failover (and a partition's NOREPLICAS refusals),
        # not fail the task that produced it.
        "result_backend_always_retry": True,
        "result_backend_max_retries": result_retry_max_retries,
        "result_backend_max_sleep_between_retries_ms": int(
            publish_retry_policy["interval_max"] * 1000
        ),
        "result_expires": result_expires,
        # Fire-and-forget apps: no result written per task (a task's own ignore_result wins).
        "task_ignore_result": ignore_result,
        # Reliable delivery: ack after the task ran, requeue if its worker process dies, and
        # reserve one message at a time by default. A dead worker's reserved messages come
        # back within the redelivery timeout (celery_ha_redelivery) however many it held, so
        # a larger prefetch costs only that wait; without acks_late a killed worker's tasks
        # are lost (kept as a knob for the bench's cost table, not for production).
        "task_acks_late": acks_late,
        "task_reject_on_worker_lost": acks_late,
        "worker_prefetch_multiplier": prefetch_multiplier,
        # Keep trying the broker at start-up and forever after: during a failover or while
        # Redis boots, a worker that gave up would need a human to restart it.
        "broker_connection_retry_on_startup": True,
        "broker_connection_retry": True,
        "broker_connection_max_retries": None,
        "broker_channel_error_retry": True,
        "task_publish_retry": True,
        "task_publish_retry_policy": publish_retry_policy,
        # Flower (and `celery events`) see tasks only with these on; off, Flower still
        # shows the workers (their heartbeats) but no task.
        "worker_send_task_events": task_events,
        "task_send_sent_event": task_events,
    }
    if link.tls:
        # The link to the master is configured apart from the Sentinel links (kombu and
        # celery take these as the master's connection arguments, with their Sentinel-managed
        # TLS connection class); Celery wants ssl_cert_reqs as the ssl module's constant.
        master_tls = {k: v for k, v in link.tls.items() if k != "ssl"}
        master_tls["ssl_cert_reqs"] = ssl.CERT_REQUIRED
        settings["broker_use_ssl"] = dict(master_tls)
        settings["redis_backend_use_ssl"] = dict(master_tls)
    settings["celery_ha_redelivery_timeout"] = redelivery_timeout
    settings["celery_ha_redelivery_interval"] = redelivery_interval
    settings.update(
        _beat(
            env,
            app_name,
            sentinels,
            master_name,
            broker_db,
            socket_timeout,
            sentinel_kwargs,
            settings.get("broker_use_ssl"),
        )
    )
    if task_time_limit is not None:
        settings["task_time_limit"] = task_time_limit
    if compression is not None:
        settings["task_compression"] = compression
        settings["result_compression"] = compression
    if default_queue is not None:
        settings["task_default_queue"] = default_queue
    if task_routes:
        # celery_ha_boot puts these in front of the app's own routes (first match wins);
        # a client using this dict directly just gets the deployment's routes.
        settings["task_routes"] = task_routes
    return settings


def log_level(environ: Mapping[str, str] | None = None) -> str:
    """CELERY_HA_LOG_LEVEL for the command lines (default INFO)."""
    value = (_Env(environ).string("LOG_LEVEL", "INFO") or "INFO").upper()
    if value not in LOG_LEVELS:
        raise SettingsError(
            PREFIX + "LOG_LEVEL", f"must be one of {', '.join(LOG_LEVELS)}, got {value!r}"
        )
    return value


def log_each_task(environ: Mapping[str, str] | None = None) -> bool:
    """CELERY_HA_LOG_EACH_TASK: celery's "received" and "succeeded" lines (default off)."""
    return _Env(environ).boolean("LOG_EACH_TASK", False)


def worker_options(environ: Mapping[str, str] | None = None) -> dict[str, Any]:
    """The per-instance worker variables (/etc/celery-ha/worker-<name>.env).

    The command line passes them to ``celery worker`` itself; they are checked here, at app
    import (before click parses the worker's options), so that a bad value is reported by
    name instead of as a bare click usage error.
    """
    env = _Env(environ)
    queues_text = env.required("WORKER_QUEUES")
    # Comma-separated without spaces: the value goes verbatim into `--queues=` and celery
    # would keep a space as part of the queue name.
    queues = queues_text.split(",")
    for queue in queues:
        if not _QUEUE_RE.match(queue):
            raise SettingsError(
                PREFIX + "WORKER_QUEUES",
                f"{queue!r} is not a queue name (use a,b,c without spaces)",
            )
    concurrency = env.integer("WORKER_CONCURRENCY", None, minimum=1, maximum=MAX_CONCURRENCY)
    if concurrency is None:
        raise SettingsError(PREFIX + "WORKER_CONCURRENCY", "is required but not set")
    pool = env.required("WORKER_POOL")
    if pool not in WORKER_POOLS:
        raise SettingsError(
            PREFIX + "WORKER_POOL", f"must be one of {', '.join(WORKER_POOLS)}, got {pool!r}"
        )
    return {"queues": queues, "concurrency": concurrency, "pool": pool}
