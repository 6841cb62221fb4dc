"""celery_ha_boot: any app, however it configures itself, ends up with the deployment's
settings, and a wrong CELERY_HA_APP is reported by name."""

from __future__ import annotations

import itertools
import logging
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from pathlib import Path

import celery_ha_boot
import pytest
from celery_ha_settings import SettingsError
from test_settings import GOOD

_names = itertools.count()


def user_app(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str) -> str:
    """Write a throwaway app module (a fresh name each time: imports are cached)."""
    name = f"userapp_{next(_names)}"
    (tmp_path / f"{name}.py").write_text(textwrap.dedent(body))
    monkeypatch.syspath_prepend(str(tmp_path))
    return name


@pytest.mark.parametrize(
    "body",
    [
        # config_from_object: what celery's --config cannot override.
        """
        from celery import Celery
        app = Celery("u")
        app.config_from_object({"broker_url": "redis://wrong:1/0", "result_backend": "redis://wrong:1/1"})
        """,
        # constructor arguments and conf.update()
        """
        from celery import Celery
        app = Celery("u", broker="redis://wrong:1/0", backend="redis://wrong:1/1")
        app.conf.update(task_acks_late=False, worker_prefetch_multiplier=4)
        """,
        # an app already configured (its conf read) at import time
        """
        from celery import Celery
        app = Celery("u")
        app.conf.broker_url = "redis://wrong:1/0"
        assert app.conf.broker_url
        """,
    ],
)
def test_deployment_settings_win_over_the_apps_own(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, body: str
) -> None:
    name = user_app(tmp_path, monkeypatch, body)
    app = celery_ha_boot.boot({**GOOD, "CELERY_HA_APP": name})
    assert app.conf.broker_url.startswith("sentinel://")
    assert app.conf.result_backend.startswith("sentinel://")
    assert app.conf.task_acks_late is True
    assert app.conf.worker_prefetch_multiplier == 1
    assert app.conf.broker_transport_options["master_name"] == "celery"


