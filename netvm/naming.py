"""Pure functions that turn a vm_id into names and addresses, and the VmNetwork value."""

from __future__ import annotations

import importlib
import ipaddress
import os
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from netvm.errors import ConfigError


def _sha256_constructor() -> Callable[[bytes], Any]:
    """hashlib loads OpenSSL (~4 ms of every `netvm` command): the interpreter's own SHA-256
    module first, as the standard library's random.py does for SHA-512 (named _sha256
    before Python 3.12, _sha2 since); hashlib where the build has neither."""
    for name in ("_sha256", "_sha2"):
        try:
            return importlib.import_module(name).sha256  # type: ignore[no-any-return]
        except (ImportError, AttributeError):
            continue
    import hashlib

    return hashlib.sha256


_SHA256 = _sha256_constructor()


def sha256_hex(data: bytes) -> str:
    return str(_SHA256(data).hexdigest())


TAP_PREFIX = "tap-"
MAX_VM_ID_LENGTH = 64
VM_ID_RULE = f"1 to {MAX_VM_ID_LENGTH} bytes (UTF-8) of printable characters without white space"
# A Linux bridge takes at most 1023 ports (BR_MAX_PORTS - 1); the 1024th enslave gets EXFULL.
MAX_BRIDGE_PORTS = 1023
# First octet of every guest MAC: locally administered (bit 1 set), unicast (bit 0 clear).
MAC_FIRST_OCTET = 0x02
# Second octet: a constant so that the remaining four octets can be the guest's IPv4 address,
# which makes the MAC unique on the bridge wherever the address is.
MAC_SECOND_OCTET = 0x6E


HOSTNAME_RULE = "1 to 64 characters: ASCII letters, digits, '-' and '.'"
DNS_RULE = "at most 2 servers (the kernel's dns0 and dns1)"


def check_hostname(hostname: object) -> str:
    """A host name the `ip=` argument can carry (ConfigError otherwise)."""
    if (
        not isinstance(hostname, str)
        or not 0 < len(hostname) <= 64
        or not all(c.isascii() and (c.isalnum() or c in "-.") for c in hostname)
    ):
        raise ConfigError("hostname", hostname, HOSTNAME_RULE)
    return str.__str__(hostname)


def check_guest_device(device: object) -> str:
    if (
        not isinstance(device, str)
        or not 0 < len(device.encode(errors="replace")) < 16
        or any(c in "/:" or c.isspace() or not c.isprintable() for c in device)
    ):
        raise ConfigError("device", device, "a guest interface name of 1 to 15 bytes")
    return str.__str__(device)


def check_dns_server(server: object) -> str:
    """A unicast IPv4 address: 0.0.0.0, 255.255.255.255 and multicast serve no one."""
    rule = "a unicast IPv4 address (not 0.0.0.0, 255.255.255.255 or multicast)"
    try:
        if not isinstance(server, (str, ipaddress.IPv4Address)):
            raise ValueError(server)
        address = ipaddress.IPv4Address(server)
    except ValueError:
        raise ConfigError("dns", server, rule) from None
    if address.is_unspecified or address.is_multicast or address == BROADCAST:
        raise ConfigError("dns", server, rule)
    return str(address)


BROADCAST = ipaddress.IPv4Address("255.255.255.255")


def validate_vm_id(vm_id: object) -> str:
    """Check a vm_id: text that the ifalias, the lease store and every output can carry.

    A lone surrogate (what undecodable bytes of argv or the environment become) has no
    UTF-8 form, so it is refused here rather than failing later in the kernel or SQLite.
    """
    if not isinstance(vm_id, str):
        raise ConfigError("vm_id", vm_id, VM_ID_RULE)
    # A str subclass is taken as the plain str it holds: its own methods (encode, hash,
    # comparison) could say something else than what the kernel and SQLite get.
    vm_id = str.__str__(vm_id)
    try:
        encoded = vm_id.encode()
    except UnicodeEncodeError:
        raise ConfigError("vm_id", vm_id, f"{VM_ID_RULE}; it has no UTF-8 form") from None
    if (
        not 0 < len(encoded) <= MAX_VM_ID_LENGTH
        or not vm_id.isprintable()
        or any(c.isspace() for c in vm_id)
    ):
        raise ConfigError("vm_id", vm_id, VM_ID_RULE)
    return vm_id


