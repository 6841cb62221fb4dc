"""Day-2 operation 1 (issue 14): rotate the passwords of every Redis ACL user (admin, celery,
beat, replication, sentinel), Sentinel's own password (requirepass) and Flower's login while
the cluster serves, with ansible/rotate_secrets.yml.

Two runs, each under load (a producer on the controller, one on a worker host):
1. ``-e rotate_secrets_retire=false``: every server accepts both passwords, then the replicas,
   the Sentinels, the workers, beat and Flower move to the new ones; the producers keep the
   old password all along, as an app server the bundle does not manage would.
2. the producers restart with the new celery.env (what an operator does with such clients),
   then the default run: the old passwords are removed and cluster_secrets_dir gets the new
   ones.

"Never refused" is read from the servers, not from the producers, whose retries would hide a
refusal: on every Redis server and every Sentinel, INFO's ``acl_access_denied_auth`` and the
WRONGPASS/NOAUTH error counts (errorstats; a Redis 7.0 Sentinel has no errorstats section,
nor acl_access_denied_auth, so there its ACL LOG's failed logins count: seen on the lab, a
wrong password adds one) and the failed TLS handshakes their journal
logs ("Error accepting a client connection") are the same before and after, and no server or
Sentinel restarted (same MainPID: a restart would zero the counters). The counters are first
seen to move on a wrong password, so an unchanged count means something. Throughout both runs
every Sentinel lists the other two with no s_down/o_down flag (they reach each other with
the new password from step 2 on), and none is disconnected at the end. Afterwards every old
password is refused and every new one accepted, on every server and every Sentinel, Flower
takes only its new login; lost = 0, failed = 0, the longest gap with no task completing is
printed and recorded (test-artifacts/soak.json); a re-run of site.yml reports changed=0; and
a Sentinel restarted after the rotation still accepts the new password only and rejoins its
peers.
"""

from __future__ import annotations

import threading
import time
from typing import Any

import redis
import requests
from opskit import OpsDrill, main_pids, run_playbook
from support.cluster import Cluster
from support.drillkit import say, wait_healthy
from support.ledger import wait_until

USERS = ("admin", "celery", "beat", "replication", "sentinel")
FLOWER_PORT = 5555
FLOWER_USER = "flower"
REFUSAL_STATS = ("acl_access_denied_auth", "errorstat_WRONGPASS", "errorstat_NOAUTH")
TLS_FAILURE = "Error accepting a client connection"


def passwords(c: Cluster) -> dict[str, str]:
    """The current password of each ACL user, Sentinel's own (``sentinel_requirepass``) and
    Flower's login (``flower``), as cluster_secrets_dir holds them."""
    secrets = c.lab.lab_dir / "secrets"
    files = {u: f"redis_{u}_password" for u in USERS} | {
        "sentinel_requirepass": "sentinel_password",
        "flower": "flower_basic_auth_password",
    }
    return {u: (secrets / f).read_text().split()[0] for u, f in files.items()}


def _count(info: dict[str, Any], key: str) -> int:
    value = info.get(key, 0)
    # errorstats come as {'count': N}; stats as plain numbers.
    return int(value["count"] if isinstance(value, dict) else value)


def sentinel_on(c: Cluster, host: str, password: str | None, timeout: float = 3) -> redis.Redis:
    """A direct connection to host's Sentinel with ``password`` (the caller closes it)."""
    return redis.Redis(
        host=c.addresses[host],
        port=dict(c.sentinels).get(c.addresses[host], 26379),
        socket_timeout=timeout,
        socket_connect_timeout=timeout,
        password=password,
        **c.tls,
    )


def logs_in(client: redis.Redis) -> bool:
    """Whether the server takes the client's credentials (a refusal is False, not an error)."""
    try:
        return bool(client.ping())
    except redis.AuthenticationError:
        return False
    finally:
        client.close()


def sentinel_accepts(c: Cluster, host: str, password: str) -> bool:
    return logs_in(sentinel_on(c, host, password))


