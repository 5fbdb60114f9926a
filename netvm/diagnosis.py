"""`netvm doctor`: what on this host would stop guest traffic, with evidence and a fix.

Read-only: it lists rulesets and reads /proc, never writes, and never reads a legacy
xtables table the kernel has not instantiated (reading one would create it).

    with NetworkManager(config) as manager:
        for finding in doctor(manager):
            print(finding.severity, finding.message, finding.fix)
"""

from __future__ import annotations

import dataclasses
import ipaddress
from dataclasses import dataclass
from typing import Any, Literal

from netvm import naming
from netvm.backends.base import FILTER, Backend
from netvm.errors import NetvmError
from netvm.firewall.choice import ChosenFirewall
from netvm.firewall.nftables import IPTABLES_FAMILY, IPTABLES_TABLE, TABLE_PREFIX, NftablesFirewall
from netvm.firewall.walk import ANY_TAP, Packet, Walk, guest_packets, hook_packets
from netvm.manager import NetworkManager
from netvm.validation import read_routes as _routes

Severity = Literal["blocking", "warning"]
Json = dict[str, Any]


@dataclass(frozen=True)
class Finding:
    code: str
    severity: Severity
    message: str
    evidence: str
    fix: str

    @property
    def blocking(self) -> bool:
        return self.severity == "blocking"

    def to_dict(self) -> dict[str, str]:
        return {
            "code": self.code,
            "severity": self.severity,
            "message": self.message,
            "evidence": self.evidence,
            "fix": self.fix,
        }


def doctor(manager: NetworkManager) -> list[Finding]:
    """Every finding for `manager`'s bridge; none blocking means guests will get out."""
    config, backend = manager.config, manager.backend
    bridge, egress = config.bridge_name, config.host_egress_iface
    found: list[Finding] = []
    found += _egress(backend, egress)
    found += _subnet(manager)
    found += _sysctls(backend, egress)
    try:
        chosen = manager.choose_firewall()
    except NetvmError as exc:
        return [
            *found,
            Finding("no-firewall", "blocking", str(exc), "", "install python3-nftables"),
        ]
    kind = chosen.kind
    if kind != "nftables":
        attached, stopped = _guarded(manager)
        if attached or stopped:
            switch = _switch_refused(manager, chosen, attached, stopped)
            if switch is not None:
                return [*found, switch]  # the legacy tables' findings would only say it again
            # ensure_host refuses to move the rules to iptables: they stay in nftables,
            # where the VMs' guarantees are, and that is what decides for the guests.
            found.append(_pin_nftables(config.firewall, chosen.reason, attached, stopped))
            kind = "nftables"
    missing = backend.firewall(kind).check(manager.firewall_policy)
    if missing:
        fix = f"run `netvm ensure-host` (or NetworkManager.ensure_host()) for {bridge}"
        if kind != chosen.kind:
            fix = f"with the firewall pinned to nftables ({_PIN}), {fix}"
        found.append(
            Finding(
                "netvm-rules-missing",
                "blocking",
                f"netvm's {kind} rules for {bridge} are not (all) in place",
                "; ".join(missing),
                fix,
            )
        )
    guest = naming.guest_ip(config.vm_subnet, 0)
    found += _nftables(backend, kind, guest, bridge, egress)
    found += _legacy(backend, kind, bridge, egress)
    return found


_PIN = (
    "MICROVM_NETWORK_FIREWALL=nftables in the environment of every netvm call, or "
    "--firewall nftables on each, or NetworkConfig(firewall='nftables')"
)
"""How the firewall is pinned to nftables for good."""


def _guarded(manager: NetworkManager) -> tuple[list[str], list[str]]:
    """The VMs with guarantees (which ensure_host will not take from them): those whose TAP
    exists, and those whose lease outlives their TAP (a stopped VM keeping its address)."""
    try:
        manager.host.check_owner()  # another store's bridge: no store is made in this one
        guarded = manager._guarded_vms()
        taps = {lease.vm_id: lease.tap_name for lease in manager.leases.all()}
    except NetvmError:
        return [], []  # the lease store is unusable: doctor says so elsewhere
    present = {link.name for link in manager.backend.list_links()}
    attached = [vm for vm in guarded if taps.get(vm, vm) in present]
    return attached, [vm for vm in guarded if vm not in attached]