def validate_vm_ids(field: str, value: object) -> list[str]:
    """Check a collection of vm_ids; return them as a list (an iterator is read once).

    A str is refused rather than read as its characters (gc(keep="vm-a") would otherwise
    keep "v", "m", "-", "a" and remove vm-a).
    """
    if isinstance(value, str | bytes | bytearray | memoryview):
        kind = type(value).__name__
        raise ConfigError(field, value, f"a sequence of vm_ids, not a {kind}")
    if not isinstance(value, Iterable):
        raise ConfigError(field, value, "a sequence of vm_ids")
    return [validate_vm_id(item) for item in value]


def _digest(vm_id: str) -> bytes:
    """Stable across processes and Python runs (unlike the built-in hash())."""
    return bytes(_SHA256(vm_id.encode()).digest())


def tap_name(vm_id: str) -> str:
    """`tap-` and 11 hex digits of the vm_id's SHA-256: 15 characters, the kernel's maximum."""
    return TAP_PREFIX + _digest(validate_vm_id(vm_id)).hex()[:11]


PORT_GROUPS = (1 << 16, 1 << 20)
"""Link groups of the TAPs of netvm's bridges, one per bridge: apart from the groups that
administrators name (/etc/iproute2/group, small numbers), the reaper's (reaper.py) and those
of a bridge being created (host.py)."""


def port_group(bridge: str) -> int:
    """The link group netvm's TAPs on `bridge` are in, so that one rule can name them all:
    the bridge family has no `meta ibrname` on every kernel (nft_meta_bridge)."""
    low, high = PORT_GROUPS
    return low + int.from_bytes(_SHA256(bridge.encode()).digest()[:4], "big") % (high - low)


BRIDGE_ALIAS = "netvm-bridge"
"""The ifalias of a bridge netvm created before it recorded the subnet (still accepted)."""


def store_id(state_dir: os.PathLike[str] | str) -> str:
    """Eight hex digits that name a lease store: its state_dir, absolute, links resolved."""
    path = os.path.realpath(state_dir).encode(errors="surrogateescape")
    return sha256_hex(path)[:8]


def bridge_alias(subnet: ipaddress.IPv4Network, store: str | None = None) -> str:
    """The ifalias that marks a bridge as netvm's and records the subnet it serves and the
    lease store that leases its addresses (store_id): a manager with another state_dir
    would lease the same addresses again from a store of its own."""
    return f"{BRIDGE_ALIAS}:{subnet}" + (f":{store}" if store else "")


@dataclass(frozen=True)
class BridgeMark:
    """What a netvm bridge's ifalias says: the subnet (None for the older, bare mark) and
    the lease store (None for a mark from before netvm recorded it)."""

    subnet: ipaddress.IPv4Network | None
    store: str | None = None


def parse_bridge_alias(alias: str | None) -> BridgeMark | None:
    """The mark of a bridge netvm created, or None for any other alias."""
    if alias == BRIDGE_ALIAS:
        return BridgeMark(None)
    prefix = BRIDGE_ALIAS + ":"
    if alias is None or not alias.startswith(prefix):
        return None
    subnet, _, store = alias.removeprefix(prefix).partition(":")
    if store and not (len(store) == 8 and all(c in "0123456789abcdef" for c in store)):
        return None
    try:
        return BridgeMark(ipaddress.IPv4Network(subnet), store or None)
    except ValueError:
        return None


def tap_alias(bridge: str, vm_id: str, slot: int) -> str:
    """The ifalias that marks a TAP as netvm's for that bridge: its address slot and vm_id.

    The kernel then holds all a lease says, and a lost lease store is rebuilt from it.
    A bridge name has no ':' (config.validate_ifname), so the alias parses unambiguously.
    """
    return f"netvm:{bridge}:{slot}:{vm_id}"


