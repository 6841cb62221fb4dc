"""The redelivery bound is refused before any change when a live worker's refreshes could
miss it (ansible/roles/celery/tasks/validate.yml)."""

from __future__ import annotations

from support.e2e_lab import LabInventory

CELERY_ENV = "/etc/celery-ha/celery.env"


def _env_checksum(lab: LabInventory, host: str) -> str:
    return lab.lab_cmd("ssh", host, f"sha256sum {CELERY_ENV}", timeout=60).split()[0]


def test_a_bound_shorter_than_four_refresh_intervals_is_refused_before_any_change(
    lab: LabInventory,
) -> None:
    host = "node1"
    before = _env_checksum(lab, host)
    proc = lab.site_yml(
        "-e", "celery_redelivery_timeout=30", "-e", "celery_redelivery_refresh_interval=10",
        timeout=300,
    )  # fmt: skip
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    flat = " ".join(out.split())  # the message may be wrapped
    assert "celery_redelivery_timeout (30) must be at least 4 x" in flat, out[-3000:]
    assert "celery_redelivery_refresh_interval (10" in flat
    # The preflight stopped the run: no play past it started, the env file is as it was.
    assert "PLAY [Redis servers]" not in out
    assert _env_checksum(lab, host) == before