def _vms(attached: list[str], stopped: list[str]) -> str:
    """e.g. "2 attached VM(s) (vm-a, vm-b) and 1 leased VM(s) whose TAP is gone (vm-c)"."""

    def some(vms: list[str]) -> str:
        return ", ".join(vms[:5]) + (", ..." if len(vms) > 5 else "")

    parts = []
    if attached:
        parts.append(f"{len(attached)} attached VM(s) ({some(attached)})")
    if stopped:
        parts.append(f"{len(stopped)} leased VM(s) whose TAP is gone ({some(stopped)})")
    return " and ".join(parts)


def _switch_refused(
    manager: NetworkManager, chosen: ChosenFirewall, attached: list[str], stopped: list[str]
) -> Finding | None:
    """Where nftables cannot be used (its binding is missing), the finding that says so;
    None where it can (the rules stay there: `_pin_nftables`)."""
    unusable = manager.backend.firewall("nftables").unavailable()
    if unusable is None:
        return None
    return Finding(
        "netvm-rules-missing",
        "blocking",
        f"the firewall is {chosen.kind} ({chosen.reason}), which cannot hold the guarantees "
        f"of {_vms(attached, stopped)}: ensure_host refuses it",
        f"nftables cannot be used: {unusable}",
        f"make nftables usable again ({unusable}), then run `netvm ensure-host`; or detach "
        "those VMs first",
    )


def _pin_nftables(configured: str, reason: str, attached: list[str], stopped: list[str]) -> Finding:
    """The firewall configured (or `auto`, as the host is now) is iptables, but VMs hold
    guarantees that only nftables can: ensure_host refuses to move the rules, which stay
    in nftables, until the firewall is pinned there (or the VMs are detached)."""
    if configured == "auto":
        message = (
            "firewall=auto now picks iptables, which cannot hold the guarantees of "
            f"{_vms(attached, stopped)}: under auto, ensure_host refuses and a VM attached "
            "gets no guarantee; netvm's rules stay in nftables, and doctor judges them there"
        )
    else:
        message = (
            f"firewall={configured} cannot hold the guarantees of {_vms(attached, stopped)}: "
            "ensure_host refuses it; netvm's rules stay in nftables, and doctor judges them "
            "there"
        )
    return Finding(
        "firewall-pin-nftables",
        "warning",
        message,
        reason,
        f"pin the firewall to nftables for good: {_PIN}; or detach those VMs first",
    )


# Interfaces, routes, addresses ------------------------------------------------------------


def _egress(backend: Backend, egress: str) -> list[Finding]:
    if backend.get_link(egress) is None:
        return [
            Finding(
                "egress-missing",
                "blocking",
                f"the egress interface {egress} does not exist in this namespace",
                "no link of that name",
                "set host_egress_iface (MICROVM_NETWORK_EGRESS, --egress) to the uplink",
            )
        ]
    defaults = [iface for iface, net in _routes(backend) if net.prefixlen == 0]
    if egress not in defaults:
        where = ", ".join(defaults) if defaults else "none"
        return [
            Finding(
                "no-default-route",
                "warning",
                f"no default route leaves through {egress}",
                f"default routes via: {where}",
                "set host_egress_iface to the interface of the default route, or add a route",
            )
        ]
    return []


