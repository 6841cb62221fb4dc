"""celery-ha-redis (sentinel/celery_ha_redis.py), the helper the roles run on the hosts: its RESP
client, the master vote that refuses to guess on a split, and sentinel-sync. Every Redis and
Sentinel here is a fake RESP server in this process, on loopback."""

from __future__ import annotations

import contextlib
import io
import json
import socketserver
import ssl
import threading
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import celery_ha_ca
import celery_ha_redis as helper
import pytest


class Simple(str):
    """A +simple string reply (a plain str is sent as a $bulk string)."""


class Error(str):
    """A -error reply."""


NULL_ARRAY = object()
Reply = Any
Respond = Callable[[list[str]], Reply]


def encode(reply: Reply) -> bytes:
    if isinstance(reply, bytes):  # raw bytes: a broken or foreign server
        return reply
    if isinstance(reply, Error):
        return b"-%s\r\n" % reply.encode()
    if isinstance(reply, Simple):
        return b"+%s\r\n" % reply.encode()
    if isinstance(reply, int):
        return b":%d\r\n" % reply
    if reply is None:
        return b"$-1\r\n"
    if reply is NULL_ARRAY:
        return b"*-1\r\n"
    if isinstance(reply, str):
        data = reply.encode()
        return b"$%d\r\n%s\r\n" % (len(data), data)
    return b"*%d\r\n" % len(reply) + b"".join(encode(r) for r in reply)


class FakeServer(socketserver.ThreadingTCPServer):
    """Speaks RESP2 on 127.0.0.1; `respond` answers each command, `seen` records them all."""

    daemon_threads = True
    allow_reuse_address = True

    def __init__(self, respond: Respond, tls: ssl.SSLContext | None = None) -> None:
        self.respond = respond
        self.tls = tls
        self.seen: list[list[str]] = []
        super().__init__(("127.0.0.1", 0), Handler)

    @property
    def endpoint(self) -> str:
        return f"127.0.0.1:{self.server_address[1]}"

    @property
    def port(self) -> int:
        return self.server_address[1]


class Handler(socketserver.StreamRequestHandler):
    server: FakeServer

    def setup(self) -> None:
        if self.server.tls is not None:
            self.request = self.server.tls.wrap_socket(self.request, server_side=True)
        super().setup()

    def handle(self) -> None:
        while True:
            line = self.rfile.readline()
            if not line:
                return
            assert line[:1] == b"*", line
            args = []
            for _ in range(int(line[1:])):
                size = int(self.rfile.readline()[1:])
                args.append(self.rfile.read(size + 2)[:-2].decode())
            self.server.seen.append(args)
            reply = self.server.respond(args)
            self.wfile.write(encode(reply))
            if isinstance(reply, bytes):
                return  # a torn reply: the server goes away mid-answer


@pytest.fixture
def serve() -> Iterator[Callable[..., FakeServer]]:
    servers: list[FakeServer] = []

    def start(respond: Respond, tls: ssl.SSLContext | None = None) -> FakeServer:
        server = FakeServer(respond, tls)
        threading.Thread(target=server.serve_forever, args=(0.01,), daemon=True).start()
        servers.append(server)
        return server

    yield start
    for server in servers:
        server.shutdown()
        server.server_close()


@pytest.fixture(autouse=True)
def _no_tls(monkeypatch: pytest.MonkeyPatch) -> None:
    # main() sets the module-wide context from --tls-dir; no test may leak it to the next.
    monkeypatch.setattr(helper, "TLS_CONTEXT", None)


def run(monkeypatch: pytest.MonkeyPatch, argv: list[str], stdin: Any = None) -> tuple[int, Any]:
    """main() as the roles call it: arguments, one JSON object on stdin, JSON on stdout."""
    monkeypatch.setattr("sys.argv", ["celery-ha-redis", *argv])
    monkeypatch.setattr("sys.stdin", io.StringIO("" if stdin is None else json.dumps(stdin)))
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        rc = helper.main()
    return rc, json.loads(out.getvalue())


def sentinel(master: tuple[str, int] | None, password: str = "sentinel-pw") -> Respond:
    """A Sentinel that requires `password` and knows `master` (None: does not know it)."""

    def respond(args: list[str]) -> Reply:
        if args[0] == "AUTH":
            return Simple("OK") if args[1:] == [password] else Error("WRONGPASS invalid password")
        if args[:2] == ["SENTINEL", "GET-MASTER-ADDR-BY-NAME"] and args[2] == "celery":
            return NULL_ARRAY if master is None else [master[0], str(master[1])]
        return Error(f"ERR unknown command {args[0]}")

    return respond


