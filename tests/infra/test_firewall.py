"""The host firewall as deployed by roles/firewall and the fragments of the redis, sentinel
and flower roles: the unit, the table in the kernel, the rules per port. What the rules do
to real connections is proven in tests/e2e/test_firewall.py."""

from __future__ import annotations

import pytest

TABLE = "inet celery_ha"
MAIN = "/etc/celery-ha/firewall.nft"
PORTS = {"redis": [6379], "sentinel": [26379], "flower": [5555, 9808]}


@pytest.fixture
def fw_host(host, lab_groups: dict[str, list[str]]) -> str:
    name = host.backend.get_hostname()
    if not any(name in lab_groups.get(group, []) for group in PORTS):
        pytest.skip(f"{name} runs neither Redis, Sentinel nor Flower: no firewall")
    return name


def table(host) -> str:
    out = host.run(f"nft list table {TABLE}")
    assert out.rc == 0, f"table {TABLE} is not loaded: {out.stderr}"
    return out.stdout


def test_unit_enabled_and_active(host, fw_host: str) -> None:
    unit = host.service("celery-ha-firewall.service")
    assert unit.is_enabled
    assert unit.is_running
    # The distribution's nftables.service flushes the whole ruleset: never enabled by us.
    assert not host.service("nftables.service").is_enabled


def test_main_file_validates(host, fw_host: str) -> None:
    assert host.file(MAIN).user == "root"
    out = host.run(f"nft -c -f {MAIN}")
    assert out.rc == 0, out.stderr


def test_policy_accept_and_loopback_allowed(host, fw_host: str) -> None:
    rules = table(host)
    assert "type filter hook input priority filter; policy accept;" in rules
    assert 'iif "lo" accept' in rules
    # Only the bundle's own ports are ever rejected: ssh never appears.
    assert "dport 22" not in rules and "dport ssh" not in rules


def test_each_port_is_rejected_for_everyone_else(
    host, fw_host: str, lab_groups: dict[str, list[str]]
) -> None:
    rules = table(host)
    expected = [p for group, ports in PORTS.items() if fw_host in lab_groups[group] for p in ports]
    for port in expected:
        assert f"tcp dport {port} reject with tcp reset" in rules, port
    for group in ("redis", "sentinel"):
        if fw_host in lab_groups[group]:
            port = PORTS[group][0]
            assert f"tcp dport {port} ip saddr @clients_v4 accept" in rules
            assert f"tcp dport {port} ip6 saddr @clients_v6 accept" in rules


def test_clients_are_the_cluster_hosts_and_the_extra_addresses(
    host, fw_host: str, lab_groups: dict[str, list[str]], lab_addresses: dict[str, str]
) -> None:
    out = host.check_output(f"nft -j list set {TABLE} clients_v4")
    cluster = {
        lab_addresses[h]
        for g in ("redis", "sentinel", "celery_workers", "celery_beat", "flower")
        for h in lab_groups.get(g, [])
    }
    controller = next(iter(lab_addresses.values())).rsplit(".", 1)[0] + ".1"
    for address in cluster | {controller}:
        probe = host.run(f"nft get element {TABLE} clients_v4 '{{ {address} }}'")
        assert probe.rc == 0, f"{address} is not allowed to reach Redis/Sentinel: {out}"
