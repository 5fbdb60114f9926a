"""GuestPolicy's words: describe() and parse() are inverses; bad words name the field."""

from __future__ import annotations

import ipaddress
import re
from collections.abc import Callable

import pytest

from netvm import ConfigError, NetworkConfig
from netvm.policy import OPEN, EgressRule, GuestPolicy, PortForward

POLICIES = [
    OPEN,
    GuestPolicy(),
    GuestPolicy.of(isolated=True),
    GuestPolicy.of(
        isolated=True,
        egress_allow=["203.0.113.0/24:tcp:443", "0.0.0.0/0:udp:53"],
        egress_deny=["198.51.100.0/24", "192.0.2.7/32:icmp"],
        port_forwards=["8080:80", "5353:53/udp"],
    ),
]


@pytest.mark.parametrize("policy", POLICIES, ids=lambda p: p.describe())
def test_parse_reads_what_describe_writes(policy: GuestPolicy) -> None:
    assert GuestPolicy.parse(policy.describe()) == policy
    assert GuestPolicy.parse(policy.describe().replace(" ", ",")) == policy
    assert policy.any is (policy != OPEN)


@pytest.mark.parametrize(
    "text",
    ["", " ", "none isolated", "anti-spoof", "allow=", "allow=10.0.0.1/8", "deny=x", "forward=80"],
)
def test_parse_refuses_other_words_naming_the_field(text: str) -> None:
    with pytest.raises(ConfigError, match=r"^invalid MY_FIELD: ") as caught:
        GuestPolicy.parse(text, "MY_FIELD")
    assert caught.value.value == text


def test_the_environment_gives_the_default_policy() -> None:
    env = {"MICROVM_NETWORK_GUEST_POLICY": "anti_spoof,isolated deny=169.254.0.0/16"}
    assert NetworkConfig.from_env(env).guest_policy == GuestPolicy.of(
        isolated=True, egress_deny=["169.254.0.0/16"]
    )
    assert NetworkConfig.from_env({}).guest_policy is None
    assert NetworkConfig.from_env({"MICROVM_NETWORK_GUEST_POLICY": "none"}).guest_policy == OPEN
    with pytest.raises(ConfigError, match=r"MICROVM_NETWORK_GUEST_POLICY.*forward"):
        NetworkConfig.from_env({"MICROVM_NETWORK_GUEST_POLICY": "forward=8080:80"})


def test_a_rule_text_is_parsed_once_and_a_bad_one_every_time() -> None:
    first = EgressRule.parse("198.51.100.0/24:tcp:443")
    assert EgressRule.parse("198.51.100.0/24:tcp:443") is first
    assert EgressRule.parse("198.51.100.0/24:tcp:80") is not first
    for _ in range(2):  # a refusal is not remembered as a rule
        with pytest.raises(ConfigError, match=re.escape("198.51.100.1/24")):
            EgressRule.parse("198.51.100.1/24")
    policy = GuestPolicy.of(egress_allow=["198.51.100.0/24:tcp:443"], egress_deny=["0.0.0.0/0"])
    assert policy.egress_text == "allow=198.51.100.0/24:tcp:443 deny=0.0.0.0/0"
    assert policy.describe() == f"anti_spoof {policy.egress_text}"


NET = ipaddress.IPv4Network("10.0.0.0/8")
HOSTILE: list[tuple[str, Callable[[], object]]] = [
    ("superscript last port", lambda: GuestPolicy.parse("allow=10.0.0.0/8:tcp:1-²")),
    ("arabic-indic last port", lambda: EgressRule.parse("10.0.0.0/8:tcp:1-٨٠")),
    ("5000-digit port", lambda: EgressRule.parse("10.0.0.0/8:tcp:1-" + "9" * 5000)),
    ("empty last port", lambda: EgressRule.parse("10.0.0.0/8:tcp:1-")),
    ("5000-digit forward", lambda: PortForward.parse("9" * 5000 + ":80")),
    ("unicode forward", lambda: PortForward.parse("٨٠:80")),
    ("three ports", lambda: EgressRule(NET, "tcp", (1, 2, 3))),  # type: ignore[arg-type]
    ("one port", lambda: EgressRule(NET, "tcp", (1,))),  # type: ignore[arg-type]
    ("int ports", lambda: EgressRule(NET, "tcp", 5)),  # type: ignore[arg-type]
    ("list protocol", lambda: EgressRule(NET, ["tcp"])),  # type: ignore[arg-type]
    ("int rules", lambda: GuestPolicy.of(egress_allow=5)),  # type: ignore[arg-type]
    ("str rules", lambda: GuestPolicy.of(egress_deny="10.0.0.0/8")),
    ("empty record", lambda: GuestPolicy.from_json({})),
    ("list record", lambda: GuestPolicy.from_json([])),  # type: ignore[arg-type]
    (
        "env policy",
        lambda: NetworkConfig.from_env(
            {"MICROVM_NETWORK_GUEST_POLICY": "allow=10.0.0.0/8:tcp:1-²"}
        ),
    ),
]


@pytest.mark.parametrize("make", [m for _, m in HOSTILE], ids=[n for n, _ in HOSTILE])
def test_hostile_rules_and_forwards_are_config_errors(make: Callable[[], object]) -> None:
    with pytest.raises(ConfigError):
        make()


def test_ascii_ports_still_parse() -> None:
    # The control of the test above: the same shapes with ASCII digits are fine.
    assert EgressRule.parse("10.0.0.0/8:tcp:1-80").ports == (1, 80)
    assert PortForward.parse("8080:80/udp") == PortForward(8080, 80, "udp")
    assert GuestPolicy.from_json(GuestPolicy().to_json()) == GuestPolicy()
    assert GuestPolicy.of(egress_deny=("10.0.0.0/8",)).egress_deny == (EgressRule(NET),)


def test_a_default_policy_forwards_no_port() -> None:
    forwarding = GuestPolicy.of(port_forwards=["8080:80"])
    with pytest.raises(ConfigError, match="guest_policy"):
        NetworkConfig(guest_policy=forwarding)
    assert NetworkConfig(guest_policy=GuestPolicy.of(isolated=True)).guest_policy is not None
