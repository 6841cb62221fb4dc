"""ansible/preflight.yml refuses bad input with every problem of a role's settings named in
one run, without a lab: three hosts on local connections, which the checks only read."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="module")
def inventory(tmp_path_factory: pytest.TempPathFactory) -> Path:
    tmp = tmp_path_factory.mktemp("preflight")
    hosts = "\n".join(f"node{i} ansible_host=10.99.0.1{i}" for i in (1, 2, 3))
    groups = "".join(
        f"[{group}]\n{members}\n"
        for group, members in {
            "redis": "node1\nnode2\nnode3",
            "sentinel": "node1\nnode2\nnode3",
            "celery_workers": "node1\nnode2\nnode3",
            "celery_beat": "node1",
            "flower": "node2",
        }.items()
    )
    path = tmp / "inventory.ini"
    path.write_text(
        f"[lab]\n{hosts}\n[lab:vars]\nansible_connection=local\n"
        f"ansible_python_interpreter=/usr/bin/python3\ncluster_secrets_dir={tmp}/secrets\n{groups}"
    )
    return path


def refused(inventory: Path, *extra: str) -> tuple[str, str]:
    """preflight.yml with ``extra`` arguments, which must fail: its output as printed, and
    the same with every run of whitespace made one space (the messages are wrapped)."""
    env = {**os.environ, "ANSIBLE_STRATEGY": "linear", "ANSIBLE_CONFIG": str(REPO / "ansible.cfg")}
    proc = subprocess.run(
        ["ansible-playbook", "-i", str(inventory), str(REPO / "ansible" / "preflight.yml"), *extra],
        env=env, capture_output=True, text=True, timeout=300,
    )  # fmt: skip
    printed = proc.stdout + proc.stderr
    assert proc.returncode != 0, printed[-3000:]
    return printed, " ".join(printed.split())


def test_every_cluster_problem_is_named_in_one_run(inventory: Path) -> None:
    _, out = refused(
        inventory,
        "-e", "cluster_sentinel_port=6379",
        "-e", "cluster_celery_result_db=0",
        "-e", "cluster_redis_beat_user=default",
        "-e", "cluster_redis_admin_password=passwordPASSWORD123",
    )  # fmt: skip
    assert "cluster_redis_port (6379) and cluster_sentinel_port (6379) must be different" in out
    assert "cluster_celery_broker_db (0) and cluster_celery_result_db (0) must be two" in out
    assert "cluster_redis_beat_user=default) must each be a plain name" in out
    assert "Missing or weak secret(s): cluster_redis_admin_password." in out
    assert "passwordPASSWORD123" not in out


def test_flower_problems_are_named_and_no_secret_is_shown(inventory: Path) -> None:
    printed, out = refused(
        inventory,
        "-vvv",
        "-e", "flower_address=0.0.0.0",
        "-e", '{"flower_env_extra": {"FLOWER_X": "a$b"}}',
        "-e", "flower_basic_auth_password=short,pw",
    )  # fmt: skip
    assert "flower_address=0.0.0.0 is not a loopback address" in out
    assert "flower_env_extra keys must look like FLOWER_<NAME>" in out
    assert "flower_basic_auth_password needs at least" in out
    secrets = inventory.parent / "secrets"
    for secret in [*secrets.iterdir(), *secrets.glob("tls/*.key")]:
        if secret.is_file():
            assert secret.read_text().strip() not in printed, secret.name
    assert "short,pw" not in out
