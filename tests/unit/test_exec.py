"""celery_ha_exec: systemd's EnvironmentFile= reading, for supervisord."""

from __future__ import annotations

from pathlib import Path

import celery_ha_exec
import pytest
from celery_ha_exec import EnvFileError, environment, read_env_file


def write(tmp_path: Path, name: str, text: str) -> Path:
    path = tmp_path / name
    path.write_text(text)
    return path


def test_env_file_as_the_role_writes_it(tmp_path: Path) -> None:
    path = write(
        tmp_path,
        "celery.env",
        "# managed\n"
        "; also a comment\n"
        "\n"
        "CELERY_HA_APP=celery_ha_app\n"
        "CELERY_HA_REDIS_PASSWORD='p@ss w$rd\"x'\n"
        'CELERY_HA_TASK_ROUTES=\'{"reports.*":"reports"}\'\n'
        'CELERY_HA_OTHER="a \\"b\\" \\\\ \\x"\n'
        "CELERY_HA_EMPTY=\n"
        "  CELERY_HA_SPACED = value  \n",
    )
    assert read_env_file(path) == {
        "CELERY_HA_APP": "celery_ha_app",
        "CELERY_HA_REDIS_PASSWORD": 'p@ss w$rd"x',
        "CELERY_HA_TASK_ROUTES": '{"reports.*":"reports"}',
        "CELERY_HA_OTHER": 'a "b" \\ \\x',
        "CELERY_HA_EMPTY": "",
        "CELERY_HA_SPACED": "value",
    }


@pytest.mark.parametrize(
    ("line", "fragment"),
    [
        ("no equals sign", "KEY=value"),
        ("1BAD=x", "KEY=value"),
        ("KEY='unterminated", "unterminated"),
        ("KEY='it's'", "single quote"),
    ],
)
def test_bad_lines_name_file_and_line(tmp_path: Path, line: str, fragment: str) -> None:
    path = write(tmp_path, "bad.env", f"# ok\n{line}\n")
    with pytest.raises(EnvFileError, match=rf"bad\.env:2: .*{fragment}"):
        read_env_file(path)


def test_worker_environment_order(tmp_path: Path) -> None:
    write(tmp_path, "celery.env", "CELERY_HA_LOG_LEVEL=WARNING\nCELERY_HA_WORKER_POOL=solo\n")
    write(tmp_path, "worker-reports.env", "CELERY_HA_WORKER_POOL=threads\n")
    env = environment("worker", "reports", {"PATH": "/usr/bin"}, config_dir=tmp_path)
    assert env["PATH"] == "/usr/bin"
    assert env["CELERY_HA_LOG_LEVEL"] == "WARNING"  # env file over unit default
    assert env["CELERY_HA_WORKER_POOL"] == "threads"  # instance file last
    assert env["CELERY_HA_WORKER_CONCURRENCY"] == "2"  # unit default


def test_missing_instance_file_fails(tmp_path: Path) -> None:
    write(tmp_path, "celery.env", "")
    with pytest.raises(FileNotFoundError):
        environment("worker", "nope", {}, config_dir=tmp_path)


@pytest.mark.parametrize("argv", [[], ["worker"], ["beat", "x"], ["bogus"], ["worker", "a", "b"]])
def test_usage(argv: list[str]) -> None:
    with pytest.raises(SystemExit, match="usage"):
        celery_ha_exec.main(argv)