def _subnet(manager: NetworkManager) -> list[Finding]:
    config, backend = manager.config, manager.backend
    bridge = backend.get_link(config.bridge_name)
    names = {link.index: link.name for link in backend.list_links()}
    found: list[Finding] = []
    for address in backend.list_addresses():
        if address.interface.network.overlaps(config.vm_subnet) and (
            bridge is None or address.index != bridge.index
        ):
            found.append(
                Finding(
                    "subnet-overlap",
                    "blocking",
                    f"the VM subnet {config.vm_subnet} overlaps an address of another interface",
                    f"{address.interface} on {names.get(address.index, address.index)}",
                    "choose another vm_subnet (MICROVM_NETWORK_SUBNET, --subnet)",
                )
            )
    for iface, network in _routes(manager.backend):
        if network.prefixlen and network.overlaps(config.vm_subnet) and iface != config.bridge_name:
            found.append(
                Finding(
                    "subnet-overlap",
                    "blocking",
                    f"the VM subnet {config.vm_subnet} overlaps a route",
                    f"{network} dev {iface}",
                    "choose another vm_subnet (MICROVM_NETWORK_SUBNET, --subnet)",
                )
            )
    return found


def _sysctls(backend: Backend, egress: str) -> list[Finding]:
    found: list[Finding] = []
    if (backend.read_proc("/proc/sys/net/ipv4/ip_forward") or "0").strip() != "1":
        found.append(
            Finding(
                "ip-forward-off",
                "blocking",
                "IPv4 forwarding is off in this namespace",
                "/proc/sys/net/ipv4/ip_forward = 0",
                "run `netvm ensure-host`: it switches ip_forward on (and off again at teardown)",
            )
        )
    rp = backend.read_proc(f"/proc/sys/net/ipv4/conf/{egress}/rp_filter")
    if rp is not None and rp.strip() == "1":
        found.append(
            Finding(
                "rp-filter-strict",
                "warning",
                f"strict reverse-path filtering on {egress}",
                f"/proc/sys/net/ipv4/conf/{egress}/rp_filter = 1",
                "fine while replies come back through the egress; with asymmetric routing use "
                f"loose mode: sysctl net.ipv4.conf.{egress}.rp_filter=2",
            )
        )
    return found


# nftables ---------------------------------------------------------------------------------


def _matches(rule: Json, key: str, value: str) -> bool:
    for expr in rule.get("expr", []):
        match = expr.get("match") if isinstance(expr, dict) else None
        if match and match.get("left") == {"meta": {"key": key}} and match.get("right") == value:
            return True
    return False


def _verdicts(rule: Json) -> set[str]:
    return {
        name
        for expr in rule.get("expr", [])
        if isinstance(expr, dict)
        for name in expr
        if name in ("accept", "drop", "reject", "jump", "goto")
    }


def _nftables(
    backend: Backend, chosen: str, guest: ipaddress.IPv4Address, bridge: str, egress: str
) -> list[Finding]:
    firewall = backend.firewall("nftables")
    if not isinstance(firewall, NftablesFirewall) or firewall.unavailable() is not None:
        return []
    nf_call = backend.read_proc("/proc/sys/net/bridge/bridge-nf-call-iptables")
    bridged = nf_call is not None and nf_call.strip() == "1"
    chains: dict[tuple[str, str], dict[str, Json]] = {}
    rules: dict[tuple[str, str], list[Json]] = {}
    for item in firewall.walkable_ruleset():
        if "chain" in item:
            chain = item["chain"]
            chains.setdefault((chain["family"], chain["table"]), {})[chain["name"]] = chain
        elif "rule" in item:
            rule = item["rule"]
            rules.setdefault((rule["family"], rule["table"]), []).append(rule)
    packets = guest_packets(bridge, egress, guest)
    found: list[Finding] = []
    for (family, table), by_name in chains.items():
        if table.startswith(TABLE_PREFIX):
            continue
        table_rules = rules.get((family, table), [])
        walk = Walk(by_name, table_rules)
        iptables_forward = (family, table) == (IPTABLES_FAMILY, IPTABLES_TABLE)
        if iptables_forward and "FORWARD" in by_name:
            if any(n.startswith("ufw-") for n in by_name):
                found += _ufw(walk, packets, bridge, egress, bridged)
            else:
                found += _iptables_nft(by_name, table_rules, chosen)
                if chosen == "nftables":
                    # netvm's accepts stand in this table: is anything before them in the way?
                    found += _walked(
                        walk, (family, table, "FORWARD"), packets, bridge, egress, bridged
                    )
        for name, chain in by_name.items():
            hook = chain.get("hook")
            if hook is None or (iptables_forward and name == "FORWARD"):
                continue
            if family in ("ip", "inet") and hook == "forward":
                found += _walked(walk, (family, table, name), packets, bridge, egress, bridged)
                continue
            devices = chain.get("dev")
            named = devices if isinstance(devices, list) else [devices] if devices else []
            unnamed = family == "netdev" and not named  # libnftables < 1.0.7 omits it
            prio = chain.get("prio")
            priority = prio if isinstance(prio, int) else 0
            seen = [
                _before_conntrack(packet) if _untracked(family, hook, priority) else packet
                for device in (named or ([egress, bridge] if unnamed else [None]))
                for packet in hook_packets(family, hook, device, priority, bridge, egress, guest)
                if chain.get("type") != "nat" or packet.ct_state == "new"  # a first packet
            ]
            found += _dropped_at(walk, (family, table, name), chain, seen, unnamed, bridge, egress)
    return found