def redis_server(role: str, user: str = "admin", password: str = "admin-pw") -> Respond:
    def respond(args: list[str]) -> Reply:
        if args[0] == "AUTH":
            ok = args[1:] == [user, password]
            return Simple("OK") if ok else Error("WRONGPASS invalid username-password pair")
        if args == ["ROLE"]:
            return [role, 0, []]
        return Error("ERR unknown command")

    return respond


def master_argv(sentinels: list[str], servers: list[str] = ()) -> list[str]:
    argv = ["master", "--name", "celery"]
    argv += [f"--sentinel={s}" for s in sentinels]
    argv += [f"--redis={r}" for r in servers]
    return argv


MASTER_STDIN = {"password": "sentinel-pw", "redis_user": "admin", "redis_password": "admin-pw"}


# --- the RESP client


def test_commands_are_sent_as_bulk_strings_and_replies_decoded(serve) -> None:
    replies = {
        "simple": Simple("OK"),
        "int": 42,
        "bulk": "two words\r\nand a line",
        "nil": None,
        "nested": ["a", 1, ["b", None], NULL_ARRAY],
        "nullarray": NULL_ARRAY,
        "empty": [],
    }
    server = serve(lambda args: replies[args[0]])
    conn = helper.Connection("127.0.0.1", server.port)
    try:
        assert conn.command("simple") == "OK"
        assert conn.command("int") == 42
        assert conn.command("bulk", "x y", "é", "") == "two words\r\nand a line"
        assert conn.command("nil") is None
        assert conn.command("nested") == ["a", 1, ["b", None], None]
        assert conn.command("nullarray") is None
        assert conn.command("empty") == []
    finally:
        conn.close()
    # Spaces, CRLF-free unicode and empty arguments arrive intact, one argument each.
    assert server.seen[2] == ["bulk", "x y", "é", ""]


def test_error_reply_raises_but_an_error_inside_an_array_is_kept(serve) -> None:
    server = serve(
        lambda args: Error("ERR boom") if args[0] == "bad" else [Simple("OK"), Error("ERR inner")]
    )
    conn = helper.Connection("127.0.0.1", server.port)
    try:
        with pytest.raises(helper.RedisError, match="ERR boom"):
            conn.command("bad")
        # EXEC answers with an array in which single commands may have failed.
        assert conn.command("EXEC") == ["OK", {"error": "ERR inner"}]
    finally:
        conn.close()


@pytest.mark.parametrize(
    "torn",
    [
        b"",  # closed before answering
        b"$10\r\nabc",  # closed in the middle of a bulk string
        b"*2\r\n$1\r\na\r\n",  # closed in the middle of an array
        b"+OK",  # closed before the end of the line
        b"HTTP/1.1 400 Bad Request\r\n",  # not a Redis at all
    ],
)
def test_a_torn_or_foreign_reply_is_a_connection_error_not_a_value(serve, torn: bytes) -> None:
    server = serve(lambda args: torn)
    conn = helper.Connection("127.0.0.1", server.port)
    try:
        with pytest.raises(ConnectionError):
            conn.command("GET", "k")
    finally:
        conn.close()


def test_connect_authenticates_as_user_or_with_password_only(serve) -> None:
    server = serve(lambda args: Simple("OK"))
    helper.connect("127.0.0.1", server.port, "admin", "pw").close()
    helper.connect("127.0.0.1", server.port, None, "pw").close()
    helper.connect("127.0.0.1", server.port, "admin", None).close()  # no password: no AUTH
    assert server.seen == [["AUTH", "admin", "pw"], ["AUTH", "pw"]]


def test_connect_refused_password_is_an_error(serve) -> None:
    server = serve(sentinel(None))
    with pytest.raises(helper.RedisError, match="WRONGPASS"):
        helper.connect("127.0.0.1", server.port, None, "wrong")


