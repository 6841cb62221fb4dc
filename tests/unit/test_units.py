"""The systemd units and supervisor programs: hardening score, syntax, and that both run the
same command lines (celery_ha_exec is the supervisor side)."""

from __future__ import annotations

import configparser
import re
import shlex
import shutil
import subprocess
from pathlib import Path

import celery_ha_exec
import pytest
import yaml

REPO = Path(__file__).resolve().parents[2]
UNITS = sorted((REPO / "systemd").glob("*.service"))
SYSTEMD_ANALYZE = shutil.which("systemd-analyze") or "/usr/bin/systemd-analyze"
needs_systemd_analyze = pytest.mark.skipif(
    not Path(SYSTEMD_ANALYZE).exists(), reason="systemd-analyze is not installed on this machine"
)
MAX_EXPOSURE = 2.0
KIND = {
    "celery-worker@.service": "worker",
    "celery-beat.service": "beat",
    "flower.service": "flower",
}
# Units that run no Celery process: only the hardening and syntax checks apply to them.
NOT_CELERY = {"celery-ha-firewall.service", "celery-ha-queue-depth.service"}
CELERY_UNITS = [u for u in UNITS if u.name in KIND]


def test_every_unit_we_ship_is_checked() -> None:
    assert sorted(u.name for u in UNITS) == sorted(set(KIND) | NOT_CELERY)


def unit_settings(path: Path) -> dict[str, list[str]]:
    """Key -> values of the [Service] section (keys may repeat)."""
    settings: dict[str, list[str]] = {}
    section = None
    for line in path.read_text().splitlines():
        line = line.strip()
        if not line or line[0] in "#;":
            continue
        if line.startswith("["):
            section = line
            continue
        if section == "[Service]":
            key, _, value = line.partition("=")
            settings.setdefault(key, []).append(value)
    return settings


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_security_exposure_at_most_2(unit: Path) -> None:
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "security", "--offline=true", "--no-pager", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", result.stdout)
    assert match, f"no exposure level in:\n{result.stdout}\n{result.stderr}"
    exposure = float(match.group(1))
    print(f"{unit.name}: exposure {exposure}")
    assert exposure <= MAX_EXPOSURE, result.stdout


