"""celery-ha: the wheel tags of a host's Python, for a wheelhouse built on a controller whose
Python is another one (files/celery-ha-build-wheels, celery_wheelhouse_build: cross).

TARGET is what files/celery_ha_python_target.py printed on the host (JSON). Standard library
only: it runs with the controller's Python, whatever its version.

  celery_ha_wheel_tags.py pip-args TARGET     pip download's target options, one a line
  celery_ha_wheel_tags.py uv-args TARGET      uv pip compile's, one a line
  celery_ha_wheel_tags.py check TARGET WHEEL...
      exit 1, naming them, when a wheel does not install on that Python

Only CPython on glibc Linux is a target (Debian's python3); anything else is refused with
the reason, so that the role can tell the user to build on a matching controller instead.
"""

from __future__ import annotations

import json
import re
import sys
from pathlib import Path

# The oldest glibc of each manylinux architecture (PEP 600) and the legacy aliases.
OLDEST_GLIBC_MINOR = {
    "x86_64": 5,
    "i686": 5,
    "aarch64": 17,
    "ppc64le": 17,
    "s390x": 17,
    "armv7l": 17,
}
LEGACY = {(2, 17): "manylinux2014", (2, 12): "manylinux2010", (2, 5): "manylinux1"}
# The newest manylinux uv's --python-platform names (uv 0.13); an older glibc tag only narrows
# what the resolution may pick, every wheel it picks still fits the host.
UV_NEWEST_GLIBC_MINOR = 40


class TargetError(ValueError):
    """The target is not one this cross build can serve."""


def parse_target(text: str) -> dict:
    target = json.loads(text)
    if target.get("implementation") != "cpython":
        raise TargetError(f"{target.get('implementation')} is not CPython")
    if not re.fullmatch(r"\d+\.\d+\.\d+", target.get("version", "")):
        raise TargetError(f"Python version {target.get('version')!r} is not a release X.Y.Z")
    libc = re.fullmatch(r"glibc-2\.(\d+)", target.get("libc", ""))
    if not libc:
        raise TargetError(f"C library {target.get('libc')!r} is not glibc 2.x")
    if target.get("machine") not in OLDEST_GLIBC_MINOR:
        raise TargetError(f"machine {target.get('machine')!r} has no manylinux wheels")
    target["glibc_minor"] = int(libc.group(1))
    major, minor, _ = target["version"].split(".")
    target["major"], target["minor"] = int(major), int(minor)
    return target


def platforms(target: dict) -> list[str]:
    """Every platform tag a wheel for this host may carry, newest first (as pip ranks them)."""
    arch = target["machine"]
    tags = []
    for glibc_minor in range(target["glibc_minor"], OLDEST_GLIBC_MINOR[arch] - 1, -1):
        tags.append(f"manylinux_2_{glibc_minor}_{arch}")
        if (2, glibc_minor) in LEGACY:
            tags.append(f"{LEGACY[2, glibc_minor]}_{arch}")
    return tags


def abi(target: dict) -> str:
    return f"cp{target['major']}{target['minor']}{target['abiflags']}"


def pip_args(target: dict) -> list[str]:
    args = [
        "--implementation", "cp",
        "--python-version", f"{target['major']}.{target['minor']}",
        "--abi", abi(target),
    ]  # fmt: skip
    for platform in platforms(target):
        args += ["--platform", platform]
    return args


def uv_args(target: dict) -> list[str]:
    glibc_minor = min(target["glibc_minor"], UV_NEWEST_GLIBC_MINOR)
    if glibc_minor < 17 or target["machine"] not in ("x86_64", "aarch64"):
        raise TargetError(
            f"uv names no manylinux platform for {target['machine']} glibc 2.{glibc_minor}"
        )
    return [
        "--python-version", target["version"],
        "--python-platform", f"{target['machine']}-manylinux_2_{glibc_minor}",
    ]  # fmt: skip


def supported(target: dict) -> set[tuple[str, str, str]]:
    """The (interpreter, abi, platform) tags the host's pip accepts (packaging.tags' rules)."""
    major, minor = target["major"], target["minor"]
    own = f"cp{major}{minor}"
    plats = platforms(target)
    tags = {(own, abi(target), p) for p in plats}
    tags |= {(own, "none", p) for p in plats}
    if not target["abiflags"].count("t"):  # the free-threaded build has no stable ABI
        tags |= {(f"cp{major}{m}", "abi3", p) for m in range(2, minor + 1) for p in plats}
    pure = [f"py{major}{m}" for m in range(minor, -1, -1)] + [f"py{major}"]
    tags |= {(py, "none", p) for py in pure for p in [*plats, "any"]}
    tags.add((own, "none", "any"))
    return tags


def wheel_tags(name: str) -> set[tuple[str, str, str]]:
    """The tags a wheel's file name declares (dot-separated sets expanded)."""
    parts = name.removesuffix(".whl").split("-")
    if not name.endswith(".whl") or len(parts) not in (5, 6):
        raise ValueError(f"{name} is not a wheel file name")
    pys, abis, plats = (part.split(".") for part in parts[-3:])
    return {(py, a, p) for py in pys for a in abis for p in plats}


def unfit(target: dict, wheels: list[str]) -> list[str]:
    ok = supported(target)
    return [w for w in wheels if not wheel_tags(Path(w).name) & ok]


def main(argv: list[str]) -> int:
    if len(argv) < 2 or argv[0] not in ("pip-args", "uv-args", "check"):
        print(__doc__, file=sys.stderr)
        return 2
    try:
        target = parse_target(argv[1])
        if argv[0] == "check":
            bad = unfit(target, argv[2:])
            for wheel in bad:
                print(f"{Path(wheel).name} does not install on the host's Python", file=sys.stderr)
            return 1 if bad else 0
        print("\n".join(pip_args(target) if argv[0] == "pip-args" else uv_args(target)))
    except TargetError as err:
        print(
            f"cannot build a wheelhouse for this host from another Python: {err}", file=sys.stderr
        )
        return 3
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
