"""The firewall role's address filters (what the preflight refuses and what goes into the nft
sets, per family) and its one fragment template, fed by the redis, sentinel and flower roles."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import jinja2
import pytest
import yaml
from ansible.module_utils.parsing.convert_bool import boolean

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


# --- the fragment template (roles/firewall/templates/etc/celery-ha/firewall.d/fragment.nft.j2)

ROLES = REPO / "ansible/roles"
# As the template module renders: trim_blocks on, the trailing newline kept.
_env = jinja2.Environment(
    loader=jinja2.FileSystemLoader(ROLES / "firewall/templates"),
    trim_blocks=True,
    keep_trailing_newline=True,
    undefined=jinja2.StrictUndefined,
)
_env.filters.update(bool=lambda v: boolean(v, strict=False), firewall_networks=fw.firewall_networks)
LAB_VARS = {
    "cluster_redis_port": 6379,
    "cluster_sentinel_port": 26379,
    "flower_proxy_port": 5555,
    "flower_allowed_sources": ["10.88.16.1"],
    "flower_queue_depth_port": 9808,
    "flower_queue_depth_enabled": True,
}


def fragment(role: str, **overrides: object) -> str:
    """Render the fragment the way ROLE's tasks/main.yml asks for it."""
    tasks = yaml.safe_load((ROLES / role / "tasks/main.yml").read_text())
    [task] = [
        t
        for t in tasks
        if t.get("ansible.builtin.include_role", {}).get("tasks_from") == "fragment"
    ]
    context = {**LAB_VARS, **overrides}

    def resolve(value: object) -> object:
        if isinstance(value, str) and "{{" in value:
            [expr] = value.removeprefix("{{").removesuffix("}}").split("}}")
            return _env.compile_expression(expr.strip())(**context)
        return value

    rules = [
        {k: resolve(v) for k, v in rule.items()} for rule in task["vars"]["firewall_fragment_rules"]
    ]
    assert task["vars"]["firewall_fragment_name"] == role
    return _env.get_template("etc/celery-ha/firewall.d/fragment.nft.j2").render(
        ansible_managed="Ansible managed",
        firewall__table="celery_ha",
        firewall_fragment_rules=rules,
    )


def clients_rules(port: int) -> str:
    return (
        f"add rule inet celery_ha input tcp dport {port} ip saddr @clients_v4 accept\n"
        f"add rule inet celery_ha input tcp dport {port} ip6 saddr @clients_v6 accept\n"
        f"add rule inet celery_ha input tcp dport {port} reject with tcp reset\n"
    )


# The files the per-role templates wrote before the one entry point (read on a converged lab):
# the same bytes, so a converged cluster is left unchanged.
def test_redis_and_sentinel_fragments_open_their_port_to_the_client_sets() -> None:
    why = (
        " only for the cluster's hosts and firewall_client_addresses (the\n"
        "# sets of firewall.nft); anyone else gets a TCP reset at once instead of a hanging"
        " connect.\n"
    )
    assert fragment("redis") == (
        "# Ansible managed\n# Redis (cluster_redis_port)" + why + clients_rules(6379)
    )
    assert fragment("sentinel") == (
        "# Ansible managed\n# Sentinel (cluster_sentinel_port)" + why + clients_rules(26379)
    )


FLOWER_HEAD = (
    "# Ansible managed\n"
    "# Flower's nginx (flower_proxy_port) only for flower_allowed_sources; anyone else gets a TCP\n"
    "# reset at once. Prometheus scrapes /metrics and the queue depth through this port too.\n"
)
EXPORTER = (
    "# The exporter listens on loopback and is published by nginx: nobody else ever needs"
    " its port.\n"
    "add rule inet celery_ha input tcp dport 9808 reject with tcp reset\n"
)


def test_flower_fragment_opens_its_port_to_the_allowed_sources_only() -> None:
    assert fragment("flower") == (
        FLOWER_HEAD
        + "add rule inet celery_ha input tcp dport 5555 ip saddr { 10.88.16.1 } accept\n"
        + "add rule inet celery_ha input tcp dport 5555 reject with tcp reset\n"
        + EXPORTER
    )


def test_flower_fragment_per_family_nobody_and_no_exporter() -> None:
    both = fragment(
        "flower",
        flower_allowed_sources=["2001:db8::/64", "10.0.5.7/24", "10.0.0.1"],
        flower_queue_depth_enabled=False,
    )
    assert both == (
        FLOWER_HEAD
        + "add rule inet celery_ha input tcp dport 5555 ip saddr { 10.0.0.1, 10.0.5.0/24 } accept\n"
        + "add rule inet celery_ha input tcp dport 5555 ip6 saddr { 2001:db8::/64 } accept\n"
        + "add rule inet celery_ha input tcp dport 5555 reject with tcp reset\n"
    )
    # No allowed source: the port is rejected for everyone (loopback only, see firewall.nft).
    nobody = fragment("flower", flower_allowed_sources=[])
    assert nobody == (
        FLOWER_HEAD
        + "add rule inet celery_ha input tcp dport 5555 reject with tcp reset\n"
        + EXPORTER
    )