@needs_systemd_analyze
@pytest.mark.parametrize("unit", UNITS, ids=lambda p: p.name)
def test_systemd_analyze_verify(unit: Path) -> None:
    # Works offline. The one complaint expected here is that the venv (installed by the role on
    # the hosts) does not exist on this machine; anything else is a real problem in the unit.
    result = subprocess.run(
        [SYSTEMD_ANALYZE, "verify", "--man=no", str(unit)],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    lines = [
        line
        for line in (result.stdout + result.stderr).splitlines()
        if line.strip()
        and not re.search(r"Command /opt/celery-ha/venv/bin/\S+ is not executable", line)
    ]
    assert lines == [], "\n".join(lines)


@pytest.mark.parametrize("unit", CELERY_UNITS, ids=lambda p: p.name)
def test_unit_contract(unit: Path) -> None:
    s = unit_settings(unit)
    assert s["Type"] == ["exec"]
    assert s["User"] == ["celery"]
    assert s["KillMode"] == ["mixed"]
    assert s["KillSignal"] == ["SIGTERM"]
    assert s["Restart"] == ["always"]
    assert s["StateDirectory"] == ["celery-ha"]
    assert s["EnvironmentFile"][0] == "/etc/celery-ha/celery.env"
    assert s["StandardOutput"] == ["journal"]
    assert s["ExecStart"][0].startswith("/opt/celery-ha/venv/bin/celery -A celery_ha_boot ")
    assert " multi " not in s["ExecStart"][0]


def test_worker_instance_files_and_stop_timeout_default() -> None:
    s = unit_settings(REPO / "systemd" / "celery-worker@.service")
    assert s["EnvironmentFile"] == ["/etc/celery-ha/celery.env", "/etc/celery-ha/worker-%i.env"]
    assert "--hostname=%i@%H" in s["ExecStart"][0].split()
    assert int(s["TimeoutStopSec"][0]) >= 60


def unit_defaults(s: dict[str, list[str]]) -> dict[str, str]:
    defaults: dict[str, str] = {}
    for value in s.get("Environment", []):
        for item in shlex.split(value):
            key, _, val = item.partition("=")
            defaults[key] = val
    return defaults


def expand(exec_start: str, env: dict[str, str], instance: str, host: str) -> list[str]:
    words = exec_start.replace("%i", instance).replace("%H", host).split()
    return [re.sub(r"\$\{(\w+)\}", lambda m: env[m.group(1)], w) for w in words]


@pytest.mark.parametrize("unit", CELERY_UNITS, ids=lambda p: p.name)
def test_supervisor_runs_the_units_exact_command_line(unit: Path) -> None:
    kind = KIND[unit.name]
    s = unit_settings(unit)
    defaults = unit_defaults(s)
    assert defaults == celery_ha_exec.DEFAULTS[kind]
    env = {**defaults, "CELERY_HA_WORKER_QUEUES": "a,b", "CELERY_HA_LOG_LEVEL": "DEBUG"}
    instance = "reports" if kind == "worker" else None
    expected = expand(s["ExecStart"][0], env, instance or "", "node9")
    assert celery_ha_exec.command(kind, instance, env, hostname="node9") == expected


@pytest.mark.parametrize(
    "unit", [u for u in UNITS if "User" in unit_settings(u)], ids=lambda p: p.name
)
def test_units_spell_the_celery_roles_constants(unit: Path) -> None:
    # The role's paths and user are constants (vars/main.yml) because these static files
    # hard-code them: the two must say the same.
    const = yaml.safe_load((REPO / "ansible/roles/celery/vars/main.yml").read_text())
    s = unit_settings(unit)
    assert s["User"] == [const["celery_user"]]
    assert s["Group"] == [const["celery_group"]]
    assert s["ExecStart"][0].startswith(const["celery_venv"] + "/bin/")
    assert s["EnvironmentFile"]
    assert all(Path(f).parent == Path(const["celery_config_dir"]) for f in s["EnvironmentFile"])
    if "StateDirectory" in s:
        assert Path("/var/lib", s["StateDirectory"][0]) == Path(const["celery_state_dir"])
        assert s["WorkingDirectory"] == [const["celery_state_dir"]]


def test_flower_unit_falls_back_to_the_flower_roles_address_and_port() -> None:
    # Were flower.env to lack them, Flower must still come up where the role's nginx looks for
    # it (flower_address:flower_port, behind flower_proxy_port), not on Flower's own 5555.
    role = yaml.safe_load((REPO / "ansible/roles/flower/defaults/main.yml").read_text())
    defaults = unit_defaults(unit_settings(REPO / "systemd" / "flower.service"))
    assert defaults["FLOWER_ADDRESS"] == role["flower_address"] == "127.0.0.1"
    assert defaults["FLOWER_PORT"] == str(role["flower_port"])
    assert role["flower_port"] != role["flower_proxy_port"]
    # celery-ha-exec's defaults are the unit's: test_supervisor_runs_the_units_exact_command_line.


jinja2 = pytest.importorskip("jinja2")


def render(name: str, **context: object) -> configparser.ConfigParser:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(REPO / "supervisor"), undefined=jinja2.StrictUndefined
    )
    parser = configparser.ConfigParser(interpolation=None, inline_comment_prefixes=(";",))
    parser.read_string(env.get_template(name).render(**context))
    return parser


@pytest.mark.parametrize(
    ("template", "context", "program", "args"),
    [
        (
            "celery-worker.conf",
            {"celery_worker": {"name": "reports"}, "celery_worker_stop_timeout": 900},
            "celery-worker-reports",
            ["worker", "reports"],
        ),
        ("celery-beat.conf", {}, "celery-beat", ["beat"]),
        ("flower.conf", {}, "flower", ["flower"]),
    ],
)
def test_supervisor_programs(template: str, context: dict, program: str, args: list[str]) -> None:
    section = render(template, **context)[f"program:{program}"]
    assert shlex.split(section["command"]) == ["/opt/celery-ha/venv/bin/celery-ha-exec", *args]
    assert section["user"] == "celery"
    assert section["autorestart"] == "true"
    assert section["stopsignal"] == "TERM"
    # KillMode=mixed: TERM to the main process only, SIGKILL to the group at the timeout.
    assert section["stopasgroup"] == "false"
    assert section["killasgroup"] == "true"
    if program.startswith("celery-worker"):
        assert section["stopwaitsecs"] == "900"


def test_supervisor_worker_default_stop_wait_matches_the_unit() -> None:
    section = render("celery-worker.conf", celery_worker={"name": "x"})["program:celery-worker-x"]
    unit = unit_settings(REPO / "systemd" / "celery-worker@.service")
    assert section["stopwaitsecs"] == unit["TimeoutStopSec"][0]
