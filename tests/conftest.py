"""Fixtures shared by every test: backends (fake and kernel), configs, managers.

Tests marked `privileged` need CAP_NET_ADMIN, /dev/net/tun and Debian's iptables package;
without them they are skipped with the reason, except when NETVM_REQUIRE_PRIVILEGED=1 (CI),
where they fail, so that a broken privilege check cannot hide the kernel tests.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from netvm import FakeBackend, KernelBackend, NetworkConfig, NetworkManager
from netvm.backends.base import Backend
from netvm.testing import Topology, UdpEchoServer, kernel_unavailable, throwaway_netns
from tests.required import cannot_run


def pytest_runtest_setup(item: pytest.Item) -> None:
    if item.get_closest_marker("privileged") is None:
        return
    reason = kernel_unavailable()
    if reason is None:
        return
    cannot_run("privileged test", reason)


@pytest.fixture
def netns() -> Iterator[str]:
    """A fresh, randomly named network namespace, deleted afterwards."""
    with throwaway_netns("netvm-test-") as name:
        yield name


@pytest.fixture(params=["fake", pytest.param("kernel", marks=pytest.mark.privileged)])
def backend(request: pytest.FixtureRequest) -> Iterator[Backend]:
    """The same tests run on the in-memory model and on the kernel in a throwaway netns."""
    if request.param == "fake":
        yield FakeBackend()
        return
    with throwaway_netns("netvm-test-") as name:
        kernel = KernelBackend(name)
        try:
            yield kernel
        finally:
            kernel.close()


@pytest.fixture
def config(tmp_path: Path) -> NetworkConfig:
    return NetworkConfig(
        bridge_name="nvbr0",
        vm_subnet="192.0.2.0/24",
        host_egress_iface="up0",
        mtu=1500,
        state_dir=tmp_path / "state",
    )


@pytest.fixture
def manager(config: NetworkConfig, backend: Backend) -> Iterator[NetworkManager]:
    with NetworkManager(config, backend) as mgr:
        yield mgr


# Fixtures of the tiers with a host and a small internet (tests/e2e, tests/guest), each of
# which defines its own `topology`.


@pytest.fixture
def host_backend(topology: Topology) -> Iterator[KernelBackend]:
    backend = KernelBackend(topology.host_netns)
    try:
        yield backend
    finally:
        backend.close()


@pytest.fixture
def internet_host(topology: Topology) -> Iterator[UdpEchoServer]:
    """A UDP echo server on the internet host that records who sent each datagram."""
    with UdpEchoServer(topology.internet_netns, topology.internet.ip) as server:
        yield server
