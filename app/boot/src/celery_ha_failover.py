"""Sentinel clients that follow a failover within about a second.

Stock redis-py, kombu and celery (the pinned 6.4.0 / 5.6.2 / 5.6.3) follow a failover only when
a socket to the dead master fails by itself, and then ask the Sentinels one by one:

- A consumer waiting in BRPOP on a crashed master notices only when TCP gives up (keepalive or
  TCP_USER_TIMEOUT, tens of seconds): the event loop has no read timeout.
- ``Sentinel.discover_master`` asks the Sentinels in list order, and kombu and celery build a
  new ``Sentinel`` (list order reset) for every pool, so each reconnect first waits out the
  connect timeout of a dead first Sentinel. The state of a fresh deployment (the initial
  master's host is also the first Sentinel of every client) is the worst case: 70 s measured.
- The first Sentinel to answer wins, even a Sentinel that has just restarted and still names
  the master of an older epoch.
- ``MasterNotFoundError`` carries the repr of each Sentinel client, whose connection pool
  repr holds the Sentinel password in clear: it reaches every log that prints it.

Here, per process:

- :class:`FastSentinel` asks every Sentinel at once, takes the answer of the highest
  config-epoch from the first majority to reply (or the master a Sentinel has just announced,
  over stragglers that have not heard of it yet), and raises errors that name no secret.
- :class:`FailoverWatcher` subscribes to ``+switch-master`` on every Sentinel; when one
  announces a new master, every socket of this process to any other address is shut down, so
  the blocked BRPOP, publish or result write fails at once and its retry finds the new master.
- :class:`SentinelTransport` (kombu) and :class:`SentinelBackend` (celery) use both, and
  treat the replies of a demoted, isolated or loading master (READONLY, NOREPLICAS,
  MASTERDOWN, LOADING) as a reason to reconnect and retry, not as a failed publish or a
  FAILURE result.
- A worker takes each message and records it as unacked in one script, or, when it has to
  wait for one, into an in-flight list of its own with one atomic command
  (:class:`SentinelChannel`, :class:`InflightQoS`), not with kombu's BRPOP, which loses the
  message when the worker dies before its next command records it (celery/kombu#305).
- Publishes may wait for a replica's acknowledgement (``WAIT``): a task that an isolated old
  master accepted and then threw away when it rejoined is then retried, not lost. The message
  is pushed once and waited for on the same connection (:func:`push_acknowledged`).
- A client's broker connection closed while it waited in kombu's pool (a crashed master, a
  Sentinel's CLIENT KILL, the watcher's cut) is reconnected before its next BRPOP
  (:class:`IdleCheckingPoller`): the first control broadcast (ping, inspect) after a failover
  failed with a ConnectionError otherwise, as celery does not retry broadcasts.
- :func:`use_for_redbeat` gives beat's lock and schedule (celery-redbeat) the same client.
- TLS connections share one ``SSLContext`` per process and settings (:func:`tls_context`):
  redis-py builds a new one for every connection and loads the system's whole CA store into
  it, 20 ms of CPU per connection on the lab's hosts, which a reconnect storm after a
  failover pays dozens of times per process.

:func:`install` registers the transport and backend under the ``sentinel`` scheme, so
``sentinel://`` URLs (and Flower, which reads them) stay as they are. Upstream: the secret in
the error is visible in redis/redis-py#2782; long client stalls after a Sentinel election are
the subject of redis/redis#11642; kombu's Sentinel channel builds a stock ``Sentinel`` with no
way to pass another class, hence the copy of its pool factory below.
"""

from __future__ import annotations

import _thread
import contextlib
import hashlib
import logging
import os
import queue
import socket
import ssl
import sys
import threading
import time
import types
import weakref
from collections.abc import Callable, Iterable, Iterator
from functools import partial
from typing import Any, ClassVar

import redis
from celery import states
from celery.app import backends
from celery.backends.redis import SentinelBackend as StockSentinelBackend
from celery.exceptions import BackendStoreError
from kombu import transport
from kombu.transport import redis as kombu_redis
from kombu.utils.encoding import bytes_to_str
from redis.backoff import NoBackoff
from redis.retry import Retry
from redis.sentinel import MasterNotFoundError, Sentinel, SentinelConnectionPool

log = logging.getLogger("celery_ha.failover")

SWITCH_CHANNEL = "+switch-master"
# Replies of a server that is no longer (or cannot act as) the master: retry elsewhere.
# UNBLOCKED: the server was demoted while this client blocked on it (a publish's WAIT).
NOT_MASTER_REPLIES = ("READONLY", "NOREPLICAS", "MASTERDOWN", "LOADING", "UNBLOCKED")
# Of those, the ones that last until Sentinel acts: LOADING ends by itself within a second or
# so of a restart, and is retried at once.
UNTIL_SWITCH_REPLIES = ("READONLY", "NOREPLICAS", "MASTERDOWN")


class NotMasterError(redis.exceptions.ConnectionError):
    """The server answered as a master that cannot take writes (demoted, isolated, loading),
    or no replica acknowledged a publish in time: reconnect through the Sentinels and retry.
    A ConnectionError so that kombu, celery and redis-py retry it as they retry a lost link."""


def not_master(exc: BaseException) -> bool:
    return isinstance(exc, redis.exceptions.ResponseError) and str(exc).startswith(
        NOT_MASTER_REPLIES
    )


# ---------------------------------------------------------------------------------------
# Connections of this process, so that a watcher can cut the ones to a former master.
# ---------------------------------------------------------------------------------------
_connections: weakref.WeakSet[redis.connection.AbstractConnection] = weakref.WeakSet()
_connections_lock = threading.Lock()


# Masters that have just answered as unable to take writes until Sentinel acts
# (UNTIL_SWITCH_REPLIES, or no replica acknowledged a publish), with when (monotonic clock). A
# connection attempt to one of them within REFUSED_PAUSE s fails at once, so the caller waits
# for the Sentinels (woken by +switch-master) instead of reconnecting to it in a tight loop:
# an isolated master refuses every write for seconds before the switch, which would burn
# kombu's and celery's counted retries and leave the switch to be noticed only after their
# next sleep. Forgotten at every switch.
_refused: dict[tuple[str, int], float] = {}
REFUSED_PAUSE = 0.5


def mark_refused(host: str, port: int) -> None:
    _refused[(str(host), int(port))] = time.monotonic()


def refused_ago(host: str, port: int) -> float | None:
    """Seconds since (host, port) refused a write, if less than REFUSED_PAUSE ago."""
    when = _refused.get((str(host), int(port)))
    if when is None:
        return None
    ago = time.monotonic() - when
    return ago if ago < REFUSED_PAUSE else None


class _NotMasterAware:
    """Turns the replies of a master that cannot take writes into NotMasterError as they are
    read, before redis-py wraps them (a pipeline's error text starts with "Command # 1"), so
    every caller, pipelines and kombu's queue declarations included, reconnects and retries."""

    def read_response(self, *args: Any, **kwargs: Any) -> Any:
        try:
            return super().read_response(*args, **kwargs)  # type: ignore[misc]
        except redis.exceptions.ResponseError as exc:
            if not_master(exc):
                if str(exc).startswith(UNTIL_SWITCH_REPLIES):
                    mark_refused(self.host, self.port)  # type: ignore[attr-defined]
                self.disconnect()  # type: ignore[attr-defined]
                raise NotMasterError(str(exc)) from exc
            raise


