"""The firewall role's address filters: what the preflight refuses and what goes into the
nft sets, per family."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
_spec = importlib.util.spec_from_file_location(
    "firewall_addresses", REPO / "ansible/roles/firewall/filter_plugins/firewall_addresses.py"
)
assert _spec and _spec.loader
fw = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(fw)


@pytest.mark.parametrize(
    "bad",
    ["redis1.example.com", "10.0.0.256", "10.0.0.0/33", "fe80:::1", "", "2001:db8::/129", "1.2.3"],
)
def test_invalid_addresses_are_reported(bad: str) -> None:
    assert fw.firewall_invalid_addresses(["10.0.0.1", bad]) == [bad]


def test_valid_addresses_pass() -> None:
    good = ["10.0.0.1", "10.0.5.0/24", "10.0.0.5/24", "2001:db8::7", "2001:db8::/64", "::1"]
    assert fw.firewall_invalid_addresses(good) == []


def test_networks_split_by_family_normalised_and_deduplicated() -> None:
    values = ["10.0.0.5/24", "10.0.0.0/24", "192.0.2.9", "192.0.2.9/32", "2001:db8::7", "fd00::/8"]
    assert fw.firewall_networks(values, "ipv4") == ["10.0.0.0/24", "192.0.2.9"]
    assert fw.firewall_networks(values, "ipv6") == ["2001:db8::7", "fd00::/8"]
    assert fw.firewall_networks([], "ipv6") == []
