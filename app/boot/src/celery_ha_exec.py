"""``celery-ha-exec worker NAME | beat | flower``: what supervisord runs.

supervisord has no EnvironmentFile=, so this does what systemd does for the units: read
/etc/celery-ha/celery.env (plus worker-NAME.env, beat.env or flower.env) with systemd's rules,
put the values in the environment, then exec the SAME celery command line as the unit, so the
process supervisord watches is celery itself (its PID, its signals).

The command lines here must match systemd/*.service ExecStart= word for word;
tests/unit/test_units.py compares them.
"""

from __future__ import annotations

import os
import socket
import sys
from collections.abc import Mapping, MutableMapping
from pathlib import Path

CONFIG_DIR = Path(os.environ.get("CELERY_HA_CONFIG_DIR", "/etc/celery-ha"))
STATE_DIR = "/var/lib/celery-ha"

# The same defaults as the units' Environment= lines; the env files override them.
DEFAULTS: dict[str, dict[str, str]] = {
    "worker": {
        "CELERY_HA_WORKER_QUEUES": "default",
        "CELERY_HA_WORKER_CONCURRENCY": "2",
        "CELERY_HA_WORKER_POOL": "prefork",
        "CELERY_HA_LOG_LEVEL": "INFO",
    },
    "beat": {"CELERY_HA_LOG_LEVEL": "INFO"},
    "flower": {
        "CELERY_HA_LOG_LEVEL": "INFO",
        "CELERY_HA_TASK_EVENTS": "false",
        "FLOWER_ADDRESS": "127.0.0.1",
        "FLOWER_PORT": "5556",
    },
}


class EnvFileError(ValueError):
    pass


def _unquote(value: str, where: str) -> str:
    """One value as systemd's EnvironmentFile= reads it (the subset the role writes: bare,
    '...' taken literally, or "..." with backslash escapes)."""
    if len(value) >= 2 and value[0] == value[-1] == "'":
        inner = value[1:-1]
        if "'" in inner:
            raise EnvFileError(f"{where}: a single quote inside '...' is not supported")
        return inner
    if len(value) >= 2 and value[0] == value[-1] == '"':
        out, chars = [], iter(value[1:-1])
        for ch in chars:
            if ch == "\\":
                nxt = next(chars, "")
                # systemd keeps the backslash unless it escapes one of these.
                out.append(nxt if nxt in '"\\`$\n' else "\\" + nxt)
            elif ch == '"':
                raise EnvFileError(f'{where}: unescaped " inside "..."')
            else:
                out.append(ch)
        return "".join(out)
    if value[:1] in ("'", '"'):
        raise EnvFileError(f"{where}: unterminated quote")
    if value.endswith("\\"):
        raise EnvFileError(f"{where}: line continuations are not supported")
    # Unquoted, systemd drops a backslash and keeps the character after it.
    out, chars = [], iter(value)
    for ch in chars:
        out.append(next(chars, "") if ch == "\\" else ch)
    return "".join(out)


def read_env_file(path: Path) -> dict[str, str]:
    """KEY=value lines; blank lines and lines starting with # or ; are comments."""
    return parse_env(path.read_text(), str(path))


def parse_env(text: str, source: str) -> dict[str, str]:
    """The lines of an env file (read from ``source``, named in errors), as systemd reads them."""
    env: dict[str, str] = {}
    for number, line in enumerate(text.splitlines(), start=1):
        stripped = line.strip()
        if not stripped or stripped[0] in "#;":
            continue
        where = f"{source}:{number}"
        key, sep, value = stripped.partition("=")
        key = key.strip()
        if not sep or not key.replace("_", "").isalnum() or key[0].isdigit():
            raise EnvFileError(f"{where}: not a KEY=value line")
        env[key] = _unquote(value.strip(), where)
    return env


def command(
    kind: str,
    instance: str | None,
    env: Mapping[str, str],
    bin_dir: str = "/opt/celery-ha/venv/bin",
    hostname: str | None = None,
) -> list[str]:
    """The argv of a unit's ExecStart=, with ${VAR} and %i/%H already substituted."""
    celery = f"{bin_dir}/celery"
    level = env["CELERY_HA_LOG_LEVEL"]
    if kind == "worker":
        if not instance:
            raise ValueError("worker needs an instance name")
        host = hostname or socket.gethostname()
        return [
            celery,
            "-A",
            "celery_ha_boot",
            "worker",
            f"--hostname={instance}@{host}",
            "--without-mingle",
            f"--queues={env['CELERY_HA_WORKER_QUEUES']}",
            f"--concurrency={env['CELERY_HA_WORKER_CONCURRENCY']}",
            f"--pool={env['CELERY_HA_WORKER_POOL']}",
            f"--loglevel={level}",
        ]
    if kind == "beat":
        return [
            celery,
            "-A",
            "celery_ha_boot",
            "beat",
            f"--schedule={STATE_DIR}/celerybeat-schedule",
            f"--loglevel={level}",
        ]
    if kind == "flower":
        return [
            celery,
            "-A",
            "celery_ha_boot",
            "flower",
            f"--loglevel={level}",
            f"--enable_events={env['CELERY_HA_TASK_EVENTS']}",
        ]
    raise ValueError(f"unknown program {kind!r} (worker NAME | beat | flower)")


def environment(
    kind: str, instance: str | None, base: MutableMapping[str, str], config_dir: Path = CONFIG_DIR
) -> MutableMapping[str, str]:
    """``base`` + defaults + env files, in the order the unit reads them."""
    files = [config_dir / "celery.env"]
    if kind == "worker":
        files.append(config_dir / f"worker-{instance}.env")
    elif kind == "beat":
        files.append(config_dir / "beat.env")
    elif kind == "flower":
        files.append(config_dir / "flower.env")
    env = base
    env.update(DEFAULTS.get(kind, {}))
    for path in files:
        env.update(read_env_file(path))
    return env


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if (
        not args
        or args[0] not in DEFAULTS
        or (args[0] == "worker") != (len(args) == 2)
        or len(args) > 2
    ):
        sys.exit("usage: celery-ha-exec worker NAME | beat | flower")
    kind, instance = args[0], (args[1] if len(args) == 2 else None)
    try:
        env = environment(kind, instance, dict(os.environ))
    except (OSError, EnvFileError) as exc:
        sys.exit(f"celery-ha-exec: {exc}")
    argv_ = command(kind, instance, env, bin_dir=str(Path(sys.executable).parent))
    os.execve(argv_[0], argv_, env)


if __name__ == "__main__":
    main()
