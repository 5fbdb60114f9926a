"""netvm's state in a namespace, by name, for before/after comparisons."""

from __future__ import annotations

from typing import Any

from netvm.backends.base import FILTER, NAT, Backend


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
            )
            for link in links
        ),
        "addresses": sorted((names[a.index], str(a.interface)) for a in backend.list_addresses()),
        "ip_forward": backend.get_ip_forward(),
        "rules": {
            table: {chain: backend.list_rules(table, chain) for chain in backend.list_chains(table)}
            for table in (FILTER, NAT)
        },
    }
