"""``celery -A celery_ha_boot ...``: run ANY Celery app with the deployment's settings.

Why a wrapper instead of celery's global ``--config MODULE``: in celery 5.6.3 ``--config``
only sets ``CELERY_CONFIG_MODULE``, which the loader reads when the app has no config source
of its own. An app that calls ``app.config_from_object(...)`` (most do) replaces it silently,
and settings the app passed to ``Celery(broker=...)`` or ``app.conf.update()`` win over it
anyway. Here the settings are applied with ``app.conf.update()`` after the app module is
imported: before the app is configured they land in its pre-configuration, which celery
gives precedence over any config_from_object source; after, they overwrite the finalized
settings. Either way the broker wiring is the deployment's, whatever the app says.

The app is named by CELERY_HA_APP, in the same syntax as ``celery -A`` (``pkg.module`` or
``pkg.module:attribute``), and found with celery's own ``find_app``.
"""

from __future__ import annotations

import logging
import os
import re
import sys

import celery
import celery_ha_failover
import celery_ha_redelivery
import celery_ha_settings
from celery import Celery, signals
from celery.app import trace
from celery.app.utils import find_app
from celery_ha_settings import SettingsError
from redis import sentinel

# `app` is provided lazily by __getattr__ below.
__all__ = ["boot"]


def boot(environ: dict[str, str] | None = None) -> Celery:
    """Import the app CELERY_HA_APP names and apply the CELERY_HA_* settings to it."""
    env = os.environ if environ is None else environ
    settings = celery_ha_settings.load(env)
    # Worker instances get CELERY_HA_WORKER_* from their own env file; only they have them.
    if any(key.startswith("CELERY_HA_WORKER_") for key in env):
        celery_ha_settings.worker_options(env)

    name = env["CELERY_HA_APP"].strip()
    try:
        found = find_app(name)
    except ModuleNotFoundError as exc:
        raise SettingsError(
            "CELERY_HA_APP",
            f"cannot import {name!r}: module {exc.name!r} not found in {sys.prefix}",
        ) from exc
    except AttributeError as exc:
        raise SettingsError("CELERY_HA_APP", f"{name!r}: {exc}") from exc
    if not isinstance(found, Celery):
        raise SettingsError(
            "CELERY_HA_APP", f"{name!r} is a {type(found).__name__}, not a Celery app"
        )
    routes = settings.pop("task_routes", None)
    if routes:
        # The deployment's routes first, the app's own after them: a route the operator set
        # wins, and the app's remain for every task the operator did not mention.
        own = found.conf.task_routes
        if own is None:
            own_list: list = []
        elif isinstance(own, (list, tuple)):
            own_list = list(own)
        else:
            own_list = [own]
        settings["task_routes"] = [routes, *own_list]
    found.conf.update(settings)
    # Workers refresh the messages they hold, so a dead worker's are redelivered in about a
    # minute while a live worker's long task never is (celery_ha_redelivery).
    celery_ha_redelivery.install(found)
    if "redbeat_redis_options" in settings:
        celery_ha_failover.use_for_redbeat(found)
    return found


def _connect_standby_beat(sender: object = None, **_: object) -> None:
    """A standby beat waits for redbeat's lock inside beat_init (redbeat's receiver, connected
    after this one). Connect its broker producer first: otherwise the first publish after a
    takeover builds the connection then, and with the dead host first in the Sentinel list that
    costs a connect timeout per discovery (seen: 16 s) on top of the lock's expiry."""
    scheduler = getattr(sender, "scheduler", None)
    if scheduler is not None and type(scheduler).__module__.startswith("redbeat"):
        scheduler.producer  # noqa: B018 - a cached property: connecting is the point


signals.beat_init.connect(_connect_standby_beat, weak=False)


def _not_a_success_line(record: logging.LogRecord) -> bool:
    return record.msg is not trace.LOG_SUCCESS