def refusals(c: Cluster, admin_password: str) -> dict[str, dict[str, int]]:
    """Each Redis server's and each Sentinel's authentication refusals so far (on a Sentinel
    also ``acl_log_auth``: its ACL LOG's failed logins, counted over their repeats)."""
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
        log = client.execute_command("ACL", "LOG", "128")
        client.close()
        seen[f"sentinel@{host}"] = {k: _count(info, k) for k in REFUSAL_STATS} | {
            "acl_log_auth": sum(
                int(e["count"]) for e in map(_fields, log) if e.get("reason") == "auth"
            )
        }
    return seen


def moved_on_wrong_password(c: Cluster, admin_password: str) -> dict[str, dict[str, int]]:
    """One wrong login on every server and Sentinel: the counters refusals() reads must move
    (otherwise "unchanged" would prove nothing). Returns the counts after it."""
    before = refusals(c, admin_password)
    for host in c.redis_hosts:
        assert not accepted(c, host, "celery", "not-the-password")
    for host in c.sentinel_hosts:
        assert not sentinel_accepts(c, host, "not-the-password")
    after = refusals(c, admin_password)
    for where, counts in after.items():
        # Redis 7.0's INFO has no acl_access_denied_auth, and its Sentinel no errorstats.
        keys = ("acl_log_auth",) if where.startswith("sentinel@") else ("errorstat_WRONGPASS",)
        moved = {k: (before[where][k], counts[k]) for k in keys}
        assert all(b + 1 == a for b, a in moved.values()), f"{where}: {moved} on a wrong password"
    say(f"ops 1: one wrong password moved every refusal counter by one: {after}")
    return after


def _text(value: Any) -> Any:
    return value.decode() if isinstance(value, bytes) else value


def _fields(entry: Any) -> dict[str, Any]:
    """One SENTINEL SENTINELS entry (a flat list of names and values, or a dict) as a dict."""
    pairs = entry.items() if isinstance(entry, dict) else zip(entry[::2], entry[1::2], strict=True)
    return {_text(k): _text(v) for k, v in pairs}


class PeerWatch:
    """Polls every Sentinel's SENTINEL SENTINELS while the rotation runs, on connections
    opened before it (a Sentinel keeps a logged-in connection when its password changes):
    any peer seen s_down/o_down or missing, and any poll that failed, are kept.

    A peer shown ``disconnected`` is kept apart, as an episode (first and last poll that saw
    it): SENTINEL CONFIG SET sentinel-pass makes that Sentinel drop its own links to the
    others (src/sentinel.c, sentinelDropConnections), which it opens again, with the new
    password, at its next timer tick."""

    def __init__(self, c: Cluster, password: str, interval: float = 0.2) -> None:
        self.c, self.interval = c, interval
        self.clients = {h: sentinel_on(c, h, password) for h in c.sentinel_hosts}
        self.polls = 0
        self.flagged: list[tuple[float, str, str, str]] = []
        self.errors: list[tuple[float, str, str]] = []
        # (Sentinel, peer) -> [first seen, last seen] of each run of polls seeing it disconnected
        self.drops: dict[tuple[str, str], list[list[float]]] = {}
        self._last_poll: dict[str, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def peers(self, host: str) -> list[dict[str, str]]:
        raw = self.clients[host].execute_command("SENTINEL", "SENTINELS", self.c.master_name)
        return [_fields(p) for p in raw]

    def _run(self) -> None:
        while not self._stop.is_set():
            for host in self.c.sentinel_hosts:
                try:
                    peers = self.peers(host)
                except redis.RedisError as exc:
                    self.errors.append((time.time(), host, repr(exc)))
                    continue
                now = time.time()
                if len(peers) != len(self.c.sentinel_hosts) - 1:
                    self.flagged.append((now, host, "count", str(len(peers))))
                for p in peers:
                    flags = set(p.get("flags", "").split(","))
                    if flags & {"s_down", "o_down"}:
                        self.flagged.append((now, host, p.get("ip", "?"), p["flags"]))
                    if "disconnected" in flags:
                        runs = self.drops.setdefault((host, p.get("ip", "?")), [])
                        if runs and runs[-1][1] >= self._last_poll.get(host, 0):
                            runs[-1][1] = now
                        else:
                            runs.append([now, now])
                self._last_poll[host] = now
            self.polls += 1
            time.sleep(self.interval)

    def longest_drop_s(self) -> float:
        """An upper bound of the longest disconnected episode: first to last poll seeing
        it, plus the polls before and after that did not."""
        spans = [end - start for runs in self.drops.values() for start, end in runs]
        return round(max(spans, default=0.0) + 2 * self.interval, 2) if spans else 0.0

    def __enter__(self) -> PeerWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)
        for client in self.clients.values():
            client.close()


