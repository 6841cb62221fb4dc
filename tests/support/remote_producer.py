"""A steady producer that runs ON a worker host, as the celery user, with the deployment's own
settings: what an app server beside the workers does. The drills ship this file and ledger.py
to the host and start it in the background (tests/support/drillkit.py, RemoteProducer).

Usage: python remote_producer.py RUN_ID RATE MAX_SECONDS OUTFILE
Every accepted publish is appended to OUTFILE as ``P <ledger_id> <unix_time>``, every publish
that failed after its retries as ``F <ledger_id> <unix_time>``. It stops after MAX_SECONDS or
as soon as OUTFILE.stop exists.
"""

from __future__ import annotations

import faulthandler
import logging
import signal
import sys
import time
from pathlib import Path
from typing import TextIO

import celery_ha_settings
from celery import Celery
from celery_ha_exec import CONFIG_DIR, read_env_file
from ledger import RECORD_TASK, Ledger, Producer


class FileLedger(Ledger):
    """A ledger that also writes each publish outcome to a file the controller reads."""

    def __init__(self, run_id: str, out: TextIO) -> None:
        super().__init__(run_id)
        self.out = out

    def mark_published(self, ledger_id: str, ts: float | None = None) -> None:
        now = time.time() if ts is None else ts
        super().mark_published(ledger_id, now)
        self.out.write(f"P {ledger_id} {now:.6f}\n")

    def mark_failed_publish(self, ledger_id: str, error: str) -> None:
        super().mark_failed_publish(ledger_id, error)
        self.out.write(f"F {ledger_id} {time.time():.6f}\n")


def main(run_id: str, rate: float, max_seconds: float, outfile: str) -> None:
    # The drill asks for every thread's stack (SIGUSR1) before stopping it, so a publish that
    # hangs shows where.
    faulthandler.register(signal.SIGUSR1)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(name)s %(message)s")
    settings = celery_ha_settings.load(read_env_file(CONFIG_DIR / "celery.env"))
    app = Celery("celery-ha-remote-producer", set_as_current=False)
    app.conf.update(settings)
    stop_file = Path(outfile + ".stop")
    with open(outfile, "a", buffering=1) as out:
        ledger = FileLedger(run_id, out)

        def send(ledger_id: str) -> None:
            app.send_task(RECORD_TASK, args=(ledger_id, run_id, 0.0), task_id=ledger_id)

        producer = Producer(ledger, send, rate=rate, max_seconds=max_seconds, tag="r")
        producer.start()
        while producer.running and not stop_file.exists():
            time.sleep(0.2)
        producer.stop()


if __name__ == "__main__":
    main(sys.argv[1], float(sys.argv[2]), float(sys.argv[3]), sys.argv[4])
