"""NetworkConfig: what netvm manages, validated once, on construction."""

from __future__ import annotations

import ipaddress
import os
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from netvm.errors import ConfigError

DEFAULT_BRIDGE = "fcbr0"
DEFAULT_SUBNET = "172.30.0.0/24"
DEFAULT_EGRESS = "eth0"
DEFAULT_MTU = 1500
DEFAULT_STATE_DIR = Path("/run/netvm")

ENV_BRIDGE = "MICROVM_NETWORK_BRIDGE"
ENV_SUBNET = "MICROVM_NETWORK_SUBNET"
ENV_EGRESS = "MICROVM_NETWORK_EGRESS"
ENV_MTU = "MICROVM_NETWORK_MTU"
ENV_STATE_DIR = "MICROVM_NETWORK_STATE_DIR"

IFNAMSIZ = 16
# The MTU range that both a bridge and a TAP accept (measured on Linux 6.18).
MIN_MTU = 68
MAX_MTU = 65521
MAX_PREFIX = 30

IFNAME_RULE = "1 to 15 bytes, not '.' or '..', without '/', ':' or white space"
SUBNET_RULE = f"an IPv4 network in CIDR form with no host bits set, /{MAX_PREFIX} or larger"
MTU_RULE = f"an integer from {MIN_MTU} to {MAX_MTU}"


def validate_ifname(field_name: str, value: object) -> str:
    """Check a Linux interface name against the kernel's own rule (dev_valid_name)."""
    if not isinstance(value, str):
        raise ConfigError(field_name, value, IFNAME_RULE)
    size = len(value.encode())
    bad_char = any(c in "/:\0" or c.isspace() for c in value)
    if not 0 < size < IFNAMSIZ or value in (".", "..") or bad_char:
        raise ConfigError(field_name, value, IFNAME_RULE)
    return value


def parse_subnet(field_name: str, value: object) -> ipaddress.IPv4Network:
    """Parse a VM subnet: IPv4, host bits clear, room for a gateway and one guest."""
    if isinstance(value, ipaddress.IPv4Network):
        net = value
    elif isinstance(value, str):
        try:
            parsed = ipaddress.ip_network(value.strip(), strict=True)
        except ValueError as exc:
            raise ConfigError(field_name, value, f"{SUBNET_RULE} ({exc})") from None
        if not isinstance(parsed, ipaddress.IPv4Network):
            raise ConfigError(field_name, value, f"{SUBNET_RULE} (IPv6 is not supported)")
        net = parsed
    else:
        raise ConfigError(field_name, value, SUBNET_RULE)
    if net.prefixlen > MAX_PREFIX:
        raise ConfigError(
            field_name, value, f"{SUBNET_RULE} (a /{net.prefixlen} has no room for a guest)"
        )
    return net


def parse_mtu(field_name: str, value: object) -> int:
    """An MTU from an int, or from the decimal text of one (an environment variable)."""
    number = value
    if isinstance(value, str):
        text = value.strip()
        number = int(text) if text.isdigit() else None
    if not isinstance(number, int) or isinstance(number, bool):
        raise ConfigError(field_name, value, MTU_RULE)
    if not MIN_MTU <= number <= MAX_MTU:
        raise ConfigError(field_name, value, MTU_RULE)
    return number


@dataclass(frozen=True, init=False)
class NetworkConfig:
    """The host network netvm manages: one bridge, one subnet, one egress interface.

    `vm_subnet` may be given as a string and `state_dir` as a string; they are stored as an
    `ipaddress.IPv4Network` and a `Path`. Every field is checked here: a bad value raises
    ConfigError naming the field, the value and what is allowed.
    """

    bridge_name: str
    vm_subnet: ipaddress.IPv4Network
    host_egress_iface: str
    mtu: int
    state_dir: Path

    def __init__(
        self,
        bridge_name: str = DEFAULT_BRIDGE,
        vm_subnet: ipaddress.IPv4Network | str = DEFAULT_SUBNET,
        host_egress_iface: str = DEFAULT_EGRESS,
        mtu: int = DEFAULT_MTU,
        state_dir: Path | str = DEFAULT_STATE_DIR,
    ) -> None:
        validate_ifname("bridge_name", bridge_name)
        validate_ifname("host_egress_iface", host_egress_iface)
        if bridge_name == host_egress_iface:
            raise ConfigError(
                "host_egress_iface", host_egress_iface, "must differ from bridge_name"
            )
        if isinstance(mtu, str):
            raise ConfigError("mtu", mtu, MTU_RULE)
        if not isinstance(state_dir, str | Path) or not str(state_dir):
            raise ConfigError("state_dir", state_dir, "a non-empty directory path")
        object.__setattr__(self, "bridge_name", bridge_name)
        object.__setattr__(self, "vm_subnet", parse_subnet("vm_subnet", vm_subnet))
        object.__setattr__(self, "host_egress_iface", host_egress_iface)
        object.__setattr__(self, "mtu", parse_mtu("mtu", mtu))
        object.__setattr__(self, "state_dir", Path(state_dir))

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> NetworkConfig:
        """Read MICROVM_NETWORK_{BRIDGE,SUBNET,EGRESS,MTU,STATE_DIR}.

        Unset means the default; a set but invalid value (an empty one included) raises
        ConfigError naming the variable, the value and what is allowed.
        """
        env = os.environ if environ is None else environ
        bridge = env.get(ENV_BRIDGE)
        subnet = env.get(ENV_SUBNET)
        egress = env.get(ENV_EGRESS)
        mtu = env.get(ENV_MTU)
        state_dir = env.get(ENV_STATE_DIR)
        if state_dir is not None and not state_dir:
            raise ConfigError(ENV_STATE_DIR, state_dir, "a non-empty directory path")
        return cls(
            bridge_name=DEFAULT_BRIDGE if bridge is None else validate_ifname(ENV_BRIDGE, bridge),
            vm_subnet=parse_subnet(ENV_SUBNET, DEFAULT_SUBNET if subnet is None else subnet),
            host_egress_iface=(
                DEFAULT_EGRESS if egress is None else validate_ifname(ENV_EGRESS, egress)
            ),
            mtu=DEFAULT_MTU if mtu is None else parse_mtu(ENV_MTU, mtu),
            state_dir=DEFAULT_STATE_DIR if state_dir is None else Path(state_dir),
        )

    @property
    def gateway(self) -> ipaddress.IPv4Interface:
        """The bridge's address: the subnet's first host, with the subnet's prefix."""
        net = self.vm_subnet
        return ipaddress.IPv4Interface((net.network_address + 1, net.prefixlen))
