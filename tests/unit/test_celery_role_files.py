"""The programs the celery role runs (roles/celery/files): the controller's fingerprint and
wheel build, and on the hosts the app check and the celery command with settings on stdin.
Each is run here as the role runs it: same interpreter kind, environment, stdin, arguments."""

from __future__ import annotations

import hashlib
import json
import os
import platform
import subprocess
import sys
import sysconfig
import textwrap
from pathlib import Path

import pytest
from test_settings import GOOD

REPO = Path(__file__).resolve().parents[2]
FILES = REPO / "ansible/roles/celery/files"
PYTHONPATH = os.pathsep.join(str(REPO / p) for p in ("app/src", "app/boot/src"))


def run_script(name: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    """A controller-side program, with bash and only the environment the role gives it."""
    return subprocess.run(
        ["/bin/bash", str(FILES / name)],
        env={"PATH": os.environ["PATH"], **env},
        capture_output=True,
        text=True,
        check=False,
    )


# --- celery-ha-fingerprint


def make_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(text)
    return root


@pytest.fixture
def trees(tmp_path: Path) -> dict[str, Path]:
    return {
        "boot": make_tree(tmp_path / "boot", {"pyproject.toml": "b", "src/boot.py": "x = 1\n"}),
        "app": make_tree(tmp_path / "app", {"pyproject.toml": "a", "src/app/tasks.py": "t\n"}),
    }


def sources(trees: dict[str, Path]) -> dict[str, str]:
    """What both programs are given: a local app, no extras, installed online."""
    return {
        "BOOT": str(trees["boot"]),
        "APP": str(trees["app"]),
        "SOURCE": "local",
        "EXTRA": "",
        "MODE": "online",
    }


def fingerprint(trees: dict[str, Path], **env: str) -> subprocess.CompletedProcess[str]:
    base = {"GIT_URL": "", "GIT_REF": "", "PACKAGE": "", "PY": sys.executable}
    return run_script("celery-ha-fingerprint", {**sources(trees), **base, **env})


def test_fingerprint_is_the_hash_of_the_lines_it_shows(trees: dict[str, Path]) -> None:
    run = fingerprint(trees, EXTRA="gevent redis", MODE="wheelhouse")
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    assert [line.split()[0] for line in lines] == ["boot", "app", "extra", "mode"]
    assert lines[2] == "extra gevent redis"
    # The role compares this line with the host's Python before shipping a wheelhouse.
    here = f"{platform.python_version()} {sysconfig.get_platform()}"
    assert lines[3] == f"mode wheelhouse {here}"
    assert run.stdout.strip() == hashlib.sha256(run.stderr.encode()).hexdigest()[:16]
    assert fingerprint(trees, EXTRA="gevent redis", MODE="wheelhouse").stdout == run.stdout


def test_fingerprint_ignores_build_leftovers_but_not_sources(trees: dict[str, Path]) -> None:
    before = fingerprint(trees).stdout
    make_tree(
        trees["app"],
        {
            "src/app/__pycache__/tasks.cpython-311.pyc": "junk",
            "build/lib/app/tasks.py": "old",
            "dist/app-1.0.whl": "old",
            "src/app.egg-info/PKG-INFO": "x",
            ".pytest_cache/v/x": "x",
            "src/app/stale.pyc": "x",
        },
    )
    assert fingerprint(trees).stdout == before
    (trees["app"] / "src/app/tasks.py").write_text("t2\n")
    changed = fingerprint(trees).stdout
    assert changed != before
    (trees["boot"] / "src/new.py").write_text("")
    assert fingerprint(trees).stdout not in (before, changed)


def test_fingerprint_of_a_package_and_of_a_pinned_git_commit(trees: dict[str, Path]) -> None:
    run = fingerprint(trees, SOURCE="package", PACKAGE="myapp==1.2")
    assert run.stderr.splitlines()[1] == "package myapp==1.2"
    commit = "0123456789abcdef0123456789abcdef01234567"
    # A full commit id is taken as it is: no git call, so no network.
    run = fingerprint(trees, SOURCE="git", GIT_URL="https://nowhere.invalid/x.git", GIT_REF=commit)
    assert run.returncode == 0, run.stderr
    assert run.stderr.splitlines()[1] == f"git https://nowhere.invalid/x.git@{commit}"


def test_fingerprint_resolves_a_git_branch_or_tag(trees: dict[str, Path], tmp_path: Path) -> None:
    repo = tmp_path / "repo"
    git = ["git", "-C", str(repo), "-c", "user.name=t", "-c", "user.email=t@t"]
    subprocess.run(["git", "init", "-q", "-b", "main", str(repo)], check=True)
    (repo / "f").write_text("1")
    subprocess.run([*git, "add", "f"], check=True)
    subprocess.run([*git, "commit", "-q", "-m", "one"], check=True)
    subprocess.run([*git, "tag", "-a", "v1", "-m", "v1"], check=True)
    head = subprocess.run(
        [*git, "rev-parse", "HEAD"], capture_output=True, text=True, check=True
    ).stdout.strip()
    for ref in ("main", "v1"):  # an annotated tag: the commit, not the tag object
        run = fingerprint(trees, SOURCE="git", GIT_URL=str(repo), GIT_REF=ref)
        assert run.returncode == 0, run.stderr
        assert run.stderr.splitlines()[1] == f"git {repo}@{head}"
    run = fingerprint(trees, SOURCE="git", GIT_URL=str(repo), GIT_REF="nosuch")
    assert run.returncode != 0
    assert f"celery_app_git_version nosuch not found in {repo}" in run.stderr


# --- celery-ha-build-wheels, with a builder venv whose pip only records what it is asked

FAKE_PYTHON = """\
#!/bin/bash
# A builder venv's python: logs "-m pip wheel ..." calls (arguments |-separated) and writes
# one wheel per source.
printf '%s|' "$@" >>"$LOG" && echo >>"$LOG"
[[ $1 == -m && $2 == pip && $3 == wheel ]] || exit 2
[[ -n ${FAIL_ON:-} && $* == *$FAIL_ON* ]] && exit 1
shift 3
out=
while (($#)); do
    case $1 in
        -w) out=$2; shift 2 ;;
        -q | --no-deps) shift ;;
        *) src=$1; shift
           [[ -d $src ]] && ls -A "$src" | tr '\\n' ' ' >>"$LOG.trees" && echo >>"$LOG.trees"
           mkdir -p "$out" && touch "$out/$(basename "$src" .whl)-0-py3-none-any.whl" ;;
    esac
done
"""


@pytest.fixture
def builder(tmp_path: Path) -> Path:
    venv = tmp_path / "builder"
    (venv / "bin").mkdir(parents=True)
    (venv / "bin/python").write_text(FAKE_PYTHON)
    (venv / "bin/python").chmod(0o755)
    return venv


def build(trees, builder: Path, tmp_path: Path, **env: str) -> subprocess.CompletedProcess[str]:
    base = {
        "OUT": str(tmp_path / "out"),
        "BUILDER": str(builder),
        "PY": "/nonexistent/python",  # the builder venv exists: never needed
        "REQ": "",
        "LOG": str(tmp_path / "pip.log"),
    }
    return run_script("celery-ha-build-wheels", {**sources(trees), **base, **env})


def pip_calls(tmp_path: Path) -> list[str]:
    return (tmp_path / "pip.log").read_text().splitlines()


def test_build_local_app_from_clean_scratch_copies(trees, builder, tmp_path: Path) -> None:
    make_tree(trees["app"], {"build/lib/old.py": "", "src/app.egg-info/PKG-INFO": ""})
    run = build(trees, builder, tmp_path)
    assert run.returncode == 0, run.stderr
    out = tmp_path / "out"
    assert sorted(p.name for p in (out / "app").iterdir()) == [
        "app-0-py3-none-any.whl",
        "boot-0-py3-none-any.whl",
    ]
    assert sorted(p.name for p in out.iterdir()) == ["app"]  # no scratch sources left
    assert not (tmp_path / "out.tmp").exists()
    # Built from copies without the leftovers; the sources themselves are untouched.
    assert (tmp_path / "pip.log.trees").read_text().splitlines() == [
        "pyproject.toml src ",
        "pyproject.toml src ",
    ]
    assert (trees["app"] / "build/lib/old.py").exists()
    assert all("|--no-deps|" in call for call in pip_calls(tmp_path))


def test_build_wheelhouse_has_every_dependency_and_each_extra(trees, builder, tmp_path) -> None:
    run = build(
        trees, builder, tmp_path, SOURCE="package", REQ="myapp==1.2", MODE="wheelhouse",
        EXTRA="redis >= 5, < 9\ngevent",
    )  # fmt: skip
    assert run.returncode == 0, run.stderr
    calls = pip_calls(tmp_path)
    assert len(calls) == 3
    assert calls[1].endswith(f"|--no-deps|-w|{tmp_path}/out.tmp/app|myapp==1.2|")
    # Every dependency (no --no-deps) of our wheels; each extra requirement one argument.
    wheels = f"{tmp_path}/out.tmp/app/"
    assert calls[2] == (
        f"-m|pip|wheel|-q|-w|{tmp_path}/out.tmp/wheels|{wheels}boot-0-py3-none-any.whl|"
        f"{wheels}myapp==1.2-0-py3-none-any.whl|redis >= 5, < 9|gevent|"
    )
    assert (tmp_path / "out/wheels").is_dir()


def test_build_online_package_ships_only_boot(trees, builder, tmp_path: Path) -> None:
    run = build(trees, builder, tmp_path, SOURCE="git", REQ="git+https://x@abc")
    assert run.returncode == 0, run.stderr
    assert len(pip_calls(tmp_path)) == 1  # the hosts install the app from its source
    assert [p.name for p in (tmp_path / "out/app").iterdir()] == ["boot-0-py3-none-any.whl"]


def test_a_failed_build_leaves_no_output(trees, builder, tmp_path: Path) -> None:
    run = build(trees, builder, tmp_path, FAIL_ON="src/app")
    assert run.returncode != 0
    assert not (tmp_path / "out").exists()
    # The next attempt starts from scratch and succeeds.
    assert build(trees, builder, tmp_path).returncode == 0
    assert (tmp_path / "out/app/app-0-py3-none-any.whl").exists()


# --- the host-side programs, run as python -c PROGRAM ARGS with the settings on stdin


def run_on_host(program: str, *args: str, settings: dict[str, str]) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if not k.startswith("CELERY_HA_")}
    return subprocess.run(
        [sys.executable, "-c", (FILES / program).read_text(), *args],
        input=json.dumps(settings),
        env={**env, "PYTHONPATH": PYTHONPATH},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )


def test_app_check_lists_the_queues_the_app_routes_to(tmp_path: Path) -> None:
    (tmp_path / "routed_app.py").write_text(
        textwrap.dedent(
            """
            from celery import Celery
            from kombu import Queue
            app = Celery("routed")
            app.conf.task_routes = [
                {"a.*": {"queue": "alpha"}, "b": "beta"},
                {"c": {"queue": Queue("gamma")}},
            ]
            """
        )
    )
    settings = {**GOOD, "CELERY_HA_APP": "routed_app", "PYTHONPATH": str(tmp_path)}
    env_path = f"{tmp_path}{os.pathsep}{PYTHONPATH}"
    run = subprocess.run(
        [sys.executable, "-c", (FILES / "celery_ha_app_check.py").read_text(), "routed_app"],
        input=json.dumps(settings),
        env={**os.environ, "PYTHONPATH": env_path},
        capture_output=True,
        text=True,
        check=False,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr
    queues = json.loads(run.stdout)
    assert {"alpha", "beta", "gamma"} <= set(queues)
    assert queues == sorted(queues)


def test_app_check_names_a_module_that_does_not_load() -> None:
    run = run_on_host("celery_ha_app_check.py", "no_such_app", settings=GOOD)
    assert run.returncode == 1
    assert "celery_app_module='no_such_app' cannot be loaded from" in run.stderr
    assert GOOD["CELERY_HA_REDIS_PASSWORD"] not in run.stderr


def test_app_check_refuses_settings_celery_ha_boot_rejects() -> None:
    run = run_on_host(
        "celery_ha_app_check.py",
        "celery_ha_app",
        settings={**GOOD, "CELERY_HA_SENTINELS": "not an endpoint"},
    )
    assert run.returncode != 0
    assert "CELERY_HA_SENTINELS" in run.stderr


def test_stdin_env_runs_celery_with_the_settings_from_stdin() -> None:
    run = run_on_host("celery_ha_stdin_env.py", "-A", "celery_ha_boot", "report", settings=GOOD)
    assert run.returncode == 0, run.stderr
    # The broker URL is celery_ha_boot's, built from the settings that came on stdin.
    assert "sentinel://" in run.stdout
    assert "10.0.0.11:26379" in run.stdout


def test_the_preflight_refuses_what_the_workers_would() -> None:
    """The celery role's preflight (vars, validate.yml, argument_specs: static YAML that cannot
    import Python) carries copies of celery_ha_settings' limits: they must be the same."""
    import yaml
    from celery_ha_settings import _APP_RE, MAX_CONCURRENCY, MAX_PREFETCH, WORKER_POOLS

    role = REPO / "ansible/roles/celery"
    role_vars = yaml.safe_load((role / "vars/main.yml").read_text())
    assert role_vars["celery__pools"] == list(WORKER_POOLS)
    assert role_vars["celery__max_concurrency"] == MAX_CONCURRENCY
    assert role_vars["celery__max_prefetch"] == MAX_PREFETCH
    specs = yaml.safe_load((role / "meta/argument_specs.yml").read_text())
    pool = specs["argument_specs"]["main"]["options"]["celery_workers"]["options"]["pool"]
    assert pool["choices"] == list(WORKER_POOLS)
    validate = (role / "tasks/validate.yml").read_text()
    # The same pattern, in Ansible's `match` (the regex with one group fewer ?: ).
    assert f"celery_app_module is match('{_APP_RE.pattern.replace('(?:', '(')}')" in validate