def _dropped_at(
    walk: Walk,
    at: tuple[str, str, str],
    chain: Json,
    packets: list[Packet],
    unnamed: bool,
    bridge: str,
    egress: str,
) -> list[Finding]:
    """A base chain at another hook than forward (`at`: family, table, chain) that
    certainly drops a guest's packet. What may or may not is not reported there (rules on
    addresses, as Docker's per-container drops in raw PREROUTING, would make every such
    host a warning). `unnamed`: a netdev chain whose device libnftables does not name,
    walked as if on the egress and on the bridge: a warning, not blocking."""
    family, table, name = at
    dropped_packets = [packet for packet in packets if walk.verdict(name, packet) == "drop"]
    dropped = [packet.what for packet in dropped_packets]
    if not dropped:
        return []
    at_text = f"{family} {table} {name}"
    hook = str(chain.get("hook"))
    where = f"table {family} {table} chain {name} (hook {hook}"
    if unnamed:
        where += f" of a device libnftables does not name: if it is {egress} or {bridge})"
    else:
        where += f" of {chain['dev']})" if chain.get("dev") else ")"
    prio = chain.get("prio")
    priority = prio if isinstance(prio, int) else 0
    if family == "bridge":  # the guests' TAPs (meta ibrname needs nft_meta_bridge)
        key = "iifname" if hook in ("prerouting", "input") else "oifname"
        fix = (
            f'let them through before the drop: nft insert rule {at_text} {key} "{ANY_TAP}" accept'
        )
    elif family == "netdev":
        rule = "accept for the guests' traffic"
        fix = f"let them through before the drop: nft insert rule {at_text} {rule}"
    else:
        fix = _let_dropped_through(at, hook, priority, dropped_packets, bridge, egress)
    return [
        Finding(
            "foreign-hook-unsure" if unnamed else "foreign-hook-drop",
            "warning" if unnamed else "blocking",
            f"{where} drops " + " and ".join(dict.fromkeys(dropped)),
            f"{where}: policy {chain.get('policy', 'accept')}; walked to a drop",
            fix,
        )
    ]


def _let_dropped_through(
    at: tuple[str, str, str],
    hook: str,
    priority: int,
    dropped: list[Packet],
    bridge: str,
    egress: str,
) -> str:
    """The rules that let the dropped packets (and only those) through the ip or inet base
    chain `at` at prerouting or postrouting; where no rule can (the replies, before
    conntrack has seen them), what the administrator must change instead."""
    family, table, name = at
    commands: list[str] = []
    untracked = False
    for packet in dropped:
        reply = packet.iifname == egress
        if hook == "prerouting" and reply and _untracked(family, hook, priority):
            untracked = True
        elif hook == "prerouting":
            commands.append(_insert(at, "-i", egress if reply else bridge, reply))
        else:
            commands.append(_insert(at, "-o", bridge if reply else egress, reply))
    fix = ""
    if commands:
        fix = "let them through before the drop: " + "; ".join(dict.fromkeys(commands))
    if untracked:
        chain = f"table {family} {table} chain {name}"
        if _xtables_tool(family, table, name) is not None:
            replies = _insert((family, "mangle", name), "-i", egress, True)
            later = f"to the mangle table's PREROUTING behind `{replies}`"
        else:
            later = (
                f"to a prerouting chain of priority above {CONNTRACK_PRIORITY} behind "
                f'`iifname "{egress}" {_REPLIES}`'
            )
        fix += (". " if fix else "") + (
            f"No rule in {chain} can let the replies to the guests through: at priority "
            f"{priority} conntrack has not seen them yet (it runs at {CONNTRACK_PRIORITY}), so "
            f"there a reply from {egress} cannot be told from a new packet. Narrow that drop "
            f"(to the sources, ports or addresses it is meant for) so that it does not take "
            f"every packet from {egress}, or move it {later}, or remove it"
        )
    return fix