@pytest.mark.parametrize(
    ("endpoint", "expected"),
    [
        ("10.0.0.11:26379", ("10.0.0.11", 26379)),
        ("[fd00::1]:6379", ("fd00::1", 6379)),
        ("fd00::1:6379", ("fd00::1", 6379)),  # how a Sentinel's IPv6 answer is joined
        ("node1:6379", ("node1", 6379)),
    ],
)
def test_split_endpoint(endpoint: str, expected: tuple[str, int]) -> None:
    assert helper.split_endpoint(endpoint) == expected


# --- master: the vote


def test_master_found_by_a_majority_of_the_sentinels(serve, monkeypatch) -> None:
    a, b = ("10.0.0.11", 6379), ("10.0.0.12", 6379)
    sentinels = [serve(sentinel(a)).endpoint, serve(sentinel(a)).endpoint]
    sentinels.append(serve(sentinel(b)).endpoint)  # one Sentinel behind: outvoted
    rc, out = run(monkeypatch, master_argv(sentinels), MASTER_STDIN)
    assert rc == 0
    assert (out["state"], out["source"], out["address"], out["port"]) == (
        "found",
        "sentinel",
        "10.0.0.11",
        6379,
    )
    assert out["votes"] == 2
    assert out["answers"][sentinels[2]] == "10.0.0.12:6379"


def test_master_majority_counts_unreachable_sentinels(serve, monkeypatch, closed_port) -> None:
    a = ("10.0.0.11", 6379)
    up = [serve(sentinel(a)).endpoint, serve(sentinel(a)).endpoint]
    rc, out = run(monkeypatch, master_argv([*up, f"127.0.0.1:{closed_port}"]), MASTER_STDIN)
    assert (rc, out["state"], out["votes"]) == (0, "found", 2)
    assert out["answers"][f"127.0.0.1:{closed_port}"].startswith("error: ")


def test_master_refuses_a_split_vote(serve, monkeypatch) -> None:
    sentinels = [
        serve(sentinel(("10.0.0.11", 6379))).endpoint,
        serve(sentinel(("10.0.0.12", 6379))).endpoint,
        serve(sentinel(("10.0.0.13", 6379))).endpoint,
    ]
    rc, out = run(monkeypatch, master_argv(sentinels), MASTER_STDIN)
    assert (rc, out["state"]) == (3, "split")
    assert "address" not in out


def test_master_half_of_the_sentinels_is_no_majority(serve, monkeypatch) -> None:
    a, b = ("10.0.0.11", 6379), ("10.0.0.12", 6379)
    sentinels = [serve(sentinel(master)).endpoint for master in (a, a, b, b)]
    rc, out = run(monkeypatch, master_argv(sentinels), MASTER_STDIN)
    assert (rc, out["state"]) == (3, "split")


def test_master_refuses_a_minority_even_when_the_others_are_down(
    serve, monkeypatch, closed_port
) -> None:
    # One Sentinel of three answering is no majority: it may be the one that is cut off.
    lone = serve(sentinel(("10.0.0.12", 6379))).endpoint
    down = f"127.0.0.1:{closed_port}"
    server = serve(redis_server("master"))
    rc, out = run(monkeypatch, master_argv([lone, down, down], [server.endpoint]), MASTER_STDIN)
    assert (rc, out["state"]) == (3, "split")
    assert server.seen == []  # a split is never settled by asking the servers


def test_master_wrong_sentinel_password_is_no_vote(serve, monkeypatch) -> None:
    ours = [serve(sentinel(("10.0.0.11", 6379))).endpoint for _ in range(2)]
    other = serve(sentinel(("10.0.0.99", 6379), password="another-cluster")).endpoint
    rc, out = run(monkeypatch, master_argv([*ours, other]), MASTER_STDIN)
    assert (rc, out["state"], out["address"]) == (0, "found", "10.0.0.11")
    assert "WRONGPASS" in out["answers"][other]
    assert "sentinel-pw" not in json.dumps(out)


def test_master_from_the_one_running_server_when_no_sentinel_knows(serve, monkeypatch) -> None:
    sentinels = [serve(sentinel(None)).endpoint for _ in range(3)]
    servers = [serve(redis_server(role)) for role in ("slave", "master", "slave")]
    rc, out = run(monkeypatch, master_argv(sentinels, [s.endpoint for s in servers]), MASTER_STDIN)
    assert (rc, out["state"], out["source"]) == (0, "found", "redis")
    assert (out["address"], out["port"]) == ("127.0.0.1", servers[1].port)
    # The servers are asked as the admin user, the Sentinels with the Sentinel password.
    assert servers[0].seen[0] == ["AUTH", "admin", "admin-pw"]
    assert out["answers"] == dict.fromkeys(sentinels)


