"""GuestPolicy: what a guest may do on the network, chosen per attach (a sibling of TapOptions).

- `anti_spoof`: frames from the VM's TAP carry its MAC; IPv4 its leased address (DHCP
  discovery from 0.0.0.0 excepted); ARP its MAC and address; no DHCP server replies; any
  other frame (IPv6, VLAN tags, other ethertypes) is dropped.
- `isolated`: the VM reaches no other VM on the bridge, at layer 2 or through the gateway.
- `egress_allow` / `egress_deny`: what the VM may reach beyond the gateway. An empty allow
  list means everything; a deny entry wins over an allow entry.
- `port_forwards`: a port of the host's egress address forwarded to a port of the VM.

Values only: the firewall turns a policy into set elements (netvm/firewall/guard.py).
"""

from __future__ import annotations

import ipaddress
import json
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import cached_property
from typing import Any, Literal

from netvm.errors import ConfigError

Protocol = Literal["tcp", "udp", "icmp"]
PROTOCOLS: dict[str, int] = {"icmp": 1, "tcp": 6, "udp": 17}
EGRESS_RULE = (
    "CIDR[:PROTOCOL[:PORT[-PORT]]], PROTOCOL one of tcp, udp, icmp, ports only with tcp or udp "
    "(e.g. 198.51.100.0/24, 0.0.0.0/0:udp:53, 203.0.113.0/24:tcp:8000-8100)"
)
FORWARD_RULE = "HOST_PORT:GUEST_PORT[/tcp|/udp], ports 1 to 65535 (e.g. 8080:80, 5353:53/udp)"
POLICY_RULE = (
    "words anti_spoof, isolated, allow=RULE, deny=RULE, forward=FORWARD, or the one word "
    "none (e.g. 'anti_spoof isolated deny=169.254.0.0/16')"
)


