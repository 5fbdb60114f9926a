"""NetworkConfig: what netvm manages, validated once, on construction."""

from __future__ import annotations

import ipaddress
import os
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Literal, get_args

from netvm.errors import ConfigError
from netvm.policy import GuestPolicy

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
ENV_FIREWALL = "MICROVM_NETWORK_FIREWALL"
ENV_GUEST_POLICY = "MICROVM_NETWORK_GUEST_POLICY"

FirewallChoice = Literal["auto", "nftables", "iptables"]
FIREWALL_CHOICES: tuple[FirewallChoice, ...] = get_args(FirewallChoice)
DEFAULT_FIREWALL: FirewallChoice = "auto"
FIREWALL_RULE = "one of auto, nftables, iptables"

IFNAMSIZ = 16
# The MTU range that both a bridge and a TAP accept (measured on Linux 6.18).
MIN_MTU = 68
MAX_MTU = 65521
MAX_PREFIX = 30

IFNAME_RULE = (
    "1 to 15 characters from A-Z a-z 0-9 _ . - (not starting with '-' or '.', "
    "not 'all' or 'default'): a name netvm writes into firewall rules must match only itself"
)
# Stricter than the kernel (dev_valid_name): in iptables a trailing '+' is a wildcard and a
# leading '!' a negation, in nftables a trailing '*' is a wildcard; quotes and escapes mean
# something to one tool or another. These characters mean nothing to any of them.
_IFNAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,14}")
# The kernel refuses these (EINVAL): they are directories of /proc/sys/net/ipv4/conf.
_RESERVED_IFNAMES = frozenset({"all", "default"})
SUBNET_RULE = f"an IPv4 network in CIDR form with no host bits set, /{MAX_PREFIX} or larger"
# Ranges whose addresses the kernel or the firewall treat as something other than a unicast
# host on a link: a VM network there is unreachable, or captures traffic meant elsewhere.
UNUSABLE_NETWORKS: tuple[tuple[ipaddress.IPv4Network, str], ...] = (
    (ipaddress.IPv4Network("0.0.0.0/8"), "'this network'"),
    (ipaddress.IPv4Network("127.0.0.0/8"), "loopback"),
    (ipaddress.IPv4Network("169.254.0.0/16"), "link-local"),
    (ipaddress.IPv4Network("224.0.0.0/4"), "multicast"),
    (ipaddress.IPv4Network("240.0.0.0/4"), "reserved, with the broadcast address"),
)
USABLE_SUBNET_RULE = (
    "a unicast IPv4 network outside "
    + ", ".join(f"{net} ({what})" for net, what in UNUSABLE_NETWORKS)
    + ", e.g. part of 10.0.0.0/8, 172.16.0.0/12 or 192.168.0.0/16"
)
MTU_RULE = f"an integer from {MIN_MTU} to {MAX_MTU}"
STATE_DIR_RULE = "a non-empty directory path, as text that UTF-8 can encode, without NUL"


def validate_ifname(field_name: str, value: object) -> str:
    """Check an interface name: one the kernel takes and no firewall reads as a pattern."""
    if not isinstance(value, str):
        raise ConfigError(field_name, value, IFNAME_RULE)
    name = str.__str__(value)  # a str subclass as the plain str it holds (naming.py)
    if _IFNAME.fullmatch(name) is None or name in _RESERVED_IFNAMES:
        raise ConfigError(field_name, value, IFNAME_RULE)
    return name


def parse_firewall(field_name: str, value: object) -> FirewallChoice:
    for choice in FIREWALL_CHOICES:
        if value == choice:
            return choice
    raise ConfigError(field_name, value, FIREWALL_RULE)


def parse_guest_policy(field_name: str, value: str) -> GuestPolicy:
    """A default guest policy in `GuestPolicy.describe()`'s words. Port forwards are
    refused: a host port can be forwarded to one VM only, so it is never a default."""
    policy = GuestPolicy.parse(value, field_name)
    if policy.port_forwards:
        raise ConfigError(
            field_name, value, "no forward=: a host port goes to one VM, give it per attach"
        )
    return policy


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
    for unusable, what in UNUSABLE_NETWORKS:
        if net.overlaps(unusable):
            raise ConfigError(
                field_name, value, f"{USABLE_SUBNET_RULE} ({net} overlaps {unusable}, {what})"
            )
    return net


def parse_mtu(field_name: str, value: object) -> int:
    """An MTU from an int, or from the decimal text of one (an environment variable)."""
    number = value
    if isinstance(value, str):
        text = value.strip()
        # ASCII digits only: int() also reads the digits of other scripts (Arabic-Indic,
        # Devanagari...), which no kernel interface or configuration file means.
        number = int(text) if text.isascii() and text.isdigit() and len(text) <= 6 else None
    if not isinstance(number, int) or isinstance(number, bool):
        raise ConfigError(field_name, value, MTU_RULE)
    if not MIN_MTU <= number <= MAX_MTU:
        raise ConfigError(field_name, value, MTU_RULE)
    return number