def _not_master_aware(connection_class: type) -> type:
    # Not cached: kombu makes a new connection class for each channel's asynchronous pool, so
    # a cache would keep every one of them; this class lives as long as its pool.
    if issubclass(connection_class, _NotMasterAware):
        return connection_class
    return type(connection_class.__name__, (_NotMasterAware, connection_class), {})


class TrackedConnectionPool(SentinelConnectionPool):
    """A Sentinel master pool whose connections the watcher can find, whose connection
    attempts wait for a usable master instead of failing while an election runs, and whose
    connections report a master that cannot take writes as a lost connection."""

    def __init__(self, service_name: str, sentinel_manager: Any, **kwargs: Any) -> None:
        super().__init__(service_name, sentinel_manager, **kwargs)
        # kombu and celery pick the class (TLS or not, their own subclasses): wrap theirs.
        self.connection_class = _not_master_aware(self.connection_class)

    def make_connection(self) -> Any:
        connection = super().make_connection()
        # A forked child inherits the parent's objects, and shutdown() on an inherited socket
        # would cut the parent's link too: only the creating process may sever a connection.
        connection._celery_ha_pid = os.getpid()
        with _connections_lock:
            _connections.add(connection)
        return connection

    def get_connection(self, *args: Any, **kwargs: Any) -> Any:
        # Until Sentinel has elected a new master, the old one is either still named (and
        # dead: connect fails) or named as down (MasterNotFoundError). kombu and celery would
        # count each such failure and back off for 2, 4, 6... s, sleeping through the switch;
        # one attempt that waits for it (woken by +switch-master) resumes at once instead.
        manager = self.sentinel_manager
        watcher = FailoverWatcher.ensure(manager, self.service_name)

        def attempt() -> Any:
            connection = super(TrackedConnectionPool, self).get_connection(*args, **kwargs)
            ago = refused_ago(connection.host, connection.port)
            if ago is not None:
                self.release(connection)
                refused = NotMasterError(
                    f"{connection.host}:{connection.port} refused writes {ago:.1f} s ago"
                )
                # Try it again as soon as the pause is over, not at the back-off's next step:
                # a master restarted in place refuses writes (NOREPLICAS) only until its
                # replicas are back, a fraction of a second.
                refused.retry_in = REFUSED_PAUSE - ago  # type: ignore[attr-defined]
                raise refused
            return connection

        return wait_for_master(
            attempt,
            watcher,
            getattr(manager, "master_wait", 0.0),
            getattr(manager, "poll_interval", 1.0),
        )


# The pause after a first failed attempt (s); each next one doubles, up to the caller's poll.
# A master that restarts in place (systemd has it back within half a second and no switch
# follows, so no announcement ends the pause) is found again soon after its return, while an
# election of several seconds still costs each client only about two tries a second.
FIRST_RETRY = 0.05


def wait_for_master(
    attempt: Callable[[], Any], watcher: FailoverWatcher, wait: float, poll: float
) -> Any:
    """``attempt()`` until it stops failing for want of a master, for up to ``wait`` s."""
    give_up = time.monotonic() + wait
    pause = FIRST_RETRY
    while True:
        generation = watcher.generation
        try:
            return attempt()
        except (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError):
            raise  # a wrong password does not get better with time
        except (redis.exceptions.ConnectionError, redis.exceptions.TimeoutError) as exc:
            left = give_up - time.monotonic()
            if left <= 0:
                raise
            retry_in = getattr(exc, "retry_in", poll)
        watcher.wait_for_switch(generation, min(left, pause, poll, retry_in))
        pause *= 2


def sever_connections(keep: tuple[str, int] | None) -> int:
    """Shut down every master socket of this process that is not connected to ``keep``.

    shutdown(), unlike close(), wakes a thread blocked on the socket and makes the event loop
    see it readable, whoever owns it; the owner then gets a ConnectionError and reconnects.
    SSLSocket.shutdown would also drop the TLS object under the owner's feet: the plain
    socket's shutdown leaves TLS to fail cleanly on the next read.
    """
    pid = os.getpid()
    with _connections_lock:
        candidates = list(_connections)
    cut = 0
    for connection in candidates:
        sock = getattr(connection, "_sock", None)
        if sock is None or getattr(connection, "_celery_ha_pid", None) != pid:
            continue
        if keep is not None and (connection.host, int(connection.port)) == keep:
            continue
        try:
            socket.socket.shutdown(sock, socket.SHUT_RDWR)
            cut += 1
        except OSError:
            pass  # already closed by its owner
    return cut


# ---------------------------------------------------------------------------------------
# Discovery
# ---------------------------------------------------------------------------------------
def _address(client: redis.Redis) -> str:
    kwargs = client.connection_pool.connection_kwargs
    return f"{kwargs.get('host')}:{kwargs.get('port')}"


_sentinel_clients: dict[tuple, redis.Redis] = {}
_sentinel_clients_lock = threading.Lock()


def _shared_sentinel_client(host: str, port: int, kwargs: dict[str, Any]) -> redis.Redis:
    # "retry" is a fresh object (same policy) per Sentinel; everything else must match.
    settings = tuple(sorted((k, repr(v)) for k, v in kwargs.items() if k != "retry"))
    key = (os.getpid(), host, port, settings)
    with _sentinel_clients_lock:
        client = _sentinel_clients.get(key)
        if client is None:
            client = _sentinel_clients[key] = redis.Redis(host=host, port=port, **kwargs)
        return client


def choose_master(
    answers: Iterable[dict[str, Any]], service_name: str, min_other_sentinels: int = 0
) -> tuple[str, int] | None:
    """The master to use from several Sentinels' SENTINEL MASTERS replies.

    The highest config-epoch wins: a Sentinel that has just restarted, or sits on the wrong
    side of a partition, may still name the master of an older epoch. An address that half
    or more of the answering Sentinels see as down is not used even if one still trusts it:
    with two answers, one from the Sentinel cut off beside the old master, the caller then
    waits for the third instead of publishing into the partition.
    """
    states = [a[service_name] for a in answers if service_name in a]
    if not states:
        return None
    down: dict[tuple[str, int], int] = {}
    for state in states:
        if state["is_sdown"] or state["is_odown"]:
            key = (state["ip"], int(state["port"]))
            down[key] = down.get(key, 0) + 1
    best: tuple[int, tuple[str, int]] | None = None
    for state in states:
        key = (state["ip"], int(state["port"]))
        if (
            not state["is_master"]
            or state["is_sdown"]
            or state["is_odown"]
            or state["num-other-sentinels"] < min_other_sentinels
            or down.get(key, 0) * 2 >= len(states)
        ):
            continue
        epoch = int(state.get("config-epoch", 0))
        if best is None or epoch > best[0]:
            best = (epoch, key)
    return None if best is None else best[1]


