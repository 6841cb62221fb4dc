"""Day-2 operation 4 (issue 14): drain a worker host under load with ansible/drain_worker.yml.

A producer on the controller and one on another worker host publish steadily; slow tasks
are running on the host when the drain starts. Asserted: every slow task the host had
started finished there (warm shutdown, not killed and not run again elsewhere), the host
starts nothing after the drain, its workers stay stopped (disabled, no process, no ping
answer), the other hosts carry the load with lost = 0 and failed = 0, and a re-run of
site.yml brings the host's workers back to consuming. The longest gap with no task
completing is printed and recorded (test-artifacts/soak.json).
"""

from __future__ import annotations

import time
from typing import Any

from opskit import OpsDrill, run_playbook
from support.cluster import Cluster
from support.drillkit import Load, say, wait_healthy
from support.ledger import wait_until

SLOW_S = 12.0


def test_ops4_drain_a_worker_host(
    drill_cluster: Cluster, workers: list[str], drill_figures: list[dict[str, Any]]
) -> None:
    c = drill_cluster
    wait_healthy(c, workers)
    # Two hosts at once (the lab's node3 runs supervisor, node2 systemd: both paths), the
    # first one carries the load alone meanwhile.
    remote, targets = c.worker_hosts[0], c.worker_hosts[1:]
    mine = [w for w in workers if w.split("@")[1] in targets]
    assert mine, f"no worker instance on {targets}"
    with OpsDrill(c, "ops4-drain", remote) as drill:
        load = drill.load
        # Slow tasks until one runs on a drained host: the drain must let it finish there.
        slow: list[str] = []

        def started_on_target() -> list[str] | None:
            c.collect(load.ledger)
            hits = [
                e.ledger_id
                for e in load.ledger.executions("S")
                if e.ledger_id in slow and e.host in targets
            ]
            if not hits:
                slow.extend(load.publish_slow(SLOW_S) for _ in range(2))
            return hits or None

        held = wait_until(started_on_target, 90, interval=2, what=f"a slow task on {targets}")
        say(f"{targets} run {held} when the drain starts")
        rc, recap, tail = drill.operate(
            "drain_worker.yml", "-e", f"drain_hosts={','.join(targets)}"
        )
        assert rc == 0, tail
        assert all(recap[t]["changed"] > 0 for t in targets), recap
        t_drained = drill.t_op_end

        # Stopped and left so: no process, no systemd unit enabled, no ping answer.
        for target in targets:
            units = c.lab.ssh(
                target, "systemctl is-enabled 'celery-worker@*' 2>/dev/null; true", check=False
            )
            assert "enabled" not in units.split(), f"{target}: worker units still enabled: {units}"
            assert not c.lab.ssh(target, "pgrep -f '[c]elery_ha_boot worker' || true").strip()
        assert not set(mine) & set(c.ping_workers()), f"{mine} still answer ping"
        row = drill.finish(drill_figures, "ops 4: drain a worker host", drained=",".join(targets))

    c.collect(load.ledger)
    for ledger_id in held:
        began = [e.host for e in load.ledger.executions("S") if e.ledger_id == ledger_id]
        done = [e.host for e in load.ledger.executions("D") if e.ledger_id == ledger_id]
        assert done == began[:1], (
            f"{ledger_id} was running on {began[:1]} at the drain: it must finish there, once "
            f"(warm shutdown), not be killed or run again elsewhere: done on {done}"
        )
    late = [e for e in load.ledger.executions("S") if e.host in targets and e.ts > t_drained]
    assert not late, f"drained hosts started {len(late)} task(s) after the drain"

    # Undo: site.yml starts the workers again.
    rc, _, tail = run_playbook(c, "site.yml")
    assert rc == 0, tail
    wait_until(lambda: set(workers) <= set(c.ping_workers()), 120, interval=3, what="workers back")
    t_back = time.time()
    with Load(c, "ops4-undo") as again:
        wait_until(
            lambda: (
                c.collect(again.ledger)
                or {e.host for e in again.ledger.executions("D") if e.ts > t_back} >= set(targets)
            ),
            120,
            interval=2,
            what=f"{targets} consuming again",
        )
        undo = again.finish()
    say(undo.summary())
    assert not undo.lost and undo.failed == 0, undo.summary()
    row["undone_by_site_yml"] = True
