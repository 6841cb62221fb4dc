"""Redis servers of the cluster, as deployed by roles/redis (issue 3).

Per-host checks use testinfra's `host`; access-control checks connect from the controller
to each server's cluster address with redis-py, exactly as a client on the network would.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest
import redis

REDIS_PORT = 6379
# In the flavor's config folder (/etc/redis or /etc/valkey); None = its main file.
CONFIG_FILES = (None, "celery-ha.conf", "celery-ha-auth.conf", "celery-ha-static.conf", "users.acl")


@pytest.fixture
def redis_host(host, lab_groups: dict[str, list[str]]) -> str:
    name = host.backend.get_hostname()
    if name not in lab_groups.get("redis", []):
        pytest.skip(f"{name} is not in the redis group")
    return name


def connect(
    address: str, user: str | None, password: str | None, tls: dict, db: int = 0
) -> redis.Redis:
    return redis.Redis(
        host=address,
        port=REDIS_PORT,
        db=db,
        username=user,
        password=password,
        socket_timeout=3,
        socket_connect_timeout=3,
        **tls,
    )


@pytest.fixture(scope="module")
def clients(lab_groups, lab_addresses, secret, tls) -> Iterator[dict[str, dict[str, redis.Redis]]]:
    """For each Redis host: a client per ACL user (admin, celery, replication, sentinel)."""
    users = {
        "admin": secret("redis_admin_password"),
        "celery": secret("redis_celery_password"),
        "replication": secret("redis_replication_password"),
        "sentinel": secret("redis_sentinel_password"),
    }
    out = {
        host: {user: connect(lab_addresses[host], user, pw, tls) for user, pw in users.items()}
        for host in lab_groups["redis"]
    }
    yield out
    for per_host in out.values():
        for client in per_host.values():
            client.close()


def info_replication(client: redis.Redis) -> dict[str, object]:
    return client.info("replication")


# -- packages, unit, files -------------------------------------------------------------


def test_packages_installed(host, redis_host: str, flavor) -> None:
    for name in (flavor.server_package, flavor.tools_package):
        assert host.package(name).is_installed, name


def test_unit_enabled_and_running(host, redis_host: str, flavor, assert_flavor_unit) -> None:
    unit = assert_flavor_unit(host, flavor.server_unit, flavor.user, flavor.server_binary)
    # Debian's own hardened unit, not a replacement.
    assert f"FragmentPath=/lib/systemd/system/{flavor.server_unit}" in unit or (
        f"FragmentPath=/usr/lib/systemd/system/{flavor.server_unit}" in unit
    )


def test_valkey_without_redis_named_shims(host, redis_host: str, flavor) -> None:
    """Valkey runs as itself: no redis package, unit, command, user or folder stands in."""
    if flavor.name != "valkey":
        pytest.skip("the host runs Redis")
    for package in ("redis-server", "redis-tools", "redis-sentinel", "valkey-redis-compat"):
        assert not host.package(package).is_installed, package
    for path in ("/usr/bin/redis-server", "/usr/bin/redis-cli", "/etc/redis", "/var/lib/redis"):
        assert not host.file(path).exists, path
    assert not host.user("redis").exists
    assert host.run("systemctl cat redis-server.service").rc != 0


def test_listens_only_on_loopback_and_cluster_address(
    host, redis_host: str, lab_addresses: dict[str, str]
) -> None:
    sockets = {
        s
        for s in host.socket.get_listening_sockets()
        if s.startswith("tcp://") and s.endswith(f":{REDIS_PORT}")
    }
    expected = {
        f"tcp://127.0.0.1:{REDIS_PORT}",
        f"tcp://::1:{REDIS_PORT}",
        f"tcp://{lab_addresses[redis_host]}:{REDIS_PORT}",
    }
    assert sockets == expected


@pytest.mark.parametrize("name", CONFIG_FILES, ids=lambda n: n or "main")
def test_config_files_hold_secrets_privately(host, redis_host: str, name, flavor) -> None:
    path = f"{flavor.conf_dir}/{name}" if name else flavor.server_conf
    f = host.file(path)
    assert f.exists
    assert f.user == flavor.user
    assert f.group == flavor.user
    assert f.mode & 0o007 == 0, f"{path} is world accessible: {oct(f.mode)}"
    assert f.mode & 0o137 == 0, f"{path} is more than 0640: {oct(f.mode)}"


def test_acl_file_has_no_plaintext_password(host, redis_host: str, secret, flavor) -> None:
    content = host.file(f"{flavor.conf_dir}/users.acl").content_string
    for name in ("redis_admin_password", "redis_celery_password", "redis_sentinel_password"):
        assert secret(name) not in content


def test_main_config_includes_role_settings(host, redis_host: str, flavor) -> None:
    content = host.file(flavor.server_conf).content_string
    assert f"include {flavor.conf_dir}/celery-ha-static.conf" in content
    assert f"include {flavor.conf_dir}/celery-ha.conf" in content
    assert f"include {flavor.conf_dir}/celery-ha-auth.conf" in content


def test_kernel_settings_persisted(host, redis_host: str) -> None:
    sysctl = host.file("/etc/sysctl.d/60-celery-ha-redis.conf").content_string
    assert "vm.overcommit_memory = 1" in sysctl
    assert host.service("disable-transparent-hugepages").is_enabled
    somaxconn = int(host.file("/proc/sys/net/core/somaxconn").content_string.strip())
    assert somaxconn >= 511


# -- access control --------------------------------------------------------------------


def test_unauthenticated_commands_refused(
    redis_host: str, lab_addresses: dict[str, str], tls: dict
) -> None:
    client = connect(lab_addresses[redis_host], None, None, tls)
    try:
        with pytest.raises(redis.AuthenticationError):
            client.ping()
        with pytest.raises(redis.AuthenticationError):
            client.get("anything")
    finally:
        client.close()


def test_default_user_and_wrong_password_refused(
    redis_host: str, lab_addresses: dict[str, str], secret, tls: dict
) -> None:
    for user, password in (
        ("default", secret("redis_admin_password")),
        ("admin", "not-the-password"),
        ("celery", secret("redis_admin_password")),
    ):
        client = connect(lab_addresses[redis_host], user, password, tls)
        try:
            with pytest.raises(redis.AuthenticationError):
                client.ping()
        finally:
            client.close()


def test_celery_user_can_do_broker_work(
    redis_host: str, clients, lab_addresses: dict[str, str], secret, tls: dict
) -> None:
    celery = clients[redis_host]["celery"]
    assert celery.ping()
    role = info_replication(clients[redis_host]["admin"])["role"]
    if role == "master":
        for db in (0, 1):
            c = connect(
                lab_addresses[redis_host], "celery", secret("redis_celery_password"), tls, db
            )
            try:
                c.lpush("infra:test:list", "x")
                assert c.rpop("infra:test:list") == b"x"
                c.set("infra:test:key", "v", ex=30)
                assert c.get("infra:test:key") == b"v"
                pubsub = c.pubsub()
                pubsub.subscribe("infra:test:channel")
                pubsub.close()
            finally:
                c.close()
    else:
        # Replicas serve reads only; the write is refused by replica-read-only, not by ACL.
        with pytest.raises(redis.ReadOnlyError):
            celery.set("infra:test:key", "v")


@pytest.mark.parametrize(
    "command",
    [
        ("CONFIG", "GET", "maxmemory"),
        ("CONFIG", "SET", "maxmemory", "1"),
        ("FLUSHALL",),
        ("FLUSHDB",),
        ("KEYS", "*"),
        ("SHUTDOWN",),
        ("REPLICAOF", "NO", "ONE"),
        ("ACL", "LIST"),
        ("MONITOR",),
        ("SELECT", "5"),
    ],
    ids=lambda c: " ".join(c[:2]),
)
def test_celery_user_cannot_run_admin_commands(redis_host: str, clients, command) -> None:
    with pytest.raises(redis.exceptions.NoPermissionError):
        clients[redis_host]["celery"].execute_command(*command)


# ACL DRYRUN asks the ACL engine itself, also for commands that other settings block first
# (DEBUG is disabled server-wide) or that would disturb the server if they were allowed.
CELERY_ALLOWED = [
    ("BRPOP", "q", "1"),
    ("LPUSH", "q", "x"),
    ("EVALSHA", "0" * 40, "0"),
    ("SCRIPT", "LOAD", "return 1"),
    ("PUBLISH", "c", "m"),
    ("SUBSCRIBE", "c"),
    ("ZADD", "unacked_index", "1", "a"),
    ("HSET", "unacked", "a", "b"),
    ("SETEX", "celery-task-meta-x", "10", "v"),
    ("MULTI",),
    ("SELECT", "0"),
    ("SELECT", "1"),
]
CELERY_DENIED = [
    ("DEBUG", "SLEEP", "0"),
    ("CONFIG", "REWRITE"),
    ("FLUSHALL",),
    ("SWAPDB", "0", "1"),
    ("SAVE",),
    ("BGREWRITEAOF",),
    ("CLIENT", "KILL", "ID", "1"),
    ("ACL", "SETUSER", "x"),
    ("SELECT", "2"),
]


def acl_dryrun(clients, host: str, user: str, command: tuple[str, ...]) -> str:
    try:
        reply = clients[host]["admin"].execute_command("ACL", "DRYRUN", user, *command)
    except redis.ResponseError as err:
        return str(err)
    return reply.decode() if isinstance(reply, bytes) else str(reply)


@pytest.mark.parametrize("command", CELERY_ALLOWED, ids=lambda c: " ".join(c[:2]))
def test_acl_allows_what_celery_needs(redis_host: str, clients, command) -> None:
    assert acl_dryrun(clients, redis_host, "celery", command) == "OK"


@pytest.mark.parametrize("command", CELERY_DENIED, ids=lambda c: " ".join(c[:2]))
def test_acl_denies_celery_admin_commands(redis_host: str, clients, command) -> None:
    assert acl_dryrun(clients, redis_host, "celery", command) != "OK"


@pytest.mark.parametrize("user", ["replication", "sentinel"])
def test_internal_users_cannot_touch_data(redis_host: str, clients, user: str) -> None:
    client = clients[redis_host][user]
    for command in (("GET", "k"), ("SET", "k", "v"), ("FLUSHALL",), ("CONFIG", "GET", "*")):
        with pytest.raises(redis.exceptions.NoPermissionError):
            client.execute_command(*command)


def test_sentinel_user_can_monitor(redis_host: str, clients) -> None:
    client = clients[redis_host]["sentinel"]
    assert client.ping()
    assert client.execute_command("ROLE")
    assert "role" in client.info("replication")


# -- settings in effect ----------------------------------------------------------------


@pytest.mark.parametrize(
    ("name", "expected"),
    [
        ("appendonly", "yes"),
        ("appendfsync", "everysec"),
        ("maxmemory-policy", "noeviction"),
        ("min-replicas-to-write", "1"),
        ("min-replicas-max-lag", "3"),
        ("repl-diskless-sync-delay", "0"),
        ("protected-mode", "yes"),
        ("replica-read-only", "yes"),
        ("aclfile", "{conf_dir}/users.acl"),
        ("dir", "{data_dir}"),
        ("supervised", "systemd"),
        ("daemonize", "no"),
    ],
)
def test_broker_settings_in_effect(
    redis_host: str, clients, flavor, name: str, expected: str
) -> None:
    expected = expected.format(conf_dir=flavor.conf_dir, data_dir=flavor.data_dir)
    assert clients[redis_host]["admin"].config_get(name)[name] == expected


def test_maxmemory_is_set(redis_host: str, clients) -> None:
    assert int(clients[redis_host]["admin"].config_get("maxmemory")["maxmemory"]) > 0


def test_default_user_is_off(redis_host: str, clients) -> None:
    rules = {line.split()[1]: line for line in clients[redis_host]["admin"].acl_list() if line}
    assert " off " in rules["default"] + " "
    assert "nopass" not in rules["default"]


# -- replication (cluster-wide, from the controller) -----------------------------------


def test_exactly_one_master_and_every_replica_connected(clients, lab_addresses) -> None:
    roles = {host: info_replication(c["admin"]) for host, c in clients.items()}
    masters = [host for host, info in roles.items() if info["role"] == "master"]
    assert len(masters) == 1, roles
    master = masters[0]
    replicas = [host for host in roles if host != master]
    for host in replicas:
        info = roles[host]
        assert info["role"] == "slave", (host, info)
        assert info["master_host"] == lab_addresses[master], (host, info)
        assert info["master_link_status"] == "up", (host, info)
    master_info = roles[master]
    assert master_info["connected_slaves"] == len(replicas)
    announced = {
        master_info[f"slave{i}"]["ip"]
        for i in range(master_info["connected_slaves"])
        if master_info[f"slave{i}"]["state"] == "online"
    }
    assert announced == {lab_addresses[h] for h in replicas}


# -- preflight: bad input is refused, naming the variable -------------------------------

THREE = "[redis]\nn1\nn2\nn3\n[sentinel]\nn1\nn2\nn3\n"
ROLES = {"cluster": "all", "redis_tls": "all", "redis": "redis", "sentinel": "sentinel"}


def test_preflight_accepts_the_defaults(preflight) -> None:
    rc, out = preflight(THREE, ROLES)
    assert rc == 0, out[-3000:]


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"cluster_redis_celery_password": "password"}, "cluster_redis_celery_password"),
        ({"cluster_redis_admin_password": "short"}, "cluster_redis_admin_password"),
        ({"cluster_sentinel_password": ""}, "cluster_sentinel_password"),
        (
            {"cluster_redis_replication_password": "Password1234567890!"},
            "cluster_redis_replication_password",
        ),
        (
            {"cluster_redis_sentinel_password": "has space in it 1234"},
            "cluster_redis_sentinel_password",
        ),
        ({"cluster_redis_initial_master": "n9"}, "cluster_redis_initial_master"),
        ({"redis_maxmemory_policy": "allkeys-lru"}, "redis_maxmemory_policy"),
        ({"redis_maxmemory": "0"}, "redis_maxmemory"),
        ({"redis_min_replicas_to_write": "3"}, "redis_min_replicas_to_write"),
        ({"cluster_celery_result_db": "0"}, "cluster_celery_result_db"),
    ],
    ids=lambda v: next(iter(v)) if isinstance(v, dict) else None,
)
def test_preflight_refuses_bad_input(preflight, extra: dict[str, str], named: str) -> None:
    rc, out = preflight(THREE, ROLES, **extra)
    assert rc != 0, out[-3000:]
    assert named in out
    for key, value in extra.items():
        if "password" in key and len(value) > 8:  # a refused secret is never echoed back
            assert value not in out


@pytest.mark.parametrize(
    ("inventory_ini", "named"),
    [
        ("[redis]\n[sentinel]\nn1\nn2\nn3\n", "cluster_redis_group"),
        ("[redis]\nn1\nn2\nn3\n[sentinel]\n", "cluster_sentinel_group"),
        ("[sentinel]\nn1\nn2\nn3\n", "cluster_redis_group"),
    ],
    ids=["empty redis group", "empty sentinel group", "missing redis group"],
)
def test_preflight_refuses_empty_groups(preflight, inventory_ini: str, named: str) -> None:
    rc, out = preflight(inventory_ini, {"cluster": "all"})
    assert rc != 0, out[-3000:]
    assert named in out


def test_preflight_refuses_a_cluster_of_two_flavors(preflight) -> None:
    """Hosts of both Debian releases default to different servers: the preflight names them."""
    rc, out = preflight(
        "[redis]\nn1 cluster_redis_flavor=valkey\nn2\nn3\n[sentinel]\nn1\nn2\nn3\n", ROLES
    )
    out = " ".join(out.split())
    assert rc != 0, out[-3000:]
    assert "cluster_redis_flavor differs" in out
    assert "n1=valkey, n2=redis, n3=redis" in out


# -- TLS ---------------------------------------------------------------------------------


def test_tls_key_readable_only_by_redis(
    host, redis_host: str, flavor, assert_private_key_dir
) -> None:
    assert_private_key_dir(host, f"{flavor.conf_dir}/tls/server", flavor.user, flavor.user)


def test_only_tls_listens(redis_host: str, clients) -> None:
    # Plaintext closed, TLS on the cluster's port, client certificates required, and the
    # replication link to the master over TLS as well.
    admin = clients[redis_host]["admin"]
    config = admin.config_get("*port*") | admin.config_get("tls-*")
    assert config["port"] == "0"
    assert config["tls-port"] == str(REDIS_PORT)
    assert config["tls-auth-clients"] == "yes"
    assert config["tls-replication"] == "yes"


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        ({"redis_tls_ca_cert": "/nonexistent/ca.crt"}, "redis_tls_ca_cert"),
        ({"redis_tls_ca_key": "/nonexistent/ca.key"}, "redis_tls_ca_key"),
        ({"redis_tls_renew_days": "400"}, "redis_tls_renew_days"),
        ({"redis_tls_cert_days": "5000"}, "redis_tls_ca_days"),
        ({"redis_tls_protocols": "SSLv3"}, "redis_tls_protocols"),
    ],
)
def test_preflight_refuses_bad_tls_input(preflight, extra: dict[str, str], named: str) -> None:
    rc, out = preflight(THREE, ROLES, **extra)
    assert rc != 0, out[-3000:]
    assert named in out
