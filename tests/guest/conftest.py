"""Fixtures of the real-guest tier: QEMU, a Debian kernel and busybox (installed with apt when
root and missing), the initramfs built once, and a host with an uplink to a small internet.

Skips, and when they become failures: this tier is privileged, so without CAP_NET_ADMIN it
skips (fails under NETVM_REQUIRE_PRIVILEGED=1, tests/conftest.py). A missing package that
cannot be installed (not root, no apt-get, apt fails) skips with apt's reason, and fails
under NETVM_REQUIRE_PRIVILEGED=1: CI is a root Debian machine where the install must work,
and a registry hiccup should be seen, not hidden. Only where QEMU truly cannot run (a host
that is not amd64, or QEMU unable to start an empty machine with the accelerator) does the
tier skip even in CI: that is a fact of the host, not a fault of the project.
"""

from __future__ import annotations

import os
import platform
from collections.abc import Iterator
from pathlib import Path
from typing import NoReturn

import pytest

from netvm import KernelBackend, NetworkConfig, NetworkManager
from netvm.testing import Topology, internet_topology
from netvm.testing.qemu import (
    GuestSetupError,
    GuestTools,
    build_initramfs,
    find_guest_tools,
    install_packages,
    missing_packages,
    module_paths,
    qemu_unusable,
)
from tests.required import cannot_run

ACCEL = os.environ.get("NETVM_GUEST_ACCEL", "tcg")
"""TCG unless told: this machine's /dev/kvm opens but a KVM guest never boots on it."""


def _cannot_set_up(reason: str) -> NoReturn:
    cannot_run("guest tier", reason)


@pytest.fixture(scope="session")
def guest_tools() -> GuestTools:
    if platform.machine() != "x86_64":
        pytest.skip(f"the guest tier boots an amd64 kernel; this host is {platform.machine()}")
    missing = missing_packages()
    if missing:
        if os.geteuid() != 0:
            _cannot_set_up(f"needs Debian packages {' '.join(missing)} (root installs them)")
        try:
            install_packages(missing)
        except GuestSetupError as exc:
            _cannot_set_up(str(exc))
    try:
        tools = find_guest_tools()
    except GuestSetupError as exc:
        _cannot_set_up(f"after installing: {exc}")
    reason = qemu_unusable(tools.qemu, ACCEL)
    if reason is not None:
        pytest.skip(reason)
    return tools


@pytest.fixture(scope="session")
def initramfs(guest_tools: GuestTools, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Busybox, the guest's /init and the kernel's virtio-net modules, built once per run."""
    dest = tmp_path_factory.mktemp("guest") / "initramfs.cpio.gz"
    return build_initramfs(dest, guest_tools.busybox, module_paths(guest_tools.kernel))


@pytest.fixture
def topology() -> Iterator[Topology]:
    with internet_topology("eth0", prefix="netvm-guest-") as topo:
        yield topo


@pytest.fixture
def guest_config(tmp_path: Path) -> NetworkConfig:
    return NetworkConfig(
        bridge_name="nvbr0",
        vm_subnet="192.0.2.0/24",
        host_egress_iface="eth0",
        mtu=1500,
        state_dir=tmp_path / "state",
    )


@pytest.fixture
def net(guest_config: NetworkConfig, host_backend: KernelBackend) -> Iterator[NetworkManager]:
    """netvm on the topology's host, after ensure_host()."""
    with NetworkManager(guest_config, host_backend) as manager:
        manager.ensure_host()
        yield manager
