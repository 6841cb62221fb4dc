"""celery_ha_settings: the beat hosts' celery-redbeat settings (CELERY_HA_BEAT_*)."""

from __future__ import annotations

import ssl

import celery_ha_boot  # also connects its beat_init receiver
import pytest
from celery_ha_settings import BEAT_KEY_PREFIX, SettingsError, beat_key_prefix, load
from test_settings import env

BEAT = {"BEAT_REDIS_USERNAME": "beat", "BEAT_REDIS_PASSWORD": "beat-secret"}
TLS = {"TLS_CA": "/etc/ca.crt", "TLS_CERT": "/etc/c.crt", "TLS_KEY": "/etc/c.key"}


def test_without_beat_variables_nothing_of_redbeat_is_set() -> None:
    settings = load(env())
    assert not any(k.startswith(("redbeat_", "beat_")) for k in settings)


def test_redbeat_goes_through_every_sentinel_with_its_own_user_and_tls() -> None:
    settings = load(env(**BEAT, **TLS))
    assert settings["beat_scheduler"] == "redbeat.RedBeatScheduler"
    assert settings["redbeat_redis_url"].startswith("redis-sentinel")
    options = settings["redbeat_redis_options"]
    hosts = ["10.0.0.11", "10.0.0.12", "10.0.0.13"]
    assert options["sentinels"] == [(h, 26379) for h in hosts]
    assert options["service_name"] == "celery"
    assert (options["username"], options["password"]) == ("beat", "beat-secret")
    # The Sentinels are asked with their own password and over TLS too.
    assert options["sentinel_kwargs"]["password"] == "sentinel-secret"
    assert options["sentinel_kwargs"]["ssl"] is True
    assert settings["redbeat_redis_use_ssl"]["ssl_cert_reqs"] == ssl.CERT_REQUIRED
    assert settings["redbeat_redis_use_ssl"]["ssl_ca_certs"] == "/etc/ca.crt"
    # Keys the ACL user may touch (users.acl.j2), and a lock far below redbeat's 1500 s.
    assert settings["redbeat_key_prefix"] == beat_key_prefix("celery_ha_app")
    assert settings["redbeat_key_prefix"].startswith(BEAT_KEY_PREFIX)
    assert settings["redbeat_lock_key"] == settings["redbeat_key_prefix"] + "lock"
    assert settings["redbeat_lock_timeout"] == 30
    assert settings["beat_max_loop_interval"] == 5
    assert options["retry_period"] < settings["redbeat_lock_timeout"]


def test_the_lock_must_outlast_three_ticks() -> None:
    with pytest.raises(SettingsError) as error:
        load(env(**BEAT, BEAT_LOCK_TIMEOUT="10", BEAT_MAX_INTERVAL="5"))
    assert error.value.variable == "CELERY_HA_BEAT_LOCK_TIMEOUT"


def test_a_beat_user_needs_its_password() -> None:
    with pytest.raises(SettingsError) as error:
        load(env(BEAT_REDIS_USERNAME="beat"))
    assert error.value.variable == "CELERY_HA_BEAT_REDIS_PASSWORD"


def test_two_apps_on_one_cluster_get_their_own_lock_and_schedule() -> None:
    one = load(env(**BEAT))
    other = load(env(**BEAT, APP="inventory_app.worker:inventory"))
    assert one["redbeat_lock_key"] != other["redbeat_lock_key"]
    assert one["redbeat_key_prefix"] != other["redbeat_key_prefix"]
    assert other["redbeat_key_prefix"].startswith(BEAT_KEY_PREFIX)


def test_supervisors_beat_reads_beat_env_after_celery_env(tmp_path) -> None:
    from celery_ha_exec import environment

    (tmp_path / "celery.env").write_text("CELERY_HA_APP=x\nCELERY_HA_BEAT_LOCK_TIMEOUT=99\n")
    (tmp_path / "beat.env").write_text("CELERY_HA_BEAT_REDIS_USERNAME=beat\n")
    env = environment("beat", None, {}, config_dir=tmp_path)
    assert env["CELERY_HA_BEAT_REDIS_USERNAME"] == "beat"
    assert env["CELERY_HA_BEAT_LOCK_TIMEOUT"] == "99"
    # Workers never see beat's secret.
    (tmp_path / "worker-a.env").write_text("CELERY_HA_WORKER_QUEUES=a\n")
    assert "CELERY_HA_BEAT_REDIS_USERNAME" not in environment("worker", "a", {}, tmp_path)


def test_a_standby_beat_connects_its_producer_before_waiting_for_the_lock() -> None:
    from celery import signals

    class Service:  # a signal's sender must be hashable
        def __init__(self, scheduler: object) -> None:
            self.scheduler = scheduler

    connected = []

    class RedBeatLike:
        __module__ = "redbeat.schedulers"

        @property
        def producer(self) -> object:
            connected.append(True)
            return object()

    signals.beat_init.send(sender=Service(RedBeatLike()))
    assert connected == [True]
    # celery's own file scheduler keeps connecting lazily.
    signals.beat_init.send(sender=Service(object()))
    assert connected == [True]


def test_sentinel_errors_do_not_carry_the_passwords() -> None:
    from redis.sentinel import MasterNotFoundError, Sentinel

    # Loopback port 1: refused at once, as a dead Sentinel would be after its timeout.
    sentinel = Sentinel(
        [("127.0.0.1", 1)],
        sentinel_kwargs={"password": "s3cret-sentinel", "socket_connect_timeout": 0.5},
        password="s3cret-redis",
    )
    with pytest.raises(MasterNotFoundError) as error:
        sentinel.discover_master("celery")
    text = str(error.value)
    assert "No master found" in text
    assert "s3cret" not in text
    assert error.value.__cause__ is None and error.value.__suppress_context__


def test_redbeat_gets_the_failover_aware_client(tmp_path, monkeypatch) -> None:
    from celery_ha_failover import FastSentinel, TrackedConnectionPool
    from redbeat.schedulers import RetryingConnection, get_redis
    from test_boot import user_app

    name = user_app(tmp_path, monkeypatch, "from celery import Celery\napp = Celery('u')\n")
    app = celery_ha_boot.boot(env(**BEAT, **TLS, APP=name, CONNECT_TIMEOUT="0.3"))
    client = get_redis(app)
    # redbeat's own wrapper, kept for its retry_period, with a short fixed pause.
    assert isinstance(client, RetryingConnection)
    assert client.retry_kwargs["wait"].wait_fixed == pytest.approx(0.2)
    pool = client.wrapped_connection.connection_pool
    assert isinstance(pool, TrackedConnectionPool)
    assert isinstance(pool.sentinel_manager, FastSentinel)
    assert pool.sentinel_manager.master_wait == 10.0
    kwargs = pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"]) == ("beat", "beat-secret")
    assert kwargs["decode_responses"] is True
    assert kwargs["socket_connect_timeout"] == pytest.approx(0.3)
    assert kwargs["ssl_ca_certs"] == "/etc/ca.crt"
    assert pool.connection_class.__name__.startswith("SentinelManagedSSL")
    # No beat variables (a worker): redbeat is left alone.
    worker = user_app(tmp_path, monkeypatch, "from celery import Celery\napp = Celery('w')\n")
    other = celery_ha_boot.boot(env(APP=worker))
    assert getattr(other, "redbeat_redis", None) is None
