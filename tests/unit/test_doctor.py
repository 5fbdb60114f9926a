"""doctor(): findings with evidence and a fix, read-only (on the fake here; the e2e
coexistence tests run it on the kernel beside ufw and firewalld)."""

from __future__ import annotations

import dataclasses
from pathlib import Path

import pytest

from netvm import FakeBackend, NetworkConfig, NetworkManager, doctor
from netvm.backends.base import FILTER, Rule
from netvm.cli import main
from netvm.firewall.fake_nft import FakeNftRunner
from netvm.testing import snapshot

ROUTES = (
    "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
    "up0\t00000000\t017100CB\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
)


def ready_host() -> FakeBackend:
    backend = FakeBackend()
    backend.add_link("up0", "veth")
    backend.state.proc["/proc/thread-self/net/route"] = ROUTES
    return backend


def codes(manager: NetworkManager) -> list[str]:
    return [finding.code for finding in doctor(manager)]


def test_a_set_up_host_has_no_blocking_finding(config: NetworkConfig) -> None:
    backend = ready_host()
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        before = snapshot(backend)
        findings = doctor(manager)
        assert snapshot(backend) == before, "doctor changes nothing"
    assert not [f for f in findings if f.blocking]


def test_a_bare_host_says_what_to_run(config: NetworkConfig) -> None:
    with NetworkManager(config, ready_host()) as manager:
        found = codes(manager)
    assert "ip-forward-off" in found
    assert "netvm-rules-missing" in found


def test_a_missing_egress_blocks(config: NetworkConfig) -> None:
    with NetworkManager(config, FakeBackend()) as manager:
        (finding,) = [f for f in doctor(manager) if f.code == "egress-missing"]
    assert finding.blocking
    assert "up0" in finding.message


def test_a_legacy_drop_beside_netvms_nftables_rules_is_a_split(config: NetworkConfig) -> None:
    backend = ready_host()
    with NetworkManager(dataclasses.replace(config, firewall="nftables"), backend) as manager:
        manager.ensure_host()
        backend.set_policy(FILTER, "FORWARD", "DROP")
        (split,) = [f for f in doctor(manager) if f.code == "rules-split"]
    assert split.blocking
    assert f"iptables-legacy -I FORWARD -i {config.bridge_name} -o up0 -j ACCEPT" in split.fix


