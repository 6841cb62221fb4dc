"""The programs the celery role runs (roles/celery/files): the controller's fingerprint and
wheel build, and on the hosts the app check and the celery command with settings on stdin.
Each is run here as the role runs it: same interpreter kind, environment, stdin, arguments."""

from __future__ import annotations

import hashlib
import importlib.util
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
    base = {"GIT_URL": "", "GIT_REF": "", "PACKAGE": ""}
    return run_script("celery-ha-fingerprint", {**sources(trees), **base, **env})


def test_fingerprint_is_the_hash_of_the_lines_it_shows(trees: dict[str, Path]) -> None:
    run = fingerprint(trees, EXTRA="gevent redis", MODE="wheelhouse")
    assert run.returncode == 0, run.stderr
    lines = run.stderr.splitlines()
    assert [line.split()[0] for line in lines] == ["boot", "app", "extra", "mode"]
    assert lines[2] == "extra gevent redis"
    # No Python in it: in wheelhouse mode the role adds each host's (tasks/install.yml).
    assert lines[3] == "mode wheelhouse"
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


# --- a wheelhouse for another Python: celery_ha_python_target.py, celery_ha_wheel_tags.py

TRIXIE = {
    "abiflags": "",
    "implementation": "cpython",
    "libc": "glibc-2.41",
    "machine": "x86_64",
    "platform": "linux-x86_64",
    "version": "3.13.5",
}