DETACHING_MARK = "netvm-detaching:"


def detaching_alias(bridge: str, vm_id: str) -> str:
    """The ifalias of a TAP whose VM is detached and that is about to be deleted."""
    return f"{DETACHING_MARK}{bridge}:{vm_id}"


def retired_vm_id(alias: str | None) -> str | None:
    """The vm_id in a detaching mark of any bridge (a TAP that netvm retired and is about
    to delete), or None; a bridge name has no ':', so the first ':' after the mark ends it."""
    if alias is None or not alias.startswith(DETACHING_MARK):
        return None
    bridge, colon, vm_id = alias.removeprefix(DETACHING_MARK).partition(":")
    if not bridge or not colon:
        return None
    try:
        return validate_vm_id(vm_id)
    except ConfigError:
        return None


def detaching_vm_id(alias: str | None, bridge: str) -> str | None:
    """The vm_id in a detaching mark of `bridge` (detaching_alias), or None."""
    vm_id = retired_vm_id(alias)
    return vm_id if vm_id is not None and alias == detaching_alias(bridge, vm_id) else None


DETACHED_PREFIX = "nvdel"


def detached_name(index: int) -> str:
    """The name a detached TAP has until it is deleted: `nvdel` and its ifindex in hex
    (at most 13 characters). Unique while the device exists, it is no VM's TAP name, so
    the VM's own name is free for the next attach at once."""
    return f"{DETACHED_PREFIX}{index:x}"


@dataclass(frozen=True)
class TapMark:
    """What a netvm TAP's ifalias says. `slot` is None for TAPs made before netvm
    recorded it (alias `netvm:<bridge>:<vm_id>`)."""

    vm_id: str
    slot: int | None


def _named(vm_id: str, name: str | None) -> bool:
    """Whether `vm_id` is a valid vm_id whose TAP is called `name` (any name if None)."""
    try:
        return name is None or tap_name(vm_id) == name
    except ConfigError:
        return False


def parse_tap_alias(alias: str | None, bridge: str, name: str | None = None) -> TapMark | None:
    """The mark of a TAP netvm made for `bridge`, or None for any other device.

    With the TAP's `name`, the vm_id must hash to it, which also tells the current form
    (`netvm:<bridge>:<slot>:<vm_id>`) from the older one (`netvm:<bridge>:<vm_id>`) when a
    vm_id itself starts with digits and a colon.
    """
    prefix = f"netvm:{bridge}:"
    if not alias or not alias.startswith(prefix):
        return None
    rest = alias.removeprefix(prefix)
    head, colon, tail = rest.partition(":")
    if colon and head.isascii() and head.isdigit() and len(head) <= 4 and _named(tail, name):
        return TapMark(tail, int(head))
    if _named(rest, name):
        return TapMark(rest, None)
    return None


def vm_id_from_alias(alias: str | None, bridge: str, name: str | None = None) -> str | None:
    """The vm_id of a TAP that netvm made for `bridge`, or None for any other device."""
    mark = parse_tap_alias(alias, bridge, name)
    return None if mark is None else mark.vm_id


def guest_capacity(subnet: ipaddress.IPv4Network) -> int:
    """Guests one bridge can hold: the subnet's hosts less the gateway, at most 1023 ports."""
    return min(subnet.num_addresses - 3, MAX_BRIDGE_PORTS)


def capacity_reason(subnet: ipaddress.IPv4Network) -> str:
    hosts = subnet.num_addresses - 3
    if hosts > MAX_BRIDGE_PORTS:
        return (
            f"a Linux bridge takes at most {MAX_BRIDGE_PORTS} ports, "
            f"fewer than the subnet's {hosts} guest addresses"
        )
    return f"{subnet.num_addresses} addresses less network, gateway and broadcast"


