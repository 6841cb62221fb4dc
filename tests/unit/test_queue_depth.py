"""Unit tests of the queue-depth exporter (no broker: an in-memory stand-in for Redis)."""

from __future__ import annotations

import importlib.util
import sys
import threading
import urllib.request
from collections.abc import Iterable
from fnmatch import fnmatchcase
from http.server import ThreadingHTTPServer
from pathlib import Path

import pytest
from celery_ha_settings import broker_link

SOURCE = (
    Path(__file__).resolve().parents[2]
    / "ansible/roles/flower/files/usr/local/lib/celery-ha/queue_depth.py"
)
_spec = importlib.util.spec_from_file_location("queue_depth", SOURCE)
assert _spec and _spec.loader
qd = importlib.util.module_from_spec(_spec)
sys.modules["queue_depth"] = qd
_spec.loader.exec_module(qd)

SEP = "\x06\x16"


class FakeRedis:
    def __init__(
        self, lists: dict[str, int] | None = None, sets: dict[str, set[str]] | None = None
    ) -> None:
        self.lists = lists or {}
        self.sets = sets or {}
        self.closed = False

    def llen(self, name: str) -> int:
        return self.lists.get(name, 0)

    def smembers(self, name: str) -> set[bytes]:
        return {m.encode() for m in self.sets.get(name, set())}

    def scan_iter(self, match: str | None = None, count: int | None = None) -> Iterable[bytes]:
        return [k.encode() for k in self.sets if match is None or fnmatchcase(k, match)]

    def close(self) -> None:
        self.closed = True


CLUSTER = {"CELERY_HA_SENTINELS": "10.0.0.1:26379", "CELERY_HA_MASTER_NAME": "celery"}


def cfg(**kw: object) -> qd.Config:
    return qd.Config(link=broker_link(CLUSTER), **kw)  # type: ignore[arg-type]


def parse(text: str) -> dict[str, float]:
    """Prometheus text -> {'name{labels}': value}; also checks every sample line is well formed."""
    samples = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        name, value = line.rsplit(" ", 1)
        samples[name] = float(value)
    return samples


def test_priority_keys_match_kombu_naming() -> None:
    assert qd.priority_keys("default", [0, 3, 6, 9]) == [
        "default",
        f"default{SEP}3",
        f"default{SEP}6",
        f"default{SEP}9",
    ]
    assert qd.priority_keys("q", [0, 5], prefix="p:") == ["p:q", f"p:q{SEP}5"]


def test_depth_sums_every_priority_sub_queue() -> None:
    client = FakeRedis(lists={"default": 4, f"default{SEP}3": 2, f"default{SEP}9": 1, "reports": 7})
    assert qd.queue_depths(client, cfg(queues=["default", "reports", "empty"], discover=False)) == {
        "default": 7,
        "empty": 0,
        "reports": 7,
    }


def test_discovery_reads_bindings_and_skips_fanout_exchanges() -> None:
    client = FakeRedis(
        lists={"probe": 3},
        sets={
            "_kombu.binding.celery": {f"default{SEP}{SEP}default", f"probe{SEP}{SEP}probe"},
            "_kombu.binding.reports": {f"reports{SEP}{SEP}reports"},
            "_kombu.binding.celeryev": {f"worker.#{SEP}{SEP}celeryev.1234"},
            "_kombu.binding.reply.celery.pidbox": {f"x{SEP}{SEP}abcd.reply.celery.pidbox"},
            "unrelated": {"x"},
        },
    )
    assert qd.discover_queues(client) == {"default", "probe", "reports"}
    assert qd.queue_depths(client, cfg()) == {"default": 0, "probe": 3, "reports": 0}


