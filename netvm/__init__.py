"""netvm: host networking for microVMs, straight through netlink, netfilter and TUN ioctls.

A bridge with a gateway address, IPv4 forwarding, NAT toward an egress interface, and one
TAP per VM with a leased address, a MAC and the kernel's `ip=` argument:

    from netvm import NetworkConfig, NetworkManager

    config = NetworkConfig(bridge_name="fcbr0", vm_subnet="172.30.0.0/24",
                           host_egress_iface="eth0")
    with NetworkManager(config) as net:      # as root, or with CAP_NET_ADMIN
        net.ensure_host()                    # bridge, gateway, ip_forward, NAT and rules
        vm = net.attach("vm-1")              # VmNetwork: tap_name, guest_ip, guest_mac...
        print(vm.tap_name, vm.guest_ip, vm.kernel_ip_arg())
        net.detach("vm-1")

Every error is a NetvmError naming what failed and what to do. The README has the rest:
the CLI (`netvm --help`), guest policies, firewalls, asyncio, the testing helpers.
"""

# The public names below are loaded on first use (PEP 562), so `import netvm` costs almost
# nothing and a command loads only what it needs: `from netvm import NetworkManager` loads
# the manager and the kernel backend, not the in-memory fake or the doctor. Type checkers
# see the names through the TYPE_CHECKING imports, which list the same names as `_LAZY`
# (tests/unit/test_exported_members.py holds the two lists and `__all__` equal).

from __future__ import annotations

import importlib

TYPE_CHECKING = False
"""typing.TYPE_CHECKING without importing typing (a few ms); type checkers take it as True."""

if TYPE_CHECKING:
    from typing import Any

    from netvm.attaching import AttachManyResult
    from netvm.backends.base import Address, Backend, Link, Rule, TapOptions
    from netvm.backends.fake import FakeBackend, FakeState
    from netvm.backends.kernel import KernelBackend
    from netvm.config import NetworkConfig
    from netvm.diagnosis import Finding, doctor
    from netvm.errors import (
        Closed,
        ConfigError,
        ConflictError,
        DeviceExists,
        HostError,
        NetvmError,
        NotFound,
        PermissionDenied,
        StateStoreError,
        SubnetExhausted,
        UsedAfterFork,
    )
    from netvm.firewall import BridgeFirewall, Firewall, FirewallRule
    from netvm.glue import (
        cloud_hypervisor_net,
        firecracker_boot_args,
        firecracker_network_interface,
        qemu_args,
        tap_options_for,
    )
    from netvm.manager import Attachment, NetworkManager
    from netvm.naming import VmNetwork
    from netvm.policy import EgressRule, GuestPolicy, PortForward
    from netvm.status import FirewallStatus, HostStatus, host_status

_LAZY: dict[str, str] = {
    "Address": "netvm.backends.base",
    "AttachManyResult": "netvm.attaching",
    "Attachment": "netvm.manager",
    "Backend": "netvm.backends.base",
    "BridgeFirewall": "netvm.firewall",
    "ConfigError": "netvm.errors",
    "ConflictError": "netvm.errors",
    "DeviceExists": "netvm.errors",
    "EgressRule": "netvm.policy",
    "FakeBackend": "netvm.backends.fake",
    "FakeState": "netvm.backends.fake",
    "Finding": "netvm.diagnosis",
    "Firewall": "netvm.firewall",
    "FirewallRule": "netvm.firewall",
    "FirewallStatus": "netvm.status",
    "GuestPolicy": "netvm.policy",
    "HostError": "netvm.errors",
    "HostStatus": "netvm.status",
    "KernelBackend": "netvm.backends.kernel",
    "Link": "netvm.backends.base",
    "NetvmError": "netvm.errors",
    "NetworkConfig": "netvm.config",
    "NetworkManager": "netvm.manager",
    "NotFound": "netvm.errors",
    "PermissionDenied": "netvm.errors",
    "PortForward": "netvm.policy",
    "Rule": "netvm.backends.base",
    "StateStoreError": "netvm.errors",
    "SubnetExhausted": "netvm.errors",
    "UsedAfterFork": "netvm.errors",
    "Closed": "netvm.errors",
    "TapOptions": "netvm.backends.base",
    "VmNetwork": "netvm.naming",
    "cloud_hypervisor_net": "netvm.glue",
    "doctor": "netvm.diagnosis",
    "firecracker_boot_args": "netvm.glue",
    "firecracker_network_interface": "netvm.glue",
    "host_status": "netvm.status",
    "qemu_args": "netvm.glue",
    "tap_options_for": "netvm.glue",
}
"""Public name -> the module that defines it."""

__all__ = [
    "Address",
    "AttachManyResult",
    "Attachment",
    "Backend",
    "BridgeFirewall",
    "Closed",
    "ConfigError",
    "ConflictError",
    "DeviceExists",
    "EgressRule",
    "FakeBackend",
    "FakeState",
    "Finding",
    "Firewall",
    "FirewallRule",
    "FirewallStatus",
    "GuestPolicy",
    "HostError",
    "HostStatus",
    "KernelBackend",
    "Link",
    "NetvmError",
    "NetworkConfig",
    "NetworkManager",
    "NotFound",
    "PermissionDenied",
    "PortForward",
    "Rule",
    "StateStoreError",
    "SubnetExhausted",
    "TapOptions",
    "UsedAfterFork",
    "VmNetwork",
    "cloud_hypervisor_net",
    "doctor",
    "firecracker_boot_args",
    "firecracker_network_interface",
    "host_status",
    "qemu_args",
    "tap_options_for",
]


def __getattr__(name: str) -> Any:
    """Load a public name on first use and keep it, so later lookups are plain globals.

    Any other name raises AttributeError, which is also what lets `from netvm import naming`
    fall through to importing the submodule.
    """
    if name == "__version__":
        from importlib.metadata import PackageNotFoundError, version

        try:
            found = version("netvm")
        except PackageNotFoundError:  # a checkout on sys.path, not installed
            found = "unknown"
        globals()[name] = found
        return found
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'netvm' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
