"""Fixtures of the end-to-end tests: a host with an uplink to a small internet, netvm on it.

Every namespace is made here and deleted afterwards; only TEST-NET addresses are used
(192.0.2.0/24 for the VMs, 203.0.113.0/24 for the uplink and the internet host).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterator

import pytest

from netvm import KernelBackend, NetworkConfig, NetworkManager
from netvm.testing import Topology, internet_topology


@pytest.fixture
def topology() -> Iterator[Topology]:
    with internet_topology("eth0", prefix="netvm-e2e-") as topo:
        yield topo


@pytest.fixture(params=["nftables", "iptables"])
def e2e_config(config: NetworkConfig, request: pytest.FixtureRequest) -> NetworkConfig:
    """The shared test config, with the egress named like the topology's uplink, on each
    firewall in turn."""
    return dataclasses.replace(config, host_egress_iface="eth0", firewall=request.param)


@pytest.fixture
def net(e2e_config: NetworkConfig, host_backend: KernelBackend) -> Iterator[NetworkManager]:
    """A NetworkManager on the host namespace, after ensure_host()."""
    with NetworkManager(e2e_config, host_backend) as manager:
        manager.ensure_host()
        yield manager
