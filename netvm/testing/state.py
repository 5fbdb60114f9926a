"""netvm's state in a namespace, by name, for before/after comparisons."""

from __future__ import annotations

import json
from typing import Any

from netvm.backends.base import FILTER, NAT, Backend, Rule
from netvm.firewall.nftables import NftablesFirewall

BUILTIN_CHAINS = {
    FILTER: {"INPUT", "FORWARD", "OUTPUT"},
    NAT: {"PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"},
}


def snapshot(backend: Backend) -> dict[str, Any]:
    """The state netvm cares about, by name (not index), for before/after comparisons."""
    links = backend.list_links()
    names = {link.index: link.name for link in links}
    return {
        "links": sorted(
            (
                link.name,
                link.kind,
                names.get(link.master) if link.master else None,
                link.mtu,
                link.up,
                link.alias,
                link.tap,
                link.accept_ra,
                link.address,
            )
            for link in links
        ),
        "addresses": sorted((names[a.index], str(a.interface)) for a in backend.list_addresses()),
        "ip_forward": backend.get_ip_forward(),
        "rules": legacy_rules(backend),
        "nftables": nftables_ruleset(backend),
    }


def legacy_rules(backend: Backend) -> dict[str, dict[str, list[Rule]]]:
    """The legacy tables' chains and rules. Only tables the kernel has instantiated are read
    (reading one would create it), and one without a rule counts as absent."""
    found: dict[str, dict[str, list[Rule]]] = {}
    for table in sorted(backend.legacy_tables() & {FILTER, NAT}):
        chains = {chain: backend.list_rules(table, chain) for chain in backend.list_chains(table)}
        if any(chains.values()) or set(chains) - BUILTIN_CHAINS[table]:
            found[table] = chains
    return found


def nftables_ruleset(backend: Backend) -> list[Any] | None:
    """The namespace's whole nftables ruleset (None where libnftables is missing)."""
    firewall = backend.firewall("nftables")
    if not isinstance(firewall, NftablesFirewall) or firewall.unavailable() is not None:
        return None
    return [_without_handles(item) for item in firewall.ruleset()]


def _without_handles(item: Any) -> Any:
    """Handles are numbered anew when a table is made again: the content is what counts."""
    if isinstance(item, dict):
        found = {k: _without_handles(v) for k, v in item.items() if k != "handle"}
        if isinstance(found.get("elem"), list):
            # A set's elements come in the order of its hash table: the content is what counts.
            found["elem"] = sorted(found["elem"], key=lambda e: json.dumps(e, sort_keys=True))
        return found
    if isinstance(item, list):
        return [_without_handles(v) for v in item]
    return item