def _iptables_nft(chains: dict[str, Json], rules: list[Json], chosen: str) -> list[Finding]:
    forward = chains["FORWARD"]
    drops = forward.get("policy") == "drop" or any(
        rule["chain"] == "FORWARD" and _verdicts(rule) & {"drop", "reject"} for rule in rules
    )
    if not drops or chosen == "nftables":
        return []  # netvm's own accepts stand there: `check` reports them when missing
    return [
        Finding(
            "rules-split",
            "blocking",
            "the iptables-nft filter table drops forwarded packets, and netvm's rules are "
            "in the legacy tables, whose accept cannot override it",
            "ip filter FORWARD drops; netvm firewall = iptables (legacy)",
            "use the nftables firewall: --firewall nftables (MICROVM_NETWORK_FIREWALL)",
        )
    ]


def _ufw(
    walk: Walk, packets: list[Packet], bridge: str, egress: str, bridged: bool
) -> list[Finding]:
    """ufw's FORWARD chain walked like any other (ufw rewrites its chains on reload, so
    netvm writes nothing there: the fix is ufw's own command)."""
    found: list[Finding] = []
    between = Packet("frames between guests on the bridge", bridge, bridge, "new", None, None)
    cases = [(p, f"ufw route allow in on {bridge} out on {egress}", False) for p in packets]
    if bridged:  # with br_netfilter, bridged frames pass the forward hook too
        cases.append((between, f"ufw route allow in on {bridge} out on {bridge}", True))
    note = "ufw rewrites its chains on reload, so netvm does not write there"
    for packet, fix, between_guests in cases:
        verdict = walk.verdict("FORWARD", packet)
        evidence = (
            f"iptables-nft filter FORWARD with ufw-* chains: {packet.what}: {verdict}; {note}"
        )
        if verdict == "drop" and between_guests:
            found.append(
                Finding("ufw-bridge-drop", "warning", f"ufw drops {packet.what}", evidence, fix)
            )
        elif verdict == "drop":
            found.append(
                Finding("ufw-forward-drop", "blocking", f"ufw drops {packet.what}", evidence, fix)
            )
        elif verdict == "unknown":
            message = (
                f"ufw may drop {packet.what}: its rules match on what netvm cannot tell "
                "(ports, addresses)"
            )
            found.append(Finding("ufw-forward-unsure", "warning", message, evidence, fix))
    return found


def _walked(
    walk: Walk,
    at: tuple[str, str, str],
    packets: list[Packet],
    bridge: str,
    egress: str,
    bridged: bool,
) -> list[Finding]:
    """What the base chain `at` (family, table, chain) does to the guests' packets
    (netvm/firewall/walk.py); with br_netfilter (`bridged`), to frames between guests."""
    family, table, name = at
    found = _between_guests(walk, at, bridge) if bridged else []
    verdicts = {packet.what: walk.verdict(name, packet) for packet in packets}
    dropped = [what for what, verdict in verdicts.items() if verdict == "drop"]
    unsure = [what for what, verdict in verdicts.items() if verdict == "unknown"]
    evidence = f"table {family} {table} chain {name}: " + "; ".join(
        f"{what}: {verdict}" for what, verdict in verdicts.items()
    )
    fix = f"{_insert(at, '-i', bridge, False, egress)}; {_insert(at, '-o', bridge, True, egress)}"
    if table == "firewalld":
        fix = _firewalld_policy(bridge, egress)
    if dropped:
        code = "firewalld-forward-reject" if table == "firewalld" else "foreign-forward-drop"
        return [
            *found,
            Finding(
                code,
                "blocking",
                f"table {family} {table} drops or rejects at the forward hook "
                + " and ".join(dropped),
                evidence,
                fix,
            ),
        ]
    if unsure:
        return [
            *found,
            Finding(
                "foreign-forward-unsure",
                "warning",
                f"table {family} {table} may drop at the forward hook "
                + " and ".join(unsure)
                + ": its rules match on what netvm cannot tell (addresses of the internet, "
                "ports, marks...)",
                evidence,
                fix,
            ),
        ]
    return found


