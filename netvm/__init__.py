"""netvm: host networking for microVMs, straight through netlink, netfilter and TUN ioctls."""

from netvm.backends.base import Address, Backend, Firewall, Link, Rule, TapOptions
from netvm.backends.fake import FakeBackend, FakeState
from netvm.backends.kernel import KernelBackend
from netvm.config import NetworkConfig
from netvm.errors import (
    ConfigError,
    ConflictError,
    DeviceExists,
    HostError,
    NetvmError,
    NotFound,
    PermissionDenied,
    SubnetExhausted,
)
from netvm.manager import Attachment, NetworkManager
from netvm.naming import VmNetwork

__all__ = [
    "Address",
    "Attachment",
    "Backend",
    "ConfigError",
    "ConflictError",
    "DeviceExists",
    "FakeBackend",
    "FakeState",
    "Firewall",
    "HostError",
    "KernelBackend",
    "Link",
    "NetvmError",
    "NetworkConfig",
    "NetworkManager",
    "NotFound",
    "PermissionDenied",
    "Rule",
    "SubnetExhausted",
    "TapOptions",
    "VmNetwork",
]
