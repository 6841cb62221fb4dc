"""celery_ha_settings: the CELERY_HA_* environment -> Celery settings, and its errors."""

from __future__ import annotations

import json

import pytest
from celery_ha_settings import (
    SettingsError,
    load,
    log_level,
    parse_sentinels,
    parse_task_routes,
    worker_options,
)
from kombu.utils.url import url_to_parts

GOOD = {
    "CELERY_HA_APP": "celery_ha_app",
    "CELERY_HA_SENTINELS": "10.0.0.11:26379,10.0.0.12:26379,10.0.0.13:26379",
    "CELERY_HA_MASTER_NAME": "celery",
    "CELERY_HA_REDIS_USERNAME": "celery",
    "CELERY_HA_REDIS_PASSWORD": "p@ss:w/rd%;x",
    "CELERY_HA_SENTINEL_PASSWORD": "sentinel-secret",
}


def env(**changes: str | None) -> dict[str, str]:
    result = dict(GOOD)
    for key, value in changes.items():
        name = "CELERY_HA_" + key
        if value is None:
            result.pop(name, None)
        else:
            result[name] = value
    return result


def test_broker_and_backend_list_every_sentinel_with_quoted_credentials() -> None:
    settings = load(GOOD)
    for key, db in (("broker_url", "0"), ("result_backend", "1")):
        urls = settings[key].split(";")
        assert len(urls) == 3
        for url, host in zip(urls, ("10.0.0.11", "10.0.0.12", "10.0.0.13"), strict=True):
            parts = url_to_parts(url)
            assert (parts.scheme, parts.hostname, parts.port) == ("sentinel", host, 26379)
            if key == "broker_url" or host == "10.0.0.11":
                assert (parts.username, parts.password) == ("celery", "p@ss:w/rd%;x")
            else:  # the backend reads them from its first URL only
                assert (parts.username, parts.password) == (None, None)
            assert parts.path == db


def test_shown_settings_hold_no_secret() -> None:
    # What `celery inspect conf` and Flower's Config tab show of a worker's settings.
    from celery import Celery

    app = Celery(set_as_current=False)
    app.conf.update(load(env(SENTINEL_USERNAME="sentinel-user")))
    shown = json.dumps(app.conf.table(with_defaults=False, censored=True), default=str)
    assert "p@ss" not in shown
    assert "sentinel-secret" not in shown
    backend = app.backend
    assert (backend.connparams["username"], backend.connparams["password"]) == (
        "celery",
        "p@ss:w/rd%;x",
    )


def test_sentinel_options_for_broker_and_backend() -> None:
    settings = load(env(SENTINEL_USERNAME="sentinel-user"))
    for key in ("broker_transport_options", "result_backend_transport_options"):
        options = settings[key]
        assert options["master_name"] == "celery"
        assert options["sentinel_kwargs"]["password"] == "sentinel-secret"
        assert options["sentinel_kwargs"]["username"] == "sentinel-user"
        # An unreachable sentinel must not stall discovery: half a second at most, on a LAN.
        assert options["sentinel_kwargs"]["socket_connect_timeout"] == 0.5
        assert options["sentinel_kwargs"]["socket_timeout"] == 0.5


def test_reliable_delivery_and_events() -> None:
    settings = load(GOOD)
    assert settings["task_acks_late"] is True
    assert settings["task_reject_on_worker_lost"] is True
    assert settings["worker_prefetch_multiplier"] == 1
    assert settings["broker_transport_options"]["visibility_timeout"] == 3600
    assert settings["broker_connection_retry_on_startup"] is True
    assert settings["broker_connection_max_retries"] is None
    assert settings["task_publish_retry"] is True
    # Tries that each wait for a master, at most half a second apart.
    assert settings["task_publish_retry_policy"]["max_retries"] == 20
    assert settings["task_publish_retry_policy"]["interval_max"] == 0.5
    assert settings["result_backend_always_retry"] is True
    assert settings["result_backend_max_retries"] == 120
    assert settings["result_backend_max_sleep_between_retries_ms"] == 500
    # A publish returns only once a replica has the message as well.
    assert settings["broker_transport_options"]["publish_wait_replicas"] == 1
    # One list per queue: what lets a one-queue worker fetch through its in-flight list.
    assert settings["broker_transport_options"]["priority_steps"] == [0]
    assert settings["broker_transport_options"]["publish_wait_timeout"] == 10000
    assert settings["worker_send_task_events"] is False
    assert settings["task_send_sent_event"] is False
    assert settings["result_expires"] == 86400
    for optional in ("task_compression", "task_default_queue", "task_routes", "task_time_limit"):
        assert optional not in settings


