"""Redis Sentinels of the cluster, as deployed by roles/sentinel (issue 3)."""

from __future__ import annotations

import re
from collections.abc import Iterator

import pytest
import redis

SENTINEL_PORT = 26379
MASTER_NAME = "celery"


@pytest.fixture
def sentinel_host(host, lab_groups: dict[str, list[str]]) -> str:
    name = host.backend.get_hostname()
    if name not in lab_groups.get("sentinel", []):
        pytest.skip(f"{name} is not in the sentinel group")
    return name


def connect(address: str, password: str | None, tls: dict) -> redis.Redis:
    return redis.Redis(
        host=address,
        port=SENTINEL_PORT,
        password=password,
        socket_timeout=3,
        socket_connect_timeout=3,
        decode_responses=True,
        **tls,
    )


@pytest.fixture(scope="module")
def sentinels(lab_groups, lab_addresses, secret, tls) -> Iterator[dict[str, redis.Redis]]:
    password = secret("sentinel_password")
    out = {host: connect(lab_addresses[host], password, tls) for host in lab_groups["sentinel"]}
    yield out
    for client in out.values():
        client.close()


def master_settings(client: redis.Redis) -> dict[str, str]:
    flat = client.execute_command("SENTINEL", "MASTER", MASTER_NAME)
    if isinstance(flat, dict):
        return {str(k): str(v) for k, v in flat.items()}
    return {str(flat[i]): str(flat[i + 1]) for i in range(0, len(flat), 2)}


def as_dict(reply) -> dict[str, str]:
    if isinstance(reply, dict):
        return reply
    return dict(zip(reply[::2], reply[1::2], strict=True))


def test_package_installed(host, sentinel_host: str, flavor) -> None:
    assert host.package(flavor.sentinel_package).is_installed


def test_unit_enabled_and_running(host, sentinel_host: str, flavor, assert_flavor_unit) -> None:
    assert_flavor_unit(host, flavor.sentinel_unit, flavor.user, flavor.sentinel_binary)


def test_valkey_sentinel_without_redis_named_shims(host, sentinel_host: str, flavor) -> None:
    if flavor.name != "valkey":
        pytest.skip("the host runs Redis")
    assert not host.package("redis-sentinel").is_installed
    assert not host.file("/usr/bin/redis-sentinel").exists
    assert host.run("systemctl cat redis-sentinel.service").rc != 0


def test_listens_only_on_loopback_and_cluster_address(
    host, sentinel_host: str, lab_addresses: dict[str, str]
) -> None:
    sockets = {
        s
        for s in host.socket.get_listening_sockets()
        if s.startswith("tcp://") and s.endswith(f":{SENTINEL_PORT}")
    }
    assert sockets == {
        f"tcp://127.0.0.1:{SENTINEL_PORT}",
        f"tcp://::1:{SENTINEL_PORT}",
        f"tcp://{lab_addresses[sentinel_host]}:{SENTINEL_PORT}",
    }


def test_config_is_private_and_sentinel_owned(host, sentinel_host: str, flavor) -> None:
    f = host.file(flavor.sentinel_conf)
    assert f.user == flavor.user
    assert f.group == flavor.user
    assert f.mode & 0o137 == 0, oct(f.mode)
    content = f.content_string
    # Written once by Ansible, then rewritten by Sentinel with its own state.
    assert "celery-ha: bootstrapped by Ansible" in content
    assert "sentinel myid " in content


def test_unauthenticated_and_wrong_password_refused(
    sentinel_host: str, lab_addresses: dict[str, str], tls: dict
) -> None:
    for password in (None, "not-the-password"):
        client = connect(lab_addresses[sentinel_host], password, tls)
        try:
            with pytest.raises((redis.AuthenticationError, redis.ResponseError)):
                client.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME)
        finally:
            client.close()