def wheel_tags_module():
    spec = importlib.util.spec_from_file_location("wheel_tags", FILES / "celery_ha_wheel_tags.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_python_target_is_what_the_wheels_and_markers_depend_on() -> None:
    program = (FILES / "celery_ha_python_target.py").read_text()
    # As the role runs it: python -c PROGRAM, with no help from the environment.
    run = subprocess.run(
        [sys.executable, "-I", "-c", program], capture_output=True, text=True, check=True
    )
    target = json.loads(run.stdout)
    assert target["version"] == platform.python_version()
    assert target["platform"] == sysconfig.get_platform()
    assert target["implementation"] == "cpython"
    assert target["libc"].startswith("glibc-2.")
    assert set(target) == set(TRIXIE)


def test_wheel_tags_accept_what_the_hosts_pip_would_install() -> None:
    tags = wheel_tags_module()
    target = tags.parse_target(json.dumps(TRIXIE))
    fit = [
        "celery-5.6.3-py3-none-any.whl",
        "tzdata-2026.6-py2.py3-none-any.whl",
        "wcwidth-0.9.5-cp310-abi3-manylinux2014_x86_64.manylinux_2_17_x86_64.whl",
        "x-1-cp313-cp313-manylinux_2_41_x86_64.whl",
        "x-1-cp313-cp313-manylinux1_x86_64.whl",
        "x-1-1build-py313-none-any.whl",
    ]
    unfit = [
        "x-1-cp311-cp311-manylinux_2_17_x86_64.whl",  # another CPython's ABI
        "x-1-cp313-cp313-manylinux_2_42_x86_64.whl",  # a newer glibc than the host's
        "x-1-cp313-cp313-linux_x86_64.whl",  # built here, for this controller only
        "x-1-cp313-cp313t-manylinux_2_17_x86_64.whl",  # the free-threaded build
        "x-1-cp313-cp313-manylinux_2_17_aarch64.whl",
        "x-1-cp314-abi3-manylinux_2_17_x86_64.whl",  # needs a newer Python
        "x-1-py2-none-any.whl",
    ]
    assert tags.unfit(target, fit + unfit) == unfit
    assert "manylinux_2_41_x86_64" in tags.platforms(target)
    assert "manylinux_2_42_x86_64" not in tags.platforms(target)


def test_wheel_tags_tell_pip_and_uv_the_hosts_python() -> None:
    tags = wheel_tags_module()
    target = tags.parse_target(json.dumps(TRIXIE))
    pip_args = tags.pip_args(target)
    assert pip_args[:6] == ["--implementation", "cp", "--python-version", "3.13", "--abi", "cp313"]
    assert pip_args[6:8] == ["--platform", "manylinux_2_41_x86_64"]
    assert pip_args[-2:] == ["--platform", "manylinux1_x86_64"]
    # uv resolves for the full version (python_full_version markers); its newest manylinux
    # name stands in for a newer glibc.
    assert tags.uv_args(target) == [
        "--python-version", "3.13.5", "--python-platform", "x86_64-manylinux_2_40",
    ]  # fmt: skip
    bookworm = tags.parse_target(json.dumps({**TRIXIE, "version": "3.11.2", "libc": "glibc-2.36"}))
    assert tags.uv_args(bookworm)[-1] == "x86_64-manylinux_2_36"


@pytest.mark.parametrize(
    ("change", "reason"),
    [
        ({"implementation": "pypy"}, "pypy is not CPython"),
        ({"libc": "musl-1.2"}, "is not glibc 2.x"),
        ({"version": "3.14.0rc1"}, "is not a release X.Y.Z"),
        ({"machine": "mips"}, "has no manylinux wheels"),
    ],
)
def test_wheel_tags_refuse_a_target_they_cannot_serve(change: dict, reason: str) -> None:
    run = subprocess.run(
        [sys.executable, str(FILES / "celery_ha_wheel_tags.py"), "pip-args",
         json.dumps({**TRIXIE, **change})],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 3
    assert reason in run.stderr
    assert run.stdout == ""


def test_wheel_tags_check_names_the_wheels_that_do_not_fit(tmp_path: Path) -> None:
    wheels = ["a-1-py3-none-any.whl", "b-2-cp311-cp311-manylinux_2_17_x86_64.whl"]
    run = subprocess.run(
        [sys.executable, str(FILES / "celery_ha_wheel_tags.py"), "check", json.dumps(TRIXIE),
         *(str(tmp_path / w) for w in wheels)],
        capture_output=True, text=True, check=False,
    )  # fmt: skip
    assert run.returncode == 1
    assert run.stderr.strip() == f"{wheels[1]} does not install on the host's Python"


# --- celery-ha-build-wheels, cross: a builder venv whose pip and uv only record and fake

CROSS_PYTHON = """\
#!/bin/bash
# A builder venv's python: runs .py programs (the tags) with the real Python; fakes pip.
[[ $1 == *.py ]] && exec "$REAL_PYTHON" "$@"
printf '%s|' "$@" >>"$LOG" && echo >>"$LOG"
[[ $1 == -m && $2 == pip ]] || exit 2
cmd=$3; shift 3
out= dest= reqs=
while (($#)); do
    case $1 in
        -w) out=$2; shift 2 ;;
        -d) dest=$2; shift 2 ;;
        -r) reqs=$2; shift 2 ;;
        --implementation | --python-version | --abi | --platform) shift 2 ;;
        -*) shift ;;
        *) src=$1; shift ;;
    esac
done
case $cmd in
    install) ;;
    download) # a wheel for every pin, an sdist only for the *sdist ones
        while IFS== read -r name _ version; do
            case $name in
                *sdist) touch "$dest/$name-$version.tar.gz" ;;
                *) touch "$dest/$name-$version-py3-none-any.whl" ;;
            esac
        done <"$reqs" ;;
    wheel) # a pure sdist builds py3-none-any, the C one for this controller only
        name=$(basename "$src"); name=${name%.tar.gz}; name=${name%.whl}
        case $name in
            csdist-*) touch "$out/$name-cp311-cp311-linux_x86_64.whl" ;;
            *) mkdir -p "$out" && touch "$out/$name-0-py3-none-any.whl" ;;
        esac ;;
esac
"""


# uv pip compile ... -o RESOLVED REQUIREMENTS: our own wheel, two pins and UV_MORE.
FAKE_UV = """\
#!/bin/bash
printf '%s|' "$@" >>"$LOG.uv" && echo >>"$LOG.uv"
printf '%s\\n' "app @ file:///x/app.whl" "dep==1.0" "puresdist==2.0" ${UV_MORE:-} >"${@: -2:1}"
"""


@pytest.fixture
def cross_builder(tmp_path: Path) -> Path:
    venv = tmp_path / "builder"
    (venv / "bin").mkdir(parents=True)
    for name, text in (("python", CROSS_PYTHON), ("uv", FAKE_UV)):
        (venv / "bin" / name).write_text(text)
        (venv / "bin" / name).chmod(0o755)
    return venv


def cross_build(trees, builder: Path, tmp_path: Path, **env: str):
    return build(
        trees, builder, tmp_path, MODE="wheelhouse", BUILD="cross", TARGET=json.dumps(TRIXIE),
        TAGS=str(FILES / "celery_ha_wheel_tags.py"), UV="uv==0.13.9",
        REAL_PYTHON=sys.executable, **env,
    )  # fmt: skip


def test_cross_build_resolves_for_the_hosts_python_and_fetches_its_wheels(
    trees, cross_builder, tmp_path: Path
) -> None:
    run = cross_build(trees, cross_builder, tmp_path, EXTRA="gevent")
    assert run.returncode == 0, run.stderr
    assert sorted(p.name for p in (tmp_path / "out/wheels").iterdir()) == [
        "app-0-py3-none-any.whl",
        "boot-0-py3-none-any.whl",
        "dep-1.0-py3-none-any.whl",
        "puresdist-2.0-0-py3-none-any.whl",  # built from its sdist, pure Python
    ]
    uv = (tmp_path / "pip.log.uv").read_text().splitlines()
    assert len(uv) == 1
    assert "|--python-version|3.13.5|--python-platform|x86_64-manylinux_2_40|" in uv[0]
    calls = pip_calls(tmp_path)
    assert calls[2] == "-m|pip|install|-q|uv==0.13.9|"
    download = next(c for c in calls if "|download|" in c)
    # Exactly the pinned releases, without our own wheels, for the host's tags, no resolving.
    assert "|--no-deps|--implementation|cp|--python-version|3.13|--abi|cp313|" in download
    assert f"|-r|{tmp_path}/out.tmp/src/dependencies.txt|" in download
    assert not (tmp_path / "out/src").exists()


def test_cross_build_refuses_a_wheel_that_does_not_fit_the_host(
    trees, cross_builder, tmp_path: Path
) -> None:
    run = cross_build(trees, cross_builder, tmp_path, UV_MORE="csdist==3.0")
    assert run.returncode == 1
    assert (
        "csdist-3.0-cp311-cp311-linux_x86_64.whl does not install on the host's Python"
        in run.stderr
    )
    assert "celery_controller_python, celery_wheelhouse_build: native" in run.stderr
    assert not (tmp_path / "out").exists()
