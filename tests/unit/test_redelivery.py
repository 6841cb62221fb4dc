"""celery_ha_redelivery: live workers keep what they hold fresh; only a dead worker's is swept."""

from __future__ import annotations

import threading
from types import SimpleNamespace
from typing import Any

import celery_ha_redelivery as rd
import pytest
from celery import Celery
from celery_ha_settings import SettingsError, load
from test_settings import env


class FakeLock:
    def __init__(self, redis: FakeRedis, name: str) -> None:
        self.redis, self.name = redis, name

    def acquire(self, blocking: bool = True) -> bool:
        if self.name in self.redis.locks:
            return False
        self.redis.locks.add(self.name)
        return True

    def release(self) -> None:
        self.redis.locks.discard(self.name)


class FakeRedis:
    """The few zset and lock commands the module uses, with Redis' semantics."""

    def __init__(self) -> None:
        self.zsets: dict[str, dict[str, float]] = {}
        self.locks: set[str] = set()
        self.down = False

    def _check(self) -> None:
        if self.down:
            raise ConnectionError("broker down")

    def zadd(self, key: str, mapping: dict[str, float], xx: bool = False) -> int:
        self._check()
        zset = self.zsets.setdefault(key, {})
        for member, score in mapping.items():
            if xx and member not in zset:
                continue
            zset[member] = score
        return 0

    def zrangebyscore(self, key: str, lo: float, hi: float, start: int, num: int) -> list[bytes]:
        self._check()
        found = sorted((s, m) for m, s in self.zsets.get(key, {}).items() if lo <= s <= hi)
        return [m.encode() for _, m in found][start : start + num]

    def ping(self) -> bool:
        self._check()
        return True

    def hgetall(self, key: str) -> dict[bytes, bytes]:
        self._check()
        return {}  # no worker fetches through an in-flight list here (test_inflight.py)

    def lock(self, name: str, timeout: int) -> FakeLock:
        self._check()
        return FakeLock(self, name)