def test_config_from_env_reads_the_cluster_from_the_celery_settings() -> None:
    c = qd.config_from_env(
        {
            "CELERY_HA_SENTINELS": "10.0.0.1:26379, 10.0.0.2:26380",
            "CELERY_HA_MASTER_NAME": "celery",
            "CELERY_HA_BROKER_DB": "2",
            "CELERY_HA_REDIS_USERNAME": "celery",
            "CELERY_HA_REDIS_PASSWORD": "secret",
            "CELERY_HA_SENTINEL_PASSWORD": "sentinel-secret",
            "QUEUE_DEPTH_QUEUES": "default, reports,",
            "QUEUE_DEPTH_DISCOVER": "false",
        }
    )
    assert c.link.sentinels == [("10.0.0.1", 26379), ("10.0.0.2", 26380)]
    assert (c.link.db, c.queues, c.discover, c.link.username, c.link.password) == (
        2,
        ["default", "reports"],
        False,
        "celery",
        "secret",
    )
    # No TLS variables: plaintext, nothing TLS-related passed to redis-py.
    assert c.link.tls == {}
    client = qd.Collector(c)._redis_client("10.0.0.1", 6379)
    assert client.connection_pool.connection_kwargs["db"] == 2
    assert client.connection_pool.connection_kwargs["password"] == "secret"


def test_tls_applies_to_the_sentinel_and_the_master_links(monkeypatch: pytest.MonkeyPatch) -> None:
    c = qd.config_from_env(
        {
            **CLUSTER,
            "CELERY_HA_TLS_CA": "/etc/celery-ha/tls/ca.crt",
            "CELERY_HA_TLS_CERT": "/etc/celery-ha/tls/cert.crt",
            "CELERY_HA_TLS_KEY": "/etc/celery-ha/tls/cert.key",
        }
    )
    client = qd.Collector(c)._redis_client("10.0.0.1", 6379)
    assert client.connection_pool.connection_class.__name__ == "SSLConnection"
    kwargs = client.connection_pool.connection_kwargs
    assert kwargs["ssl_cert_reqs"] == "required"
    assert kwargs["ssl_check_hostname"] is True
    assert (kwargs["ssl_ca_certs"], kwargs["ssl_certfile"], kwargs["ssl_keyfile"]) == (
        "/etc/celery-ha/tls/ca.crt",
        "/etc/celery-ha/tls/cert.crt",
        "/etc/celery-ha/tls/cert.key",
    )
    built: dict[str, object] = {}

    class Sentinel:
        def __init__(self, sentinels: object, sentinel_kwargs: dict[str, object]) -> None:
            built.update(sentinel_kwargs)

        def discover_master(self, name: str) -> tuple[str, int]:
            return "10.0.0.2", 6379

    import celery_ha_failover

    monkeypatch.setattr(celery_ha_failover, "FastSentinel", Sentinel)
    assert qd.Collector(c)._sentinel_master() == ("10.0.0.2", 6379)
    assert built["ssl"] is True and built["ssl_ca_certs"] == "/etc/celery-ha/tls/ca.crt"
    # The scrape's own timeout, not the workers' (a scrape must answer within its deadline).
    assert built["socket_timeout"] == built["socket_connect_timeout"] == 1.0


@pytest.mark.parametrize(
    ("env", "named"),
    [
        ({"CELERY_HA_MASTER_NAME": "celery"}, "CELERY_HA_SENTINELS"),
        ({"CELERY_HA_SENTINELS": "10.0.0.1:26379"}, "CELERY_HA_MASTER_NAME"),
        ({**CLUSTER, "CELERY_HA_SENTINELS": "10.0.0.1"}, "CELERY_HA_SENTINELS"),
        ({**CLUSTER, "QUEUE_DEPTH_DISCOVER": "maybe"}, "QUEUE_DEPTH_DISCOVER"),
    ],
)
def test_bad_config_is_refused_naming_the_variable(env: dict[str, str], named: str) -> None:
    with pytest.raises(ValueError, match=named):
        qd.config_from_env(env)


