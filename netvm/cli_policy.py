"""The guest policy options of `netvm attach`, and how `list` and `status` show policies.

    --anti-spoof / --no-anti-spoof      frames from the TAP carry the VM's MAC and address
    --isolated / --no-isolated          no traffic with the other VMs of the bridge
    --egress-allow RULE                 may reach only these (repeatable)
    --egress-deny RULE                  may not reach these (repeatable; wins over allow)
    --forward HOST_PORT:GUEST_PORT[/tcp|/udp]   a port of the egress address (repeatable)
    --open                              no guarantee at all

RULE is CIDR[:tcp|udp|icmp[:PORT[-PORT]]]. The options change the default policy
(NetworkConfig.guest_policy, MICROVM_NETWORK_GUEST_POLICY, else anti-spoofing): a list
option replaces that list of the default. A value an option cannot take is a usage error
(exit 2, naming the option, the value and what it takes); a combination netvm refuses (an
egress list without anti-spoofing, a host port twice) is an error naming the option (exit 1).
"""

from __future__ import annotations

import argparse
import dataclasses
from collections import Counter
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from netvm.errors import ConfigError
from netvm.policy import (
    EGRESS_RULE,
    FORWARD_RULE,
    OPEN,
    EgressRule,
    GuestPolicy,
    PortForward,
)

if TYPE_CHECKING:
    from netvm.config import NetworkConfig
    from netvm.manager import NetworkManager

T = TypeVar("T")
IPV6 = "dropped under anti_spoof (netvm is IPv4-only: no IPv6 source check); passes without"
"""What becomes of a guest's IPv6 frames (docs/firewall.md)."""
_DESTS = ("anti_spoof", "isolated", "egress_allow", "egress_deny", "port_forwards", "open")


def _parsed(parse: Callable[[str], T], allowed: str) -> Callable[[str], T]:
    def convert(text: str) -> T:
        try:
            return parse(text)
        except ConfigError as exc:  # the library's rule, with its reason where it has one
            rule = exc.allowed if exc.allowed.startswith(allowed) else allowed
            raise argparse.ArgumentTypeError(f"{text!r}: {rule}") from None

    return convert


def add_options(parser: argparse.ArgumentParser) -> None:
    """The policy options, in their own group of `attach`'s help."""
    group = parser.add_argument_group(
        "guest policy (nftables firewall; docs/firewall.md)",
        "Change the default policy (MICROVM_NETWORK_GUEST_POLICY, else anti-spoofing).",
    )
    group.add_argument(
        "--anti-spoof",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="frames from the TAP must carry the VM's MAC and address (default: on)",
    )
    group.add_argument(
        "--isolated",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="the VM exchanges nothing with the other VMs of the bridge",
    )
    rule = _parsed(EgressRule.parse, EGRESS_RULE)
    group.add_argument(
        "--egress-allow",
        action="append",
        type=rule,
        metavar="RULE",
        help="reach only these beyond the gateway (repeatable): CIDR[:tcp|udp|icmp[:PORT[-PORT]]]",
    )
    group.add_argument(
        "--egress-deny",
        action="append",
        type=rule,
        metavar="RULE",
        help="never reach these (repeatable; a deny wins over an allow)",
    )
    group.add_argument(
        "--forward",
        dest="port_forwards",
        action="append",
        type=_parsed(PortForward.parse, FORWARD_RULE),
        metavar="HOST:GUEST[/PROTO]",
        help="forward a port of the egress address to the VM (repeatable; default tcp)",
    )
    group.add_argument(
        "--open",
        action="store_true",
        default=False,
        help="no guarantee at all (the policy before netvm had them); alone only",
    )


def _flag(dest: str, value: object = None) -> str:
    if value is False:
        return "--no-" + dest.replace("_", "-")
    return {"port_forwards": "--forward"}.get(dest, "--" + dest.replace("_", "-"))


def policy_from_args(args: argparse.Namespace, default: GuestPolicy | None) -> GuestPolicy | None:
    """The policy the options ask for, or None when none was given (the manager's default
    applies). `default` is NetworkConfig.guest_policy."""
    given = {dest: getattr(args, dest, None) for dest in _DESTS}
    given = {dest: value for dest, value in given.items() if value is not None}
    if not given.get("open"):
        given.pop("open", None)
    if not given:
        return None
    if given.pop("open", False):
        if given:
            flags = " ".join(_flag(dest, value) for dest, value in given.items())
            raise ConfigError("--open", f"--open {flags}", "no guarantee at all: alone only")
        return OPEN
    changes: dict[str, Any] = {
        dest: tuple(value) if isinstance(value, list) else value for dest, value in given.items()
    }
    try:
        return dataclasses.replace(default or GuestPolicy(), **changes)
    except ConfigError as exc:
        names: list[str]
        if "egress" in exc.field:  # the egress lists need anti-spoofing
            names = [d for d in ("egress_allow", "egress_deny", "anti_spoof") if d in given]
        else:
            names = [d for d in given if d == exc.field] or list(given)
        flags = "/".join(_flag(d, given[d]) for d in names)
        raise ConfigError(flags, exc.value, exc.allowed) from None


def policy_json(policy: GuestPolicy | None) -> dict[str, Any] | None:
    return policy.to_json() if policy is not None else None


def policy_text(policy: GuestPolicy | None) -> str:
    """`describe()`'s words, or `none` (the firewall holds nothing for the VM)."""
    return policy.describe() if policy is not None else "none"


def held(manager: NetworkManager, tap: str) -> GuestPolicy | None:
    """The guarantees the firewall holds for `tap` (read back from the kernel), or None."""
    firewall = manager.backend.firewall("nftables")
    if firewall.unavailable() is not None:
        return None
    found = firewall.record(manager.config.bridge_name, tap)
    return found.policy if found is not None else None


def default_policy(config: NetworkConfig, firewall: str | None) -> GuestPolicy:
    """What an attach without policy options gets (NetworkManager.attach's default)."""
    if config.guest_policy is not None:
        return config.guest_policy
    return GuestPolicy() if firewall == "nftables" else OPEN


def summary(policies: Sequence[GuestPolicy | None]) -> str:
    """For `status`: how many VMs have which policy, most common first."""
    counts = Counter(policy_text(p) for p in policies)
    if not counts:
        return "no VMs"
    ordered = sorted(counts.items(), key=lambda item: (-item[1], item[0]))
    return "; ".join(f"{n} VM{'s' if n != 1 else ''} {text}" for text, n in ordered)