def parse_state_dir(field_name: str, value: object) -> Path:
    """A directory path that every later use can take: os calls, and SQLite (UTF-8)."""
    if not isinstance(value, str | Path):
        raise ConfigError(field_name, value, STATE_DIR_RULE)
    text = str(value)
    if not text or "\x00" in text:
        raise ConfigError(field_name, value, STATE_DIR_RULE)
    try:
        text.encode()
    except UnicodeEncodeError:
        raise ConfigError(field_name, value, STATE_DIR_RULE) from None
    # Absolute now: the bridge's mark records the store by its path, which must not depend
    # on the working directory of each later call.
    return Path(value).absolute()  # not os.path.abspath: ".." after a symlink is the kernel's


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
    firewall: FirewallChoice
    """Which firewall holds netvm's rules: "auto" picks what the host already uses."""
    guest_policy: GuestPolicy | None
    """The guarantees of a VM attached without a policy of its own. None: anti-spoofing
    where the firewall can give it (nftables), nothing more (docs/firewall.md)."""

    def __init__(
        self,
        bridge_name: str = DEFAULT_BRIDGE,
        vm_subnet: ipaddress.IPv4Network | str = DEFAULT_SUBNET,
        host_egress_iface: str = DEFAULT_EGRESS,
        mtu: int = DEFAULT_MTU,
        state_dir: Path | str = DEFAULT_STATE_DIR,
        firewall: FirewallChoice = DEFAULT_FIREWALL,
        guest_policy: GuestPolicy | None = None,
    ) -> None:
        bridge_name = validate_ifname("bridge_name", bridge_name)
        host_egress_iface = validate_ifname("host_egress_iface", host_egress_iface)
        if bridge_name == host_egress_iface:
            raise ConfigError(
                "host_egress_iface", host_egress_iface, "must differ from bridge_name"
            )
        if isinstance(mtu, str):
            raise ConfigError("mtu", mtu, MTU_RULE)
        object.__setattr__(self, "bridge_name", bridge_name)
        object.__setattr__(self, "vm_subnet", parse_subnet("vm_subnet", vm_subnet))
        object.__setattr__(self, "host_egress_iface", host_egress_iface)
        object.__setattr__(self, "mtu", parse_mtu("mtu", mtu))
        object.__setattr__(self, "state_dir", parse_state_dir("state_dir", state_dir))
        object.__setattr__(self, "firewall", parse_firewall("firewall", firewall))
        if guest_policy is not None and not isinstance(guest_policy, GuestPolicy):
            raise ConfigError("guest_policy", guest_policy, "a GuestPolicy or None")
        if guest_policy is not None and guest_policy.port_forwards:
            raise ConfigError(
                "guest_policy",
                guest_policy.describe(),
                "no port forwards: a host port goes to one VM, give it per attach",
            )
        object.__setattr__(self, "guest_policy", guest_policy)

    @classmethod
    def from_env(cls, environ: Mapping[str, str] | None = None) -> NetworkConfig:
        """Read MICROVM_NETWORK_{BRIDGE,SUBNET,EGRESS,MTU,STATE_DIR,FIREWALL,GUEST_POLICY}.

        Unset means the default; a set but invalid value (an empty one included) raises
        ConfigError naming the variable, the value and what is allowed.
        """
        env = os.environ if environ is None else environ
        bridge = env.get(ENV_BRIDGE)
        subnet = env.get(ENV_SUBNET)
        egress = env.get(ENV_EGRESS)
        mtu = env.get(ENV_MTU)
        state_dir = env.get(ENV_STATE_DIR)
        firewall = env.get(ENV_FIREWALL)
        guest_policy = env.get(ENV_GUEST_POLICY)
        bridge_name = DEFAULT_BRIDGE if bridge is None else validate_ifname(ENV_BRIDGE, bridge)
        egress_name = DEFAULT_EGRESS if egress is None else validate_ifname(ENV_EGRESS, egress)
        if bridge_name == egress_name:
            if egress is None:
                raise ConfigError(
                    ENV_BRIDGE, bridge, f"must differ from {DEFAULT_EGRESS}, the egress"
                )
            raise ConfigError(ENV_EGRESS, egress, "must differ from the bridge's name")
        return cls(
            bridge_name=bridge_name,
            vm_subnet=parse_subnet(ENV_SUBNET, DEFAULT_SUBNET if subnet is None else subnet),
            host_egress_iface=egress_name,
            mtu=DEFAULT_MTU if mtu is None else parse_mtu(ENV_MTU, mtu),
            state_dir=(
                DEFAULT_STATE_DIR
                if state_dir is None
                else parse_state_dir(ENV_STATE_DIR, state_dir)
            ),
            firewall=(
                DEFAULT_FIREWALL if firewall is None else parse_firewall(ENV_FIREWALL, firewall)
            ),
            guest_policy=(
                None if guest_policy is None else parse_guest_policy(ENV_GUEST_POLICY, guest_policy)
            ),
        )

    @property
    def gateway(self) -> ipaddress.IPv4Interface:
        """The bridge's address: the subnet's first host, with the subnet's prefix."""
        net = self.vm_subnet
        return ipaddress.IPv4Interface((net.network_address + 1, net.prefixlen))
