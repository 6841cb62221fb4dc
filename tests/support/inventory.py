"""The lab's generated INI inventory ($LAB_DIR/inventory.ini), read one way for every test."""

from __future__ import annotations

import re
from pathlib import Path


def read_inventory(path: Path) -> tuple[dict[str, list[str]], dict[str, str]]:
    """(group -> host names, host name -> ansible_host address). Sections such as
    [x:vars] or [x:children] hold no hosts and are skipped; # and ; start comments."""
    groups: dict[str, list[str]] = {}
    addresses: dict[str, str] = {}
    current: str | None = None
    for raw in path.read_text().splitlines():
        line = re.split(r"[#;]", raw, maxsplit=1)[0].strip()
        if not line:
            continue
        if line.startswith("[") and line.endswith("]"):
            current = line[1:-1]
            if ":" not in current:
                groups.setdefault(current, [])
            continue
        if current is None or ":" in current:
            continue
        name, *attrs = line.split()
        groups[current].append(name)
        for attr in attrs:
            key, _, value = attr.partition("=")
            if key == "ansible_host":
                addresses[name] = value
    return groups, addresses