def test_master_refuses_two_servers_claiming_master(serve, monkeypatch, closed_port) -> None:
    sentinels = [f"127.0.0.1:{closed_port}"] * 3
    servers = [serve(redis_server("master")).endpoint, serve(redis_server("master")).endpoint]
    rc, out = run(monkeypatch, master_argv(sentinels, servers), MASTER_STDIN)
    assert (rc, out["state"]) == (3, "split")
    assert out["roles"] == dict.fromkeys(servers, "master")


def test_master_none_on_a_new_cluster(serve, monkeypatch, closed_port) -> None:
    down = f"127.0.0.1:{closed_port}"
    replica = serve(redis_server("slave")).endpoint
    rc, out = run(monkeypatch, master_argv([down, down, down], [replica, down]), MASTER_STDIN)
    assert (rc, out["state"]) == (0, "none")
    assert out["roles"][replica] == "slave"
    assert out["roles"][down].startswith("error: ")


def test_master_password_from_rediscli_auth_when_stdin_is_empty(serve, monkeypatch) -> None:
    monkeypatch.setenv("REDISCLI_AUTH", "sentinel-pw")
    sentinels = [serve(sentinel(("10.0.0.11", 6379))).endpoint for _ in range(3)]
    rc, out = run(monkeypatch, master_argv(sentinels))
    assert (rc, out["state"], out["votes"]) == (0, "found", 3)


# --- call


def test_call_runs_every_command_and_fails_on_an_error_reply(serve, monkeypatch) -> None:
    def respond(args: list[str]) -> Reply:
        if args[0] == "AUTH":
            return Simple("OK")
        if args[0] == "PING":
            return Simple("PONG")
        return Error("ERR unknown command")

    server = serve(respond)
    argv = ["call", "--host", "127.0.0.1", "--port", str(server.port), "--user", "admin"]
    rc, out = run(monkeypatch, argv, {"password": "pw", "input": [["PING"], ["NOPE", 5]]})
    assert rc == 1
    assert out == ["PONG", {"error": "ERR unknown command"}]
    # The commands after a failed one still run; arguments are sent as strings.
    assert server.seen == [["AUTH", "admin", "pw"], ["PING"], ["NOPE", "5"]]

    rc, out = run(monkeypatch, argv, {"password": "pw", "input": [["PING"]]})
    assert (rc, out) == (0, ["PONG"])


def test_unreachable_server_is_a_json_error(monkeypatch, closed_port) -> None:
    rc, out = run(monkeypatch, ["call", "--port", str(closed_port)], {"input": [["PING"]]})
    assert rc == 2
    assert "error" in out


# --- sentinel-sync


@pytest.fixture
def sentinel_with_settings(serve) -> FakeServer:
    settings = {"quorum": "2", "down-after-milliseconds": "30000", "failover-timeout": "180000"}

    def respond(args: list[str]) -> Reply:
        if args[0] == "AUTH":
            return Simple("OK")
        if args == ["SENTINEL", "MASTER", "celery"]:
            flat = ["name", "celery", "ip", "10.0.0.11", "port", "6379", "flags", "master"]
            return flat + [part for item in settings.items() for part in item]
        if args[:3] == ["SENTINEL", "SET", "celery"]:
            pairs = args[3:]
            settings.update(zip(pairs[::2], pairs[1::2], strict=True))
            return Simple("OK")
        return Error("ERR No such master with that name")

    return serve(respond)


def sync(monkeypatch, server: FakeServer, desired: dict, *extra: str) -> tuple[int, Any]:
    argv = ["sentinel-sync", "--name", "celery", "--port", str(server.port), *extra]
    return run(monkeypatch, argv, {"password": "pw", "input": desired})


def test_sentinel_sync_sets_only_what_differs(monkeypatch, sentinel_with_settings) -> None:
    desired = {"quorum": 2, "down-after-milliseconds": 5000, "failover-timeout": "180000"}
    rc, out = sync(monkeypatch, sentinel_with_settings, desired)
    assert rc == 0
    assert out == {
        "changed": True,
        "before": {
            "quorum": "2",
            "down-after-milliseconds": "30000",
            "failover-timeout": "180000",
        },
        "after": {"quorum": "2", "down-after-milliseconds": "5000", "failover-timeout": "180000"},
    }
    sets = [args for args in sentinel_with_settings.seen if args[:2] == ["SENTINEL", "SET"]]
    assert sets == [["SENTINEL", "SET", "celery", "down-after-milliseconds", "5000"]]

    rc, out = sync(monkeypatch, sentinel_with_settings, desired)
    assert (rc, out["changed"]) == (0, False)
    assert out["before"] == out["after"]


