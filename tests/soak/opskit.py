"""What the day-2 operation drills share: an operation playbook run under load (a producer on
the controller and one on a worker host), and the checks every one of them ends with.

Built on tests/support/drillkit.py (the load, the ledger, the figures); only what an
operation adds lives here.
"""

from __future__ import annotations

import threading
import time
from typing import Any

from support.cluster import Cluster, Lab
from support.drillkit import TwoProducers, record, say

# A regression guard, not the goal: the figures show what each operation costs.
GAP_GUARD_S = 30.0


def run_playbook(
    c: Cluster, playbook: str, *extra: str, timeout: float = 1200, lab: Lab | None = None
) -> tuple[int, dict[str, dict[str, int]], str]:
    """ansible-playbook PLAYBOOK (relative to ansible/) on the lab; (rc, recap, output tail).
    ``lab``: the same lab seen through another inventory (default c.lab)."""
    t0 = time.time()
    result = (lab or c.lab).playbook(*extra, timeout=timeout, name=playbook)
    say(f"{playbook} {' '.join(extra)}: rc={result[0]} in {time.time() - t0:.0f} s")
    return result


class OpsDrill(TwoProducers):
    """The load around one operation: both producers, the clock, the closing checks."""

    def __init__(
        self, c: Cluster, name: str, remote_host: str, remote_seconds: float = 2400
    ) -> None:
        super().__init__(c, name, remote_host, remote_seconds=remote_seconds)
        self.t_op = 0.0
        self.t_op_end = 0.0
        # Set by a drill whose operation follows a fault: the gap is measured from the fault.
        self.t_fault: float | None = None

    def operate(
        self, playbook: str, *extra: str, lab: Lab | None = None, timeout: float = 1200
    ) -> tuple[int, dict[str, dict[str, int]], str]:
        self.t_op = time.time()
        result = run_playbook(self.c, playbook, *extra, lab=lab, timeout=timeout)
        self.t_op_end = time.time()
        return result

    def finish(self, figures: list[dict[str, Any]], name: str, **extra: Any) -> dict[str, Any]:
        # A little load after the operation, so that a stall at its very end shows as a gap.
        self.load.wait_done_after(time.time(), count=40, what="tasks after the operation")
        t_stop = time.time()
        self.remote.stop()
        start = self.t_op if self.t_fault is None else min(self.t_fault, self.t_op)
        report = self.load.finish(gap_from=start, parked_ok=False, stop_at=t_stop)
        record(
            figures,
            name,
            report,
            operation_s=round(self.t_op_end - self.t_op, 1),
            **self.publish_stalls(start, t_stop),
            worker_host_publish_failures=self.remote.failures,
            **extra,
        )
        row = figures[-1]
        say(
            f"{name}: operation {row['operation_s']} s, longest gap with no task completing "
            f"{row.get('gap_s')} s, lost {row['lost']}, failed {row['failed']}"
        )
        assert not report.lost, f"lost tasks (parked ones included): {report.lost[:20]}"
        assert report.failed == 0, f"{report.failed} task(s) ended as FAILURE"
        assert report.publish_failures == 0, "a publish failed after all its retries"
        assert self.remote.failures == 0, f"{self.remote.failures} publishes failed remotely"
        for key in ("gap_s", "controller_publish_stall_s", "worker_host_publish_stall_s"):
            assert row[key] <= GAP_GUARD_S, f"{key} = {row[key]} s: the cluster stood still"
        return row


class DownWatch:
    """Polls every Redis server from the controller (admin PING) and remembers the most that
    were down at once and for how long each was: the "never two down" of a rolling restart,
    seen from outside rather than from the playbook's own waits."""

    def __init__(self, c: Cluster, interval: float = 0.2) -> None:
        self.c, self.interval = c, interval
        self.max_down = 0
        self.both: list[tuple[float, list[str]]] = []
        self.down_s: dict[str, float] = {h: 0.0 for h in c.redis_hosts}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _up(self, host: str) -> bool:
        client = self.c.redis_on(host, admin=True)
        client.connection_pool.connection_kwargs.update(socket_timeout=1, socket_connect_timeout=1)
        try:
            return bool(client.ping())
        except Exception:
            return False
        finally:
            client.close()

    def _run(self) -> None:
        last = time.time()
        while not self._stop.is_set():
            down = [h for h in self.c.redis_hosts if not self._up(h)]
            now = time.time()
            for h in down:
                self.down_s[h] += now - last
            last = now
            self.max_down = max(self.max_down, len(down))
            if len(down) > 1:
                self.both.append((now, down))
            time.sleep(self.interval)

    def __enter__(self) -> DownWatch:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(10)


def main_pids(c: Cluster) -> dict[str, str]:
    """The MainPID of every server's unit (redis-server or valkey-server)."""
    unit = c.flavor.server_unit
    return {
        h: c.lab.ssh(h, f"systemctl show -p MainPID --value {unit}").strip() for h in c.redis_hosts
    }