class FastSentinel(Sentinel):
    """A redis-py Sentinel that asks all Sentinels at once and leaks no secret in errors.

    ``master_wait``: how long a connection attempt of its pools waits for a usable master.
    """

    # Between two tries while no usable master is known (s); a +switch-master heard by the
    # watcher ends the pause at once.
    poll_interval = 0.5

    def __init__(
        self,
        sentinels: list[tuple[str, int]],
        min_other_sentinels: int = 0,
        sentinel_kwargs: dict[str, Any] | None = None,
        master_wait: float = 0.0,
        **kwargs: Any,
    ) -> None:
        # redis-py retries a Sentinel query 3 times with a backoff of up to 10 s: a dead
        # Sentinel would hold its asker for seconds. One try; the other Sentinels are the retry.
        sentinel_kwargs = {"retry": Retry(NoBackoff(), 0), **(sentinel_kwargs or {})}
        super().__init__(sentinels, min_other_sentinels, sentinel_kwargs, **kwargs)
        self._sentinel_addresses = [(str(h), int(p)) for h, p in sentinels]
        # kombu and celery build a Sentinel for every channel and pool: sharing the Sentinel
        # clients keeps their (TLS) connections, so a reconnect storm after a failover does
        # not also pay a handshake with every Sentinel for every channel.
        self.sentinels = [
            _shared_sentinel_client(h, p, self.sentinel_kwargs) for h, p in self._sentinel_addresses
        ]
        self.master_wait = master_wait
        own = self.sentinel_kwargs
        self._ask_timeout = (own.get("socket_connect_timeout") or 5.0) + (
            own.get("socket_timeout") or 5.0
        )

    def _ask_all(self, service_name: str) -> tuple[tuple[str, int] | None, list[str], int]:
        """One round: every Sentinel at once. Returns (master, errors, answers)."""
        replies: queue.SimpleQueue = queue.SimpleQueue()

        def ask(client: redis.Redis) -> None:
            try:
                replies.put((client, client.sentinel_masters()))
            except Exception as exc:  # whatever it is, it is this Sentinel's answer
                replies.put((client, exc))

        # celery's AsyncResult unsubscribes from its result in __del__, so any garbage
        # collection may do pub/sub I/O (celery/celery#10477), and a discovery may run inside
        # the pub/sub lock (a subscribe reconnecting after a Redis restart). threading's
        # Thread.start() waits until the new thread runs, and that thread may first collect
        # garbage and wait for that very lock: the deadlock that froze a producer in failover
        # drill 3. _thread's start does not wait; a delayed asker is a straggler at worst.
        if sys.is_finalizing():
            # No thread starts any more (Python 3.11's Thread.start() waited forever for one,
            # and the process never exited): ask in turn.
            for client in self.sentinels:
                ask(client)
        else:
            for client in self.sentinels:
                _thread.start_new_thread(ask, (client,))
        majority = len(self.sentinels) // 2 + 1
        answers: list[dict[str, Any]] = []
        errors: list[str] = []
        deadline = time.monotonic() + self._ask_timeout
        watcher = FailoverWatcher.find(self, service_name)
        generation = None if watcher is None else watcher.generation
        announced = None if watcher is None else watcher.recent_master()
        # A majority that names a master is enough: a dead Sentinel is not waited for.
        # Otherwise the stragglers may know better (one that heard the switch first, while
        # the others still name the old master, or one cut off beside it trusts it), so they
        # are waited for, but not past a +switch-master announced meanwhile: a dead
        # Sentinel's timeout would then delay the retry that finds the new master (0.5 s).
        # Likewise when the majority names another master than the one just announced: after
        # a controlled failover the old master is alive, and Sentinels that have not heard of
        # the switch yet still name it (a connection there would be refused as READONLY).
        while len(answers) + len(errors) < len(self.sentinels):
            left = deadline - time.monotonic()
            if left <= 0:
                errors.append("no answer from the others in time")
                break
            try:
                client, reply = replies.get(timeout=left if watcher is None else min(left, 0.02))
            except queue.Empty:
                if watcher is not None and watcher.generation != generation:
                    errors.append("a new master was announced meanwhile")
                    return None, errors, len(answers)
                continue
            if isinstance(reply, Exception):
                # Not repr(client): its connection pool's repr holds the password.
                errors.append(f"{_address(client)}: {type(reply).__name__}: {reply}")
                continue
            answers.append(reply)
            if len(answers) >= majority:
                master = choose_master(answers, service_name, self.min_other_sentinels)
                if master is not None and announced in (None, master):
                    return master, errors, len(answers)
        return choose_master(answers, service_name, self.min_other_sentinels), errors, len(answers)

    def discover_master(self, service_name: str) -> tuple[str, int]:
        master, errors, answered = self._ask_all(service_name)
        if master is None:
            detail = f"; {', '.join(errors)}" if errors else ""
            raise MasterNotFoundError(
                f"No master found for {service_name!r}: {answered} of {len(self.sentinels)} "
                f"Sentinels answered, none names a master that is up{detail}"
            )
        return master

    def master_for(self, service_name, redis_class=redis.Redis, connection_pool_class=None, **kw):
        # No second try inside redis-py (it makes one on a timeout): a connect to a master
        # that has just died would take twice the connect timeout, and the callers' own
        # retries (kombu's, celery's, wait_for_master) rediscover the master before retrying.
        kw.setdefault("retry", Retry(NoBackoff(), 0))
        return super().master_for(
            service_name, redis_class, connection_pool_class or TrackedConnectionPool, **kw
        )

    def __repr__(self) -> str:
        addresses = ",".join(f"{h}:{p}" for h, p in self._sentinel_addresses)
        return f"<celery_ha_failover.FastSentinel(sentinels=[{addresses}])>"


# ---------------------------------------------------------------------------------------
# The watcher
# ---------------------------------------------------------------------------------------
# How long after a +switch-master its master is trusted over Sentinels that still name
# another (s): long enough for every Sentinel to hear of the switch (about a second).
RECENT_SWITCH = 10.0