def test_optional_settings() -> None:
    settings = load(
        env(
            COMPRESSION="gzip",
            DEFAULT_QUEUE="default",
            TASK_ROUTES='{"reports.*":"reports","x.y":{"queue":"q"}}',
            TASK_TIME_LIMIT="600",
            VISIBILITY_TIMEOUT="7200",
            RESULT_EXPIRES="60",
            BROKER_DB="2",
            RESULT_DB="3",
            PUBLISH_RETRY_MAX_RETRIES="5",
            SOCKET_TIMEOUT="2.5",
        )
    )
    assert settings["task_compression"] == settings["result_compression"] == "gzip"
    assert settings["task_default_queue"] == "default"
    assert settings["task_routes"] == {"reports.*": {"queue": "reports"}, "x.y": {"queue": "q"}}
    assert settings["task_time_limit"] == 600
    assert settings["broker_transport_options"]["visibility_timeout"] == 7200
    assert settings["broker_transport_options"]["socket_timeout"] == 2.5
    assert settings["redis_socket_timeout"] == 2.5
    assert settings["result_expires"] == 60
    assert settings["broker_url"].endswith("/2")
    assert settings["result_backend"].endswith("/3")
    assert settings["task_publish_retry_policy"]["max_retries"] == 5


def test_empty_values_mean_unset() -> None:
    settings = load(env(COMPRESSION="", DEFAULT_QUEUE=" ", TASK_ROUTES="", SENTINEL_PASSWORD=""))
    assert "task_compression" not in settings
    assert "task_default_queue" not in settings
    assert "password" not in settings["broker_transport_options"]["sentinel_kwargs"]
    assert load(env(COMPRESSION="none")).get("task_compression") is None


def test_no_credentials_at_all() -> None:
    settings = load(env(REDIS_USERNAME=None, REDIS_PASSWORD=None))
    assert settings["broker_url"].startswith("sentinel://10.0.0.11:26379/0")


def test_password_without_username_is_legacy_auth() -> None:
    parts = url_to_parts(load(env(REDIS_USERNAME=None))["broker_url"].split(";")[0])
    assert (parts.username, parts.password) == (None, "p@ss:w/rd%;x")


def test_ipv6_and_whitespace_in_sentinels() -> None:
    assert parse_sentinels(" [fd00::1]:26379, 10.0.0.2:26380 ") == [
        ("[fd00::1]", 26379),
        ("10.0.0.2", 26380),
    ]


BAD = [
    ({"APP": None}, "CELERY_HA_APP", "required"),
    ({"APP": "not a module"}, "CELERY_HA_APP", "module path"),
    ({"SENTINELS": None}, "CELERY_HA_SENTINELS", "required"),
    ({"SENTINELS": "10.0.0.1"}, "CELERY_HA_SENTINELS", "host:port"),
    ({"SENTINELS": "10.0.0.1:http"}, "CELERY_HA_SENTINELS", "not a number"),
    ({"SENTINELS": "10.0.0.1:70000"}, "CELERY_HA_SENTINELS", "1-65535"),
    ({"SENTINELS": "a:1,a:1"}, "CELERY_HA_SENTINELS", "twice"),
    ({"SENTINELS": "user@a:1"}, "CELERY_HA_SENTINELS", "host:port"),
    ({"SENTINELS": ","}, "CELERY_HA_SENTINELS", "no sentinel"),
    ({"MASTER_NAME": ""}, "CELERY_HA_MASTER_NAME", "required"),
    ({"REDIS_PASSWORD": None}, "CELERY_HA_REDIS_PASSWORD", "USERNAME"),
    ({"SENTINEL_USERNAME": "u", "SENTINEL_PASSWORD": None}, "CELERY_HA_SENTINEL_PASSWORD", ""),
    ({"BROKER_DB": "x"}, "CELERY_HA_BROKER_DB", "integer"),
    ({"BROKER_DB": "16"}, "CELERY_HA_BROKER_DB", "between 0 and 15"),
    ({"RESULT_DB": "0"}, "CELERY_HA_RESULT_DB", "differ"),
    ({"VISIBILITY_TIMEOUT": "0"}, "CELERY_HA_VISIBILITY_TIMEOUT", ">= 1"),
    (
        {"TASK_TIME_LIMIT": "3600", "VISIBILITY_TIMEOUT": "3600"},
        "CELERY_HA_VISIBILITY_TIMEOUT",
        "above",
    ),
    ({"SOCKET_TIMEOUT": "nan"}, "CELERY_HA_SOCKET_TIMEOUT", ">="),
    ({"SOCKET_TIMEOUT": "fast"}, "CELERY_HA_SOCKET_TIMEOUT", "number"),
    ({"COMPRESSION": "rar"}, "CELERY_HA_COMPRESSION", "unknown"),
    ({"DEFAULT_QUEUE": "a b"}, "CELERY_HA_DEFAULT_QUEUE", "queue name"),
    ({"TASK_ROUTES": "{reports: x}"}, "CELERY_HA_TASK_ROUTES", "JSON"),
    ({"TASK_ROUTES": '["reports"]'}, "CELERY_HA_TASK_ROUTES", "object"),
    ({"TASK_ROUTES": '{"a": 1}'}, "CELERY_HA_TASK_ROUTES", "queue"),
    ({"PUBLISH_RETRY_MAX_RETRIES": "-1"}, "CELERY_HA_PUBLISH_RETRY_MAX_RETRIES", ">= 0"),
    ({"LOG_LEVEL": "chatty"}, "CELERY_HA_LOG_LEVEL", "one of"),
    ({"LOG_EACH_TASK": "sometimes"}, "CELERY_HA_LOG_EACH_TASK", "true or false"),
    ({"TASK_EVENTS": "maybe"}, "CELERY_HA_TASK_EVENTS", "true or false"),
    ({"IGNORE_RESULT": "2"}, "CELERY_HA_IGNORE_RESULT", "true or false"),
    ({"PREFETCH_MULTIPLIER": "0"}, "CELERY_HA_PREFETCH_MULTIPLIER", "between 1 and 1000"),
    ({"PREFETCH_MULTIPLIER": "4.5"}, "CELERY_HA_PREFETCH_MULTIPLIER", "integer"),
]


