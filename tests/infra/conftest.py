"""Shared fixtures for the testinfra checks of a deployed lab.

Run with: pytest tests/infra --hosts=ansible://all --ansible-inventory=$LAB_DIR/inventory.ini
(the venv's bin on PATH). LAB_DIR picks the lab as for tests/lab/lab (default <repo>/.lab);
secrets are read from the cluster secrets dir the lab uses ($LAB_DIR/secrets, or
CLUSTER_SECRETS_DIR when set).
"""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest
from support.inventory import read_inventory

REPO = Path(__file__).resolve().parents[2]


@pytest.fixture(scope="session")
def lab_dir() -> Path:
    return Path(os.environ.get("LAB_DIR") or REPO / ".lab")


@pytest.fixture(scope="session")
def inventory(lab_dir: Path) -> Path:
    path = lab_dir / "inventory.ini"
    if not path.is_file():
        pytest.fail(f"no lab inventory at {path} (LAB_DIR): run tests/lab/lab up and deploy")
    return path


@pytest.fixture(scope="session")
def lab_groups(inventory: Path) -> dict[str, list[str]]:
    """Inventory groups -> host names, from the generated INI inventory."""
    return read_inventory(inventory)[0]


@pytest.fixture(scope="session")
def lab_addresses(inventory: Path) -> dict[str, str]:
    """Host name -> ansible_host address."""
    return read_inventory(inventory)[1]


@pytest.fixture(scope="session")
def secrets_dir(lab_dir: Path) -> Path:
    return Path(os.environ.get("CLUSTER_SECRETS_DIR") or lab_dir / "secrets")


@pytest.fixture(scope="session")
def tls(secrets_dir: Path) -> dict:
    """redis-py TLS arguments with the operator certificate ({} when the lab has no TLS)."""
    from support.labtls import tls_kwargs

    return tls_kwargs(secrets_dir)


@pytest.fixture
def flavor(host, lab_dir: Path):
    """The server this host must run (labflavor.Flavor): the lab's cluster_redis_flavor, else
    the documented default of the host's Debian release, read from its /etc/os-release."""
    from support.labflavor import flavor_for_release

    release = host.run(". /etc/os-release && echo $VERSION_ID").stdout.strip()
    return flavor_for_release(int(release), lab_dir)


@pytest.fixture(scope="session")
def secret(secrets_dir: Path):
    """secret('redis_celery_password') -> the generated value (fails if missing)."""

    def read(name: str) -> str:
        path = secrets_dir / name
        if not path.is_file():
            pytest.fail(f"secret {name} not found in {secrets_dir} (CLUSTER_SECRETS_DIR)")
        # The password lookup may append " salt=..." for encrypted values; the first word is it.
        return path.read_text().split()[0]

    return read


@pytest.fixture(scope="session")
def lab(lab_dir: Path):
    """lab('status') -> CompletedProcess of tests/lab/lab with this lab's environment."""

    def run(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [str(REPO / "tests" / "lab" / "lab"), *args],
            env=dict(os.environ, LAB_DIR=str(lab_dir)),
            capture_output=True,
            text=True,
            timeout=timeout,
            check=True,
            stdin=subprocess.DEVNULL,
        )

    return run


PREFLIGHT_PLAY = """\
- name: Preflight only (the validate entry points, as play 0 of site.yml runs them)
  hosts: all
  gather_facts: false
  any_errors_fatal: true
  tasks:
{tasks}
"""
PREFLIGHT_TASK = """\
    - name: Validate {role}
      ansible.builtin.include_role:
        name: {role}
        tasks_from: validate
      when: {when}
"""


@pytest.fixture
def preflight(tmp_path: Path, secrets_dir: Path):
    """preflight(inventory_ini, roles={'cluster': 'all', ...}, **extra_vars) -> (rc, output).

    Runs only the roles' validate entry points against made-up hosts played by the controller
    (ansible_connection=local, no facts), reusing the lab's secrets so nothing new is generated.
    """

    def run(inventory_ini: str, roles: dict[str, str], **extra: str) -> tuple[int, str]:
        tasks = "".join(
            PREFLIGHT_TASK.format(
                role=role,
                when="true"
                if group == "all"
                else f"inventory_hostname in groups['{group}'] | default([])",
            )
            for role, group in roles.items()
        )
        playbook = tmp_path / "preflight.yml"
        playbook.write_text(PREFLIGHT_PLAY.format(tasks=tasks))
        inventory_file = tmp_path / "inventory.ini"
        # Read-only probes of the validate entry points (is a cluster running here?) run on
        # the controller then: with Ansible's own Python, not whatever `python3` is on PATH.
        inventory_file.write_text(
            inventory_ini + "\n[all:vars]\nansible_connection=local\n"
            "ansible_python_interpreter={{ ansible_playbook_python }}\n"
        )
        args = ["-e", f"cluster_secrets_dir={secrets_dir}"]
        for key, value in extra.items():
            args += ["-e", f"{key}={value}"]
        env = dict(
            os.environ,
            ANSIBLE_CONFIG=str(REPO / "ansible.cfg"),
            ANSIBLE_ROLES_PATH=str(REPO / "ansible" / "roles"),
            ANSIBLE_FORCE_COLOR="0",
            ANSIBLE_NOCOLOR="1",
        )
        proc = subprocess.run(
            ["ansible-playbook", "-i", str(inventory_file), str(playbook), *args],
            env=env,
            capture_output=True,
            text=True,
            timeout=300,
            cwd=REPO,
        )
        return proc.returncode, proc.stdout + proc.stderr

    return run


@pytest.fixture(scope="session")
def assert_private_key_dir():
    """assert_private_key_dir(host, dir, owner, group): the layout the redis_tls role installs,
    folder root:GROUP 0750, certificates 0644, and the key OWNER 0600 (nobody else reads it)."""

    def check(host, directory: str, owner: str, group: str) -> None:
        folder = host.file(directory)
        assert folder.is_directory
        assert (folder.user, folder.group, folder.mode) == ("root", group, 0o750)
        for name in ("ca.crt", "cert.crt"):
            assert host.file(f"{directory}/{name}").mode == 0o644, name
        key = host.file(f"{directory}/cert.key")
        assert (key.user, key.group, key.mode) == (owner, group, 0o600)
        # Nobody else on the host can read it, whatever the folder allows.
        assert host.run(f"runuser -u nobody -- cat {directory}/cert.key").rc != 0

    return check


@pytest.fixture(scope="session")
def assert_flavor_unit():
    """assert_flavor_unit(host, unit, user, binary): the service is enabled and running from
    Debian's own Type=notify unit, its process the flavor's own binary as its own user.
    Returns `systemctl show` of Type, FragmentPath, User and ExecStart for further checks."""

    def check(host, unit: str, user: str, binary: str) -> str:
        service = host.service(unit)
        assert service.is_enabled
        assert service.is_running
        shown = host.run(f"systemctl show -p Type -p FragmentPath -p User -p ExecStart {unit}")
        assert "Type=notify" in shown.stdout
        assert f"User={user}\n" in shown.stdout
        assert f"path={binary} " in shown.stdout
        pid = host.run(f"systemctl show -p MainPID --value {unit}").stdout.strip()
        assert host.run(f"ps -o user= -p {pid}").stdout.strip() == user
        return shown.stdout

    return check