def _between_guests(walk: Walk, at: tuple[str, str, str], bridge: str) -> list[Finding]:
    """With br_netfilter loaded, frames bridged from guest to guest pass the forward hook:
    a chain there that drops them stops the guests' traffic with each other (not their
    way out). Reported only where the drop is certain, with the accept that lets them by."""
    family, table, name = at
    between = Packet("frames between guests on the bridge", bridge, bridge, "new", None, None)
    if walk.verdict(name, between) != "drop":
        return []
    where = f"table {family} {table} chain {name}"
    fix = _insert(at, "-i", bridge, False, bridge)
    if table == "firewalld":
        fix = (
            f"firewall-cmd --permanent --zone={bridge} --add-forward; firewall-cmd --reload "
            f"(firewalld 1.0 or later: forwarding within the bridge's zone {bridge})"
        )
    return [
        Finding(
            "bridged-frames-drop",
            "warning",
            f"{where} drops frames between guests on the bridge: br_netfilter is loaded, so "
            "frames bridged between guests pass the forward hook",
            f"/proc/sys/net/bridge/bridge-nf-call-iptables = 1; {where}: frames from "
            f"{bridge} to {bridge}: drop",
            f"{fix}; or, if nothing on this host needs br_netfilter (Docker and Kubernetes "
            "do), sysctl -w net.bridge.bridge-nf-call-iptables=0",
        )
    ]


FIREWALLD_NAME_MAX = 17
"""firewalld's longest policy name (its max_policy_name_len(): 28 less 11 for its chains)."""


def _firewalld_policy(bridge: str, egress: str) -> str:
    """firewalld's own commands (it rewrites its table on reload): the bridge in a zone of
    its own, and a policy from that zone to the uplink's that accepts (firewalld >= 0.9;
    firewalld lets the replies back itself). Not the trusted zone: it would also accept
    every packet from the guests to the host itself, opening each of its ports to them."""
    cmd = "firewall-cmd --permanent"
    policy = f"{bridge}-out"
    if len(policy) > FIREWALLD_NAME_MAX:  # firewalld refuses longer policy names
        policy = f"nv{naming.sha256_hex(bridge.encode())[:8]}-out"
    uplink = (
        f'"$(firewall-cmd --get-zone-of-interface={egress} || firewall-cmd --get-default-zone)"'
    )
    return "; ".join(
        [
            f"{cmd} --new-zone={bridge}",
            f"{cmd} --zone={bridge} --add-interface={bridge}",
            f"{cmd} --new-policy={policy}",
            f"{cmd} --policy={policy} --add-ingress-zone={bridge}",
            f"{cmd} --policy={policy} --add-egress-zone={uplink}",
            f"{cmd} --policy={policy} --set-target=ACCEPT",
            "firewall-cmd --reload",
        ]
    ) + (
        f" (firewalld 0.9 or later: zone {bridge} takes the guests' packets to the host with "
        f"firewalld's defaults, policy {policy} forwards them to {egress}'s zone; not "
        f"--zone=trusted, which would open every port of the host to the guests)"
    )


# Legacy xtables ---------------------------------------------------------------------------


