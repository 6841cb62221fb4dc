"""testinfra: the Celery workers and beat as deployed by the celery role, on every lab host.

Run as: pytest tests/infra --hosts=ansible://all --ansible-inventory=$LAB_DIR/inventory.ini
Hosts outside the celery groups are skipped. Expectations come from the inventory (groups,
celery_workers, celery_process_manager) and the secrets from $LAB_DIR/secrets.
"""

from __future__ import annotations

import os
import re
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAB_DIR = Path(os.environ.get("LAB_DIR") or REPO / ".lab")
SECRETS_DIR = LAB_DIR / "secrets"

VENV = "/opt/celery-ha/venv"
CONFIG_DIR = "/etc/celery-ha"
ENV_FILE = f"{CONFIG_DIR}/celery.env"
STATE_DIR = "/var/lib/celery-ha"
DEFAULT_WORKERS = [{"name": "default", "queues": ["default"], "concurrency": 2}]
DEFAULT_STOP_TIMEOUT = 300
MAX_EXPOSURE = 2.0


_VARS: dict[str, dict] = {}


def _vars(host) -> dict:
    # get_variables() runs ansible-inventory each time: once per host is enough.
    name = host.backend.hostname
    if name not in _VARS:
        _VARS[name] = host.ansible.get_variables()
    return _VARS[name]


def _groups(host) -> list[str]:
    return _vars(host).get("group_names", [])


def _is_worker(host) -> bool:
    return "celery_workers" in _groups(host)


def _is_beat(host) -> bool:
    return "celery_beat" in _groups(host)


def _manager(host) -> str:
    return _vars(host).get("celery_process_manager", "systemd")


def _workers(host) -> list[dict]:
    return _vars(host).get("celery_workers", DEFAULT_WORKERS) if _is_worker(host) else []


@pytest.fixture
def celery_host(host):
    if not (_is_worker(host) or _is_beat(host)):
        pytest.skip("not a Celery host")
    return host


@pytest.fixture
def systemd_host(celery_host):
    if _manager(celery_host) != "systemd":
        pytest.skip("runs its Celery processes under supervisor")
    return celery_host


@pytest.fixture
def supervisor_host(celery_host):
    if _manager(celery_host) != "supervisor":
        pytest.skip("runs its Celery processes under systemd")
    return celery_host


def test_service_user_has_no_login(celery_host) -> None:
    user = celery_host.user("celery")
    assert user.exists
    assert user.shell in ("/usr/sbin/nologin", "/bin/false")
    assert user.home == STATE_DIR
    assert user.uid < 1000, "a system account"
    assert user.password in ("!", "*", "!*", "")


def test_venv_owned_by_root_and_not_writable_by_celery(celery_host) -> None:
    venv = celery_host.file(VENV)
    assert venv.is_directory and venv.user == "root"
    not_root = celery_host.check_output(f"find {VENV} ! -user root -print -quit")
    assert not_root == "", f"not owned by root: {not_root}"
    writable = celery_host.check_output(f"find {VENV} ! -type l -perm /022 -print -quit")
    assert writable == "", f"group/world writable: {writable}"
    probe = celery_host.run(f"runuser -u celery -- touch {VENV}/bin/.probe")
    assert probe.rc != 0, "the celery user could write into the venv"


def test_env_file_holds_the_secrets_and_is_not_world_readable(celery_host) -> None:
    env = celery_host.file(ENV_FILE)
    assert env.user == "root" and env.group == "celery"
    assert env.mode == 0o640
    assert celery_host.file(CONFIG_DIR).mode == 0o750
    content = env.content_string
    for key, secret in (
        ("CELERY_HA_REDIS_PASSWORD", "redis_celery_password"),
        ("CELERY_HA_SENTINEL_PASSWORD", "sentinel_password"),
    ):
        value = (SECRETS_DIR / secret).read_text().strip()
        assert re.search(rf"^{key}='?{re.escape(value)}'?$", content, re.M), f"{key} missing"


def test_worker_env_files_match_celery_workers(celery_host) -> None:
    for worker in _workers(celery_host):
        f = celery_host.file(f"{CONFIG_DIR}/worker-{worker['name']}.env")
        assert f.exists and f.mode == 0o640 and f.group == "celery"
        assert f"CELERY_HA_WORKER_QUEUES={','.join(worker['queues'])}" in f.content_string
    names = {w["name"] for w in _workers(celery_host)}
    found = celery_host.check_output(f"ls {CONFIG_DIR}").split()
    extra = {m.group(1) for f in found if (m := re.match(r"worker-(.+)\.env$", f))} - names
    assert not extra, f"env files of instances no longer configured: {extra}"


