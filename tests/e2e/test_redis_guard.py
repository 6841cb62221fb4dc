"""The split-brain guard (min-replicas-to-write) is the one Redis setting the bundle changes
while the server runs: a rolling restart relaxes it on the would-be masters for its handover.
A run that died before putting it back leaves it off, in the server and in the copy Redis
saved into its main file, where no template shows it; the next site.yml must find and fix it.
"""

from __future__ import annotations

from support.cluster import Cluster, changed_tasks
from support.e2e_lab import LabInventory

GUARD = "min-replicas-to-write"


def saved_guard(lab: LabInventory, host: str) -> str:
    """The copies CONFIG REWRITE saved into the main config file (Redis or Valkey)."""
    return lab.lab_cmd(
        "ssh", host, f"grep -hs '^{GUARD} ' /etc/redis/redis.conf /etc/valkey/valkey.conf || true"
    ).strip()


def test_rerun_puts_back_a_relaxed_write_guard(lab: LabInventory) -> None:
    cluster = Cluster(lab.lab)
    host = next(h for h in cluster.redis_hosts if cluster.role_of(h) == "replica:connected")
    server = cluster.redis_on(host, admin=True)
    # What a handover that never finished leaves behind.
    server.config_set(GUARD, 0)
    server.config_rewrite()
    assert saved_guard(lab, host) == f"{GUARD} 0"

    proc = lab.site_yml("--limit", host, "--skip-tags", "celery")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]

    assert server.config_get(GUARD)[GUARD] == "1"
    assert saved_guard(lab, host) == f"{GUARD} 1"
    # Found by the check, fixed by the live settings' handler: no restart, no failover.
    assert changed_tasks(proc.stdout, host) == [
        "redis : Check that the write guard (min-replicas-to-write) is on",
        "redis : Apply Redis runtime settings",
    ]