class FailoverWatcher:
    """One per process and cluster: a thread per Sentinel, subscribed to +switch-master."""

    _instances: ClassVar[dict[tuple[int, str, tuple], FailoverWatcher]] = {}
    _lock = threading.Lock()
    # How long a broken Sentinel link waits before it is tried again (s).
    retry_interval = 1.0

    @staticmethod
    def _key(sentinel: FastSentinel, service_name: str) -> tuple[int, str, tuple]:
        return (os.getpid(), service_name, tuple(sentinel._sentinel_addresses))

    @classmethod
    def find(cls, sentinel: FastSentinel, service_name: str) -> FailoverWatcher | None:
        """This process's watcher of that cluster, if a connection pool has started one."""
        return cls._instances.get(cls._key(sentinel, service_name))

    @classmethod
    def ensure(cls, sentinel: FastSentinel, service_name: str) -> FailoverWatcher:
        key = cls._key(sentinel, service_name)
        with cls._lock:
            watcher = cls._instances.get(key)
            if watcher is None:
                watcher = cls._instances[key] = cls(
                    sentinel._sentinel_addresses, sentinel.sentinel_kwargs, service_name
                )
                watcher.start()
            return watcher

    def __init__(
        self,
        sentinels: list[tuple[str, int]],
        sentinel_kwargs: dict[str, Any],
        service_name: str,
        on_switch: Callable[[tuple[str, int] | None], int] = sever_connections,
    ) -> None:
        self.sentinels = sentinels
        self.kwargs = dict(sentinel_kwargs)
        self.service_name = service_name
        self.on_switch = on_switch
        self.master: tuple[str, int] | None = None
        self.announced_at = float("-inf")  # monotonic time of the last switch acted on
        # Counts the switches acted on; discovery waits for it to move.
        self.generation = 0
        self._threads: list[threading.Thread] = []
        self._switched = threading.Condition()

    def start(self) -> None:
        for host, port in self.sentinels:
            thread = threading.Thread(
                target=self._follow,
                args=(host, port),
                name=f"celery-ha-watch-{host}:{port}",
                daemon=True,
            )
            thread.start()
            self._threads.append(thread)

    def recent_master(self) -> tuple[str, int] | None:
        """The master announced in the last RECENT_SWITCH s, if any."""
        if time.monotonic() - self.announced_at < RECENT_SWITCH:
            return self.master
        return None

    def wait_for_switch(self, generation: int, timeout: float) -> None:
        """Sleep up to ``timeout`` s, less if a switch after ``generation`` is announced."""
        with self._switched:
            self._switched.wait_for(lambda: self.generation != generation, timeout)

    def handle(self, source: str, data: str) -> None:
        """One +switch-master message: ``<name> <old-ip> <old-port> <new-ip> <new-port>``."""
        parts = data.split()
        if len(parts) != 5 or parts[0] != self.service_name:
            return
        new = (parts[3], int(parts[4]))
        with self._switched:
            # Every Sentinel announces the same switch; act on the first, cut again only if a
            # later announcement names yet another master.
            if self.master == new:
                return
            self.master = new
            self.announced_at = time.monotonic()
            self.generation += 1
            _refused.clear()
            self._switched.notify_all()
        cut = self.on_switch(new)
        log.warning(
            "celery-ha: Sentinel %s announced %s for %r: %s:%s -> %s:%s; closed %d "
            "connection(s) to other servers",
            source,
            SWITCH_CHANNEL,
            self.service_name,
            parts[1],
            parts[2],
            parts[3],
            parts[4],
            cut,
        )

    def _follow(self, host: str, port: int) -> None:
        source = f"{host}:{port}"
        while True:
            client = redis.Redis(host=host, port=port, **self.kwargs)
            pubsub = client.pubsub(ignore_subscribe_messages=True)
            try:
                pubsub.subscribe(SWITCH_CHANNEL)
                while True:
                    message = pubsub.get_message(timeout=1.0)
                    if message and message.get("type") == "message":
                        data = message["data"]
                        self.handle(source, data.decode() if isinstance(data, bytes) else data)
            except redis.exceptions.RedisError as exc:
                log.debug("celery-ha: Sentinel %s link: %s: %s", source, type(exc).__name__, exc)
            except Exception:  # never let the watcher die: it is what makes failover fast
                log.exception("celery-ha: watching Sentinel %s failed", source)
            finally:
                try:
                    pubsub.close()
                    client.close()
                except Exception:
                    pass
            time.sleep(self.retry_interval)


# ---------------------------------------------------------------------------------------
# TLS
# ---------------------------------------------------------------------------------------
_stock_wrap_socket_with_ssl = redis.connection.SSLConnection._wrap_socket_with_ssl
_tls_contexts: dict[tuple, tuple[tuple, ssl.SSLContext]] = {}
_tls_contexts_lock = threading.Lock()


def _file_version(path: str | None) -> tuple[int, int, int] | None:
    try:
        stat = os.stat(path) if path else None
    except OSError:
        return None  # loading it below raises the error that names the file
    return None if stat is None else (stat.st_ino, stat.st_mtime_ns, stat.st_size)


def tls_context(connection: redis.connection.SSLConnection) -> ssl.SSLContext:
    """The client ``SSLContext`` for ``connection``'s TLS settings, built once per process.

    As redis-py 6.4.0 builds it for every connection (redis/redis-py#4211 would let a caller
    pass one), with one difference: when a CA is given, only that CA is trusted, not the
    system's store beside it (the bundle's servers carry certificates of its own CA, and
    loading the store is most of the 20 ms). Rebuilt when a certificate, key or CA file is
    replaced, so a rotation reaches the next connection as it does with redis-py.
    """
    c = connection
    settings = (
        os.getpid(),
        c.certfile,
        c.keyfile,
        c.certificate_password,
        c.ca_certs,
        c.ca_path,
        c.ca_data,
        c.check_hostname,
        c.cert_reqs,
        c.ssl_min_version,
        c.ssl_ciphers,
    )
    versions = tuple(_file_version(p) for p in (c.certfile, c.keyfile, c.ca_certs, c.ca_path))
    with _tls_contexts_lock:
        cached = _tls_contexts.get(settings)
        if cached is not None and cached[0] == versions:
            return cached[1]
    context = ssl.create_default_context(cafile=c.ca_certs, capath=c.ca_path, cadata=c.ca_data)
    context.check_hostname = c.check_hostname
    context.verify_mode = c.cert_reqs
    if c.certfile or c.keyfile:
        context.load_cert_chain(c.certfile, c.keyfile, c.certificate_password)
    if c.ssl_min_version is not None:
        context.minimum_version = c.ssl_min_version
    if c.ssl_ciphers:
        context.set_ciphers(c.ssl_ciphers)
    with _tls_contexts_lock:
        _tls_contexts[settings] = (versions, context)
    return context


def _wrap_socket_with_ssl(self: redis.connection.SSLConnection, sock: socket.socket) -> Any:
    if self.ssl_validate_ocsp or self.ssl_validate_ocsp_stapled:
        return _stock_wrap_socket_with_ssl(self, sock)  # rare options: redis-py's own path
    return tls_context(self).wrap_socket(sock, server_hostname=self.host)


# ---------------------------------------------------------------------------------------
# kombu
# ---------------------------------------------------------------------------------------
# A worker of several queues waits on one at a time for this long (s) when all were empty: a
# message in another queue waits at most this long when the worker is idle.
MULTI_QUEUE_WAIT = 0.25
# The first message of the given queues, recorded as unacked as kombu's QoS.append records
# it, in one atomic script: under load a fetch and its unacked write are one round trip, not
# two. The message's tag also goes to the worker's fetched key: should the reply be lost
# with the connection or the process, the worker's next start finds the message by it
# (celery_ha_redelivery.restore_last_fetched) instead of a sweep doing so a minute later. A
# message the script cannot read is returned unrecorded, for kombu to drop as it would.
# KEYS: unacked index, unacked hash, fetched key, then the queues' lists in order.
# ARGV: the unacked score (the time).
_FETCH_RECORDED = """
for i = 4, #KEYS do
    local item = redis.call('RPOP', KEYS[i])
    if item then
        local ok, message = pcall(cjson.decode, item)
        local properties = ok and type(message) == 'table' and message.properties
        local tag = type(properties) == 'table' and properties.delivery_tag
        local info = type(properties) == 'table' and properties.delivery_info
        if type(tag) ~= 'string' or type(info) ~= 'table' then return {KEYS[i], item} end
        local entry = '[' .. item .. ', ' .. cjson.encode(info.exchange) .. ', '
            .. cjson.encode(info.routing_key) .. ']'
        redis.call('ZADD', KEYS[1], ARGV[1], tag)
        redis.call('HSET', KEYS[2], tag, entry)
        redis.call('SET', KEYS[3], tag)
        return {KEYS[i], item, tag}
    end
end
return false
"""


