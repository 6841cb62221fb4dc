"""The lab script itself, on its own subnet: what a killed lab leaves behind must not stop the
next one. CI raises its lab in a fresh clone right after a session's processes are ended, and
SIGKILL to systemd-nspawn orphans the container (LAB-NOTES): the stop 25 CI failed with
"node1 stopped while booting" that way.

Needs root and the lab's packages, like the lab; about 20 s with the base cached (LAB_CACHE,
default the main lab's cache, so the base is built once).
"""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
LAB = REPO / "tests" / "lab" / "lab"
# A subnet, bridge and tag of their own, so that the main lab may be up meanwhile.
SELFTEST_NET = "10.88.77"
SELFTEST_ENV = {
    "LAB_NET": SELFTEST_NET,
    "LAB_BRIDGE": "chabr77",
    "LAB_CACHE": os.environ.get("LAB_CACHE", f"{os.environ.get('LAB_DIR', REPO / '.lab')}/cache"),
}
CGROUP = Path("/sys/fs/cgroup/systemd/cha77-lab")


def lab(lab_dir: Path, *args: str) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, **SELFTEST_ENV, "LAB_DIR": str(lab_dir)}
    env.pop("LAB_TAG", None)
    return subprocess.run([str(LAB), *args], env=env, capture_output=True, text=True, timeout=300)


def kill_nspawns(lab_dir: Path) -> None:
    """What ending a session does to a lab: its systemd-nspawn processes SIGKILLed."""
    for pid_file in (lab_dir / "run").glob("node*.pid"):
        os.kill(int(pid_file.read_text()), signal.SIGKILL)


def container_processes() -> list[str]:
    # os.walk, not Path.glob: the containers' systemd adds and removes cgroups meanwhile, and
    # a folder gone between listing and reading is no process.
    pids = []
    for folder, _, files in os.walk(CGROUP):
        if "/payload" in folder and "cgroup.procs" in files:
            with contextlib.suppress(FileNotFoundError):
                pids += Path(folder, "cgroup.procs").read_text().split()
    return pids


def answers_ssh(lab_dir: Path, host: str) -> bool:
    """Only the lab whose key the host holds gets in: proves whose host answers."""
    return lab(lab_dir, "ssh", host, "true").returncode == 0


@pytest.fixture
def labs(tmp_path: Path) -> Iterator[tuple[Path, Path, Path]]:
    dirs = (tmp_path / "killed", tmp_path / "next", tmp_path / "third")
    yield dirs
    for lab_dir in dirs:
        lab(lab_dir, "down")


def test_a_killed_labs_containers_give_way_to_the_next_lab(labs: tuple[Path, Path, Path]) -> None:
    killed, following, third = labs
    up = lab(killed, "up", "3")
    assert up.returncode == 0, up.stderr
    kill_nspawns(killed)
    assert container_processes(), "the containers should outlive their SIGKILLed nspawn"
    assert answers_ssh(killed, "node1")

    up = lab(following, "up", "3")
    assert up.returncode == 0, up.stdout + up.stderr
    assert "left running by a killed lab" in up.stdout
    assert all(answers_ssh(following, h) for h in ("node1", "node2", "node3"))
    assert not answers_ssh(killed, "node1")

    # A lab that is alive is another matter: refused by name, and left running.
    up = lab(third, "up", "3")
    assert up.returncode != 0
    assert "cha77-node1 already runs for another lab" in up.stderr
    assert answers_ssh(following, "node1")

    # `down` from any folder of the tag removes containers whose nspawn was killed.
    kill_nspawns(following)
    down = lab(third, "down")
    assert down.returncode == 0, down.stderr
    assert container_processes() == []
