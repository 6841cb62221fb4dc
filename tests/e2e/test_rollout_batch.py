"""celery_rollout_batch sets how many Celery hosts site.yml changes at a time (the celery play's
serial keyword), and a value in the inventory, which that keyword cannot read, is refused
rather than silently ignored (ansible/site.yml)."""

from __future__ import annotations

import re
from pathlib import Path

from support.e2e_lab import LabInventory

PLAY = "PLAY [Celery workers and beat]"


def _celery_hosts(lab: LabInventory) -> list[str]:
    hosts = lab.groups.get("celery_workers", []) + lab.groups.get("celery_beat", [])
    return list(dict.fromkeys(hosts))


def test_the_batch_from_the_command_line_sets_the_rollout_size(lab: LabInventory) -> None:
    hosts = _celery_hosts(lab)
    assert len(hosts) >= 3, f"the lab needs three Celery hosts, has {hosts}"
    proc = lab.site_yml("--tags", "celery", "-e", "celery_rollout_batch=2", timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode == 0, out[-3000:]
    # One play header per batch: ceil(hosts / 2) rounds instead of one per host.
    assert out.count(PLAY) == -(-len(hosts) // 2), out[-3000:]
    assert re.findall(r"changed=(\d+)", out) and set(re.findall(r"changed=(\d+)", out)) == {"0"}


def test_a_batch_set_in_the_inventory_is_refused_before_any_celery_host_changes(
    lab: LabInventory, tmp_path: Path
) -> None:
    extra = tmp_path / "rollout.ini"
    extra.write_text("[all:vars]\ncelery_rollout_batch=2\n")
    proc = lab.site_yml("--tags", "celery", "-i", str(extra), timeout=600)
    out = proc.stdout + proc.stderr
    assert proc.returncode != 0, out[-3000:]
    flat = " ".join(out.split())
    assert "celery_rollout_batch is 2 on" in flat, out[-3000:]
    assert "-e celery_rollout_batch=2" in flat
    # The check is the play's first task: no task of the celery role ran.
    assert "TASK [celery :" not in out, out[-3000:]