def test_every_sentinel_agrees_on_the_master(sentinels, clients_admin, lab_addresses) -> None:
    views = {
        host: tuple(c.execute_command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", MASTER_NAME))
        for host, c in sentinels.items()
    }
    assert len(set(views.values())) == 1, views
    address, port = next(iter(views.values()))
    assert int(port) == 6379
    host = next(h for h, a in lab_addresses.items() if a == address)
    assert clients_admin(host).info("replication")["role"] == "master"


def test_ckquorum_ok_everywhere(sentinels) -> None:
    for host, client in sentinels.items():
        reply = client.execute_command("SENTINEL", "CKQUORUM", MASTER_NAME)
        reply = reply.decode() if isinstance(reply, bytes) else str(reply)
        assert reply.startswith("OK"), (host, reply)


def test_sentinels_know_each_other_and_every_replica(sentinels, lab_groups) -> None:
    n_sentinels = len(lab_groups["sentinel"])
    n_redis = len(lab_groups["redis"])
    for host, client in sentinels.items():
        settings = master_settings(client)
        assert settings["flags"] == "master", (host, settings["flags"])
        assert int(settings["num-other-sentinels"]) == n_sentinels - 1, host
        assert int(settings["num-slaves"]) == n_redis - 1, host
        replicas = client.execute_command("SENTINEL", "REPLICAS", MASTER_NAME)
        flags = [as_dict(r)["flags"] for r in replicas]
        assert all(f == "slave" for f in flags), (host, flags)


def test_per_master_settings(sentinels, lab_groups) -> None:
    majority = len(lab_groups["sentinel"]) // 2 + 1
    for host, client in sentinels.items():
        settings = master_settings(client)
        assert int(settings["quorum"]) == majority, host
        assert settings["down-after-milliseconds"] == "5000", host
        # Short, so that a split vote is retried within seconds (2 x failover-timeout).
        assert settings["failover-timeout"] == "4000", host
        assert settings["parallel-syncs"] == "1", host


@pytest.fixture(scope="module")
def clients_admin(lab_addresses, secret, tls):
    opened: list[redis.Redis] = []

    def make(host: str) -> redis.Redis:
        client = redis.Redis(
            host=lab_addresses[host],
            port=6379,
            username="admin",
            password=secret("redis_admin_password"),
            socket_timeout=3,
            socket_connect_timeout=3,
            **tls,
        )
        opened.append(client)
        return client

    yield make
    for client in opened:
        client.close()


# -- preflight: bad input is refused, naming the variable -------------------------------

ROLES = {"cluster": "all", "redis": "redis", "sentinel": "sentinel"}


def test_preflight_refuses_fewer_than_three_sentinels(preflight) -> None:
    rc, out = preflight("[redis]\nn1\nn2\nn3\n[sentinel]\nn1\nn2\n", ROLES)
    assert rc != 0, out[-3000:]
    assert "cluster_sentinel_group" in out
    assert "at least 3" in out


@pytest.mark.parametrize("quorum", ["1", "4"])
def test_preflight_refuses_a_quorum_that_is_not_a_majority(preflight, quorum: str) -> None:
    rc, out = preflight(
        "[redis]\nn1\nn2\nn3\n[sentinel]\nn1\nn2\nn3\n", ROLES, sentinel_quorum=quorum
    )
    assert rc != 0, out[-3000:]
    assert "sentinel_quorum" in out
    assert "majority" in out


def test_tls_only_and_key_readable_only_by_redis(
    host, sentinel_host: str, flavor, assert_private_key_dir
) -> None:
    assert_private_key_dir(host, f"{flavor.conf_dir}/tls/sentinel", flavor.user, flavor.user)
    content = host.file(flavor.sentinel_conf).content_string
    assert re.search(r"^port 0$", content, re.M)
    assert re.search(rf"^tls-port {SENTINEL_PORT}$", content, re.M)
    assert re.search(r"^tls-auth-clients yes$", content, re.M)
    assert re.search(r"^tls-replication yes$", content, re.M)