def _skip_each_task_lines(sender: object = None, **_: object) -> None:
    """Unless CELERY_HA_LOG_EACH_TASK is on, a worker logs no line per task received or
    succeeded (celery_log_each_task in the celery role says why). Before the consumer starts:
    celery's task strategy reads its logger's level once, when the consumer builds it, and
    then skips even preparing the line. The tracer logs retries and ignored tasks at INFO on
    the same logger as successes, so only the success line is filtered out there. Pool
    processes are forked later and inherit both."""
    if celery_ha_settings.log_each_task():
        return
    logging.getLogger("celery.worker.strategy").setLevel(logging.WARNING)
    logging.getLogger("celery.app.trace").addFilter(_not_a_success_line)


signals.worker_init.connect(_skip_each_task_lines, weak=False)

_PASSWORD_RE = re.compile(r"(password=)[^,)>\s]*")


def _hide_passwords_in_sentinel_errors() -> None:
    """Stock redis-py's MasterNotFoundError carries the repr of every Sentinel client it asked,
    passwords in clear (redis/redis-py#2782). The bundle's own clients use FastSentinel, whose
    errors name no secret; this covers a stock Sentinel built by other code in the process
    (Flower's broker view, an app's own client): raised again with the passwords masked, and
    without the original chained to it."""
    original = sentinel.Sentinel.discover_master
    if getattr(original, "_celery_ha_masked", False):
        return

    def discover_master(self: sentinel.Sentinel, service_name: str) -> object:
        try:
            return original(self, service_name)
        except sentinel.MasterNotFoundError as exc:
            masked = _PASSWORD_RE.sub(r"\1***", str(exc))
            raise sentinel.MasterNotFoundError(masked) from None

    discover_master._celery_ha_masked = True  # type: ignore[attr-defined]
    sentinel.Sentinel.discover_master = discover_master  # type: ignore[method-assign]


_hide_passwords_in_sentinel_errors()


def _keep_running_processes_busy_across_reconnects(sender: object = None, **_: object) -> None:
    """celery 5.6's prefork pool forgets, at every lost broker connection, which of its
    processes run a task (``AsynPool.flush`` clears ``_busy_workers``). Its fair scheduler then
    hands the next task to a process still busy with a long one, where it waits for that task
    to end while another process idles; with the prefetch celery cuts after a reconnect, the
    worker fetches nothing else meanwhile. Failover drill 12.4 saw no periodic run for 91 s
    after a master crash. celery 5.7 keeps the running processes marked busy
    (celery/celery#10346); this is that fix for the pinned 5.6. At worker_init: only a
    worker's main process has a pool, and beat, Flower and the CLI need not import it."""
    if celery.VERSION >= (5, 7):
        return
    from celery.concurrency import asynpool

    original = asynpool.AsynPool.flush
    if getattr(original, "_celery_ha_keeps_busy", False):
        return

    def flush(self: asynpool.AsynPool) -> None:
        busy = set(self._busy_workers)
        try:
            original(self)
        finally:
            running = set()
            for job in self._cache.values():
                process = job._write_to or job._scheduled_for
                if job._accepted and process is not None and process._is_alive():
                    running.add(process.inqW_fd)
            self._busy_workers.update(busy & running)

    flush._celery_ha_keeps_busy = True  # type: ignore[attr-defined]
    asynpool.AsynPool.flush = flush  # type: ignore[method-assign]


signals.worker_init.connect(_keep_running_processes_busy_across_reconnects, weak=False)

_app: Celery | None = None


def __getattr__(name: str) -> Celery:
    # `app` is built on first access (PEP 562), which is exactly when `celery -A` looks it
    # up; importing this module for its functions (tests, tools) has no side effect.
    global _app
    if name != "app":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    if _app is None:
        try:
            _app = boot()
        except SettingsError as error:
            # celery's CLI buries import errors under a traceback; one plain line first
            # makes the journal (and supervisor's log) say what to fix.
            print(f"celery-ha: configuration error: {error}", file=sys.stderr)
            raise
    return _app