def test_the_cost_knobs_change_only_their_own_settings() -> None:
    """Events, result storage, acks_late and the prefetch: each knob moves what it names
    (the bench's cost table changes them one at a time), and the defaults keep every
    guarantee."""
    base = load(env())
    assert base["task_ignore_result"] is False
    assert base["task_send_sent_event"] is False
    assert base["task_reject_on_worker_lost"] is True
    knobs = {
        "TASK_EVENTS": ("true", {"worker_send_task_events": True, "task_send_sent_event": True}),
        "IGNORE_RESULT": ("yes", {"task_ignore_result": True}),
        "ACKS_LATE": ("0", {"task_acks_late": False, "task_reject_on_worker_lost": False}),
        "PREFETCH_MULTIPLIER": ("16", {"worker_prefetch_multiplier": 16}),
    }
    for key, (value, expected) in knobs.items():
        changed = load(env(**{key: value}))
        diff = {k: v for k, v in changed.items() if base.get(k) != v}
        assert diff == expected, key


@pytest.mark.parametrize(("changes", "variable", "fragment"), BAD)
def test_bad_input_names_the_variable(changes: dict, variable: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as excinfo:
        load(env(**changes))
    assert excinfo.value.variable == variable
    assert str(excinfo.value).startswith(variable + ": ")
    assert fragment in str(excinfo.value)


def test_secrets_never_appear_in_errors() -> None:
    with pytest.raises(SettingsError) as excinfo:
        load(env(RESULT_DB="0"))
    assert GOOD["CELERY_HA_REDIS_PASSWORD"] not in str(excinfo.value)


def test_log_level_default_and_case() -> None:
    assert log_level({}) == "INFO"
    assert log_level({"CELERY_HA_LOG_LEVEL": "debug"}) == "DEBUG"


def test_task_routes_parser_roundtrip() -> None:
    routes = {"reports.*": "reports"}
    assert parse_task_routes(json.dumps(routes)) == {"reports.*": {"queue": "reports"}}
    assert parse_task_routes("{}") == {}


WORKER = {
    "CELERY_HA_WORKER_QUEUES": "default,reports",
    "CELERY_HA_WORKER_CONCURRENCY": "4",
    "CELERY_HA_WORKER_POOL": "prefork",
}


def test_worker_options() -> None:
    assert worker_options(WORKER) == {
        "queues": ["default", "reports"],
        "concurrency": 4,
        "pool": "prefork",
    }


@pytest.mark.parametrize(
    ("key", "value", "fragment"),
    [
        ("CELERY_HA_WORKER_QUEUES", "", "required"),
        ("CELERY_HA_WORKER_QUEUES", "default, reports", "without spaces"),
        ("CELERY_HA_WORKER_QUEUES", "default,,reports", "queue name"),
        ("CELERY_HA_WORKER_CONCURRENCY", "0", "between 1 and 256"),
        ("CELERY_HA_WORKER_CONCURRENCY", "20000", "between 1 and 256"),
        ("CELERY_HA_WORKER_CONCURRENCY", "two", "integer"),
        ("CELERY_HA_WORKER_CONCURRENCY", "", "required"),
        ("CELERY_HA_WORKER_POOL", "gevent", "prefork, threads, solo"),
    ],
)
def test_bad_worker_options_name_the_variable(key: str, value: str, fragment: str) -> None:
    with pytest.raises(SettingsError) as excinfo:
        worker_options({**WORKER, key: value})
    assert excinfo.value.variable == key
    assert fragment in str(excinfo.value)


TLS = {"TLS_CA": "/etc/celery-ha/tls/ca.crt", "TLS_CERT": "/c/cert.crt", "TLS_KEY": "/c/cert.key"}


def test_tls_covers_the_sentinel_links_and_the_master_link_apart() -> None:
    import ssl

    settings = load(env(**TLS))
    for key in ("broker_transport_options", "result_backend_transport_options"):
        sentinel = settings[key]["sentinel_kwargs"]
        # redis-py's Sentinel() only speaks TLS to the Sentinels with ssl=True in these.
        assert sentinel["ssl"] is True
        assert sentinel["ssl_ca_certs"] == TLS["TLS_CA"]
        assert (sentinel["ssl_certfile"], sentinel["ssl_keyfile"]) == ("/c/cert.crt", "/c/cert.key")
        assert sentinel["ssl_cert_reqs"] == "required"
        assert sentinel["ssl_check_hostname"] is True
        assert sentinel["password"] == "sentinel-secret"
    for key in ("broker_use_ssl", "redis_backend_use_ssl"):
        master = settings[key]
        assert master["ssl_cert_reqs"] == ssl.CERT_REQUIRED
        assert master["ssl_ca_certs"] == TLS["TLS_CA"]
        assert (master["ssl_certfile"], master["ssl_keyfile"]) == ("/c/cert.crt", "/c/cert.key")
        assert master["ssl_check_hostname"] is True


def test_without_tls_nothing_asks_for_it() -> None:
    settings = load(GOOD)
    assert "broker_use_ssl" not in settings
    assert "redis_backend_use_ssl" not in settings
    assert "ssl" not in settings["broker_transport_options"]["sentinel_kwargs"]


def test_tls_backend_is_accepted_by_celery() -> None:
    # Celery's own check of redis_backend_use_ssl (ssl_cert_reqs must be a known constant).
    from celery import Celery

    app = Celery(set_as_current=False)
    app.conf.update(load(env(**TLS)))
    backend = app.backend
    assert backend.connparams["ssl_ca_certs"] == TLS["TLS_CA"]
    assert backend.connparams["connection_class"].__name__ == "SentinelManagedSSLConnection"


@pytest.mark.parametrize(
    ("changes", "variable"),
    [
        ({"TLS_CERT": "/c/cert.crt", "TLS_KEY": "/c/cert.key"}, "CELERY_HA_TLS_CERT"),
        ({"TLS_KEY": "/c/cert.key"}, "CELERY_HA_TLS_KEY"),
        ({"TLS_CA": "/ca.crt", "TLS_CERT": "/c/cert.crt"}, "CELERY_HA_TLS_KEY"),
        ({"TLS_CA": "/ca.crt", "TLS_KEY": "/c/cert.key"}, "CELERY_HA_TLS_CERT"),
    ],
)
def test_incomplete_tls_settings_name_the_variable(changes: dict[str, str], variable: str) -> None:
    with pytest.raises(SettingsError) as err:
        load(env(**changes))
    assert err.value.variable == variable


def test_broker_connections_notice_a_silent_peer() -> None:
    import socket

    options = load(GOOD)["broker_transport_options"]
    assert options["socket_keepalive"] is True
    keepalive = options["socket_keepalive_options"]
    # About 10 s by default: idle 3 s, then 3 probes 1 s apart; unacked data fails at 10 s.
    assert keepalive[socket.TCP_KEEPIDLE] + 3 * keepalive[socket.TCP_KEEPINTVL] <= 10
    assert keepalive[socket.TCP_USER_TIMEOUT] == 10000
    assert (
        load(env(DEAD_PEER_TIMEOUT="60"))["broker_transport_options"]["socket_keepalive_options"][
            socket.TCP_USER_TIMEOUT
        ]
        == 60000
    )
    with pytest.raises(SettingsError) as err:
        load(env(DEAD_PEER_TIMEOUT="2"))
    assert err.value.variable == "CELERY_HA_DEAD_PEER_TIMEOUT"