def test_sentinel_sync_check_changes_nothing(monkeypatch, sentinel_with_settings) -> None:
    rc, out = sync(monkeypatch, sentinel_with_settings, {"quorum": 3}, "--check")
    assert (rc, out["changed"], out["after"]) == (0, True, {"quorum": "3"})
    assert not [args for args in sentinel_with_settings.seen if args[1:2] == ["SET"]]
    rc, out = sync(monkeypatch, sentinel_with_settings, {"quorum": 3}, "--check")
    assert out["before"] == {"quorum": "2"}


def test_sentinel_sync_unknown_master_is_an_error(monkeypatch, sentinel_with_settings) -> None:
    argv = ["sentinel-sync", "--name", "other", "--port", str(sentinel_with_settings.port)]
    rc, out = run(monkeypatch, argv, {"password": "pw", "input": {"quorum": 2}})
    assert rc == 2
    assert "No such master" in out["error"]


# --- sentinel-peers


def test_sentinel_peers_reports_each_peer_with_its_flags(monkeypatch, serve) -> None:
    def entry(ip: str, flags: str) -> list[str]:
        return ["name", f"{ip}:1", "ip", ip, "port", "26379", "runid", "x", "flags", flags]

    def respond(args: list[str]) -> Reply:
        if args[0] == "AUTH":
            return Simple("OK") if args[1:] == ["pw"] else Error("WRONGPASS")
        if args == ["SENTINEL", "MASTER", "celery"]:
            return ["name", "celery", "ip", "10.0.0.11", "port", "6379", "flags", "master"]
        if args == ["SENTINEL", "SENTINELS", "celery"]:
            return [entry("10.0.0.12", "sentinel"), entry("10.0.0.13", "s_down,sentinel")]
        if args == ["SENTINEL", "REPLICAS", "celery"]:
            return [entry("10.0.0.13", "s_down,slave,disconnected")]
        return Error("ERR No such master with that name")

    server = serve(respond)
    argv = ["sentinel-peers", "--name", "celery", "--port", str(server.port)]
    rc, out = run(monkeypatch, argv, {"password": "pw"})
    assert rc == 0
    assert out == {
        "master": "10.0.0.11:6379",
        "master_flags": ["master"],
        "sentinels": [
            {"ip": "10.0.0.12", "port": 26379, "flags": ["sentinel"]},
            {"ip": "10.0.0.13", "port": 26379, "flags": ["s_down", "sentinel"]},
        ],
        "replicas": [
            {"ip": "10.0.0.13", "port": 26379, "flags": ["s_down", "slave", "disconnected"]}
        ],
    }
    # Read-only: the replacement playbook relies on it to look without touching.
    assert all(args[0] in ("AUTH", "SENTINEL") for args in server.seen)
    assert not [args for args in server.seen if args[1:2] in (["RESET"], ["SET"])]

    argv = ["sentinel-peers", "--name", "other", "--port", str(server.port)]
    rc, out = run(monkeypatch, argv, {"password": "pw"})
    assert rc == 2
    assert "No such master" in out["error"]


# --- handover


NO_PING = [
    ["CONFIG", "GET", "repl-ping-replica-period"],
    ["CONFIG", "SET", "repl-ping-replica-period", "3600"],
]