class Clock:
    def __init__(self, now: float = 1_000_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


def deliver(redis: FakeRedis, tag: str, at: float) -> None:
    redis.zsets.setdefault("unacked_index", {})[tag] = at


def restorer(redis: FakeRedis, restored: list[str]):
    def restore(tag: str, client: Any) -> None:
        # kombu's restore_by_tag: out of the index (and the hash), back into its queue.
        redis.zsets["unacked_index"].pop(tag, None)
        restored.append(tag)

    return restore


def test_a_live_workers_messages_are_never_swept_however_long_they_run() -> None:
    clock, redis, restored = Clock(), FakeRedis(), []
    live = rd.Redelivery(60, 10, clock=clock)
    other = rd.Redelivery(60, 10, clock=clock)
    deliver(redis, "running", clock.now)
    deliver(redis, "prefetched", clock.now)
    for _ in range(360):  # an hour, in 10 s steps
        clock.now += 10
        live.tick(redis, ["running", "prefetched"], restorer(redis, restored))
        other.tick(redis, [], restorer(redis, restored))
    assert restored == []
    assert redis.zsets["unacked_index"] == {"running": clock.now, "prefetched": clock.now}


def test_a_dead_workers_messages_are_swept_within_the_bound() -> None:
    clock, redis, restored = Clock(), FakeRedis(), []
    sweeper = rd.Redelivery(60, 10, clock=clock)
    deliver(redis, "orphan", clock.now)  # last refreshed when its worker died
    sweeper.tick(redis, [], restorer(redis, restored))
    died = clock.now
    while not restored:
        clock.now += 10
        sweeper.tick(redis, [], restorer(redis, restored))
    assert restored == ["orphan"]
    assert 50 <= clock.now - died <= 60


def test_refresh_never_puts_back_a_message_acked_or_restored_meanwhile() -> None:
    redis = FakeRedis()
    logic = rd.Redelivery(60, 10, clock=Clock())
    deliver(redis, "kept", 0)
    assert logic.refresh(redis, ["kept", "acked-already"]) == 2
    assert set(redis.zsets["unacked_index"]) == {"kept"}


def test_after_a_broker_outage_nothing_is_swept_until_the_others_could_refresh() -> None:
    clock, redis, restored = Clock(), FakeRedis(), []
    survivor = rd.Redelivery(60, 10, clock=clock)
    owner = rd.Redelivery(60, 10, clock=clock)
    deliver(redis, "long-task", clock.now)
    survivor.tick(redis, [], restorer(redis, restored))
    redis.down = True
    for _ in range(12):  # two minutes of failover: every score ages past the bound
        clock.now += 10
        survivor.tick(redis, [], restorer(redis, restored))
    redis.down = False
    clock.now += 10
    survivor.tick(redis, [], restorer(redis, restored))  # back first
    assert survivor.healthy_since == clock.now
    clock.now += 20  # the owner reconnects later, still within stale_after
    owner.tick(redis, ["long-task"], None)
    for _ in range(10):
        clock.now += 10
        survivor.tick(redis, [], restorer(redis, restored))
        owner.tick(redis, ["long-task"], None)
    assert restored == []


def test_a_held_mutex_skips_the_sweep_instead_of_waiting() -> None:
    clock, redis, restored = Clock(), FakeRedis(), []
    logic = rd.Redelivery(60, 10, clock=clock)
    logic.healthy_since = clock.now - 1000
    deliver(redis, "orphan", 0)
    redis.locks.add("unacked_mutex")
    assert logic.sweep(redis, restorer(redis, restored)) == []
    redis.locks.clear()
    assert logic.sweep(redis, restorer(redis, restored)) == ["orphan"]
    assert redis.locks == set()


def test_tick_survives_a_broker_error_and_reports_it(caplog: pytest.LogCaptureFixture) -> None:
    redis = FakeRedis()
    redis.down = True
    logic = rd.Redelivery(60, 10, clock=Clock())
    logic.tick(redis, ["t"], lambda tag, client: None)
    assert logic.healthy_since is None
    assert "refreshing held messages failed" in caplog.text


@pytest.mark.parametrize(("timeout", "interval"), [(39, 10), (10, 10), (60, 0), (3, 1)])
def test_a_bound_shorter_than_four_refresh_intervals_is_refused(
    timeout: float, interval: float
) -> None:
    with pytest.raises(ValueError):
        rd.check_bound(timeout, interval)
    rd.check_bound(4 * max(interval, 1), max(interval, 1))


def test_held_tags_cover_the_channel_and_celerys_requests(monkeypatch) -> None:
    from celery.worker import state

    class Request:
        def __init__(self, tag: str) -> None:
            self.message = SimpleNamespace(delivery_tag=tag)

    reserved, active = Request("prefetched-old-channel"), Request("running")
    monkeypatch.setattr(state, "reserved_requests", {reserved})
    monkeypatch.setattr(state, "active_requests", {active})
    channel = SimpleNamespace(qos=SimpleNamespace(_delivered={"running": 1, "eta": 2}))
    assert sorted(rd.held_tags(channel)) == ["eta", "prefetched-old-channel", "running"]


def test_settings_carry_the_bound_and_install_adds_the_consumer_step() -> None:
    settings = load(env())
    assert settings[rd.TIMEOUT_SETTING] == 60
    assert settings[rd.INTERVAL_SETTING] == 10
    app = Celery("t", set_as_current=False)
    rd.install(app)
    assert rd.RedeliveryStep not in app.steps["consumer"]  # not asked for: nothing added
    app.conf.update(settings)
    rd.install(app)
    rd.install(app)
    assert list(app.steps["consumer"]).count(rd.RedeliveryStep) == 1
    assert list(app.steps["consumer"]).count(rd.WakeupStep) == 1


@pytest.mark.parametrize(
    ("changes", "needle"),
    [
        ({"REDELIVERY_TIMEOUT": "30"}, "4 refresh intervals"),
        ({"REDELIVERY_TIMEOUT": "20", "REDELIVERY_INTERVAL": "6"}, "4 refresh intervals"),
        ({"REDELIVERY_TIMEOUT": "600", "VISIBILITY_TIMEOUT": "600"}, "VISIBILITY_TIMEOUT"),
        ({"REDELIVERY_INTERVAL": "0.1"}, ">= 0.5"),
    ],
)
def test_settings_refuse_a_bound_a_live_worker_could_miss(changes, needle) -> None:
    with pytest.raises(SettingsError) as error:
        load(env(**changes))
    assert error.value.variable.startswith("CELERY_HA_REDELIVERY_")
    assert needle in str(error.value)


def test_a_closing_channel_requeues_all_but_the_tasks_still_running(monkeypatch) -> None:
    from celery.worker import state

    class Request:
        def __init__(self, tag: str) -> None:
            self.message = SimpleNamespace(delivery_tag=tag)

    requeued: list[str] = []

    class QoS:
        def __init__(self) -> None:
            self._delivered = {"running": 1, "reserved": 2}

        def restore_unacked(self, client: Any = None) -> list:
            requeued.extend(self._delivered)
            self._delivered.clear()
            return []

    qos = QoS()
    monkeypatch.setattr(state, "active_requests", {Request("running"), Request("elsewhere")})
    rd.keep_running_on_close(qos)
    rd.keep_running_on_close(qos)  # once per QoS, however often the step starts
    qos.restore_unacked()
    assert requeued == ["reserved"]


def test_a_call_soon_from_another_thread_wakes_the_loop() -> None:
    # The threads pool's ack reaches the worker's loop through hub.call_soon from the pool's
    # thread; the loop must see its poll return instead of sleeping on until a timer fires.
    from kombu.asynchronous import Hub

    hub = Hub()
    try:
        read_end = rd.wake_on_foreign_call_soon(hub)
        hub.add_reader(read_end, rd._drain, read_end)
        assert rd.wake_on_foreign_call_soon(hub) == read_end  # once per hub
        ran: list[str] = []
        hub.call_soon(ran.append, "from the loop's thread")
        assert not hub.poller.poll(0), "a call from the loop's own thread needs no wake-up"
        worker = threading.Thread(target=hub.call_soon, args=(ran.append, "from a pool thread"))
        worker.start()
        worker.join()
        events = hub.poller.poll(0)
        assert [fd for fd, _ in events or ()] == [read_end]
        rd._drain(read_end)
        assert not hub.poller.poll(0)
        for callback in hub._pop_ready():
            callback()
        assert sorted(ran) == ["from a pool thread", "from the loop's thread"]
    finally:
        hub.close()
