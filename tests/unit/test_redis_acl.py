"""The Redis role's default user keeps the transactions of the append-only file: a server that
restarts from its AOF replays them as the default user (redis/redis#14541), so a default user
without rights lost every MULTI/EXEC and Lua script's writes since the last rewrite."""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from conftest import redis_server

TEMPLATE = (
    Path(__file__).resolve().parents[2] / "ansible/roles/redis/templates/etc/redis/users.acl.j2"
)


def bundle_default_user() -> str:
    lines = [ln for ln in TEMPLATE.read_text().splitlines() if ln.startswith("user default ")]
    assert len(lines) == 1, lines
    return lines[0]


@pytest.mark.parametrize(
    ("default_user", "kept"),
    [
        (bundle_default_user(), True),
        # The line the role had before: the server threw the transactions away at load.
        ("user default off resetpass resetkeys resetchannels -@all", False),
    ],
    ids=["bundle", "without-rights"],
)
def test_transactions_survive_a_restart_from_the_aof(
    tmp_path: Path, default_user: str, kept: bool
) -> None:
    acl = tmp_path / "users.acl"
    acl.write_text(f"{default_user}\nuser app on >secret ~* &* +@all\n")
    settings = ("--aclfile", str(acl), "--appendonly", "yes", "--appendfsync", "always")
    with redis_server(tmp_path, *settings) as url:
        client = redis.Redis.from_url(url, username="app", password="secret")
        client.set("plain", "1")
        pipe = client.pipeline(transaction=True)
        pipe.set("in-multi", "1").lpush("queue", "m")
        pipe.execute()
        client.eval("redis.call('SET', 'by-script', '1') redis.call('SET', 'also', '1')", 0)
        # A Redis killed (SIGKILL) comes back from its AOF.
    with redis_server(tmp_path, *settings) as url:
        client = redis.Redis.from_url(url, username="app", password="secret")
        assert client.get("plain") == b"1"
        survived = [k for k in ("in-multi", "queue", "by-script", "also") if client.exists(k)]
        assert survived == (["in-multi", "queue", "by-script", "also"] if kept else [])
        # Off and without a password: nobody is the default user, whatever its rights.
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(url).get("plain")
        with pytest.raises(redis.AuthenticationError):
            redis.Redis.from_url(url, username="default", password="").get("plain")
