"""Which server a lab's cluster should run (cluster_redis_flavor) and that server's own names.

The expectation comes from the settings, never from what is found on the hosts: the lab's
group_vars when they set cluster_redis_flavor, else the documented default for the host's
Debian release (valkey on 13, redis on 12). So a host that runs the wrong server, or Valkey
behind redis-named shims, fails the checks instead of redefining them.
"""

from __future__ import annotations

import os
import re
from dataclasses import dataclass
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
RELEASES = {"bookworm": 12, "trixie": 13}


@dataclass(frozen=True)
class Flavor:
    name: str
    server_package: str
    sentinel_package: str
    tools_package: str
    server_unit: str
    sentinel_unit: str
    conf_dir: str
    server_conf: str
    sentinel_conf: str
    user: str
    data_dir: str
    server_binary: str
    sentinel_binary: str


FLAVORS = {
    "redis": Flavor(
        "redis", "redis-server", "redis-sentinel", "redis-tools", "redis-server.service",
        "redis-sentinel.service", "/etc/redis", "/etc/redis/redis.conf",
        "/etc/redis/sentinel.conf", "redis", "/var/lib/redis", "/usr/bin/redis-server",
        "/usr/bin/redis-sentinel",
    ),
    "valkey": Flavor(
        "valkey", "valkey-server", "valkey-sentinel", "valkey-tools", "valkey-server.service",
        "valkey-sentinel.service", "/etc/valkey", "/etc/valkey/valkey.conf",
        "/etc/valkey/sentinel.conf", "valkey", "/var/lib/valkey", "/usr/bin/valkey-server",
        "/usr/bin/valkey-sentinel",
    ),
}  # fmt: skip


def lab_dir() -> Path:
    return Path(os.environ.get("LAB_DIR") or REPO / ".lab")


def configured_flavor(directory: Path | None = None) -> str | None:
    """cluster_redis_flavor as the lab's group_vars set it, if they do."""
    path = (directory or lab_dir()) / "group_vars" / "all.yml"
    if not path.is_file():
        return None
    match = re.search(r"^cluster_redis_flavor:\s*(\w+)", path.read_text(), re.MULTILINE)
    return match.group(1) if match else None


def flavor_for_release(major: int, directory: Path | None = None) -> Flavor:
    """The flavor a host of this Debian release must run in this lab."""
    return FLAVORS[configured_flavor(directory) or ("valkey" if major >= 13 else "redis")]


def lab_release(directory: Path | None = None) -> int:
    """The Debian release the lab's hosts run (tests/lab/lab records it at `up`)."""
    path = (directory or lab_dir()) / "run" / "suite"
    suite = path.read_text().strip() if path.is_file() else "bookworm"
    return RELEASES[suite]


def lab_flavor(directory: Path | None = None) -> Flavor:
    return flavor_for_release(lab_release(directory), directory)
