"""Helpers for the end-to-end tests: a Celery client on the controller that reaches the lab
only through its Sentinels, wired from the lab's inventory and secrets ($LAB_DIR, default
<repo>/.lab), never from the hosts themselves, so a wrong wiring on the hosts shows up here.
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import celery_ha_settings
import yaml

from support.cluster import Lab
from support.inventory import read_inventory
from support.labtls import tls_env, tls_kwargs

REPO = Path(__file__).resolve().parents[2]

LAB_DIR = Path(os.environ.get("LAB_DIR") or REPO / ".lab")
SENTINEL_PORT = 26379
DEFAULT_WORKERS = [{"name": "default", "queues": ["default"], "concurrency": 2}]


class LabInventory:
    """Groups, addresses and per-host celery_workers of the lab's generated inventory."""

    def __init__(self, lab_dir: Path) -> None:
        self.lab_dir = lab_dir
        self.path = lab_dir / "inventory.ini"
        self.groups, self.addresses = read_inventory(self.path)
        self.lab = Lab(str(lab_dir))

    def host_vars(self, host: str) -> dict:
        path = self.lab_dir / "host_vars" / f"{host}.yml"
        return (yaml.safe_load(path.read_text()) or {}) if path.exists() else {}

    def workers(self, host: str) -> list[dict]:
        return self.host_vars(host).get("celery_workers", DEFAULT_WORKERS)

    def expected_nodes(self) -> set[str]:
        return {
            f"{w['name']}@{host}"
            for host in self.groups.get("celery_workers", [])
            for w in self.workers(host)
        }

    def secret(self, name: str) -> str:
        return (self.lab_dir / "secrets" / name).read_text().strip()

    def lab_cmd(self, *args: str, timeout: float = 120) -> str:
        """tests/lab/lab VERB ... on this lab (support.cluster.Lab.run); its stdout."""
        proc = self.lab.run(*args, timeout=timeout, check=False)
        assert proc.returncode == 0, f"lab {args[:2]}: {proc.stdout}{proc.stderr}"
        return proc.stdout

    def site_yml(self, *args: str, timeout: float = 900) -> subprocess.CompletedProcess:
        """ansible-playbook site.yml on this lab, with extra arguments; never raises on rc."""
        return self.lab.ansible_playbook(*args, timeout=timeout)

    def tls_kwargs(self) -> dict:
        """TLS arguments for a direct redis-py client ({} without TLS)."""
        return tls_kwargs(self.lab_dir / "secrets")


def client_env(inv: LabInventory, **overrides: str) -> dict[str, str]:
    """The CELERY_HA_* settings a client needs, from the inventory and the secrets dir."""
    sentinels = ",".join(f"{inv.addresses[h]}:{SENTINEL_PORT}" for h in inv.groups["sentinel"])
    env = {
        "CELERY_HA_APP": "celery_ha_app",
        "CELERY_HA_SENTINELS": sentinels,
        "CELERY_HA_MASTER_NAME": "celery",
        "CELERY_HA_REDIS_USERNAME": "celery",
        "CELERY_HA_REDIS_PASSWORD": inv.secret("redis_celery_password"),
        "CELERY_HA_SENTINEL_PASSWORD": inv.secret("sentinel_password"),
        "CELERY_HA_BROKER_DB": "0",
        "CELERY_HA_RESULT_DB": "1",
        **tls_env(inv.lab_dir / "secrets"),
    }
    env.update(overrides)
    return env


def client_settings(inv: LabInventory, **overrides: str) -> dict:
    """Celery settings for a client, made by the same loader the workers use."""
    return celery_ha_settings.load(client_env(inv, **overrides))


def run(cmd: list[str], timeout: float = 900, **kwargs) -> subprocess.CompletedProcess:
    """A controller command, with its output kept for the failure message."""
    env = dict(os.environ, LAB_DIR=str(LAB_DIR), ANSIBLE_CONFIG=str(REPO / "ansible.cfg"))
    return subprocess.run(
        cmd,
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
        **kwargs,
    )