class HandoverCluster:
    """An old master, its replica and three Sentinels, faked; the replica catches up on the
    second ROLE after the pause and the Sentinels name it `elect_after` looks after FAILOVER."""

    OLD, NEW = "127.0.0.1:6379", "10.0.0.12:6379"

    def __init__(
        self,
        serve,
        role: str = "master",
        failover: list[Reply] = (),
        elect_after: int = 2,
        in_progress_looks: int = 0,
    ):
        self.role, self.failover_replies, self.elect_after = role, list(failover), elect_after
        self.in_progress_looks = in_progress_looks
        self.roles_after_pause = 0
        self.failed_over = False
        self.looks = 0
        self.server = serve(self.redis)
        self.sentinels = [serve(self.sentinel) for _ in range(3)]

    def redis(self, args: list[str]) -> Reply:
        if args[0] == "AUTH":
            return Simple("OK") if args[1:] == ["admin", "admin-pw"] else Error("WRONGPASS")
        if args == ["CONFIG", "GET", "repl-ping-replica-period"]:
            return ["repl-ping-replica-period", "10"]
        if args == ["ROLE"]:
            paused = any(a[:2] == ["CLIENT", "PAUSE"] for a in self.server.seen)
            self.roles_after_pause += paused
            replica_offset = 100 if self.roles_after_pause >= 2 else 90
            return [self.role, 100, [["10.0.0.12", "6379", str(replica_offset)]]]
        return Simple("OK")

    def sentinel(self, args: list[str]) -> Reply:
        if args[0] == "AUTH":
            return Simple("OK") if args[1:] == ["sentinel-pw"] else Error("WRONGPASS")
        if args == ["SENTINEL", "FAILOVER", "celery"]:
            if self.failover_replies:
                return self.failover_replies.pop(0)
            self.failed_over = True
            return Simple("OK")
        if args == ["SENTINEL", "MASTER", "celery"]:
            busy = self.in_progress_looks > 0
            self.in_progress_looks -= busy
            return ["name", "celery", "flags", "master,failover_in_progress" if busy else "master"]
        if args[:2] == ["SENTINEL", "GET-MASTER-ADDR-BY-NAME"]:
            if self.failed_over:
                self.looks += 1
            name = self.NEW if self.looks > self.elect_after * 3 else self.OLD
            return name.split(":")
        return Error(f"ERR unknown command {args[0]}")

    def argv(self, pause_ms: int = 5000) -> list[str]:
        argv = ["handover", "--name", "celery", "--self", self.OLD, "--user", "admin"]
        argv += ["--port", str(self.server.port), "--pause-ms", str(pause_ms)]
        return argv + [f"--sentinel={s.endpoint}" for s in self.sentinels]

    def run(self, monkeypatch, pause_ms: int = 5000) -> tuple[int, Any]:
        stdin = {"password": "admin-pw", "sentinel_password": "sentinel-pw"}
        return run(monkeypatch, self.argv(pause_ms), stdin)

    def server_commands(self) -> list[list[str]]:
        return [a for a in self.server.seen if a[0] not in ("AUTH", "ROLE")]

    def failovers_asked(self) -> int:
        return sum(a[:2] == ["SENTINEL", "FAILOVER"] for s in self.sentinels for a in s.seen)


def test_handover_holds_writes_until_this_server_follows_the_new_master(serve, monkeypatch):
    cluster = HandoverCluster(serve)
    rc, out = cluster.run(monkeypatch)
    assert rc == 0, out
    assert (out["from"], out["to"]) == (cluster.OLD, cluster.NEW)
    assert 0 <= out["caught_up_s"] <= out["elected_s"] <= out["held_s"]
    # The failover is asked only once every replica has every write, of one Sentinel only
    # (a second would start a failover of its own), and the pause lifts only after REPLICAOF.
    assert cluster.roles_after_pause == 2
    assert cluster.failovers_asked() == 1
    # No replication PING between the pause and REPLICAOF: the period is set back, and saved.
    assert cluster.server_commands() == [
        *NO_PING,
        ["CLIENT", "PAUSE", "5000", "WRITE"],
        ["REPLICAOF", "10.0.0.12", "6379"],
        ["CONFIG", "SET", "repl-ping-replica-period", "10"],
        ["CONFIG", "REWRITE"],
        ["CLIENT", "UNPAUSE"],
    ]


def test_handover_asks_again_while_a_failover_is_in_progress(serve, monkeypatch):
    cluster = HandoverCluster(serve, failover=[Error("INPROG Failover already in progress")])
    rc, out = cluster.run(monkeypatch)
    assert (rc, out["to"]) == (0, cluster.NEW)
    assert cluster.failovers_asked() == 2


def test_handover_waits_for_a_failover_in_progress_before_holding_writes(serve, monkeypatch):
    cluster = HandoverCluster(serve, in_progress_looks=2)
    rc, out = cluster.run(monkeypatch)
    assert (rc, out["to"]) == (0, cluster.NEW)
    assert cluster.in_progress_looks == 0
    assert cluster.failovers_asked() == 1