def flower_status(c: Cluster, password: str) -> int:
    host = c.lab.group("flower")[0]
    url = f"http://{c.addresses[host]}:{FLOWER_PORT}/api/workers"
    return requests.get(url, auth=(FLOWER_USER, password), timeout=10).status_code


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
    return logs_in(client)


def rotate_under_load(
    c: Cluster, workers: list[str], figures: list[dict[str, Any]], run: str, name: str, *extra: str
) -> dict[str, Any]:
    wait_healthy(c, workers)
    with OpsDrill(c, run, c.worker_hosts[0]) as drill:
        rc, _, tail = drill.operate("rotate_secrets.yml", *extra)
        assert rc == 0, tail
        master = wait_healthy(c, workers)
        return drill.finish(figures, name, master_after=master)


def sentinel_restart_keeps_new(c: Cluster, new: str, old: str) -> dict[str, Any]:
    """Restart one Sentinel after the rotation: it must accept the new password only (its
    file's `user default` line) and be back among its peers, none of them flagged."""
    host = c.sentinel_hosts[-1]
    t0 = time.time()
    c.lab.ssh(host, f"systemctl restart {c.flavor.sentinel_unit}")

    def up() -> bool:
        try:
            return sentinel_accepts(c, host, new)
        except redis.RedisError:
            return False

    wait_until(up, 30, interval=0.5, what=f"{host}'s Sentinel answering after its restart")
    back_s = round(time.time() - t0, 1)
    assert not sentinel_accepts(c, host, old), (
        f"{host}: old Sentinel password accepted after restart"
    )

    def peers_clean() -> bool:
        with PeerWatch(c, new) as watch:
            try:
                views = {h: watch.peers(h) for h in c.sentinel_hosts}
            except redis.RedisError:
                return False
        return all(
            len(peers) == len(c.sentinel_hosts) - 1
            and not any(
                set(p.get("flags", "").split(",")) & {"s_down", "o_down", "disconnected"}
                for p in peers
            )
            for peers in views.values()
        )

    wait_until(peers_clean, 60, interval=1, what="every Sentinel listing its peers, none down")
    say(f"ops 1: {host}'s Sentinel restarted: back in {back_s} s, new password only, peers up")
    return {"sentinel_restarted": host, "sentinel_back_s": back_s}