def test_state_dir_belongs_to_celery(celery_host) -> None:
    state = celery_host.file(STATE_DIR)
    assert state.user == "celery" and state.mode == 0o750


def test_worker_units_enabled_and_active(systemd_host) -> None:
    for worker in _workers(systemd_host):
        unit = systemd_host.service(f"celery-worker@{worker['name']}")
        assert unit.is_enabled and unit.is_running, worker["name"]


def test_beat_only_on_the_beat_host(systemd_host) -> None:
    beat = systemd_host.service("celery-beat")
    if _is_beat(systemd_host):
        assert beat.is_enabled and beat.is_running
    else:
        assert not beat.is_running and not beat.is_enabled


def test_worker_stop_timeout_above_the_longest_task(systemd_host) -> None:
    for worker in _workers(systemd_host):
        out = systemd_host.check_output(
            f"systemctl show -p TimeoutStopUSec --value celery-worker@{worker['name']}"
        )
        expected = _vars(systemd_host).get("celery_worker_stop_timeout", DEFAULT_STOP_TIMEOUT)
        minutes, seconds = divmod(int(expected), 60)
        human = " ".join(
            p for p in (f"{minutes}min" if minutes else "", f"{seconds}s" if seconds else "") if p
        )
        assert out == human, f"TimeoutStopUSec={out}, want {human}"


def test_units_rated_safe_by_systemd_analyze(systemd_host) -> None:
    units = [f"celery-worker@{w['name']}.service" for w in _workers(systemd_host)]
    if _is_beat(systemd_host):
        units.append("celery-beat.service")
    for unit in units:
        out = systemd_host.check_output(f"systemd-analyze security --no-pager {unit}")
        match = re.search(r"Overall exposure level for \S+: ([0-9.]+)", out)
        assert match, out[-500:]
        print(f"{systemd_host.backend.hostname} {unit}: {match.group(1)}")
        assert float(match.group(1)) <= MAX_EXPOSURE, f"{unit} rated {match.group(1)}"


def test_supervisor_programs_running(supervisor_host) -> None:
    status = supervisor_host.check_output("supervisorctl status")
    programs = [f"celery-worker-{w['name']}" for w in _workers(supervisor_host)]
    if _is_beat(supervisor_host):
        programs.append("celery-beat")
    for program in programs:
        assert re.search(rf"^{re.escape(program)}\s+RUNNING\b", status, re.M), status
    if not _is_beat(supervisor_host):
        assert "celery-beat" not in status


def test_supervisor_host_runs_no_celery_unit(supervisor_host) -> None:
    active = supervisor_host.check_output(
        # The Celery processes' units; celery-ha-firewall.service runs on every host.
        "systemctl list-units --plain --no-legend --state=active 'celery-worker@*' 'celery-beat*'"
        " | awk '{print $1}'"
    )
    assert active == "", f"systemd units of ours still active under supervisor: {active}"


def test_every_worker_answers_ping(celery_host) -> None:
    workers = _workers(celery_host)
    if not workers:
        pytest.skip("no worker instance on this host")
    nodename = celery_host.check_output("hostname")
    nodes = ",".join(f"{w['name']}@{nodename}" for w in workers)
    out = celery_host.check_output(
        "runuser -u celery -- sh -c 'set -a; . %s; . %s/worker-%s.env; set +a; "
        "exec %s/bin/celery -A celery_ha_boot inspect ping --timeout 5 -d %s'",
        ENV_FILE,
        CONFIG_DIR,
        workers[0]["name"],
        VENV,
        nodes,
    )
    for worker in workers:
        assert f"{worker['name']}@{nodename}: OK" in out, out


def test_tls_client_certificate_is_the_celery_users_alone(
    celery_host, assert_private_key_dir
) -> None:
    assert_private_key_dir(celery_host, f"{CONFIG_DIR}/tls", "celery", "celery")
    content = celery_host.file(ENV_FILE).content_string
    for key, name in (("CA", "ca.crt"), ("CERT", "cert.crt"), ("KEY", "cert.key")):
        assert re.search(rf"^CELERY_HA_TLS_{key}={CONFIG_DIR}/tls/{name}$", content, re.M), key
