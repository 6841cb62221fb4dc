"""support.inventory reads the lab's generated inventory as Ansible does."""

from __future__ import annotations

from pathlib import Path

from support.inventory import read_inventory


def test_groups_and_addresses(tmp_path: Path) -> None:
    path = tmp_path / "inventory.ini"
    path.write_text(
        "# Generated\n[lab]\nnode1 ansible_host=10.88.0.11\nnode2 ansible_host=10.88.0.12 ; two\n\n"
        "[redis]\nnode1\nnode2  # the second\n\n[redis:vars]\nredis_port=6379\n\n"
        "[all:children]\nredis\n\n[spare]\n"
    )
    groups, addresses = read_inventory(path)
    assert groups == {"lab": ["node1", "node2"], "redis": ["node1", "node2"], "spare": []}
    assert addresses == {"node1": "10.88.0.11", "node2": "10.88.0.12"}