def test_ops1_rotate_redis_passwords(
    drill_cluster: Cluster, workers: list[str], drill_figures: list[dict[str, Any]]
) -> None:
    c = drill_cluster
    old = passwords(c)
    t0 = time.time()
    assert flower_status(c, old["flower"]) == 200, "Flower refuses its current login"
    before = moved_on_wrong_password(c, old["admin"])
    pids = main_pids(c) | {f"sentinel@{h}": p for h, p in sentinel_pids(c).items()}

    with PeerWatch(c, old["sentinel_requirepass"]) as watch:
        rotate_under_load(
            c,
            workers,
            drill_figures,
            "ops1-rotate-switch",
            "ops 1: rotate passwords, steps 1-2 (both accepted, clients moved)",
            "-e",
            "rotate_secrets_retire=false",
        )
        # Nothing moved yet where site.yml reads the secrets but Flower's login, which has
        # nothing to retire; the clients this bundle manages moved.
        switched = passwords(c)
        assert {k: v for k, v in switched.items() if k != "flower"} == {
            k: v for k, v in old.items() if k != "flower"
        }, "cluster_secrets_dir changed before the old passwords went"
        assert switched["flower"] != old["flower"], "Flower's login did not change"
        c.reload()
        assert c.password != old["celery"], "celery.env still holds the old celery password"
        pending = c.sentinel_kwargs["password"]
        assert pending != old["sentinel_requirepass"], "celery.env: old Sentinel password"
        for host in c.sentinel_hosts:
            assert sentinel_accepts(c, host, old["sentinel_requirepass"]), f"{host}: old refused"
            assert sentinel_accepts(c, host, pending), f"{host}: new Sentinel password refused"

        rotate_under_load(
            c,
            workers,
            drill_figures,
            "ops1-rotate-retire",
            "ops 1: rotate passwords, step 3 (old ones removed)",
        )
    new = passwords(c)
    assert c.password == new["celery"], "celery.env and cluster_secrets_dir disagree"
    assert pending == new["sentinel_requirepass"], "celery.env and cluster_secrets_dir disagree"

    after = refusals(c, new["admin"])
    assert after == before, f"a client, replica or Sentinel was refused: {before} -> {after}"
    handshakes = tls_failures(c, t0)
    assert not any(handshakes.values()), f"failed TLS handshakes during the rotation: {handshakes}"
    pids_after = main_pids(c) | {f"sentinel@{h}": p for h, p in sentinel_pids(c).items()}
    assert pids_after == pids, f"a server or Sentinel restarted: {pids} -> {pids_after}"
    drops = sum(len(runs) for runs in watch.drops.values())
    say(
        f"ops 1: Sentinel peers polled {watch.polls} times on each Sentinel: "
        f"flagged {watch.flagged[:10]}, poll errors {watch.errors[:5]}, links re-opened "
        f"(seen disconnected) {drops} times, each under {watch.longest_drop_s()} s: "
        f"{sorted(watch.drops)}"
    )
    assert not watch.errors, f"a Sentinel did not answer SENTINEL SENTINELS: {watch.errors[:5]}"
    assert not watch.flagged, f"a Sentinel saw a peer down or missing: {watch.flagged[:10]}"
    # Only its own switch (once per Sentinel and run at most) may re-open a Sentinel's links.
    assert watch.longest_drop_s() <= 2.0, f"a Sentinel's peer link stayed down: {watch.drops}"
    assert drops <= 2 * 2 * len(c.sentinel_hosts), f"peer links dropped too often: {watch.drops}"

    for user in USERS:
        assert new[user] != old[user], f"{user}: password not changed"
        for host in c.redis_hosts:
            assert accepted(c, host, user, new[user]), f"{host}: new {user} password refused"
            assert not accepted(c, host, user, old[user]), f"{host}: old {user} password accepted"
    for host in c.redis_hosts:
        if c.role_of(host) != "master":
            link = c.redis_on(host, admin=True).info("replication")["master_link_status"]
            assert link == "up", f"{host}: replica link {link} after the rotation"
    for host in c.sentinel_hosts:
        assert sentinel_accepts(c, host, new["sentinel_requirepass"]), f"{host}: new refused"
        assert not sentinel_accepts(c, host, old["sentinel_requirepass"]), f"{host}: old accepted"
    for name in ("sentinel_requirepass", "flower"):
        assert new[name] != old[name], f"{name}: password not changed"
    assert flower_status(c, new["flower"]) == 200, "Flower refuses its new login"
    assert flower_status(c, old["flower"]) == 401, "Flower still takes its old login"
    assert flower_status(c, switched["flower"]) == 401, "Flower takes the first run's login"

    rc, recap, tail = run_playbook(c, "site.yml")
    assert rc == 0, tail
    changed = {h: r.get("changed", 0) for h, r in recap.items() if r.get("changed", 0)}
    assert not changed, f"site.yml after the rotation changed something: {changed}\n{tail}"
    restart = sentinel_restart_keeps_new(
        c, new["sentinel_requirepass"], old["sentinel_requirepass"]
    )
    drill_figures[-1].update(
        refusals_before=before,
        refusals_after=after,
        sentinel_peer_polls=watch.polls,
        sentinel_peers_flagged=len(watch.flagged),
        sentinel_links_reopened=drops,
        sentinel_link_reopen_max_s=watch.longest_drop_s(),
        **restart,
    )
    say(f"ops 1: refusals per server unchanged {after}; site.yml re-run changed=0")