def test_a_foreign_nftables_drop_at_the_forward_hook_is_reported(config: NetworkConfig) -> None:
    backend = ready_host()
    base = {"type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}
    FakeNftRunner(backend.state.nftables).run(
        [
            {"add": {"table": {"family": "inet", "name": "filter"}}},
            {"add": {"chain": {"family": "inet", "table": "filter", "name": "forward", **base}}},
        ],
        "test",
        None,
    )
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        (drop,) = [f for f in doctor(manager) if f.code == "foreign-forward-drop"]
    assert 'nft insert rule inet filter forward iifname "nvbr0" oifname "up0" accept' in drop.fix


def test_a_subnet_overlapping_a_route_blocks(config: NetworkConfig) -> None:
    backend = ready_host()
    backend.state.proc["/proc/thread-self/net/route"] = ROUTES + (
        "up0\t000200C0\t00000000\t0001\t0\t0\t0\t00FFFFFF\t0\t0\t0\n"
    )
    with NetworkManager(config, backend) as manager:
        assert "subnet-overlap" in codes(manager)


@pytest.mark.parametrize(("prepare", "code"), [(False, 1), (True, 0)])
def test_the_cli_exits_1_when_guests_cannot_get_out(
    config: NetworkConfig, capsys: pytest.CaptureFixture[str], prepare: bool, code: int
) -> None:
    backend = ready_host()
    if prepare:
        with NetworkManager(config, backend) as manager:
            manager.ensure_host()
    argv = ["doctor", "--json", "--bridge", "nvbr0", "--subnet", "192.0.2.0/24", "--egress", "up0"]
    argv += ["--state-dir", str(config.state_dir)]
    assert main(argv, backend_factory=lambda netns: backend, environ={}) == code
    assert '"guests_get_out": ' + ("true" if code == 0 else "false") in capsys.readouterr().out


def _foreign(backend: FakeBackend, family: str, chain: dict[str, object], *body: object) -> None:
    table = {"family": family, "name": "t"}
    commands: list[dict[str, object]] = [
        {"add": {"table": table}},
        {"add": {"chain": {"family": family, "table": "t", "name": "c", **chain}}},
    ]
    commands += [
        {"add": {"rule": {"family": family, "table": "t", "chain": "c", "expr": exprs}}}
        for exprs in body
    ]
    FakeNftRunner(backend.state.nftables).run(commands, "test", None)


def _meta(key: str, value: str) -> dict[str, object]:
    return {"match": {"op": "==", "left": {"meta": {"key": key}}, "right": value}}


DROP, ACCEPT = {"drop": None}, {"accept": None}
HOOKS = {
    "ip prerouting drop from the bridge": (
        "ip",
        {"type": "filter", "hook": "prerouting", "prio": -300, "policy": "accept"},
        [[_meta("iifname", "nvbr0"), DROP]],
        [[_meta("oifname", "up0"), DROP]],  # no output device at prerouting: never matches
    ),
    "inet postrouting drop to the egress": (
        "inet",
        {"type": "filter", "hook": "postrouting", "prio": 0, "policy": "accept"},
        [[_meta("oifname", "up0"), DROP]],
        [[_meta("oifname", "eth9"), DROP]],
    ),
    "nat postrouting drop": (
        "ip",
        {"type": "nat", "hook": "postrouting", "prio": 100, "policy": "accept"},
        [[_meta("oifname", "up0"), DROP]],
        [[_meta("oifname", "nvbr0"), DROP]],  # a reply: nat chains see first packets only
    ),
    "bridge input policy drop": (
        "bridge",
        {"type": "filter", "hook": "input", "prio": 0, "policy": "drop"},
        [],
        [[_meta("ibrname", "nvbr0"), ACCEPT]],
    ),
    "netdev ingress drop on the egress": (
        "netdev",
        {"type": "filter", "hook": "ingress", "dev": "up0", "prio": 0, "policy": "drop"},
        [],
        None,
    ),
}


@pytest.mark.parametrize("case", HOOKS, ids=str)
@pytest.mark.parametrize("control", [False, True], ids=["drops", "control"])
def test_a_drop_at_another_hook_than_forward_blocks(
    config: NetworkConfig, case: str, control: bool
) -> None:
    family, chain, dropping, passing = HOOKS[case]
    if control and passing is None:  # the control: the same chain on another device
        chain = {**chain, "dev": "eth9"}
    backend = ready_host()
    backend.add_link("eth9", "veth")
    _foreign(backend, family, chain, *(passing if control and passing else dropping))
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        found = [f for f in doctor(manager) if f.code == "foreign-hook-drop"]
    if control:
        assert found == []
    else:
        (finding,) = found
        assert finding.blocking
        assert "table " + family + " t chain c" in finding.message


@pytest.mark.parametrize(
    ("rules", "code"),
    [
        ([Rule("REJECT", other="-p tcp -m tcp --dport 25 -j REJECT --reject-with x")], "unsure"),
        ([Rule("BLK")], "drop"),
        ([Rule("ACCEPT", in_iface="nvbr0"), Rule("ACCEPT", out_iface="nvbr0"), Rule("DROP")], None),
        ([Rule("DROP", in_iface="eth9")], None),
        ([Rule("DROP", in_iface="nv+")], "drop"),
    ],
    ids=["port-reject", "jump-to-a-drop", "bridge-let-through", "other-device", "wildcard"],
)
def test_the_legacy_forward_chain_is_walked_for_the_guests_packets(
    config: NetworkConfig, rules: list[Rule], code: str | None
) -> None:
    """A drop there beats netvm's nftables accept: blocking when it certainly takes the
    guests' packets, a warning when its matches say what netvm cannot tell (a port), and
    nothing when it does not take them; jumps are followed."""
    backend = ready_host()
    with NetworkManager(dataclasses.replace(config, firewall="nftables"), backend) as manager:
        manager.ensure_host()
        backend.create_chain(FILTER, "BLK")
        backend.insert_rule(FILTER, "BLK", Rule("DROP"))
        for position, rule in enumerate(rules):
            backend.insert_rule(FILTER, "FORWARD", rule, position)
        found = {f.code: f for f in doctor(manager) if f.code.startswith("rules-split")}
    if code is None:
        assert found == {}
    elif code == "drop":
        assert list(found) == ["rules-split"]
        assert found["rules-split"].blocking
        assert "iptables-legacy -I FORWARD -i nvbr0 -o up0 -j ACCEPT" in found["rules-split"].fix
    else:
        assert list(found) == ["rules-split-unsure"]
        assert not found["rules-split-unsure"].blocking


def test_auto_turning_to_iptables_under_guarded_vms_gets_advice_that_leads_out(
    config: NetworkConfig,
) -> None:
    """Docker on iptables-legacy started after VMs with guarantees: auto would now pick
    iptables, which ensure_host refuses (the guarantees would go), so netvm's rules stay in
    nftables. doctor judges them there, says to pin nftables for good (not for one call:
    under auto it would say the same again), gives the legacy table's commands while it
    drops, and, once they are run, has nothing blocking under auto either."""
    from netvm import ConflictError

    backend = ready_host()
    auto = dataclasses.replace(config, firewall="auto")
    with NetworkManager(auto, backend) as manager:
        manager.ensure_host()
        manager.attach("vm-a")
        manager.attach("vm-b")
    backend.insert_rule(FILTER, "FORWARD", Rule("DROP", in_iface="docker0"))
    backend.set_policy(FILTER, "FORWARD", "DROP")
    with NetworkManager(auto, backend) as manager:
        with pytest.raises(ConflictError, match=r"2 attached VM\(s\) \(vm-a, vm-b\)"):
            manager.ensure_host()
        found = {f.code: f for f in doctor(manager)}
    assert "netvm-rules-missing" not in found, "netvm's rules are in place, in nftables"
    pin = found["firewall-pin-nftables"]
    assert "2 attached VM(s) (vm-a, vm-b)" in pin.message
    assert "MICROVM_NETWORK_FIREWALL=nftables in the environment of every netvm call" in pin.fix
    assert "iptables-legacy -I FORWARD -i nvbr0 -o up0 -j ACCEPT" in found["rules-split"].fix
    # The administrator runs them (iptables-legacy -I FORWARD ...).
    backend.insert_rule(FILTER, "FORWARD", Rule("ACCEPT", in_iface="nvbr0"))
    replies = Rule("ACCEPT", out_iface="nvbr0", ctstate=("ESTABLISHED", "RELATED"))
    backend.insert_rule(FILTER, "FORWARD", replies)
    for firewall in ("auto", "nftables"):
        with NetworkManager(dataclasses.replace(config, firewall=firewall), backend) as manager:
            after = doctor(manager)
        assert not [f for f in after if f.blocking], firewall
        pinned = [f for f in after if f.code == "firewall-pin-nftables"]
        assert bool(pinned) == (firewall == "auto")


def test_vms_whose_taps_are_gone_are_not_counted_as_attached(config: NetworkConfig) -> None:
    backend = ready_host()
    auto = dataclasses.replace(config, firewall="auto")
    with NetworkManager(auto, backend) as manager:
        manager.ensure_host()
        for vm_id in ("vm-a", "vm-b", "vm-c"):
            manager.attach(vm_id)
        stopped = [a.tap_name for a in manager.list() if a.vm_id != "vm-a"]
    for tap in stopped:  # VMs stopped that keep their address (state tap-missing)
        backend.delete_link(tap)
    backend.insert_rule(FILTER, "FORWARD", Rule("DROP", in_iface="docker0"))
    with NetworkManager(auto, backend) as manager:
        (pin,) = [f for f in doctor(manager) if f.code == "firewall-pin-nftables"]
    assert "1 attached VM(s) (vm-a) and 2 leased VM(s) whose TAP is gone (vm-b, vm-c)" in (
        pin.message
    )


def test_a_drop_in_iptables_nfts_table_gets_a_fix_iptables_nft_can_still_list(
    config: NetworkConfig,
) -> None:
    """A native `ct state` rule in iptables-nft's table makes iptables-nft refuse to list
    the chain (docs/firewall.md): the fix is written with iptables-nft there."""
    backend = ready_host()
    base = {"type": "filter", "hook": "forward", "prio": 0, "policy": "drop"}
    FakeNftRunner(backend.state.nftables).run(
        [
            {"add": {"table": {"family": "ip", "name": "filter"}}},
            {"add": {"chain": {"family": "ip", "table": "filter", "name": "FORWARD", **base}}},
        ],
        "test",
        None,
    )
    with NetworkManager(dataclasses.replace(config, firewall="nftables"), backend) as manager:
        manager.ensure_host()
        # Docker's hardening advice, above netvm's accepts: `iptables -I DOCKER-USER -i up0
        # -j DROP` (here in FORWARD).
        iif = {"meta": {"key": "iifname"}}
        exprs = [{"match": {"op": "==", "left": iif, "right": "up0"}}, {"drop": None}]
        rule = {"family": "ip", "table": "filter", "chain": "FORWARD", "expr": exprs}
        FakeNftRunner(backend.state.nftables).run([{"insert": {"rule": rule}}], "test", None)
        drops = [f for f in doctor(manager) if f.code == "foreign-forward-drop"]
    assert drops
    for finding in drops:
        assert finding.fix.startswith("iptables-nft -I FORWARD -i nvbr0 -o up0 -j ACCEPT")
        assert "nft insert" not in finding.fix


def _iptables_nft_chain(backend: FakeBackend, table: str, chain: str, hook: str, prio: int) -> None:
    """A base chain as iptables-nft makes it (`iptables-nft -t TABLE ...`)."""
    base = {"type": "filter", "hook": hook, "prio": prio, "policy": "accept"}
    FakeNftRunner(backend.state.nftables).run(
        [
            {"add": {"table": {"family": "ip", "name": table}}},
            {"add": {"chain": {"family": "ip", "table": table, "name": chain, **base}}},
        ],
        "test",
        None,
    )


def _rule(backend: FakeBackend, table: str, chain: str, *exprs: object) -> None:
    rule = {"family": "ip", "table": table, "chain": chain, "expr": list(exprs)}
    FakeNftRunner(backend.state.nftables).run([{"add": {"rule": rule}}], "test", None)


@pytest.mark.parametrize(
    ("table", "chain", "hook", "prio", "match", "fix"),
    [
        ("mangle", "FORWARD", "forward", -150, _meta("iifname", "nvbr0"),
         "iptables-nft -t mangle -I FORWARD -i nvbr0 -o up0 -j ACCEPT; iptables-nft -t mangle -I "
         "FORWARD -i up0 -o nvbr0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"),
        ("mangle", "PREROUTING", "prerouting", -150, _meta("iifname", "up0"),
         "let them through before the drop: iptables-nft -t mangle -I PREROUTING -i up0 "
         "-m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"),
        ("raw", "PREROUTING", "prerouting", -300, _meta("iifname", "nvbr0"),
         "let them through before the drop: iptables-nft -t raw -I PREROUTING -i nvbr0 -j ACCEPT"),
        ("security", "FORWARD", "forward", 50, _meta("oifname", "nvbr0"),
         "iptables-nft -t security -I FORWARD -i nvbr0 -o up0 -j ACCEPT; iptables-nft -t security "
         "-I FORWARD -i up0 -o nvbr0 -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"),
    ],
    ids=["mangle-forward", "mangle-prerouting-replies", "raw-prerouting", "security-forward"],
)  # fmt: skip
def test_a_drop_in_another_iptables_nft_table_gets_an_iptables_nft_fix(
    config: NetworkConfig,
    table: str,
    chain: str,
    hook: str,
    prio: int,
    match: dict[str, object],
    fix: str,
) -> None:
    """Every table iptables-nft made refuses to be listed by it once a native nft rule is
    there ("table `mangle' is incompatible, use 'nft' tool"): the fix is iptables-nft's,
    for the packets that are dropped only."""
    backend = ready_host()
    _iptables_nft_chain(backend, table, chain, hook, prio)
    _rule(backend, table, chain, match, DROP)
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        (finding,) = [f for f in doctor(manager) if f.blocking]
    assert finding.fix == fix


@pytest.mark.parametrize("family_table", [("iptables-nft", "raw"), ("nft", "raw1")])
def test_no_connection_state_fix_before_conntrack(
    config: NetworkConfig, family_table: tuple[str, str]
) -> None:
    """A prerouting chain at priority -300 sees no connection state (the kernel's `ct
    state` reads invalid there): doctor suggests no reply rule that cannot match, says what
    to change instead, and an `established` accept above the drop lets nothing through."""
    tool, table = family_table
    chain = "PREROUTING" if tool == "iptables-nft" else "pre"
    backend = ready_host()
    _iptables_nft_chain(backend, table, chain, "prerouting", -300)
    _rule(backend, table, chain, _meta("iifname", "up0"), DROP)
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        (finding,) = [f for f in doctor(manager) if f.blocking]
        assert "established" not in finding.fix.partition("No rule")[0].lower()
        assert "conntrack has not seen them yet" in finding.fix
        assert "Narrow that drop" in finding.fix
        ct = {"ct": {"key": "state"}}
        replies = {"match": {"op": "in", "left": ct, "right": ["established", "related"]}}
        rule = {"family": "ip", "table": table, "chain": chain, "expr": [replies, ACCEPT]}
        FakeNftRunner(backend.state.nftables).run([{"insert": {"rule": rule}}], "test", None)
        assert [f for f in doctor(manager) if f.blocking], "the kernel still drops them"


def test_without_nftables_under_guarded_vms_the_fix_is_to_make_it_usable(
    config: NetworkConfig,
) -> None:
    """auto falls back to iptables because libnftables' binding is gone: "keep nftables"
    cannot be followed there (--firewall nftables is refused), so the fix says what
    nftables misses."""
    backend = ready_host()
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        manager.attach("vm-a")
    missing = "needs libnftables: apt-get install python3-nftables"
    backend.firewall("nftables")._unavailable = lambda: missing  # type: ignore[attr-defined]
    with NetworkManager(dataclasses.replace(config, firewall="auto"), backend) as manager:
        (finding,) = [f for f in doctor(manager) if f.blocking]
    assert "cannot hold the guarantees of 1 attached VM(s) (vm-a)" in finding.message
    assert finding.fix.startswith(f"make nftables usable again ({missing})")
    assert "--firewall nftables" not in finding.fix


def test_the_firewalld_fix_is_a_policy_not_the_trusted_zone(config: NetworkConfig) -> None:
    """firewalld's trusted zone would accept everything from the guests to the host too
    (every port that firewalld closes): the fix gives the bridge a zone of its own and a
    policy from it to the uplink's zone."""
    backend = ready_host()
    base = {"type": "filter", "hook": "forward", "prio": 10, "policy": "accept"}
    FakeNftRunner(backend.state.nftables).run(
        [
            {"add": {"table": {"family": "inet", "name": "firewalld"}}},
            {
                "add": {
                    "chain": {"family": "inet", "table": "firewalld", "name": "filter_FORWARD"}
                    | base
                }
            },
            {
                "add": {
                    "rule": {
                        "family": "inet",
                        "table": "firewalld",
                        "chain": "filter_FORWARD",
                        "expr": [{"reject": None}],
                    }
                }
            },
        ],
        "test",
        None,
    )
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        (finding,) = [f for f in doctor(manager) if f.code == "firewalld-forward-reject"]
    commands = finding.fix.split(" (firewalld 0.9")[0].split("; ")
    assert commands == [
        "firewall-cmd --permanent --new-zone=nvbr0",
        "firewall-cmd --permanent --zone=nvbr0 --add-interface=nvbr0",
        "firewall-cmd --permanent --new-policy=nvbr0-out",
        "firewall-cmd --permanent --policy=nvbr0-out --add-ingress-zone=nvbr0",
        "firewall-cmd --permanent --policy=nvbr0-out --add-egress-zone="
        '"$(firewall-cmd --get-zone-of-interface=up0 || firewall-cmd --get-default-zone)"',
        "firewall-cmd --permanent --policy=nvbr0-out --set-target=ACCEPT",
        "firewall-cmd --reload",
    ]
    assert "--zone=trusted --add-interface" not in finding.fix


BR_NF_CALL = "/proc/sys/net/bridge/bridge-nf-call-iptables"


@pytest.mark.parametrize("drops_between_guests", [False, True])
def test_br_netfilter_is_said_only_where_a_chain_drops_frames_between_guests(
    config: NetworkConfig, drops_between_guests: bool
) -> None:
    """br_netfilter loaded is no finding by itself (it was a WARNING on every run, with a
    remark for a fix); a forward chain that drops the frames it passes between guests
    is, with the accept that lets them by."""
    backend = ready_host()
    backend.state.proc[BR_NF_CALL] = "1\n"
    forward = {"type": "filter", "hook": "forward", "prio": 0, "policy": "accept"}
    between = [_meta("iifname", "nvbr0"), _meta("oifname", "nvbr0"), DROP]
    _foreign(backend, "inet", forward, *([between] if drops_between_guests else []))
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        found = doctor(manager)
    if not drops_between_guests:
        assert found == []
        return
    (finding,) = found
    assert (finding.code, finding.severity) == ("bridged-frames-drop", "warning")
    assert "table inet t chain c drops frames between guests on the bridge" in finding.message
    assert finding.fix.startswith('nft insert rule inet t c iifname "nvbr0" oifname "nvbr0" accept')


def test_doctor_with_another_state_dir_makes_no_store_there(
    config: NetworkConfig, tmp_path: Path
) -> None:
    """doctor reads only: under a mistyped state_dir (on a firewall choice that asks which
    VMs have guarantees) it must not build a store there from the bridge's TAPs (review27 #7)."""
    backend = ready_host()
    with NetworkManager(config, backend) as owner:
        owner.ensure_host()
        owner.attach("vm-a")
    other = dataclasses.replace(config, state_dir=tmp_path / "typo", firewall="iptables")
    with NetworkManager(other, backend) as mistyped:
        doctor(mistyped)
    made = list(other.state_dir.iterdir()) if other.state_dir.exists() else []
    assert not [p for p in made if ".sqlite" in p.name], made


def test_the_firewalld_policy_name_fits_firewalld() -> None:
    """firewalld refuses policy names longer than 17 characters (review27 #8): a 15-character
    bridge name gets a short one of its own, a short bridge name keeps `<bridge>-out`."""
    from netvm.diagnosis import FIREWALLD_NAME_MAX, _firewalld_policy

    def policy(bridge: str) -> str:
        (name,) = {
            part.split("--new-policy=")[1].split()[0]
            for part in _firewalld_policy(bridge, "up0").split("; ")
            if "--new-policy=" in part
        }
        return name

    assert policy("nvbr0") == "nvbr0-out"
    long_one, other = policy("netvm-bridge-01"), policy("netvm-bridge-02")
    assert len(long_one) <= FIREWALLD_NAME_MAX
    assert long_one != other