def _port(field_name: str, value: object, text: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= 65535:
        raise ConfigError(field_name, text, "ports are integers from 1 to 65535")
    return value


def _port_text(field_name: str, digits: str, text: str, rule: str) -> int:
    """A port written in ASCII digits (not '²' or '٨', which str.isdigit takes), 1 to 65535."""
    if not (digits.isascii() and digits.isdigit() and len(digits) <= 5):
        raise ConfigError(field_name, text, rule)
    return _port(field_name, int(digits), text)


_PARSED_RULES: dict[str, EgressRule] = {}
_PARSED_RULES_MAX = 4096


@dataclass(frozen=True)
class EgressRule:
    """Destinations: a network, optionally one protocol, optionally a port range of it."""

    network: ipaddress.IPv4Network
    protocol: Protocol | None = None
    ports: tuple[int, int] | None = None
    """(first, last), inclusive; only with tcp or udp."""

    def __post_init__(self) -> None:
        if not isinstance(self.network, ipaddress.IPv4Network):
            raise ConfigError("egress rule", self.network, EGRESS_RULE)
        if self.protocol is not None and (
            not isinstance(self.protocol, str) or self.protocol not in PROTOCOLS
        ):
            raise ConfigError("egress rule", self.protocol, EGRESS_RULE)
        if self.ports is not None:
            if not isinstance(self.ports, tuple) or len(self.ports) != 2:
                raise ConfigError("egress rule ports", self.ports, "None or (first, last)")
            if self.protocol not in ("tcp", "udp"):
                raise ConfigError("egress rule", str(self), "ports need protocol tcp or udp")
            first, last = (_port("egress rule", p, str(self)) for p in self.ports)
            if first > last:
                raise ConfigError("egress rule", str(self), "the first port is above the last")

    @classmethod
    def parse(cls, text: str | EgressRule) -> EgressRule:
        if isinstance(text, EgressRule):
            return text
        if not isinstance(text, str):
            raise ConfigError("egress rule", text, EGRESS_RULE)
        # A rule is immutable: one parse per text, shared (its text and hash computed once).
        found = _PARSED_RULES.get(text)
        if found is None:
            if len(_PARSED_RULES) >= _PARSED_RULES_MAX:
                _PARSED_RULES.clear()
            found = _PARSED_RULES[text] = cls._parse(text)
        return found

    @classmethod
    def _parse(cls, text: str) -> EgressRule:
        parts = text.strip().split(":")
        if not 1 <= len(parts) <= 3:
            raise ConfigError("egress rule", text, EGRESS_RULE)
        try:
            network = ipaddress.IPv4Network(parts[0], strict=True)
        except ValueError as exc:
            raise ConfigError("egress rule", text, f"{EGRESS_RULE} ({exc})") from None
        protocol = parts[1] if len(parts) > 1 else None
        if protocol is not None and protocol not in PROTOCOLS:
            raise ConfigError("egress rule", text, EGRESS_RULE)
        ports: tuple[int, int] | None = None
        if len(parts) == 3:
            first, dash, last = parts[2].partition("-")
            low = _port_text("egress rule", first, text, EGRESS_RULE)
            ports = (low, _port_text("egress rule", last, text, EGRESS_RULE) if dash else low)
        return cls(network, protocol, ports)  # type: ignore[arg-type]

    def __str__(self) -> str:
        return self.text

    @cached_property
    def text(self) -> str:
        """The rule as `parse` reads it (kept: an attach writes it into the VM's record)."""
        text = str(self.network)
        if self.protocol is not None:
            text += f":{self.protocol}"
        if self.ports is not None:
            first, last = self.ports
            text += f":{first}" if first == last else f":{first}-{last}"
        return text

    @property
    def protocol_range(self) -> tuple[int, int]:
        if self.protocol is None:
            return (0, 255)
        number = PROTOCOLS[self.protocol]
        return (number, number)

    @property
    def port_range(self) -> tuple[int, int]:
        return self.ports if self.ports is not None else (0, 65535)


@dataclass(frozen=True)
class PortForward:
    """`host_port` of the host's egress address, forwarded to `guest_port` of the VM."""

    host_port: int
    guest_port: int
    protocol: Literal["tcp", "udp"] = "tcp"

    def __post_init__(self) -> None:
        _port("port forward", self.host_port, str(self))
        _port("port forward", self.guest_port, str(self))
        if self.protocol not in ("tcp", "udp"):
            raise ConfigError("port forward", str(self), FORWARD_RULE)

    @classmethod
    def parse(cls, text: str | PortForward) -> PortForward:
        if isinstance(text, PortForward):
            return text
        if not isinstance(text, str):
            raise ConfigError("port forward", text, FORWARD_RULE)
        ports, _, protocol = text.strip().partition("/")
        host, _, guest = ports.partition(":")
        host_port = _port_text("port forward", host, text, FORWARD_RULE)
        guest_port = _port_text("port forward", guest, text, FORWARD_RULE)
        if protocol not in ("", "tcp", "udp"):
            raise ConfigError("port forward", text, FORWARD_RULE)
        return cls(host_port, guest_port, protocol or "tcp")  # type: ignore[arg-type]

    def __str__(self) -> str:
        return f"{self.host_port}:{self.guest_port}/{self.protocol}"


def _rules(field_name: str, value: object) -> tuple[EgressRule, ...]:
    if isinstance(value, str) or not isinstance(value, tuple | list):
        raise ConfigError(field_name, value, f"a sequence of {EGRESS_RULE}")
    return tuple(EgressRule.parse(item) for item in value)


@dataclass(frozen=True)
class GuestPolicy:
    """The guarantees of one VM (`GuestPolicy.of` takes the rules and forwards as text)."""

    anti_spoof: bool = True
    isolated: bool = False
    egress_allow: tuple[EgressRule, ...] = ()
    egress_deny: tuple[EgressRule, ...] = ()
    port_forwards: tuple[PortForward, ...] = field(default=())

    def __post_init__(self) -> None:
        for name in ("anti_spoof", "isolated"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(name, getattr(self, name), "True or False")
        object.__setattr__(self, "egress_allow", _rules("egress_allow", self.egress_allow))
        object.__setattr__(self, "egress_deny", _rules("egress_deny", self.egress_deny))
        forwards = self.port_forwards
        if isinstance(forwards, str) or not isinstance(forwards, tuple | list):
            raise ConfigError("port_forwards", forwards, f"a sequence of {FORWARD_RULE}")
        parsed = tuple(PortForward.parse(item) for item in forwards)
        keys = [(f.protocol, f.host_port) for f in parsed]
        if len(set(keys)) != len(keys):
            raise ConfigError("port_forwards", [str(f) for f in parsed], "a host port twice")
        object.__setattr__(self, "port_forwards", parsed)
        if (self.egress_allow or self.egress_deny) and not self.anti_spoof:
            raise ConfigError(
                "egress policy",
                [str(r) for r in (*self.egress_allow, *self.egress_deny)],
                "needs anti_spoof: it is keyed by the guest's address, which only "
                "anti-spoofing ties to its TAP",
            )

    @classmethod
    def of(
        cls,
        *,
        anti_spoof: bool = True,
        isolated: bool = False,
        egress_allow: Sequence[str | EgressRule] = (),
        egress_deny: Sequence[str | EgressRule] = (),
        port_forwards: Sequence[str | PortForward] = (),
    ) -> GuestPolicy:
        """The same, typed for rules and forwards given as text (`"198.51.100.0/24:tcp:80"`,
        `"8080:80/udp"`)."""
        return cls(
            anti_spoof=anti_spoof,
            isolated=isolated,
            egress_allow=egress_allow,  # type: ignore[arg-type]  # parsed in __post_init__
            egress_deny=egress_deny,  # type: ignore[arg-type]
            port_forwards=port_forwards,  # type: ignore[arg-type]
        )

    @property
    def any(self) -> bool:
        """Whether the firewall has anything to do for this VM."""
        return bool(
            self.anti_spoof
            or self.isolated
            or self.egress_allow
            or self.egress_deny
            or self.port_forwards
        )

    def needs(self) -> list[str]:
        """The guarantees asked for, by field name (for errors on a firewall without them)."""
        wanted = [name for name in ("anti_spoof", "isolated") if getattr(self, name)]
        wanted += [
            name for name in ("egress_allow", "egress_deny", "port_forwards") if getattr(self, name)
        ]
        return wanted

    def to_json(self) -> dict[str, Any]:
        return {
            "anti_spoof": self.anti_spoof,
            "isolated": self.isolated,
            "egress_allow": [str(rule) for rule in self.egress_allow],
            "egress_deny": [str(rule) for rule in self.egress_deny],
            "port_forwards": [str(forward) for forward in self.port_forwards],
        }

    @classmethod
    def from_json(cls, data: dict[str, Any]) -> GuestPolicy:
        """What to_json wrote; ConfigError for anything else (a missing key included)."""
        if not isinstance(data, dict):
            raise ConfigError("guest policy", data, "a JSON object as GuestPolicy.to_json writes")
        return cls(
            anti_spoof=data.get("anti_spoof"),  # type: ignore[arg-type]  # checked
            isolated=data.get("isolated"),  # type: ignore[arg-type]
            egress_allow=data.get("egress_allow", ()),
            egress_deny=data.get("egress_deny", ()),
            port_forwards=data.get("port_forwards", ()),
        )

    @classmethod
    def parse(cls, text: str, field_name: str = "guest policy") -> GuestPolicy:
        """The policy `describe()` wrote: words `anti_spoof`, `isolated`, `allow=RULE`,
        `deny=RULE`, `forward=FORWARD`, or `none` (no guarantee), in any order, separated
        by white space or commas. ConfigError naming `field_name` otherwise."""
        flags = {"anti_spoof": False, "isolated": False}
        lists: dict[str, list[str]] = {"allow": [], "deny": [], "forward": []}
        words = text.replace(",", " ").split() if isinstance(text, str) else None
        if not words:
            raise ConfigError(field_name, text, POLICY_RULE)
        for word in words:
            name, sep, value = word.partition("=")
            if sep and name in lists and value:
                lists[name].append(value)
            elif not sep and name in flags:
                flags[name] = True
            elif word != "none" or len(words) > 1:
                raise ConfigError(field_name, text, f"{POLICY_RULE}; not {word!r}")
        try:
            return cls(
                anti_spoof=flags["anti_spoof"],
                isolated=flags["isolated"],
                egress_allow=tuple(EgressRule.parse(r) for r in lists["allow"]),
                egress_deny=tuple(EgressRule.parse(r) for r in lists["deny"]),
                port_forwards=tuple(PortForward.parse(f) for f in lists["forward"]),
            )
        except ConfigError as exc:
            allowed = f"{exc.field} {exc.value!r}: {exc.allowed}"
            raise ConfigError(field_name, text, allowed) from None

    def describe(self) -> str:
        """One line, e.g. `anti_spoof isolated allow=198.51.100.0/24 forward=8080:80/tcp`."""
        return self._description

    @cached_property
    def _description(self) -> str:
        parts = [name for name in ("anti_spoof", "isolated") if getattr(self, name)]
        if self.egress_text:
            parts.append(self.egress_text)
        parts += [f"forward={f}" for f in self.port_forwards]
        return " ".join(parts) or "none"

    @cached_property
    def egress_text(self) -> str:
        """`allow=NET ... deny=NET ...`: the egress lists in describe()'s words ("" if none)."""
        return " ".join(
            [f"allow={r}" for r in self.egress_allow] + [f"deny={r}" for r in self.egress_deny]
        )


OPEN = GuestPolicy(anti_spoof=False)
"""No guarantee: what every guest got before GuestPolicy existed."""


def compact(policy: GuestPolicy) -> str:
    return json.dumps(policy.to_json(), separators=(",", ":"), sort_keys=True)
