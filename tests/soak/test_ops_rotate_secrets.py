"""Day-2 operation 1 (issue 14): rotate the passwords of every Redis ACL user (admin, celery,
beat, replication, sentinel) while the cluster serves, with ansible/rotate_secrets.yml.

Two runs, each under load (a producer on the controller, one on a worker host):
1. ``-e rotate_secrets_retire=false``: every server accepts both passwords, then the replicas,
   the Sentinels, the workers, beat and Flower move to the new ones; the producers keep the
   old password all along, as an app server the bundle does not manage would.
2. the producers restart with the new celery.env (what an operator does with such clients),
   then the default run: the old passwords are removed and cluster_secrets_dir gets the new
   ones.

"Never refused" is read from the servers, not from the producers, whose retries would hide a
refusal: on every Redis server and every Sentinel, INFO's ``acl_access_denied_auth`` and the
WRONGPASS/NOAUTH error counts (errorstats) and the failed TLS handshakes their journal logs
("Error accepting a client connection") are the same before and after, and no server or
Sentinel restarted (same MainPID: a restart would zero the counters). Afterwards every old
password is refused and every new one accepted, on every server; lost = 0, failed = 0, the
longest gap with no task completing is printed and recorded (test-artifacts/soak.json), and a
re-run of site.yml reports changed=0.
"""

from __future__ import annotations

import time
from typing import Any

import redis
from opskit import OpsDrill, main_pids, run_playbook
from support.cluster import Cluster
from support.drillkit import say, wait_healthy

USERS = ("admin", "celery", "beat", "replication", "sentinel")
REFUSAL_STATS = ("acl_access_denied_auth", "errorstat_WRONGPASS", "errorstat_NOAUTH")
TLS_FAILURE = "Error accepting a client connection"


def passwords(c: Cluster) -> dict[str, str]:
    """The current password of each ACL user, as cluster_secrets_dir holds it."""
    secrets = c.lab.lab_dir / "secrets"
    return {u: (secrets / f"redis_{u}_password").read_text().split()[0] for u in USERS}


def _count(info: dict[str, Any], key: str) -> int:
    value = info.get(key, 0)
    # errorstats come as {'count': N}; stats as plain numbers.
    return int(value["count"] if isinstance(value, dict) else value)


def refusals(c: Cluster, admin_password: str) -> dict[str, dict[str, int]]:
    """Each Redis server's and each Sentinel's authentication refusals so far."""
    seen: dict[str, dict[str, int]] = {}
    for host in c.redis_hosts:
        client = c.redis_on(host, admin=True)
        client.connection_pool.connection_kwargs["password"] = admin_password
        info = client.info("stats") | client.info("errorstats")
        client.close()
        seen[f"redis@{host}"] = {k: _count(info, k) for k in REFUSAL_STATS}
    for host in c.sentinel_hosts:
        port = dict(c.sentinels).get(c.addresses[host], 26379)
        client = redis.Redis(
            host=c.addresses[host],
            port=port,
            socket_timeout=3,
            socket_connect_timeout=3,
            **{k: v for k, v in c.sentinel_kwargs.items() if k in ("username", "password")},
            **c.tls,
        )
        info = client.info("stats") | client.info("errorstats")
        client.close()
        seen[f"sentinel@{host}"] = {k: _count(info, k) for k in REFUSAL_STATS}
    return seen


def tls_failures(c: Cluster, since: float) -> dict[str, int]:
    """Failed TLS handshakes each server and Sentinel logged since ``since``."""
    units = f"-u {c.flavor.server_unit} -u {c.flavor.sentinel_unit}"
    command = f"journalctl {units} --since @{int(since)} -o cat | grep -c '{TLS_FAILURE}' || true"
    return {
        h: int(c.lab.ssh(h, command).strip() or 0)
        for h in sorted(set(c.redis_hosts) | set(c.sentinel_hosts))
    }


def sentinel_pids(c: Cluster) -> dict[str, str]:
    unit = c.flavor.sentinel_unit
    return {
        h: c.lab.ssh(h, f"systemctl show -p MainPID --value {unit}").strip()
        for h in c.sentinel_hosts
    }


def accepted(c: Cluster, host: str, user: str, password: str) -> bool:
    client = c.redis_on(host)
    client.connection_pool.connection_kwargs.update(username=user, password=password)
    try:
        return bool(client.ping())
    except redis.AuthenticationError:
        return False
    finally:
        client.close()


def rotate_under_load(
    c: Cluster, workers: list[str], figures: list[dict[str, Any]], run: str, name: str, *extra: str
) -> dict[str, Any]:
    wait_healthy(c, workers)
    with OpsDrill(c, run, c.worker_hosts[0]) as drill:
        rc, _, tail = drill.operate("rotate_secrets.yml", *extra)
        assert rc == 0, tail
        master = wait_healthy(c, workers)
        return drill.finish(figures, name, master_after=master)


def test_ops1_rotate_redis_passwords(
    drill_cluster: Cluster, workers: list[str], drill_figures: list[dict[str, Any]]
) -> None:
    c = drill_cluster
    old = passwords(c)
    t0 = time.time()
    before = refusals(c, old["admin"])
    pids = main_pids(c) | {f"sentinel@{h}": p for h, p in sentinel_pids(c).items()}

    rotate_under_load(
        c,
        workers,
        drill_figures,
        "ops1-rotate-switch",
        "ops 1: rotate Redis passwords, steps 1-2 (both accepted, clients moved)",
        "-e",
        "rotate_secrets_retire=false",
    )
    # Nothing moved yet where site.yml reads the secrets; the clients this bundle manages did.
    assert passwords(c) == old, "cluster_secrets_dir changed before the old passwords went"
    c.reload()
    assert c.password != old["celery"], "celery.env still holds the old celery password"

    rotate_under_load(
        c,
        workers,
        drill_figures,
        "ops1-rotate-retire",
        "ops 1: rotate Redis passwords, step 3 (old ones removed)",
    )
    new = passwords(c)
    assert c.password == new["celery"], "celery.env and cluster_secrets_dir disagree"

    after = refusals(c, new["admin"])
    assert after == before, f"a client, replica or Sentinel was refused: {before} -> {after}"
    handshakes = tls_failures(c, t0)
    assert not any(handshakes.values()), f"failed TLS handshakes during the rotation: {handshakes}"
    pids_after = main_pids(c) | {f"sentinel@{h}": p for h, p in sentinel_pids(c).items()}
    assert pids_after == pids, f"a server or Sentinel restarted: {pids} -> {pids_after}"

    for user in USERS:
        assert new[user] != old[user], f"{user}: password not changed"
        for host in c.redis_hosts:
            assert accepted(c, host, user, new[user]), f"{host}: new {user} password refused"
            assert not accepted(c, host, user, old[user]), f"{host}: old {user} password accepted"
    for host in c.redis_hosts:
        if c.role_of(host) != "master":
            link = c.redis_on(host, admin=True).info("replication")["master_link_status"]
            assert link == "up", f"{host}: replica link {link} after the rotation"

    rc, recap, tail = run_playbook(c, "site.yml")
    assert rc == 0, tail
    changed = {h: r.get("changed", 0) for h, r in recap.items() if r.get("changed", 0)}
    assert not changed, f"site.yml after the rotation changed something: {changed}\n{tail}"
    say(f"ops 1: refusals per server unchanged {after}; site.yml re-run changed=0")
