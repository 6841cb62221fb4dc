"""Soak drill: SIGKILL workers' main processes again and again under load (make soak).

Drill 1 of make test kills a worker's main process twice; a kill lands in the moment between
taking a message and recording it only now and then, which is how CI once lost a task there
(celery/kombu#305). Here 20 kills (SOAK_KILLS), one every 5 s over every worker host in turn
(systemd and supervisor), at 60 tasks/s (SOAK_KILL_RATE): on the lab that window was hit by
6 kills of 20. Every published task must run: a message a worker died holding comes back from
its in-flight list when the worker restarts, or from the unacked hash within the redelivery
bound.
"""

from __future__ import annotations

import os
import time
from typing import Any

from support.cluster import Cluster
from support.drillkit import Load, record, say, wait_healthy
from support.ledger import wait_until

KILLS = int(os.environ.get("SOAK_KILLS", "20"))
RATE = float(os.environ.get("SOAK_KILL_RATE", "60"))
INSTANCE = "default"


def main_pid(c: Cluster, host: str) -> str:
    """The worker instance's main process: the one of its processes whose parent is not."""
    pids = c.lab.ssh(host, f"pgrep -f -- '--hostname={INSTANCE}@' || true").split()
    for pid in pids:
        parent = c.lab.ssh(host, f"ps -o ppid= -p {pid} || true").strip()
        if parent and parent not in pids:
            return pid
    raise AssertionError(f"no {INSTANCE} worker main process on {host}: {pids}")


def test_worker_main_processes_killed_again_and_again(
    drill_cluster: Cluster, workers: list[str], drill_figures: list[dict[str, Any]]
) -> None:
    c = drill_cluster
    wait_healthy(c, workers)
    hosts = [h for h in c.worker_hosts if f"{INSTANCE}@{h}" in workers]
    with Load(c, "storm", rate=RATE) as load:
        for n in range(KILLS):
            host = hosts[n % len(hosts)]
            pid = main_pid(c, host)
            c.lab.ssh(host, f"kill -KILL {pid}")
            say(f"kill {n + 1}/{KILLS}: main process {pid} of {INSTANCE}@{host}")
            time.sleep(5)
        wait_until(
            lambda: set(workers) <= set(c.ping_workers()), 120, what="every worker answering"
        )
        report = load.finish(parked_ok=False)
    adopted = sum(
        int(c.lab.ssh(h, f"journalctl --since @{load.t_start:.0f} --no-pager -o cat "
                         "| grep -c 'was taking when it stopped' || true").strip() or 0)
        for h in hosts
    )  # fmt: skip
    record(
        drill_figures,
        "storm: worker main processes SIGKILLed",
        report,
        kills=KILLS,
        rate=RATE,
        restarts_that_put_back_a_message=adopted,
    )
    assert not report.lost, f"lost tasks: {report.lost[:20]}"
