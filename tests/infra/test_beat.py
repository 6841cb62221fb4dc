"""testinfra: beat on every celery_beat host, exactly one of them active behind celery-redbeat's
lock in Redis, reached with beat's own least-privilege ACL user; and the preflight rules of
the redelivery bound and the beat lock (ansible/roles/celery/README.md).

Run as: pytest tests/infra --hosts=ansible://all --ansible-inventory=$LAB_DIR/inventory.ini
"""

from __future__ import annotations

from pathlib import Path

import pytest
import redis
from celery_ha_settings import beat_key_prefix
from redis.sentinel import Sentinel

REPO = Path(__file__).resolve().parents[2]

# The lab's app (celery_app_module's default).
KEYS = beat_key_prefix("celery_ha_app")
LOCK_KEY = KEYS + "lock"
BEAT_ENV = "/etc/celery-ha/beat.env"
DEFAULT_LOCK_TIMEOUT = 30
MASTER_NAME = "celery-ha"


def _groups(host) -> list[str]:
    return host.ansible.get_variables().get("group_names", [])


def test_beat_unit_and_its_secret_on_every_beat_host_only(host) -> None:
    groups = _groups(host)
    if "celery_workers" not in groups and "celery_beat" not in groups:
        pytest.skip("not a Celery host")
    if host.ansible.get_variables().get("celery_process_manager", "systemd") != "systemd":
        pytest.skip("runs its Celery processes under supervisor")
    beat = host.service("celery-beat")
    env = host.file(BEAT_ENV)
    if "celery_beat" in groups:
        assert beat.is_enabled and beat.is_running
        assert (env.user, env.group, env.mode) == ("root", "celery", 0o640)
        assert host.run(f"runuser -u nobody -- cat {BEAT_ENV}").rc != 0
    else:
        assert not beat.is_running and not env.exists


def _lock_holders(lab, beat_hosts: list[str]) -> dict[str, bool]:
    """Per beat host: has its running beat process (MainPID) logged that it took the lock?"""
    holders = {}
    for name in beat_hosts:
        out = lab(
            "ssh",
            name,
            "pid=$(systemctl show -p MainPID --value celery-beat); "
            "journalctl --no-pager -o cat _PID=$pid | grep -c 'beat: Acquired lock' || true",
        ).stdout
        holders[name] = int(out.strip().splitlines()[-1] or 0) > 0
    return holders


@pytest.fixture(scope="module")
def beat_master(lab_groups, lab_addresses, secret, tls):
    """A client on the current master as the beat ACL user, found through the Sentinels."""
    sentinels = [(lab_addresses[h], 26379) for h in lab_groups["sentinel"]]
    sentinel = Sentinel(
        sentinels,
        sentinel_kwargs={"password": secret("sentinel_password"), "socket_timeout": 3, **tls},
        socket_timeout=3,
        **tls,
    )
    master_name = None
    for line in (REPO / "ansible/roles/cluster/defaults/main.yml").read_text().splitlines():
        if line.startswith("cluster_sentinel_master_name:"):
            master_name = line.split(":", 1)[1].strip().strip("'\"")
    client = sentinel.master_for(
        master_name or MASTER_NAME,
        username="beat",
        password=secret("redis_beat_password"),
    )
    yield client
    client.close()


def test_exactly_one_beat_holds_the_lock(lab, lab_groups, beat_master) -> None:
    beat_hosts = lab_groups["celery_beat"]
    holders = _lock_holders(lab, beat_hosts)
    print(f"beat lock holders: {holders}")
    assert sum(holders.values()) == 1, holders
    assert beat_master.get(LOCK_KEY), "no lock in Redis although a beat says it holds it"
    ttl_ms = beat_master.pttl(LOCK_KEY)
    assert 0 < ttl_ms <= DEFAULT_LOCK_TIMEOUT * 1000, ttl_ms  # not redbeat's 1500 s default


def test_beat_user_reaches_only_its_own_keys(beat_master) -> None:
    # What redbeat reads (the sample app's reminder is in the schedule), and nothing else.
    entries = beat_master.zrangebyscore(KEYS + ":schedule", "-inf", "+inf")
    assert any(b"reminder" in e for e in entries), entries
    with pytest.raises(redis.exceptions.NoPermissionError):
        beat_master.get("unacked_index")
    with pytest.raises(redis.exceptions.NoPermissionError):
        beat_master.keys("*")
    with pytest.raises(redis.exceptions.NoPermissionError):
        beat_master.execute_command("CONFIG", "GET", "maxmemory")


# -- preflight: the redelivery bound and the beat lock -------------------------------------

CLUSTER = (
    "[redis]\nn1\nn2\nn3\n[sentinel]\nn1\nn2\nn3\n"
    "[celery_workers]\nn1\nn2\nn3\n[celery_beat]\nn1\nn2\n"
)
ROLES = {"cluster": "all", "redis_tls": "all", "celery": "celery_workers"}
APP = {"celery_app_path": str(REPO / "app")}


def test_preflight_accepts_two_beat_hosts_and_the_default_bound(preflight) -> None:
    rc, out = preflight(CLUSTER, ROLES, **APP)
    assert rc == 0, out[-3000:]


@pytest.mark.parametrize(
    ("extra", "named"),
    [
        (
            {"celery_redelivery_timeout": "30", "celery_redelivery_refresh_interval": "10"},
            "celery_redelivery_timeout (30) must be at least 4 x",
        ),
        ({"celery_redelivery_refresh_interval": "0"}, "celery_redelivery_refresh_interval (0"),
        (
            {"celery_redelivery_timeout": "600", "celery_visibility_timeout": "600"},
            "below celery_visibility_timeout (600)",
        ),
        ({"celery_beat_lock_timeout": "10"}, "celery_beat_lock_timeout (10) must be at least 3 x"),
    ],
    ids=["bound-under-4-intervals", "zero-interval", "bound-not-below-visibility", "short-lock"],
)
def test_preflight_refuses_a_bound_live_workers_could_miss(
    preflight, extra: dict[str, str], named: str
) -> None:
    rc, out = preflight(CLUSTER, ROLES, **APP, **extra)
    assert rc != 0, out[-3000:]
    assert named in " ".join(out.split())


def test_preflight_refuses_an_empty_beat_group(preflight) -> None:
    rc, out = preflight(CLUSTER.replace("[celery_beat]\nn1\nn2\n", "[celery_beat]\n"), ROLES, **APP)
    assert rc != 0, out[-3000:]
    assert "celery_beat_group 'celery_beat' holds no host" in " ".join(out.split())