_REPLIES = "ct state established,related accept"
CONNTRACK_PRIORITY = -200
"""Where conntrack hooks prerouting: a chain at or before it sees no connection state."""
_IPTABLES_NFT_CHAINS = {
    "filter": ("INPUT", "FORWARD", "OUTPUT"),
    "mangle": ("PREROUTING", "INPUT", "FORWARD", "OUTPUT", "POSTROUTING"),
    "raw": ("PREROUTING", "OUTPUT"),
    "nat": ("PREROUTING", "INPUT", "OUTPUT", "POSTROUTING"),
    "security": ("INPUT", "FORWARD", "OUTPUT"),
}
"""The tables iptables-nft makes in the ip and ip6 families, and their base chains."""


def _xtables_tool(family: str, table: str, chain: str) -> str | None:
    """iptables-nft (ip6tables-nft) where `chain` is a base chain of a table iptables-nft
    made: a native nft rule there makes iptables-nft refuse to list the whole table
    ("table is incompatible, use 'nft' tool"), so the fix is written with iptables-nft."""
    if family in ("ip", "ip6") and chain in _IPTABLES_NFT_CHAINS.get(table, ()):
        return "iptables-nft" if family == "ip" else "ip6tables-nft"
    return None


def _insert(
    at: tuple[str, str, str],
    flag: Literal["-i", "-o"],
    iface: str,
    replies: bool,
    other: str | None = None,
) -> str:
    """The command that inserts, at the top of the base chain `at` (family, table, chain),
    an accept of what comes in on (`-i`) or goes out through (`-o`) `iface` (and, with
    `other`, goes out through or came in on that one: a forward fix no wider than the
    guests' way out), of its replies only when `replies`: with iptables-nft in the tables
    it made, else with nft."""
    family, table, chain = at
    tool = _xtables_tool(family, table, chain)
    pair = [(flag, iface)]
    if other is not None:
        pair.append(("-o" if flag == "-i" else "-i", other))
    pair.sort()  # -i first
    if tool is not None:
        where = f"{tool} -I {chain}" if table == "filter" else f"{tool} -t {table} -I {chain}"
        state = " -m conntrack --ctstate ESTABLISHED,RELATED" if replies else ""
        match = " ".join(f"{f} {name}" for f, name in pair)
        return f"{where} {match}{state} -j ACCEPT"
    verdict = _REPLIES if replies else "accept"
    match = " ".join(f'{"iifname" if f == "-i" else "oifname"} "{name}"' for f, name in pair)
    return f"nft insert rule {family} {table} {chain} {match} {verdict}"


def _untracked(family: str, hook: str, priority: int) -> bool:
    """A base chain that sees the guests' packets before conntrack does (raw prerouting)."""
    return family in ("ip", "inet") and hook == "prerouting" and priority <= CONNTRACK_PRIORITY


def _before_conntrack(packet: Packet) -> Packet:
    """`packet` as a chain before conntrack sees it: `ct state` reads invalid there (the
    kernel has no connection for it yet), so a `ct state established` accept never takes
    a reply."""
    return dataclasses.replace(packet, ct_state="invalid")


def _let_through(tool: str, chain: str, bridge: str, egress: str) -> str:
    """The iptables commands (of `tool`) that let the guests' traffic to `egress` and its
    replies through `chain`, and nothing wider: what the nft `ct state` fix says, in a form
    iptables can list."""
    return (
        f"{tool} -I {chain} -i {bridge} -o {egress} -j ACCEPT; {tool} -I {chain} -i {egress} "
        f"-o {bridge} -m conntrack --ctstate ESTABLISHED,RELATED -j ACCEPT"
    )


