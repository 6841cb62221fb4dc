"""Address filters of the firewall role: Jinja in ansible-core has no IP address support,
and a wrong address must be refused by the preflight, not by nft on a host."""

from __future__ import annotations

import ipaddress

FAMILIES = {"ipv4": 4, "ipv6": 6}


def _network(value: object) -> ipaddress.IPv4Network | ipaddress.IPv6Network | None:
    # strict=False: 10.0.0.5/24 means the network 10.0.0.0/24, as nft reads it too.
    try:
        return ipaddress.ip_network(str(value).strip(), strict=False)
    except ValueError:
        return None


def firewall_invalid_addresses(values: list) -> list:
    """The entries that are not an IPv4/IPv6 address or network (empty list: all good)."""
    return [value for value in values if _network(value) is None]


def firewall_networks(values: list, family: str) -> list[str]:
    """The entries of one family ('ipv4' or 'ipv6'), normalised, deduplicated, sorted; a
    single address stays an address (no /32), as nft lists it."""
    version = FAMILIES[family]
    networks = {net for net in map(_network, values) if net is not None and net.version == version}
    return [
        str(net.network_address) if net.prefixlen == net.max_prefixlen else str(net)
        for net in sorted(networks)
    ]


class FilterModule:
    def filters(self) -> dict:
        return {
            "firewall_invalid_addresses": firewall_invalid_addresses,
            "firewall_networks": firewall_networks,
        }
