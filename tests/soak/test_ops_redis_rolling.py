"""Day-2 operation 3 (issue 14): restart (upgrade) every Redis server while the cluster
serves, one at a time, the master last after a controlled failover.

1. ansible/redis_rolling_restart.yml, the operator's job (the lab's mirror has no other Redis
   version, so it runs the upgrade path, redis_rolling_upgrade=true, with the installed one:
   apt finds nothing newer and the forced restart of every server is what is proven).
2. The redis role's own restart for a start-only setting (tcp-backlog, through site.yml),
   there and back: it takes the same path instead of restarting the master under its
   clients.

Both under load (a producer on the controller, one on a worker host). Asserted: every
redis-server restarted (a new MainPID), the master moved (SENTINEL FAILOVER before its
restart), never two servers down at once as seen from the controller, lost = 0, failed = 0;
the longest gap with no task completing is printed and recorded (test-artifacts/soak.json).
"""

from __future__ import annotations

from typing import Any

import pytest
from opskit import DownWatch, OpsDrill, main_pids
from support.cluster import Cluster
from support.drillkit import say, wait_healthy


def rolling(
    c: Cluster,
    workers: list[str],
    figures: list[dict[str, Any]],
    run: str,
    name: str,
    playbook: str,
    *extra: str,
) -> dict[str, Any]:
    master = wait_healthy(c, workers)
    before = main_pids(c)
    with OpsDrill(c, run, c.worker_hosts[0]) as drill, DownWatch(c) as watch:
        rc, _, tail = drill.operate(playbook, *extra)
        assert rc == 0, tail
        new_master = wait_healthy(c, workers)
        row = drill.finish(
            figures,
            name,
            master_before=master,
            master_after=new_master,
            most_redis_down_at_once=watch.max_down,
            redis_down_s={h: round(s, 1) for h, s in watch.down_s.items()},
        )
    after = main_pids(c)
    same = [h for h in c.redis_hosts if before[h] == after[h]]
    assert not same, f"redis-server not restarted on {same} (MainPID unchanged)"
    assert new_master != master, f"{master} stayed master: it was restarted without a failover"
    assert watch.max_down <= 1, f"two Redis servers down at once: {watch.both[:5]}"
    # The handover relaxes min-replicas-to-write on the would-be masters: it must be back.
    guard = {
        h: c.redis_on(h, admin=True).config_get("min-replicas-to-write")["min-replicas-to-write"]
        for h in c.redis_hosts
    }
    assert set(guard.values()) == {"1"}, f"min-replicas-to-write not restored: {guard}"
    say(f"{name}: master {master} -> {new_master}, Redis down per host {row['redis_down_s']}")
    return row


def test_ops3_rolling_redis_upgrade(
    drill_cluster: Cluster, workers: list[str], drill_figures: list[dict[str, Any]]
) -> None:
    rolling(
        drill_cluster,
        workers,
        drill_figures,
        "ops3-upgrade",
        "ops 3: rolling Redis upgrade (playbook)",
        "redis_rolling_restart.yml",
        "-e",
        "redis_rolling_upgrade=true",
    )


@pytest.mark.parametrize("backlog", ["600", None], ids=["changed", "back"])
def test_ops3_start_only_setting_restarts_rolling(
    drill_cluster: Cluster,
    workers: list[str],
    drill_figures: list[dict[str, Any]],
    backlog: str | None,
) -> None:
    c = drill_cluster
    extra = ["-e", f"redis_tcp_backlog={backlog}"] if backlog else []
    rolling(
        c,
        workers,
        drill_figures,
        f"ops3-backlog-{backlog or 'default'}",
        f"ops 3: start-only setting, role's restart (tcp-backlog {backlog or 'default'})",
        "site.yml",
        *extra,
    )
    want = backlog or "511"
    for host in c.redis_hosts:
        got = c.redis_on(host, admin=True).config_get("tcp-backlog")["tcp-backlog"]
        assert got == want, f"{host}: tcp-backlog {got}, wanted {want} after the restart"