def test_each_scrape_asks_for_the_master_again_and_reads_it() -> None:
    """The point of the exporter: after a failover the next scrape reads the NEW master."""
    servers = {
        ("10.0.0.1", 6379): FakeRedis(lists={"default": 5}),
        ("10.0.0.2", 6379): FakeRedis(lists={"default": 9}),
    }
    current = [("10.0.0.1", 6379)]
    asked: list[int] = []

    def find_master() -> tuple[str, int]:
        asked.append(1)
        return current[0]

    collector = qd.Collector(
        cfg(queues=["default"], discover=False),
        find_master=find_master,
        connect=lambda h, p: servers[(h, p)],
    )
    first = parse(collector.collect())
    current[0] = ("10.0.0.2", 6379)
    second = parse(collector.collect())
    assert len(asked) == 2
    assert first['celery_ha_queue_depth{queue="default"}'] == 5
    assert first['celery_ha_queue_depth_master_info{master="10.0.0.1:6379"}'] == 1
    assert second['celery_ha_queue_depth{queue="default"}'] == 9
    assert second['celery_ha_queue_depth_master_info{master="10.0.0.2:6379"}'] == 1
    assert first["celery_ha_queue_depth_up"] == second["celery_ha_queue_depth_up"] == 1
    assert all(s.closed for s in servers.values())


def test_no_master_means_up_zero_and_no_depth_figure() -> None:
    def find_master() -> tuple[str, int]:
        raise RuntimeError("No master found for 'celery'")

    samples = parse(
        qd.Collector(
            cfg(queues=["default"]), find_master=find_master, connect=lambda h, p: None
        ).collect()
    )
    assert samples["celery_ha_queue_depth_up"] == 0
    assert not [k for k in samples if k.startswith("celery_ha_queue_depth{")]


def test_broken_master_connection_means_up_zero() -> None:
    class Broken(FakeRedis):
        def llen(self, name: str) -> int:
            raise ConnectionError("reset")

    text = qd.Collector(
        cfg(queues=["default"], discover=False),
        find_master=lambda: ("10.0.0.1", 6379),
        connect=lambda h, p: Broken(),
    ).collect()
    samples = parse(text)
    assert samples["celery_ha_queue_depth_up"] == 0
    assert 'celery_ha_queue_depth_master_info{master="10.0.0.1:6379"}' in samples
    assert 'celery_ha_queue_depth{queue="default"}' not in samples


def test_label_values_are_escaped() -> None:
    text = qd.render(("h", 1), {'we"ird\\q': 1}, 0.0)
    assert 'celery_ha_queue_depth{queue="we\\"ird\\\\q"} 1' in text


def test_http_endpoint_serves_metrics_and_404s_elsewhere() -> None:
    collector = qd.Collector(
        cfg(queues=["default"], discover=False),
        find_master=lambda: ("h", 1),
        connect=lambda h, p: FakeRedis(lists={"default": 2}),
    )
    server = ThreadingHTTPServer(("127.0.0.1", 0), qd.make_handler(collector))
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        base = f"http://127.0.0.1:{server.server_address[1]}"
        with urllib.request.urlopen(f"{base}/metrics", timeout=5) as resp:
            assert resp.status == 200
            assert resp.headers["Content-Type"].startswith("text/plain")
            assert parse(resp.read().decode())['celery_ha_queue_depth{queue="default"}'] == 2
        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(f"{base}/other", timeout=5)
        assert err.value.code == 404
    finally:
        server.shutdown()
        server.server_close()


def test_main_reads_every_env_file_it_is_given(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    celery_env, own_env = tmp_path / "celery.env", tmp_path / "queue-depth.env"
    celery_env.write_text("CELERY_HA_SENTINELS=10.0.0.1:26379\nCELERY_HA_MASTER_NAME=celery\n")
    own_env.write_text("QUEUE_DEPTH_DISCOVER=maybe\n")
    # Refused for the second file's bad value: the first file's cluster settings were read
    # (without them the error would name CELERY_HA_SENTINELS), and so was the second.
    assert qd.main(["--env-file", str(celery_env), "--env-file", str(own_env)]) == 2
    assert "QUEUE_DEPTH_DISCOVER" in caplog.text


def test_main_refuses_bad_arguments_and_config() -> None:
    assert qd.main(["--env-file"]) == 2
    assert qd.main(["--env-file", "/nonexistent/queue-depth.env"]) == 2