class ServerScript:
    """A Lua script run by its SHA1 (EVALSHA): the master keeps it cached, so each call sends
    a digest, not the source. A master that does not know it yet (a new one after a failover,
    or one restarted) gets the source once (EVAL caches it). ``#!lua`` without flags: Redis
    refuses the whole script up front, with its usual READONLY, NOREPLICAS or OOM reply, where
    it would refuse a write command, so nothing of it runs on a master that cannot write."""

    def __init__(self, source: str) -> None:
        self.source = "#!lua\n" + source.lstrip()
        self.sha = hashlib.sha1(self.source.encode()).hexdigest()

    def __call__(self, client: redis.Redis, keys: list[Any], args: list[Any]) -> Any:
        try:
            return client.evalsha(self.sha, len(keys), *keys, *args)
        except redis.exceptions.NoScriptError:
            return client.eval(self.source, len(keys), *keys, *args)


# kombu's unacked write (ZADD index, HSET unacked) and the message's removal from the
# in-flight list it was moved to, as one atomic command: a MULTI of the three costs the
# worker five replies to parse and the master five commands, for every message.
# KEYS: unacked index, unacked hash, in-flight list. ARGV: score, tag, entry, item.
_RECORD_UNACKED = ServerScript(
    """
redis.call('ZADD', KEYS[1], ARGV[1], ARGV[2])
redis.call('HSET', KEYS[2], ARGV[2], ARGV[3])
redis.call('LREM', KEYS[3], 1, ARGV[4])
"""
)
# kombu's ack (ZREM index, HDEL unacked: a MULTI of two) as one command.
# KEYS: unacked index, unacked hash. ARGV: tag.
_FORGET_UNACKED = ServerScript(
    """
redis.call('ZREM', KEYS[1], ARGV[1])
redis.call('HDEL', KEYS[2], ARGV[1])
"""
)


class InflightQoS(kombu_redis.QoS):
    """kombu's QoS, whose unacked write also takes the message out of the channel's in-flight
    list, in the same atomic script, or was made by the fetch itself: at every moment the
    message is in the queue, in the in-flight list or in the unacked hash, never only in a
    process's memory."""

    def append(self, message: Any, delivery_tag: str) -> None:
        channel = self.channel
        if channel._recorded == delivery_tag:
            channel._recorded = None
        elif channel._moving is not None:
            key, item = channel._moving
            delivery = message.delivery_info
            raw = kombu_redis.dumps([message._raw, delivery["exchange"], delivery["routing_key"]])
            with channel.conn_or_acquire() as client:
                _RECORD_UNACKED(
                    client,
                    [self.unacked_index_key, self.unacked_key, key],
                    [time.time(), delivery_tag, raw, item],
                )
            channel._moving = None
        else:
            return super().append(message, delivery_tag)
        # kombu's virtual QoS: the delivered set (what the redelivery refresher re-scores).
        super(kombu_redis.QoS, self).append(message, delivery_tag)
        return None

    def ack(self, delivery_tag: str) -> None:
        if self.channel.global_keyprefix:
            # kombu prefixes the keys of the commands it knows, not a script's.
            return super().ack(delivery_tag)
        with self.channel.conn_or_acquire() as client:
            _FORGET_UNACKED(client, [self.unacked_index_key, self.unacked_key], [delivery_tag])
        super(kombu_redis.QoS, self).ack(delivery_tag)
        return None