def _legacy(backend: Backend, chosen: str, bridge: str, egress: str) -> list[Finding]:
    """What the legacy filter FORWARD does to the guests' packets, while netvm's rules are
    in nftables (an accept there cannot override a drop here)."""
    if FILTER not in backend.legacy_tables() or backend.xtables_unavailable() is not None:
        return []
    if chosen == "iptables":
        return []
    policy = backend.legacy_policy(FILTER, "FORWARD")
    packets = {
        "new connections from the guests": _LegacyPacket(bridge, egress, ("NEW",)),
        "replies to the guests": _LegacyPacket(egress, bridge, ("ESTABLISHED", "RELATED")),
    }
    chains = set(backend.list_chains(FILTER))
    verdicts = {
        what: _legacy_verdict(backend, chains, "FORWARD", packet, policy, 0)
        for what, packet in packets.items()
    }
    dropped = [what for what, verdict in verdicts.items() if verdict == "drop"]
    unsure = [what for what, verdict in verdicts.items() if verdict == "unknown"]
    if not dropped and not unsure:
        return []
    evidence = f"iptables-legacy filter FORWARD (policy {policy}): " + "; ".join(
        f"{what}: {verdict}" for what, verdict in verdicts.items()
    )
    fix = (
        "let the bridge through the legacy table: "
        f"{_let_through('iptables-legacy', 'FORWARD', bridge, egress)} (or, with no VM that has "
        "guarantees, which only nftables holds: --firewall iptables)"
    )
    if dropped:
        return [
            Finding(
                "rules-split",
                "blocking",
                "the legacy xtables filter table drops " + " and ".join(dropped) + ", and "
                "netvm's rules are in nftables, whose accept cannot override it",
                evidence,
                fix,
            )
        ]
    return [
        Finding(
            "rules-split-unsure",
            "warning",
            "the legacy xtables filter table may drop " + " and ".join(unsure) + ": its "
            "rules match on what netvm cannot tell (ports, addresses, other matches)",
            evidence,
            fix,
        )
    ]


@dataclass(frozen=True)
class _LegacyPacket:
    in_iface: str
    out_iface: str
    ctstate: tuple[str, ...]


def _iface_matches(pattern: str | None, name: str) -> bool:
    if pattern is None:
        return True
    if pattern.endswith("+"):
        return name.startswith(pattern[:-1])
    return pattern == name


_GOES_ON = frozenset({"LOG", "NFLOG", "ULOG", "MARK", "CONNMARK", "TCPMSS", "CT", "NOTRACK"})
"""Targets after which a packet goes on to the next rule."""


def _legacy_verdict(
    backend: Backend,
    chains: set[str],
    chain: str,
    packet: _LegacyPacket,
    policy: str | None,
    depth: int,
) -> str:
    """ "accept", "drop", "unknown", or "return" (a user chain's end) for `packet`, walking
    the rules of `chain` and the chains they jump to. A rule with matches netvm does not
    model (ports, addresses...) may or may not take the packet: its drop is "unknown"."""
    if depth > 16:
        return "unknown"
    unsure = False
    for rule in backend.list_rules(FILTER, chain):
        if not (
            _iface_matches(rule.in_iface, packet.in_iface)
            and _iface_matches(rule.out_iface, packet.out_iface)
            and (not rule.ctstate or set(rule.ctstate) & set(packet.ctstate))
        ):
            continue
        # Options of the target itself (REJECT --reject-with) come first in `other` only
        # when the rule has no match netvm does not model; a negated interface comes last.
        only_target = rule.other.startswith("-j ") and " -i !" not in rule.other
        certain = rule.source is None and (
            not rule.other or (only_target and " -o !" not in rule.other)
        )
        target = rule.target
        if target in ("DROP", "REJECT"):
            if certain and not unsure:
                return "drop"
            unsure = True
            continue
        if target == "ACCEPT":
            if certain and not unsure:
                return "accept"
            unsure = True
            continue
        if target == "RETURN":
            if certain:
                return "unknown" if unsure else "return"
            unsure = True
            continue
        if target not in chains or " -g " in f" {rule.other}":
            # Another extension target (NFQUEUE...), or a goto (its chain's end is the
            # policy of the chain that called this one): not walked.
            if target not in _GOES_ON:
                unsure = True
            continue
        inner = _legacy_verdict(backend, chains, target, packet, None, depth + 1)
        if inner == "return":
            continue
        if inner == "unknown" or not certain or unsure:
            unsure = True
            continue
        return inner
    if unsure:
        return "unknown"
    if policy is None:
        return "return"
    return "accept" if policy == "ACCEPT" else "drop"
