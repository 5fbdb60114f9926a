"""netvm: host networking for microVMs, straight through netlink, netfilter and TUN ioctls."""

from netvm.backends.base import Address, Backend, Link, Rule, TapOptions
from netvm.backends.fake import FakeBackend, FakeState
from netvm.backends.kernel import KernelBackend
from netvm.config import NetworkConfig
from netvm.diagnosis import Finding, doctor
from netvm.errors import (
    ConfigError,
    ConflictError,
    DeviceExists,
    HostError,
    NetvmError,
    NotFound,
    PermissionDenied,
    StateStoreError,
    SubnetExhausted,
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
from netvm.status import FirewallStatus, HostStatus, host_status

__all__ = [
    "Address",
    "Attachment",
    "Backend",
    "BridgeFirewall",
    "ConfigError",
    "ConflictError",
    "DeviceExists",
    "FakeBackend",
    "FakeState",
    "Finding",
    "Firewall",
    "FirewallRule",
    "FirewallStatus",
    "HostError",
    "HostStatus",
    "KernelBackend",
    "Link",
    "NetvmError",
    "NetworkConfig",
    "NetworkManager",
    "NotFound",
    "PermissionDenied",
    "Rule",
    "StateStoreError",
    "SubnetExhausted",
    "TapOptions",
    "VmNetwork",
    "cloud_hypervisor_net",
    "doctor",
    "firecracker_boot_args",
    "firecracker_network_interface",
    "host_status",
    "qemu_args",
    "tap_options_for",
]