def test_deployment_routes_go_first_and_the_apps_stay(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    name = user_app(
        tmp_path,
        monkeypatch,
        """
        from celery import Celery
        app = Celery("u")
        app.conf.task_routes = {"a.*": {"queue": "from-app"}, "b.*": {"queue": "from-app"}}
        """,
    )
    app = celery_ha_boot.boot(
        {**GOOD, "CELERY_HA_APP": name, "CELERY_HA_TASK_ROUTES": '{"a.*":"from-ops"}'}
    )
    router = app.amqp.router
    assert router.route({}, "a.x")["queue"].name == "from-ops"
    assert router.route({}, "b.x")["queue"].name == "from-app"


def test_the_second_app_with_an_explicit_attribute() -> None:
    app = celery_ha_boot.boot(
        {
            **GOOD,
            "CELERY_HA_APP": "inventory_app.worker:inventory",
            "CELERY_HA_DEFAULT_QUEUE": "inventory",
        }
    )
    assert app.main == "inventory"
    assert "inventory.count_items" in app.tasks
    # its own celeryconfig pointed at redis://127.0.0.1:6379/9
    assert app.conf.broker_url.startswith("sentinel://celery:")
    assert "@10.0.0.11:26379/0;" in app.conf.broker_url
    assert app.conf.task_default_queue == "inventory"


@pytest.mark.parametrize(
    ("app_name", "fragment"),
    [
        ("no_such_module_xyz", "not found"),
        ("inventory_app.worker:missing", "missing"),
        ("inventory_app.worker:count_items", "not a Celery app"),
    ],
)
def test_a_wrong_app_is_reported_by_name(app_name: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as excinfo:
        celery_ha_boot.boot({**GOOD, "CELERY_HA_APP": app_name})
    assert excinfo.value.variable == "CELERY_HA_APP"
    assert fragment in str(excinfo.value)


def test_worker_variables_are_checked_when_present() -> None:
    with pytest.raises(SettingsError, match="CELERY_HA_WORKER_CONCURRENCY"):
        celery_ha_boot.boot(
            {
                **GOOD,
                "CELERY_HA_WORKER_QUEUES": "default",
                "CELERY_HA_WORKER_CONCURRENCY": "0",
                "CELERY_HA_WORKER_POOL": "prefork",
            }
        )


def celery_cli(env: dict[str, str], *args: str) -> subprocess.CompletedProcess[str]:
    repo = Path(__file__).resolve().parents[2]
    path = ":".join(
        str(repo / p) for p in ("app/boot/src", "app/src", "tests/apps/inventory_app/src")
    )
    return subprocess.run(
        [sys.executable, "-m", "celery", "-A", "celery_ha_boot", *args],
        env={"PATH": "/usr/bin:/bin", "PYTHONPATH": path, **env},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


def test_the_celery_cli_loads_the_app_through_boot() -> None:
    result = celery_cli(GOOD, "report")
    assert result.returncode == 0, result.stderr
    assert "celery_ha_app" in result.stdout
    assert "sentinel://" in result.stdout


def test_the_celery_cli_says_which_variable_is_wrong() -> None:
    result = celery_cli({**GOOD, "CELERY_HA_SENTINELS": "nope"}, "report")
    assert result.returncode != 0
    assert "celery-ha: configuration error: CELERY_HA_SENTINELS:" in result.stderr


@pytest.fixture
def task_loggers() -> Iterator[tuple[logging.Logger, logging.Logger]]:
    """celery's strategy and tracer loggers, put back as they were afterwards."""
    strategy, tracer = (
        logging.getLogger("celery.worker.strategy"),
        logging.getLogger("celery.app.trace"),
    )
    level, filters = strategy.level, list(tracer.filters)
    yield strategy, tracer
    strategy.setLevel(level)
    tracer.filters[:] = filters


def trace_record(fmt: str) -> logging.LogRecord:
    return logging.LogRecord("celery.app.trace", logging.INFO, __file__, 1, fmt, None, None)


def test_a_worker_logs_no_line_per_task_by_default(
    task_loggers: tuple[logging.Logger, logging.Logger], monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery.app import trace

    strategy, tracer = task_loggers
    monkeypatch.delenv("CELERY_HA_LOG_EACH_TASK", raising=False)
    celery_ha_boot._skip_each_task_lines()
    assert not strategy.isEnabledFor(logging.INFO)  # celery then skips the "received" line
    assert not tracer.filter(trace_record(trace.LOG_SUCCESS))
    for kept in (trace.LOG_RETRY, trace.LOG_FAILURE, trace.LOG_IGNORED):
        assert tracer.filter(trace_record(kept))


def test_celery_log_each_task_keeps_celerys_lines(
    task_loggers: tuple[logging.Logger, logging.Logger], monkeypatch: pytest.MonkeyPatch
) -> None:
    from celery.app import trace

    strategy, tracer = task_loggers
    strategy.setLevel(logging.NOTSET)
    monkeypatch.setenv("CELERY_HA_LOG_EACH_TASK", "true")
    celery_ha_boot._skip_each_task_lines()
    assert strategy.level == logging.NOTSET
    assert tracer.filter(trace_record(trace.LOG_SUCCESS))


class FakeProcess:
    def __init__(self, inqueue_fd: int, alive: bool = True) -> None:
        self.inqW_fd, self.alive = inqueue_fd, alive

    def _is_alive(self) -> bool:
        return self.alive


def test_a_lost_broker_connection_leaves_the_processes_running_a_task_busy(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # celery's own AsynPool.flush, as Consumer.on_close calls it at every lost connection,
    # on a pool whose process 11 runs a long task, 12 was written a job it has not taken
    # yet and 13 died running one.
    from collections import deque
    from types import SimpleNamespace

    from celery.concurrency import asynpool

    running, written, dead = FakeProcess(11), FakeProcess(12), FakeProcess(13, alive=False)
    cache: dict[int, SimpleNamespace] = {}
    for number, (process, accepted) in enumerate(((running, True), (written, False), (dead, True))):
        cache[number] = SimpleNamespace(
            _accepted=accepted,
            _write_to=process,
            _scheduled_for=process,
            discard=lambda number=number: cache.pop(number),
        )
    pool = SimpleNamespace(
        _state=asynpool.RUN,
        _cache=cache,
        synack=False,
        outbound_buffer=deque(),
        maintain_pool=lambda: None,
        _active_writers=set(),
        _active_writes=set(),
        _busy_workers={11, 12, 13},
    )
    # Celery's own flush comes back after the test: the patch below is process-wide.
    monkeypatch.setattr(asynpool.AsynPool, "flush", asynpool.AsynPool.flush)
    celery_ha_boot._keep_running_processes_busy_across_reconnects()  # as at worker_init
    asynpool.AsynPool.flush(pool)  # type: ignore[arg-type]
    # Only 11 still runs a task: the fair scheduler must not hand it the next one.
    assert pool._busy_workers == {11}