class SentinelChannel(kombu_redis.SentinelChannel):
    """kombu's Sentinel channel with FastSentinel, and publishes that may wait for a replica."""

    from_transport_options = (
        *kombu_redis.SentinelChannel.from_transport_options,
        "publish_wait_replicas",
        "publish_wait_timeout",
        "master_wait",
    )
    # 0: a publish returns when the master has the message (Redis's asynchronous replication).
    # N: it also waits up to publish_wait_timeout ms until N replicas have it (push_acknowledged).
    publish_wait_replicas = 0
    publish_wait_timeout = 10000
    # How long one connection attempt waits for the Sentinels to name a master (s).
    master_wait = 0.0

    def _sentinel_managed_pool(self, asynchronous: bool = False) -> Any:
        # kombu 5.6.2's own method, with FastSentinel in place of redis.sentinel.Sentinel.
        connparams = self._connparams(asynchronous)
        params = {k: v for k, v in connparams.items() if k not in ("host", "port")}
        sentinels = [
            (url.hostname, url.port or self.connection.default_port)
            for url in map(kombu_redis._parse_url, self.connection.client.alt)
            if url.scheme == "sentinel"
        ] or [(connparams["host"], connparams["port"])]
        master_name = getattr(self, "master_name", None)
        if master_name is None:
            raise ValueError("'master_name' transport option must be specified.")
        manager = FastSentinel(
            sentinels,
            min_other_sentinels=getattr(self, "min_other_sentinels", 0),
            sentinel_kwargs=getattr(self, "sentinel_kwargs", None),
            master_wait=self.master_wait,
            **params,
        )
        credentials = {k: params[k] for k in ("username", "password") if k in params}
        return manager.master_for(master_name, redis.Redis, **credentials).connection_pool

    _shared_client: redis.Redis | None = None

    @contextlib.contextmanager
    def conn_or_acquire(self, client: redis.Redis | None = None) -> Iterator[redis.Redis]:
        # kombu 5.6.2 builds a new redis.Redis for every publish, ack and unacked-index update
        # made without a client, several per task; redis-py copies its ~250 response callbacks
        # into a CaseInsensitiveDict in each Redis() (redis/redis-py#3624), 0.14 ms apiece,
        # a fifth of a worker's main process under load. One per pool does the same job: a
        # Redis object holds no connection, each command takes one from the pool and gives
        # it back. The polling client (BRPOP) stays kombu's own.
        if client:
            yield client
            return
        shared = self._shared_client
        if shared is None or shared.connection_pool is not self.pool:
            shared = self._shared_client = self._create_client()
        yield shared

    QoS = InflightQoS
    # Set by the worker (celery_ha_redelivery) once it has put back what an earlier run of
    # the same worker left in its in-flight lists: from then on messages are fetched into
    # them (one list per queue: inflight_list()).
    inflight_prefix: str | None = None
    # Set with it: where the worker's fetches leave the tag of the message they took.
    fetched_key: str | None = None
    _fetching: str | None = None  # the queue list the pending fetch takes from, or "*": all
    _block_next = False  # the last fetch found nothing: the next one waits for a message
    _several = False  # the pending wait is on one of several queues' lists
    _moving: tuple[str, bytes] | None = None  # (in-flight list, message) being delivered
    _recorded: str | None = None  # the tag of a message delivered already recorded as unacked

    def _lists_of(self, queues: Iterable[str]) -> list[str]:
        """The Redis lists of ``queues``, as kombu's BRPOP would wait on them."""
        queues = list(queues)
        return [self._q_for_pri(q, pri) for pri in self.priority_steps for q in queues]

    def inflight_sources(self) -> list[str]:
        """The lists this channel consumes from, in kombu's fair order."""
        return self._lists_of(self._queue_cycle.consume(len(self.active_queues)))

    def inflight_list(self, source: str) -> str:
        assert self.inflight_prefix is not None
        return f"{self.inflight_prefix}:{source}"

    def inflight_lists(self, queues: Iterable[str]) -> dict[str, str]:
        """In-flight list: its queue's list, for each list of ``queues``."""
        return {self.inflight_list(source): source for source in self._lists_of(queues)}

    def _brpop_start(self, timeout: float | None = None) -> None:
        # kombu's BRPOP takes the message off its queue, and kombu records it as unacked only
        # with its next command: a worker killed in between (SIGKILL, the OOM killer, a host
        # crash, or a warm shutdown that drops a reply still in the socket, celery/celery#4354)
        # loses it (celery/kombu#305; failover drill 1 lost one so in CI). Here, while the
        # queues hold messages, a script takes the next one and records it as unacked in the
        # same step (_FETCH_RECORDED). A wait for a message moves it into the worker's
        # in-flight list of that queue, atomically on the server; InflightQoS takes it out as
        # it records it, and what a dead worker left there goes back to its queue
        # (celery_ha_redelivery).
        if self.inflight_prefix is None or self.fetched_key is None or self.global_keyprefix:
            self._fetching = None
            return super()._brpop_start(timeout)
        sources = self.inflight_sources()
        if not sources:
            return None
        wait = self.brpop_timeout if timeout is None else timeout
        send = self.client.connection.send_command
        self._in_poll = self.client.connection
        if self._block_next:
            # BLMOVE waits on one list only: with several queues it waits on each in turn,
            # briefly, after a non-blocking look at all of them found nothing.
            source = sources[0]
            self._several = len(sources) > 1
            if self._several:
                wait = min(wait or MULTI_QUEUE_WAIT, MULTI_QUEUE_WAIT)
            self._fetching = source
            send("BLMOVE", source, self.inflight_list(source), "RIGHT", "LEFT", wait or 0)
        else:
            self._fetching = "*"
            keys = [self.unacked_index_key, self.unacked_key, self.fetched_key, *sources]
            send("EVAL", _FETCH_RECORDED, len(keys), *keys, time.time())
        return None

    def _fetch_read(self) -> bool:
        try:
            try:
                reply = self.client.parse_response(self.client.connection, "BLMOVE")
            except self.connection_errors:
                self.client.connection.disconnect()
                raise
            if self._fetching == "*":
                self._block_next = reply is None
                source, item, *recorded = (None, None) if reply is None else reply
                if recorded:
                    self._recorded = kombu_redis.bytes_to_str(recorded[0])
            else:
                # One queue: wait again while it stays empty. Several: look at all of them
                # again, and then wait on the next one.
                self._block_next = reply is None and not self._several
                if reply is None and self._several:
                    self._queue_cycle.rotate(self._fetching)
                source, item = self._fetching, reply
                if item is not None:
                    self._moving = (self.inflight_list(source), item)
            if item is None:
                raise queue.Empty()
            source = kombu_redis.bytes_to_str(source)
            queue_name = source.rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(queue_name)
            try:
                self.connection._deliver(
                    kombu_redis.loads(kombu_redis.bytes_to_str(item)), queue_name
                )
            except self.connection_errors:
                # Not put back: the message is in the in-flight list on the master that
                # moved it (a wait), or recorded as unacked and fetched (a script), or still
                # in its queue if that master died before replicating the move. Either way
                # the worker's next start, or the sweeps of a dead worker's, hand it out again.
                raise
            except Exception:
                # What kombu would have dropped (a message it cannot decode) is dropped here
                # too, or it would come back forever.
                log.exception("celery-ha: dropping a message that could not be delivered")
                self._forget_moving()
                raise
            # A consumer without acks records nothing: the message is its own now.
            self._forget_moving()
            return True
        finally:
            self._moving = None
            self._recorded = None
            self._in_poll = None

    def _poll_error(self, type: str, **options: Any) -> Any:
        # kombu reads and discards the reply after a poll error; a moved message must be
        # delivered (recorded) instead of left in the in-flight list of a live worker.
        if type == "BRPOP" and self._fetching is not None:
            return self._fetch_read()
        return super()._poll_error(type, **options)

    def _forget_moving(self) -> None:
        """Take back the record of a message its consumer did not take as unacked."""
        if self._moving is not None:
            key, item = self._moving
            with self.conn_or_acquire() as client:
                client.lrem(key, 1, item)
            self._moving = None
        if self._recorded is not None:
            with self.conn_or_acquire() as client:
                _FORGET_UNACKED(
                    client, [self.unacked_index_key, self.unacked_key], [self._recorded]
                )
            self._recorded = None

    def _brpop_read(self, **options: Any) -> bool:
        # kombu 5.6.2's own method, except that a message whose delivery fails for a lost
        # connection goes back to its list. BRPOP has taken it off the queue, and kombu records
        # it in the unacked hash only with its next command (QoS.append): when the master dies
        # in between, that command fails and kombu drops the message, which then never runs
        # (celery/kombu#305; lost once in failover drill 1, by a worker on a surviving host).
        if self._fetching is not None:
            return self._fetch_read()
        try:
            try:
                popped = self.client.parse_response(self.client.connection, "BRPOP", **options)
            except self.connection_errors:
                # As kombu: disconnect, so that the next iteration reconnects.
                self.client.connection.disconnect()
                raise
            if not popped:
                raise queue.Empty()
            key, item = popped
            dest = kombu_redis.bytes_to_str(key).rsplit(self.sep, 1)[0]
            self._queue_cycle.rotate(dest)
            try:
                self.connection._deliver(kombu_redis.loads(kombu_redis.bytes_to_str(item)), dest)
            except self.connection_errors:
                put_back(
                    self._sentinel_managed_pool(),
                    key,
                    item,
                    self.publish_wait_replicas,
                    self.publish_wait_timeout,
                )
                raise
            return True
        finally:
            self._in_poll = None

    def _put(self, queue: str, message: Any, **kwargs: Any) -> None:
        if self.connection is None:
            # kombu (5.6.2) can hand a pooled producer a channel that a reconnect of the same
            # connection elsewhere has closed; publishing on it dies with AttributeError
            # ('NoneType' object has no attribute 'client'). As a connection error it makes
            # kombu reconnect and revive the producer instead.
            raise NotMasterError("channel closed by a reconnect; publishing on a new one")
        if not self.publish_wait_replicas:
            return super()._put(queue, message, **kwargs)
        pri = self._get_message_priority(message, reverse=False)
        with self.conn_or_acquire() as client:
            push_acknowledged(
                client.connection_pool,
                "LPUSH",
                self._q_for_pri(queue, pri),
                kombu_redis.dumps(message),
                self.publish_wait_replicas,
                self.publish_wait_timeout,
            )
        return None