def test_handover_of_a_replica_is_refused_before_writes_are_held(serve, monkeypatch):
    cluster = HandoverCluster(serve, role="slave")
    rc, out = cluster.run(monkeypatch)
    assert rc == 2
    assert "is not the master" in out["error"]
    assert cluster.server_commands() == []
    assert cluster.failovers_asked() == 0


def test_handover_refused_by_sentinel_lifts_the_pause(serve, monkeypatch):
    cluster = HandoverCluster(serve, failover=[Error("NOGOODSLAVE No suitable replica")])
    rc, out = cluster.run(monkeypatch)
    assert rc == 2
    assert "NOGOODSLAVE" in out["error"]
    assert cluster.server_commands() == [
        *NO_PING,
        ["CLIENT", "PAUSE", "5000", "WRITE"],
        ["CONFIG", "SET", "repl-ping-replica-period", "10"],
        ["CLIENT", "UNPAUSE"],
    ]


def test_handover_without_a_new_master_leaves_the_pause_to_lift_itself(serve, monkeypatch):
    # Once the failover was asked this server may have lost the master role: taking writes
    # again (UNPAUSE) would accept writes that its resync throws away.
    cluster = HandoverCluster(serve, elect_after=10**6)
    rc, out = cluster.run(monkeypatch, pause_ms=300)
    assert rc == 2
    assert "no majority of the Sentinels named a new master" in out["error"]
    assert cluster.server_commands() == [
        *NO_PING,
        ["CLIENT", "PAUSE", "300", "WRITE"],
        ["CONFIG", "SET", "repl-ping-replica-period", "10"],
    ]


# --- TLS


@pytest.fixture
def tls_dir(tmp_path: Path) -> Path:
    """ca.crt, cert.crt and cert.key laid out as the redis_tls role installs them."""

    def ca_tool(*argv: str) -> None:
        with contextlib.redirect_stdout(io.StringIO()):
            assert celery_ha_ca.main(list(argv)) == 0

    ca_tool("ca", "--cert", str(tmp_path / "ca.crt"), "--key", str(tmp_path / "ca.key"),
            "--name", "test CA", "--days", "10")  # fmt: skip
    ca_tool("cert", "--ca-cert", str(tmp_path / "ca.crt"), "--ca-key", str(tmp_path / "ca.key"),
            "--cert", str(tmp_path / "cert.crt"), "--key", str(tmp_path / "cert.key"),
            "--name", "redis@node1", "--usage", "server", "--usage", "client",
            "--san", "IP:127.0.0.1", "--days", "5", "--renew-days", "1")  # fmt: skip
    return tmp_path


def server_tls(tls_dir: Path) -> ssl.SSLContext:
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=tls_dir / "ca.crt")
    context.load_cert_chain(tls_dir / "cert.crt", tls_dir / "cert.key")
    context.verify_mode = ssl.CERT_REQUIRED  # as Redis with tls-auth-clients yes
    return context


def test_tls_dir_makes_every_connection_tls(serve, monkeypatch, tls_dir: Path) -> None:
    server = serve(lambda args: Simple("PONG"), tls=server_tls(tls_dir))
    argv = ["--tls-dir", str(tls_dir), "call", "--port", str(server.port)]
    rc, out = run(monkeypatch, argv, {"input": [["PING"]]})
    assert (rc, out) == (0, ["PONG"])


def test_tls_server_not_issued_by_the_ca_is_refused(
    serve, monkeypatch, tls_dir: Path, tmp_path_factory
) -> None:
    other = tmp_path_factory.mktemp("other-ca")
    server = serve(lambda args: Simple("PONG"), tls=server_tls(tls_dir))
    # The client trusts a different CA: the server's certificate must not verify.
    with contextlib.redirect_stdout(io.StringIO()):
        assert celery_ha_ca.main(["ca", "--cert", str(other / "ca.crt"),
                                  "--key", str(other / "ca.key"), "--name", "other",
                                  "--days", "10"]) == 0  # fmt: skip
    for name in ("cert.crt", "cert.key"):
        (other / name).write_bytes((tls_dir / name).read_bytes())
    argv = ["--tls-dir", str(other), "call", "--port", str(server.port)]
    rc, out = run(monkeypatch, argv, {"input": [["PING"]]})
    assert rc == 2
    assert "certificate verify failed" in out["error"]