def preferred_slot(vm_id: str, capacity: int) -> int:
    """The slot a vm_id gets when it is free, the same on every fresh host."""
    return int.from_bytes(_digest(vm_id)[:8], "big") % capacity


def guest_ip(subnet: ipaddress.IPv4Network, slot: int) -> ipaddress.IPv4Address:
    """Slot 0 is the address after the gateway; the broadcast address is never reached."""
    if not 0 <= slot < subnet.num_addresses - 3:
        raise ValueError(f"slot {slot} is outside {subnet}")
    return subnet.network_address + 2 + slot


def guest_slot(ip: ipaddress.IPv4Address, subnet: ipaddress.IPv4Network) -> int:
    """The slot of a guest address (guest_ip's inverse)."""
    return int(ip) - int(subnet.network_address) - 2


def gateway_ip(subnet: ipaddress.IPv4Network) -> ipaddress.IPv4Address:
    return subnet.network_address + 1


def guest_mac(ip: ipaddress.IPv4Address) -> bytes:
    return bytes((MAC_FIRST_OCTET, MAC_SECOND_OCTET)) + ip.packed


def format_mac(mac: bytes) -> str:
    return mac.hex(":")


@dataclass(frozen=True)
class VmNetwork:
    """What a VM needs to know about its network, as attach() returns it."""

    vm_id: str
    tap_name: str
    guest_ip: ipaddress.IPv4Address
    guest_mac: bytes
    gateway_ip: ipaddress.IPv4Address
    netmask: ipaddress.IPv4Address
    prefixlen: int

    @classmethod
    def for_slot(cls, vm_id: str, subnet: ipaddress.IPv4Network, slot: int) -> VmNetwork:
        ip = guest_ip(subnet, slot)
        return cls(
            vm_id=vm_id,
            tap_name=tap_name(vm_id),
            guest_ip=ip,
            guest_mac=guest_mac(ip),
            gateway_ip=gateway_ip(subnet),
            netmask=subnet.netmask,
            prefixlen=subnet.prefixlen,
        )

    def mac_string(self) -> str:
        """The MAC as `02:6e:ac:1e:00:2a`."""
        return format_mac(self.guest_mac)

    def kernel_ip_arg(
        self,
        hostname: str | None = None,
        device: str = "eth0",
        dns: tuple[str | ipaddress.IPv4Address, ...] = (),
    ) -> str:
        """The kernel's `ip=` boot argument (Documentation/admin-guide/nfs/nfsroot.rst).

        Fields, in the kernel's order: `<client-ip>:<server-ip>:<gw-ip>:<netmask>:<hostname>:
        <device>:<autoconf>:<dns0-ip>:<dns1-ip>:<ntp0-ip>`. With no arguments the result is
        `ip=<guest>::<gateway>:<netmask>::eth0:off`; `hostname`, the guest's `device` name and
        up to two `dns` servers fill their fields. Trailing empty fields are left out.
        """
        if hostname is not None:
            hostname = check_hostname(hostname)
        device = check_guest_device(device)
        if isinstance(dns, (str, bytes)) or not isinstance(dns, (tuple, list)):
            raise ConfigError("dns", dns, "a tuple of at most 2 IPv4 addresses, not one string")
        if len(dns) > 2:
            raise ConfigError("dns", list(dns), DNS_RULE)
        servers = [check_dns_server(server) for server in dns]
        fields = [
            str(self.guest_ip),
            "",
            str(self.gateway_ip),
            str(self.netmask),
            hostname or "",
            device,
            "off",
            *servers,
        ]
        return "ip=" + ":".join(fields)

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready form (strings and ints only)."""
        return {
            "vm_id": self.vm_id,
            "tap_name": self.tap_name,
            "guest_ip": str(self.guest_ip),
            "guest_mac": self.mac_string(),
            "gateway_ip": str(self.gateway_ip),
            "netmask": str(self.netmask),
            "prefixlen": self.prefixlen,
            "kernel_ip_arg": self.kernel_ip_arg(),
        }