# A publish's WAIT is sent in steps of at most this long (ms), and of at most half the
# connection's socket timeout: a longer WAIT would read as a dead link.
WAIT_STEP = 1000


def push_acknowledged(
    pool: Any, command: str, key: Any, item: Any, wait_replicas: int, wait_timeout: int
) -> None:
    """``command`` (LPUSH or RPUSH) ``item`` onto list ``key``, then wait up to
    ``wait_timeout`` ms until ``wait_replicas`` replicas acknowledged it; NotMasterError if
    they did not, and the caller publishes again.

    All on one connection, and the push is sent once: WAIT counts the replicas that have this
    connection's last write, so a master whose replica lags, or one that is isolated, gets
    the message once, however long the wait. Publishing again after each short WAIT put a
    copy on the isolated master every 1.5 s until it refused writes, and its own worker ran
    each copy (three or four runs of one task in the isolation drill). The wait ends early
    when the Sentinels announce a new master (the watcher cuts this socket) or the master is
    demoted (UNBLOCKED): both read as a lost connection, and the retry goes to the new master.
    """
    connection = pool.get_connection()
    try:
        step = WAIT_STEP
        if connection.socket_timeout:
            step = max(1, min(step, int(connection.socket_timeout * 500)))
        give_up = time.monotonic() + wait_timeout / 1000

        def push() -> int:
            connection.send_packed_command(
                connection.pack_commands(
                    [(command, key, item), ("WAIT", wait_replicas, min(step, wait_timeout))]
                )
            )
            # Both replies are read before an error is raised, so the connection stays in step.
            replies: list[Any] = []
            for _ in range(2):
                try:
                    replies.append(connection.read_response())
                except redis.exceptions.ResponseError as exc:
                    replies.append(exc)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply
            return int(replies[1])

        # A link lost before the push's reply may be retried at once, as redis-py retries a
        # pipeline; one lost while waiting may not: a WAIT on a new link would count nothing.
        acked = connection.retry.call_with_retry(push, lambda _: connection.disconnect())
        while acked < wait_replicas and (left := give_up - time.monotonic()) > 0:
            connection.send_command("WAIT", wait_replicas, max(1, min(step, int(left * 1000))))
            acked = int(connection.read_response())
    except BaseException:
        connection.disconnect()  # a reply may still be on its way
        raise
    finally:
        pool.release(connection)
    if acked < wait_replicas:
        master = getattr(pool, "master_address", None)
        if master:
            mark_refused(*master)
        # The master took it but no replica has it: an isolated old master discards it when
        # it rejoins. Publishing again may run the task twice (the retry carries the same task
        # id), never zero times.
        raise NotMasterError(
            f"publish acknowledged by {acked} of {wait_replicas} replica(s) "
            f"within {wait_timeout} ms"
        )


# How long put_back keeps trying before it gives up on a message (s): far longer than an
# election, short enough that a thread does not outlive a cluster that is gone for good.
PUT_BACK_PATIENCE = 300.0
PUT_BACK_PAUSE = 0.2


def put_back(
    pool: Any, key: bytes, item: bytes, wait_replicas: int = 0, wait_timeout: int = 10000
) -> threading.Thread:
    """Push a message that was popped from list ``key`` but never delivered back onto the end
    that is popped next, on whatever master the Sentinels name, from a thread of its own: the
    caller's event loop must go on and reconnect. As a publish, it waits for ``wait_replicas``
    replicas to have it. If the pop never reached a replica, the message is now there twice
    and its task may run twice; it never runs zero times."""

    def run() -> None:
        name = kombu_redis.bytes_to_str(key)
        give_up = time.monotonic() + PUT_BACK_PATIENCE
        try:
            while True:
                try:
                    if wait_replicas:
                        push_acknowledged(pool, "RPUSH", key, item, wait_replicas, wait_timeout)
                    else:
                        redis.Redis(connection_pool=pool).rpush(key, item)
                    log.warning(
                        "celery-ha: put back a message popped from %s as its master died", name
                    )
                    return
                except redis.exceptions.RedisError as exc:
                    if time.monotonic() > give_up:
                        log.error(
                            "celery-ha: gave up putting back a message into %s: %s", name, exc
                        )
                        return
                # Each try's connection attempt itself waits up to master_wait for a master.
                time.sleep(PUT_BACK_PAUSE)
        finally:
            pool.disconnect()

    thread = threading.Thread(target=run, name="celery-ha-put-back", daemon=True)
    thread.start()
    return thread


def drop_if_closed(channel: Any) -> bool:
    """Disconnect ``channel``'s BRPOP connection if it was closed while it sat idle; True if so.

    kombu's poller takes that connection out of its pool once and holds it for the channel's
    life, and sends the next BRPOP on it unchecked (MultiChannelPoller._client_registered looks
    only for a socket). A client's broker connection waits in kombu's global pool between two
    uses (celery's control broadcasts: ping, inspect), and whatever closed it meanwhile (the
    master's host crashed, Sentinel's CLIENT KILL of every client of an instance it reconfigures,
    the watcher's sever_connections after a +switch-master) fails the next broadcast with a
    ConnectionError: celery does not retry broadcasts (the same as celery/kombu#681, a ping
    after Redis's idle timeout closed the connection). The check is the one redis-py's own
    pool makes on a connection it hands out again (ConnectionPool.get_connection: a connection
    that is readable while no reply is due is closed, or out of step): one non-blocking read,
    which also consumes what TLS 1.3 sends outside replies (session tickets)."""
    if channel._in_poll:
        return False  # a BRPOP is under way: its reply is what the socket holds
    client = channel.__dict__.get("client")  # only if kombu has made it
    connection = getattr(client, "connection", None)
    if connection is None or connection._sock is None:
        return False  # kombu connects it before its next BRPOP anyway
    try:
        stale = connection.can_read(timeout=0)
    except (redis.exceptions.RedisError, OSError):
        stale = True
    if stale:
        log.debug(
            "celery-ha: the broker connection to %s:%s was closed while idle; reconnecting",
            connection.host,
            connection.port,
        )
        # kombu's own way after a failed BRPOP (_brpop_read): the poller reconnects it.
        connection.disconnect()
    return stale


class IdleCheckingPoller(kombu_redis.MultiChannelPoller):
    """kombu's poller, which checks each channel's BRPOP connection before it sends a BRPOP
    in ``drain_events`` (:func:`drop_if_closed`). That is the path of clients (a control
    broadcast collecting its replies, a consumer outside a worker); a worker's event loop
    uses on_poll_start instead, where its connections are never idle long, and where a dead
    one already fails the consumer and restarts it."""

    def get(self, callback: Callable[..., Any], timeout: float | None = None) -> Any:
        for channel in self._channels:
            if channel.active_queues:
                drop_if_closed(channel)
        return super().get(callback, timeout)


