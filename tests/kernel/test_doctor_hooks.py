"""doctor on the kernel: the devices of netdev chains (which libnftables 1.0.6 lists
without them) are read from the kernel, and only a chain on the egress blocks."""

from __future__ import annotations

import subprocess

import pytest

from netvm import KernelBackend, NetworkConfig, NetworkManager, doctor
from netvm.firewall.nftables import NftablesFirewall

pytestmark = pytest.mark.privileged

NETDEV = """
table netdev hardening {
    chain on_egress {
        type filter hook ingress device "up0" priority 0; policy drop;
    }
    chain elsewhere {
        type filter hook ingress device "eth9" priority 0; policy drop;
    }
}
"""


def _run(netns: str, *command: str, stdin: str | None = None) -> None:
    subprocess.run(["ip", "netns", "exec", netns, *command], input=stdin, text=True, check=True)


def test_a_netdev_chain_is_read_with_its_device_and_blocks_only_on_the_egress(
    netns: str, config: NetworkConfig
) -> None:
    for name in ("up0", "eth9"):
        _run(netns, "ip", "link", "add", name, "type", "veth", "peer", "name", name + "p")
    _run(netns, "nft", "-f", "-", stdin=NETDEV)
    backend = KernelBackend(netns)
    try:
        with NetworkManager(config, backend) as manager:
            manager.ensure_host()
            firewall = backend.firewall("nftables")
            assert isinstance(firewall, NftablesFirewall)
            listed = [
                item["chain"]
                for item in firewall.ruleset()
                if "chain" in item and item["chain"]["family"] == "netdev"
            ]
            assert {chain["name"]: chain.get("dev") for chain in listed} == {
                "on_egress": "up0",
                "elsewhere": "eth9",
            }
            found = [f for f in doctor(manager) if f.code.startswith("foreign-hook")]
            assert [f.code for f in found] == ["foreign-hook-drop"]
            assert "chain on_egress" in found[0].message  # the control: not `elsewhere`
            assert found[0].blocking
            manager.teardown_host()
    finally:
        backend.close()
