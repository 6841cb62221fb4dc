#!/usr/bin/python3
"""Small, dependency-free Redis/Sentinel client the celery-ha roles run on the hosts.

Why not redis-cli: passwords must not appear on a command line (ps, /proc/*/cmdline) and
the roles need machine-readable answers (JSON) and a majority vote over several Sentinels.
Only the Python standard library is used, so it works on a bare Debian host.

Secrets never travel on a command line (ps, /proc/*/cmdline, Ansible -vvv): the password
and the JSON input of call/sentinel-sync come as one JSON object on stdin,
  {"password": "...", "input": ..., "redis_user": "...", "redis_password": "..."}
When stdin is a terminal (an operator at a shell), the password is taken from REDISCLI_AUTH
(as redis-cli does) and the input is not needed for `master`.

With TLS (the cluster's redis_tls), give --tls-dir DIR before the sub-command: DIR holds
ca.crt, cert.crt and cert.key as the redis_tls role installs them (e.g. /etc/redis/tls/server);
the server's certificate must be issued by ca.crt and name the address connected to.

Sub-commands:
  master --name NAME --sentinel ADDR:PORT [...] [--redis ADDR:PORT ...]
      Ask every Sentinel for the address of master NAME and print JSON:
        {"state": "found", "source": "sentinel", "address": A, "port": P, ...}
      When no Sentinel knows NAME, ask the --redis servers for their ROLE (as
      input.redis_user / input.redis_password) and report the one master among them:
        {"state": "found", "source": "redis", ...}
        {"state": "none", ...}   nothing runs yet: a new cluster
      Exits 3 ("state": "split") when Sentinels answer but no address has a majority of
      ALL listed Sentinels, or when several servers claim to be master: the caller must
      not guess a master then.
  call --host H --port P [--user U]
      Run the commands given as input (JSON list of lists of strings) and print their
      replies as a JSON list; exits 1 if any reply is an error.
  sentinel-sync --name NAME [--host H] [--port P] [--check]
      Make the Sentinel's settings for NAME (quorum, down-after-milliseconds, ...) match
      the input (a JSON object) with SENTINEL SET, leaving everything Sentinel decides (the
      master, epochs, known replicas) alone. Prints {"changed": bool, "before", "after"}.
      --check reports what would change without changing it.
  sentinel-peers --name NAME [--host H] [--port P]
      What the Sentinel knows of master NAME, read-only, as JSON:
        {"master": "A:P", "master_flags": [...], "sentinels": [{"ip", "port", "flags"}, ...],
         "replicas": [{"ip", "port", "flags"}, ...]}
      (flags as Sentinel reports them: s_down, o_down, disconnected, ...). The playbook that
      replaces a dead host reads it to tell a dead peer from a live one and to see when a
      Sentinel has forgotten it after SENTINEL RESET.
  handover --name NAME --self ADDR:PORT --sentinel ADDR:PORT [...] [--host H] [--port P]
           [--user U] [--pause-ms MS]
      Hand the master role of the server at H:P (this host's, announced as --self) to a
      replica without losing a write: hold writes (CLIENT PAUSE WRITE, lifting itself after
      MS) and the replication PING (repl-ping-replica-period, put back at the end), wait
      until every replica has them all, ask one Sentinel for SENTINEL FAILOVER, wait until a
      majority of the Sentinels names another master, then make this server its replica
      (REPLICAOF, CONFIG REWRITE) and lift the pause. input.password is the
      server's, input.sentinel_password the Sentinels'. Prints
        {"from": A, "to": B, "held_s": seconds writes were held, "caught_up_s", "elected_s"}
      A failure before the failover was asked lifts the pause again; after it, the pause is
      left to lift itself, since this server may no longer be the master.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import socket
import ssl
import sys
import time
from collections import Counter
from typing import Any

TIMEOUT = 2.0
# handover: how long a failover of the Sentinels' own may still be finishing.
FAILOVER_WAIT_S = 60
# handover: the master's replication PING period while it hands over (s): none in practice.
PING_PERIOD, NO_PING_PERIOD = "repl-ping-replica-period", "3600"

# Set by main() from --tls-dir: every connection then speaks TLS with this context.
TLS_CONTEXT: ssl.SSLContext | None = None


def tls_context(directory: str) -> ssl.SSLContext:
    context = ssl.create_default_context(cafile=os.path.join(directory, "ca.crt"))
    context.load_cert_chain(
        os.path.join(directory, "cert.crt"), os.path.join(directory, "cert.key")
    )
    return context


class RedisError(Exception):
    """An error reply (-ERR ..., -NOAUTH ...) from the server."""


class Connection:
    """A minimal RESP2 client: enough for AUTH, SENTINEL, CONFIG, ACL and ROLE."""

    def __init__(self, host: str, port: int, timeout: float = TIMEOUT) -> None:
        sock = socket.create_connection((host, port), timeout=timeout)
        if TLS_CONTEXT is not None:
            try:
                sock = TLS_CONTEXT.wrap_socket(sock, server_hostname=host)
            except BaseException:
                sock.close()
                raise
        self.sock = sock
        self.file = self.sock.makefile("rb")

    def close(self) -> None:
        self.file.close()
        self.sock.close()

    def command(self, *args: str) -> Any:
        parts = [b"*%d\r\n" % len(args)]
        for arg in args:
            data = arg.encode()
            parts.append(b"$%d\r\n%s\r\n" % (len(data), data))
        self.sock.sendall(b"".join(parts))
        return self._read()

    def _read(self) -> Any:
        line = self.file.readline()
        # A server that goes away mid-reply leaves a line or a bulk string short: that is
        # a lost connection, never a (wrong) value.
        if not line.endswith(b"\r\n"):
            raise ConnectionError("connection closed by server")
        kind, rest = line[:1], line[1:-2]
        if kind == b"+":
            return rest.decode()
        if kind == b"-":
            raise RedisError(rest.decode())
        if kind == b":":
            return int(rest)
        if kind == b"$":
            size = int(rest)
            if size < 0:
                return None
            data = self.file.read(size + 2)
            if len(data) != size + 2:
                raise ConnectionError("connection closed by server")
            return data[:-2].decode(errors="replace")
        if kind == b"*":
            count = int(rest)
            if count < 0:
                return None
            return [self._read_or_error() for _ in range(count)]
        raise ConnectionError(f"unexpected reply {line!r}")

    def _read_or_error(self) -> Any:
        try:
            return self._read()
        except RedisError as err:  # an error inside EXEC's reply array
            return {"error": str(err)}


def connect(host: str, port: int, user: str | None, password: str | None) -> Connection:
    conn = Connection(host, port)
    try:
        if password:
            if user:
                conn.command("AUTH", user, password)
            else:
                conn.command("AUTH", password)
    except BaseException:
        conn.close()
        raise
    return conn


def split_endpoint(endpoint: str) -> tuple[str, int]:
    host, _, port = endpoint.rpartition(":")
    return host.strip("[]"), int(port)


def ask_sentinels(
    endpoints: list[str], name: str, password: str | None
) -> tuple[dict[str, str | None], Counter[str]]:
    answers: dict[str, str | None] = {}
    votes: Counter[str] = Counter()
    for endpoint in endpoints:
        host, port = split_endpoint(endpoint)
        try:
            conn = connect(host, port, None, password)
            try:
                reply = conn.command("SENTINEL", "GET-MASTER-ADDR-BY-NAME", name)
            finally:
                conn.close()
        except (OSError, RedisError) as err:
            # Unreachable, not yet installed, or not ours (wrong password): no vote.
            answers[endpoint] = f"error: {err}"
            continue
        if reply:
            address = f"{reply[0]}:{reply[1]}"
            answers[endpoint] = address
            votes[address] += 1
        else:
            answers[endpoint] = None
    return answers, votes


def majority(votes: Counter[str], voters: int) -> tuple[str, int] | None:
    """The address named by more than half of ``voters`` Sentinels, and its votes, if any.
    Sentinels that did not answer count against it: a minority never decides."""
    if votes:
        address, count = votes.most_common(1)[0]
        if count * 2 > voters:
            return address, count
    return None


def ask_servers(endpoints: list[str], user: str | None, password: str | None) -> dict[str, str]:
    """ROLE of every reachable Redis server, by endpoint ("master", "slave" or "error: ...")."""
    roles: dict[str, str] = {}
    for endpoint in endpoints:
        host, port = split_endpoint(endpoint)
        try:
            conn = connect(host, port, user, password)
            try:
                roles[endpoint] = str(conn.command("ROLE")[0])
            finally:
                conn.close()
        except (OSError, RedisError) as err:
            roles[endpoint] = f"error: {err}"
    return roles


def cmd_master(args: argparse.Namespace) -> int:
    given = read_stdin()
    answers, votes = ask_sentinels(args.sentinel, args.name, given.get("password"))
    result: dict[str, Any] = {"answers": answers}
    if votes:
        won = majority(votes, len(args.sentinel))
        if won:
            host, port = split_endpoint(won[0])
            result.update(state="found", source="sentinel", address=host, port=port, votes=won[1])
            print(json.dumps(result))
            return 0
        result["state"] = "split"
        print(json.dumps(result))
        return 3
    # No Sentinel knows the master (new cluster, or every Sentinel lost). Servers that are
    # already running are asked next: if one of them is master, that is the master to
    # follow, even when it is not the inventory's first host.
    roles = ask_servers(args.redis or [], given.get("redis_user"), given.get("redis_password"))
    result["roles"] = roles
    masters = [endpoint for endpoint, role in roles.items() if role == "master"]
    if len(masters) == 1:
        host, port = split_endpoint(masters[0])
        result.update(state="found", source="redis", address=host, port=port)
    elif masters:
        result["state"] = "split"
        print(json.dumps(result))
        return 3
    else:
        result["state"] = "none"
    print(json.dumps(result))
    return 0


def cmd_call(args: argparse.Namespace) -> int:
    given = read_stdin()
    commands = given.get("input") or []
    conn = connect(args.host, args.port, args.user, given.get("password"))
    replies: list[Any] = []
    failed = False
    try:
        for command in commands:
            try:
                replies.append(conn.command(*[str(part) for part in command]))
            except RedisError as err:
                replies.append({"error": str(err)})
                failed = True
    finally:
        conn.close()
    print(json.dumps(replies))
    return 1 if failed else 0


def read_stdin() -> dict[str, Any]:
    if sys.stdin.isatty():
        return {"password": os.environ.get("REDISCLI_AUTH")}
    text = sys.stdin.read()
    return json.loads(text) if text.strip() else {"password": os.environ.get("REDISCLI_AUTH")}


def pairs_to_dict(flat: list[Any]) -> dict[str, Any]:
    return {flat[i]: flat[i + 1] for i in range(0, len(flat) - 1, 2)}


def cmd_sentinel_sync(args: argparse.Namespace) -> int:
    given = read_stdin()
    desired = {key: str(value) for key, value in (given.get("input") or {}).items()}
    conn = connect(args.host, args.port, None, given.get("password"))
    try:
        current = pairs_to_dict(conn.command("SENTINEL", "MASTER", args.name))
        before = {key: current.get(key) for key in desired}
        todo = {key: value for key, value in desired.items() if before[key] != value}
        if todo and not args.check:
            flat = [part for item in todo.items() for part in item]
            conn.command("SENTINEL", "SET", args.name, *flat)
    finally:
        conn.close()
    print(json.dumps({"changed": bool(todo), "before": before, "after": {**before, **todo}}))
    return 0


def peer_list(flat_entries: list[Any] | None) -> list[dict[str, Any]]:
    peers = []
    for flat in flat_entries or []:
        entry = pairs_to_dict(flat)
        peers.append(
            {
                "ip": entry.get("ip"),
                "port": int(entry.get("port") or 0),
                "flags": str(entry.get("flags") or "").split(","),
            }
        )
    return peers


def cmd_sentinel_peers(args: argparse.Namespace) -> int:
    given = read_stdin()
    conn = connect(args.host, args.port, None, given.get("password"))
    try:
        master = pairs_to_dict(conn.command("SENTINEL", "MASTER", args.name))
        sentinels = conn.command("SENTINEL", "SENTINELS", args.name)
        replicas = conn.command("SENTINEL", "REPLICAS", args.name)
    finally:
        conn.close()
    result = {
        "master": f"{master.get('ip')}:{master.get('port')}",
        "master_flags": str(master.get("flags") or "").split(","),
        "sentinels": peer_list(sentinels),
        "replicas": peer_list(replicas),
    }
    print(json.dumps(result))
    return 0


def first_answering_sentinel(endpoints: list[str], password: str | None) -> Connection:
    errors = []
    for endpoint in endpoints:
        try:
            return connect(*split_endpoint(endpoint), None, password)
        except (OSError, RedisError) as err:
            errors.append(f"{endpoint}: {err}")
    raise RedisError(f"no Sentinel answers ({'; '.join(errors)})")


def majority_master(endpoints: list[str], name: str, password: str | None) -> str | None:
    """The address a majority of ALL the Sentinels names as the master of NAME, if any."""
    won = majority(ask_sentinels(endpoints, name, password)[1], len(endpoints))
    return won[0] if won else None


def cmd_handover(args: argparse.Namespace) -> int:
    # One process from the pause to REPLICAOF: each step the roles used to run as an Ansible
    # task of its own was a round trip of about a second with every write held.
    given = read_stdin()
    sentinel_password = given.get("sentinel_password")
    sentinel = first_answering_sentinel(args.sentinel, sentinel_password)
    server: Connection | None = None
    ping_period: str | None = None
    asked = paused = False
    try:
        # A failover of Sentinel's own still finishing would refuse ours (INPROG): wait for it
        # before the writes are held, not during.
        waited_from = time.monotonic()
        while "failover_in_progress" in str(
            pairs_to_dict(sentinel.command("SENTINEL", "MASTER", args.name)).get("flags")
        ):
            if time.monotonic() - waited_from > FAILOVER_WAIT_S:
                raise RedisError(f"a failover of the Sentinels' own lasted {FAILOVER_WAIT_S} s")
            time.sleep(0.5)
        server = connect(args.host, args.port, args.user, given.get("password"))
        if server.command("ROLE")[0] != "master":
            raise RedisError(f"{args.self} is not the master: nothing to hand over")
        # Redis 7.0 still sends its replication PING (14 bytes of the stream) while writes are
        # paused (7.2 and Valkey pause it too). One sent after the promotion reaches the other
        # replica but not the new master, and both the old master and that replica then need
        # a full resync instead of a partial one (seen on the lab: "Requested offset ...
        # 47568384, but I can reply up to 47568370"). No PING during the handover.
        ping_period = server.command("CONFIG", "GET", PING_PERIOD)[1]
        server.command("CONFIG", "SET", PING_PERIOD, NO_PING_PERIOD)
        server.command("CLIENT", "PAUSE", str(args.pause_ms), "WRITE")
        paused = True
        start = time.monotonic()
        deadline = start + args.pause_ms / 1000

        def wait(what: str, interval: float) -> None:
            if time.monotonic() >= deadline:
                raise RedisError(f"{what} within the {args.pause_ms} ms pause")
            time.sleep(interval)

        while True:
            role = server.command("ROLE")
            offsets = [int(replica[2]) for replica in role[2]]
            if offsets and min(offsets) >= int(role[1]):
                break
            wait("the replicas did not catch up", 0.01)
        caught_up = time.monotonic()
        while True:
            try:
                sentinel.command("SENTINEL", "FAILOVER", args.name)
                break
            except RedisError as err:
                # INPROG: a failover of Sentinel's own is still finishing.
                if "INPROG" not in str(err):
                    raise
                wait("a failover already in progress did not finish", 0.2)
        asked = True
        while (elected := majority_master(args.sentinel, args.name, sentinel_password)) in (
            None,
            args.self,
        ):
            wait("no majority of the Sentinels named a new master", 0.05)
        elected_at = time.monotonic()
        # Sentinel would demote this server itself, but only some 8 s later (it waits for the
        # server to report its role first); now ends the held writes sooner, with READONLY,
        # which the clients take as "go elsewhere". CONFIG REWRITE keeps replicaof in
        # redis.conf, so a restart comes back as a replica, not a master.
        host, port = split_endpoint(elected)
        server.command("REPLICAOF", host, str(port))
        server.command("CONFIG", "SET", PING_PERIOD, ping_period)
        ping_period = None
        server.command("CONFIG", "REWRITE")
        server.command("CLIENT", "UNPAUSE")
        paused = False
        held = time.monotonic() - start
    except BaseException:
        if server is not None and ping_period is not None:
            with contextlib.suppress(OSError, RedisError):  # else until the restart that follows
                server.command("CONFIG", "SET", PING_PERIOD, ping_period)
        if server is not None and paused and not asked:
            with contextlib.suppress(OSError, RedisError):  # else the pause lifts itself
                server.command("CLIENT", "UNPAUSE")
        raise
    finally:
        sentinel.close()
        if server is not None:
            server.close()
    result = {
        "from": args.self,
        "to": elected,
        "held_s": round(held, 3),
        "caught_up_s": round(caught_up - start, 3),
        "elected_s": round(elected_at - start, 3),
    }
    print(json.dumps(result))
    return 0


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--tls-dir", help="connect with TLS, using DIR/ca.crt, cert.crt, cert.key")
    sub = parser.add_subparsers(dest="command", required=True)

    master = sub.add_parser("master", help="ask the Sentinels who the master is")
    master.add_argument("--name", required=True)
    master.add_argument("--sentinel", action="append", required=True, metavar="ADDR:PORT")
    master.add_argument(
        "--redis",
        action="append",
        metavar="ADDR:PORT",
        help="Redis servers to ask (ROLE) when no Sentinel knows the master",
    )
    master.set_defaults(func=cmd_master)

    call = sub.add_parser("call", help="run commands (JSON on stdin) on a Redis server")
    call.add_argument("--host", default="127.0.0.1")
    call.add_argument("--port", type=int, default=6379)
    call.add_argument("--user")
    call.set_defaults(func=cmd_call)

    sync = sub.add_parser("sentinel-sync", help="apply per-master Sentinel settings")
    sync.add_argument("--name", required=True)
    sync.add_argument("--host", default="127.0.0.1")
    sync.add_argument("--port", type=int, default=26379)
    sync.add_argument("--check", action="store_true")
    sync.set_defaults(func=cmd_sentinel_sync)

    peers = sub.add_parser("sentinel-peers", help="the master, Sentinels and replicas it knows")
    peers.add_argument("--name", required=True)
    peers.add_argument("--host", default="127.0.0.1")
    peers.add_argument("--port", type=int, default=26379)
    peers.set_defaults(func=cmd_sentinel_peers)

    handover = sub.add_parser("handover", help="hand the master role to a replica, no write lost")
    handover.add_argument("--name", required=True)
    handover.add_argument("--self", required=True, metavar="ADDR:PORT")
    handover.add_argument("--sentinel", action="append", required=True, metavar="ADDR:PORT")
    handover.add_argument("--host", default="127.0.0.1")
    handover.add_argument("--port", type=int, default=6379)
    handover.add_argument("--user")
    handover.add_argument("--pause-ms", type=int, default=15000)
    handover.set_defaults(func=cmd_handover)

    args = parser.parse_args()
    global TLS_CONTEXT
    try:
        if args.tls_dir:
            TLS_CONTEXT = tls_context(args.tls_dir)
        return args.func(args)
    except (OSError, RedisError, ValueError) as err:
        print(json.dumps({"error": str(err)}))
        return 2


if __name__ == "__main__":
    sys.exit(main())