class SentinelTransport(kombu_redis.SentinelTransport):
    Channel = SentinelChannel
    # Without these two, kombu's Connection.ensure gives up a publish after one successful
    # reconnect (kombu/connection.py: has_modern_errors), so a publish fails while a failover
    # is still settling. Connection errors (NotMasterError and MasterNotFoundError included)
    # are worth a reconnect; other error replies are the caller's to see.
    recoverable_connection_errors = kombu_redis.SentinelTransport.connection_errors
    recoverable_channel_errors = ()

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.cycle = IdleCheckingPoller()


# ---------------------------------------------------------------------------------------
# celery
# ---------------------------------------------------------------------------------------
# celery's result write reads the task's stored state first (a SUCCESS there is kept), then
# writes and publishes the result: a GET, then a MULTI of SETEX and PUBLISH, two round trips
# per task. Here one, when nothing is stored yet (the usual case); a stored state is
# returned for celery's own check. KEYS: the task's key. ARGV: the result, its expiry (s, 0:
# none).
_STORE_FIRST_RESULT = ServerScript(
    """
local stored = redis.call('GET', KEYS[1])
if stored then return stored end
if ARGV[2] ~= '0' then
    redis.call('SETEX', KEYS[1], ARGV[2], ARGV[1])
else
    redis.call('SET', KEYS[1], ARGV[1])
end
redis.call('PUBLISH', KEYS[1], ARGV[1])
return false
"""
)


class FirstResultInOneTrip:
    """celery's Redis result backend, writing a task's first result in one round trip."""

    def _store_result(
        self,
        task_id: Any,
        result: Any,
        state: str,
        traceback: Any = None,
        request: Any = None,
        **kwargs: Any,
    ) -> Any:
        # celery 5.6's own method (celery/backends/base.py), whose read of the stored state
        # and whose write go to the master in one round trip when no state is stored yet.
        meta = self._get_result_meta(
            result=result, state=state, traceback=traceback, request=request
        )
        meta["task_id"] = bytes_to_str(task_id)
        key = self.get_key_for_task(task_id)
        value = self.encode(meta)
        if isinstance(value, str) and len(value) > self._MAX_STR_VALUE_SIZE:
            raise BackendStoreError(
                "value too large for Redis backend", state=state, task_id=task_id
            )
        stored = self.ensure(_STORE_FIRST_RESULT, (self.client, [key], [value, self.expires or 0]))
        # A task that ran twice does not overwrite the result of its run that succeeded.
        if stored is None or self.decode_result(stored)["status"] == states.SUCCESS:
            return result
        try:
            self._set_with_state(key, value, state)
        except BackendStoreError as exc:
            raise BackendStoreError(str(exc), state=state, task_id=task_id) from exc
        return result


class SentinelBackend(FirstResultInOneTrip, StockSentinelBackend):
    """celery's Sentinel result backend with FastSentinel. A result write refused by a master
    that was cut off (NOREPLICAS) or demoted arrives as NotMasterError, a connection error,
    which celery retries until the new master takes it instead of failing the task."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # celery builds its Sentinel as self.sentinel.Sentinel(...): hand it ours.
        wait = float(self._transport_options.get("master_wait", 0.0))
        self.sentinel = types.SimpleNamespace(Sentinel=partial(FastSentinel, master_wait=wait))


# ---------------------------------------------------------------------------------------
# celery-redbeat
# ---------------------------------------------------------------------------------------
# Between two tries of a redbeat call that lost its master (s). redbeat's own back-off grows
# 1, 2, 4... s; no pause is needed to spare the Sentinels, because each try's connection
# attempt already waits for a usable master (woken by +switch-master).
REDBEAT_RETRY_WAIT = 0.2


def use_for_redbeat(app: Any) -> None:
    """Give redbeat (beat's lock and schedule) a FastSentinel client with the watcher.

    celery-redbeat 2.4.2 builds a stock ``redis.sentinel.Sentinel`` in ``get_redis`` and
    offers no way to pass another class; it uses ``app.redbeat_redis`` when that is already
    set, so it is set here with what redbeat would have built: its ``RetryingConnection``
    (``retry_period`` kept) around a master client, ``decode_responses`` on. Without this, a
    beat whose master died waits out a dead first Sentinel and redbeat's growing back-off:
    periodic runs came back 47-90 s after a master crash (issue 11's drills).
    """
    from redbeat.schedulers import REDBEAT_REDIS_KEY, RetryingConnection
    from tenacity import wait_fixed

    conf = app.conf
    options = dict(conf.redbeat_redis_options)
    broker = conf.broker_transport_options or {}
    tls = conf.redbeat_redis_use_ssl
    manager = FastSentinel(
        options["sentinels"],
        sentinel_kwargs=options.get("sentinel_kwargs"),
        master_wait=float(broker.get("master_wait", 0.0)),
        socket_timeout=options.get("socket_timeout"),
        socket_connect_timeout=broker.get("socket_connect_timeout"),
        username=options.get("username"),
        password=options.get("password"),
        decode_responses=True,
        **({"ssl": True, **tls} if isinstance(tls, dict) else {}),
    )
    client = manager.master_for(options["service_name"], db=options.get("db", 0))
    # celery_ha_settings always sets retry_period (less than the lock lasts).
    retrying = RetryingConnection(options["retry_period"], client)
    retrying.retry_kwargs["wait"] = wait_fixed(REDBEAT_RETRY_WAIT)
    setattr(app, REDBEAT_REDIS_KEY, retrying)


# ---------------------------------------------------------------------------------------
# No password in a connection pool's repr
# ---------------------------------------------------------------------------------------
_SECRET_KWARGS = frozenset({"password", "ssl_password", "credential_provider"})
_stock_pool_repr = redis.connection.ConnectionPool.__repr__


def _redacted_pool_repr(self: redis.connection.ConnectionPool) -> str:
    # redis-py 6.4's ConnectionPool.__repr__ prints every connection argument, the password
    # too (redis/redis-py#3993, CVE-2026-32597; fixed in redis-py 7, which kombu's redis<6.5
    # rules out). Such a repr lands in the journal whenever a client is printed: an operator's
    # SIGUSR1 to a worker (celery's thread dump prints each frame's locals) put the Sentinel
    # password there on the lab.
    shown = ",".join(
        f"{key}={'<REDACTED>' if key in _SECRET_KWARGS and value is not None else value}"
        for key, value in self.connection_kwargs.items()
    )
    kind = self.connection_class
    return (
        f"<{type(self).__module__}.{type(self).__name__}"
        f"(<{kind.__module__}.{kind.__name__}({shown})>)>"
    )


def install() -> None:
    """Make ``sentinel://`` mean these classes in kombu and celery, and TLS contexts shared,
    for this process."""
    transport.TRANSPORT_ALIASES["sentinel"] = f"{__name__}:SentinelTransport"
    transport._transport_cache.pop("sentinel", None)
    backends.BACKEND_ALIASES["sentinel"] = f"{__name__}:SentinelBackend"
    # Every TLS client of the process: masters, Sentinels, the watcher, redbeat, results.
    redis.connection.SSLConnection._wrap_socket_with_ssl = _wrap_socket_with_ssl
    redis.connection.ConnectionPool.__repr__ = _redacted_pool_repr  # type: ignore[method-assign]
