"""The `netvm` command: host networking for microVMs from a shell or another language.

    netvm [global options] COMMAND [options]

Commands: ensure-host, attach VM_ID, detach VM_ID..., list, gc --keep [VM_ID...], teardown,
status. Global options may come before or after the command. Exit status: 0 on success,
1 when netvm reports an error (one line on stderr saying what failed and what to do),
2 for a usage error, 130 when interrupted. `--json` prints one JSON document on stdout whose
schema (version 1) is described in docs/cli.md.

`main()` takes the backend from `backend_factory(netns)` (the kernel unless given), which is
how tests run the whole command in-process on the in-memory FakeBackend.

A command imports what it needs when it runs (the manager, the kernel backend, the doctor,
the JSON encoder...), so `netvm --help` loads no backend and no lease store, and `attach`
loads neither the doctor nor the status report (tests/unit/test_imports.py).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any, NoReturn

from netvm import cli_policy, glue
from netvm.backends.base import MAX_ID, Link, TapOptions
from netvm.config import (
    DEFAULT_BRIDGE,
    DEFAULT_EGRESS,
    ENV_BRIDGE,
    ENV_EGRESS,
    ENV_FIREWALL,
    ENV_MTU,
    ENV_STATE_DIR,
    ENV_SUBNET,
    NetworkConfig,
    parse_firewall,
    parse_mtu,
    parse_state_dir,
    parse_subnet,
    validate_ifname,
)
from netvm.errors import ConfigError, NetvmError, NotFound, StateStoreError
from netvm.naming import VmNetwork

if TYPE_CHECKING:
    import logging

    from netvm.backends.base import Backend
    from netvm.manager import Attachment, NetworkManager
    from netvm.policy import GuestPolicy
    from netvm.status import HostStatus

JSON_SCHEMA_VERSION = 1
"""Bumped only when a key of the `--json` output changes meaning or disappears."""

BackendFactory = Callable[[str | None], "Backend"]
"""Makes the backend for `--netns NAME` (None: the current namespace)."""


def _log() -> logging.Logger:
    import logging

    return logging.getLogger("netvm")


def _kernel_backend(netns: str | None) -> Backend:
    from netvm.backends.kernel import KernelBackend

    return KernelBackend(netns)


# Argument parsing -----------------------------------------------------------------------


def _decimal(value: str, low: int, high: int) -> int | None:
    """The number that `value` spells in ASCII digits (None if it is not one), low to high.

    int() alone would also read other scripts' digits and fail on some characters that
    str.isdigit() accepts (superscripts), with a ValueError rather than a usage error.
    """
    if not (value.isascii() and value.isdigit()):
        return None
    if len(value.lstrip("0")) > len(str(high)) or not low <= int(value) <= high:
        raise argparse.ArgumentTypeError(f"out of range {low} to {high}: {value!r}")
    return int(value)


def _account(value: str, lookup: Callable[[str], int], what: str) -> int:
    """A numeric id, or a name looked up (by `lookup`) in the passwd or group database."""
    number = _decimal(value, 0, MAX_ID)
    if number is not None:
        return number
    try:
        found = lookup(value)
    except (KeyError, ValueError):  # ValueError: a NUL, or text the database cannot hold
        raise argparse.ArgumentTypeError(f"no such {what}: {value!r}") from None
    if not 0 <= found <= MAX_ID:
        raise argparse.ArgumentTypeError(f"{what} {value!r} has the unusable id {found}")
    return found


def _uid(value: str) -> int:
    """A user id (0 to 2**32-2), or a user name looked up in the passwd database."""
    import pwd

    return _account(value, lambda name: pwd.getpwnam(name).pw_uid, "user")


def _gid(value: str) -> int:
    """A group id (0 to 2**32-2), or a group name looked up in the group database."""
    import grp

    return _account(value, lambda name: grp.getgrnam(name).gr_gid, "group")


def _positive(value: str) -> int:
    number = _decimal(value, 1, glue.MAX_QUEUE_PAIRS)
    if number is None:
        raise argparse.ArgumentTypeError(f"not a positive integer: {value!r}")
    return number


def _add_global_options(parser: argparse.ArgumentParser, in_subcommand: bool) -> None:
    """The same options on the main parser and on every command, so that both
    `netvm --netns X list` and `netvm list --netns X` work. In a command their default is
    SUPPRESS, so a value given before the command is not overwritten."""

    def default(value: Any) -> Any:
        return argparse.SUPPRESS if in_subcommand else value

    group = parser.add_argument_group("global options")
    group.add_argument(
        "--netns",
        metavar="NAME",
        default=default(None),
        help="act inside this network namespace (a name under /run/netns, or a path)",
    )
    group.add_argument(
        "--bridge", metavar="NAME", default=default(None), help=f"bridge name ({ENV_BRIDGE})"
    )
    group.add_argument(
        "--subnet", metavar="CIDR", default=default(None), help=f"VM subnet ({ENV_SUBNET})"
    )
    group.add_argument(
        "--egress",
        metavar="IFACE",
        default=default(None),
        help=f"egress interface for NAT ({ENV_EGRESS})",
    )
    group.add_argument("--mtu", default=default(None), help=f"bridge and TAP MTU ({ENV_MTU})")
    group.add_argument(
        "--state-dir",
        metavar="DIR",
        default=default(None),
        help=f"lease store directory ({ENV_STATE_DIR})",
    )
    group.add_argument(
        "--firewall",
        metavar="KIND",
        default=default(None),
        help=f"auto, nftables or iptables: where netvm's rules go ({ENV_FIREWALL})",
    )
    group.add_argument(
        "--json",
        action="store_true",
        default=default(False),
        help="print one JSON document on stdout (schema: docs/cli.md)",
    )
    group.add_argument(
        "-v",
        "--verbose",
        action="count",
        default=default(0),
        help="log what netvm does on stderr (-vv: debug)",
    )


def _columns() -> int:
    """The terminal's width as shutil.get_terminal_size() gives it: $COLUMNS, else the
    terminal of stdout, else 80."""
    try:
        columns = int(os.environ.get("COLUMNS", "0"))
    except ValueError:
        columns = 0
    if columns > 0:
        return columns
    stdout = sys.__stdout__
    try:
        return (os.get_terminal_size(stdout.fileno()).columns if stdout else 0) or 80
    except (ValueError, OSError):
        return 80


class _HelpFormatter(argparse.HelpFormatter):
    """argparse's formatter, given its width. Without one it imports shutil, and with it
    zlib, bz2 and lzma (~2 ms of every command), to ask the terminal each time an
    argument is added, for help that only --help prints."""

    def __init__(self, prog: str) -> None:
        super().__init__(prog, width=_columns() - 2)


class _Parser(argparse.ArgumentParser):
    """argparse's parser, keeping its usage error's message for the `--json` document."""

    usage_error: str | None = None

    def error(self, message: str) -> NoReturn:
        _Parser.usage_error = message
        super().error(message)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(
        prog="netvm",
        formatter_class=_HelpFormatter,
        description="Host networking for microVMs: bridge, NAT, per-VM TAPs.",
        epilog=(
            "Each global option overrides its MICROVM_NETWORK_* variable, which overrides "
            "the default. Exit status: 0 success, 1 error, 2 usage error."
        ),
    )
    parser.add_argument("--version", action=_VersionAction, help="show netvm's version and exit")
    _add_global_options(parser, in_subcommand=False)
    commands = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)

    def command(name: str, help_text: str) -> argparse.ArgumentParser:
        sub = commands.add_parser(
            name, help=help_text, description=help_text, formatter_class=_HelpFormatter
        )
        _add_global_options(sub, in_subcommand=True)
        return sub

    command("ensure-host", "create what is missing of the bridge, gateway, ip_forward and rules")
    attach = command("attach", "lease an address and put the VM's TAP on the bridge")
    attach.add_argument("vm_id", metavar="VM_ID", nargs="+", help="one or more (attach_many)")
    tap = attach.add_argument_group("TAP options")
    tap.add_argument(
        "--owner", type=_uid, metavar="UID", help="user that may open the TAP (uid or name)"
    )
    tap.add_argument(
        "--group", type=_gid, metavar="GID", help="group that may open the TAP (gid or name)"
    )
    tap.add_argument("--multi-queue", action="store_true", help="create a multi-queue TAP")
    tap.add_argument("--vnet-hdr", action="store_true", help="create the TAP with IFF_VNET_HDR")
    vmm = attach.add_argument_group("VMM configuration")
    vmm.add_argument(
        "--for",
        dest="vmm",
        choices=glue.VMMS,
        help="pick TAP flags for this VMM and print its configuration",
    )
    vmm.add_argument(
        "--queues",
        type=_positive,
        metavar="N",
        help="queue pairs of a multi-queue TAP (default 2; 1 without --multi-queue)",
    )
    vmm.add_argument("--iface-id", default="eth0", help="Firecracker's iface_id (default eth0)")
    vmm.add_argument(
        "--vhost",
        action=argparse.BooleanOptionalAction,
        help="QEMU's vhost=on (default: for a multi-queue TAP when /dev/vhost-net is usable)",
    )
    guest = attach.add_argument_group("kernel ip= argument")
    guest.add_argument("--hostname", help="the guest's host name")
    guest.add_argument(
        "--guest-device", default="eth0", metavar="NAME", help="guest interface (default eth0)"
    )
    guest.add_argument(
        "--dns", action="append", default=[], metavar="IP", help="DNS server (up to 2)"
    )
    cli_policy.add_options(attach)
    detach = command("detach", "delete the VMs' TAPs and free their addresses")
    detach.add_argument("vm_id", nargs="+", metavar="VM_ID")  # a list: one or more
    command("list", "the VMs of the bridge: leases and TAPs")
    gc = command("gc", "detach every VM of the bridge except those kept")
    gc.add_argument(
        "--keep",
        nargs="*",
        required=True,
        metavar="VM_ID",
        help="VMs to keep (required; give it with no VM_ID to detach every VM)",
    )
    command("teardown", "remove netvm's TAPs, rules, bridge, and ip_forward if netvm set it")
    command("status", "what of the host set-up is present, and how many VMs are attached")
    command(
        "doctor",
        "what on this host would stop guest traffic, with evidence and the fix (read-only); "
        "exit 1 when something blocks it",
    )
    return parser


def _version() -> str:
    from importlib import metadata  # ~10 ms to import: only for --version

    try:
        return metadata.version("netvm")
    except metadata.PackageNotFoundError:
        return "unknown"


class _VersionAction(argparse.Action):
    """argparse's "version" action, with the version looked up only when it is asked for."""

    def __init__(self, option_strings: Sequence[str], dest: str, help: str | None = None) -> None:
        super().__init__(option_strings, dest, nargs=0, default=argparse.SUPPRESS, help=help)

    def __call__(
        self,
        parser: argparse.ArgumentParser,
        namespace: argparse.Namespace,
        values: Any,
        option_string: str | None = None,
    ) -> None:
        print(f"netvm {_version()}")
        parser.exit()


def load_config(args: argparse.Namespace, environ: Mapping[str, str]) -> NetworkConfig:
    """Options override MICROVM_NETWORK_* variables, which override the defaults.

    A bad option value is reported under the option's name, a bad variable under its own.
    """
    env = dict(environ)
    if args.bridge is not None:
        env[ENV_BRIDGE] = validate_ifname("--bridge", args.bridge)
    if args.subnet is not None:
        parse_subnet("--subnet", args.subnet)
        env[ENV_SUBNET] = args.subnet
    if args.egress is not None:
        env[ENV_EGRESS] = validate_ifname("--egress", args.egress)
    if args.egress is not None and env.get(ENV_BRIDGE, DEFAULT_BRIDGE) == args.egress:
        raise ConfigError("--egress", args.egress, "must differ from the bridge's name")
    if args.bridge is not None and env.get(ENV_EGRESS, DEFAULT_EGRESS) == args.bridge:
        raise ConfigError("--bridge", args.bridge, "must differ from the egress interface")
    if args.mtu is not None:
        env[ENV_MTU] = str(parse_mtu("--mtu", args.mtu))
    if args.firewall is not None:
        env[ENV_FIREWALL] = parse_firewall("--firewall", args.firewall)
    if args.state_dir is not None:
        env[ENV_STATE_DIR] = str(parse_state_dir("--state-dir", args.state_dir))
    return NetworkConfig.from_env(env)


# Output ---------------------------------------------------------------------------------


_emitted = [False]
"""Whether this run printed its JSON document already (`--json` prints one, no more)."""


def _emit(args: argparse.Namespace, document: dict[str, Any], text: str) -> None:
    if args.json:
        import json

        _emitted[0] = True
        print(json.dumps({"version": JSON_SCHEMA_VERSION, **document}, indent=2))
    elif text:
        _print(text)


def _print(text: str) -> None:
    """print(), with what stdout's encoding cannot show (LANG=C, a vm_id 'é') escaped."""
    try:
        print(text)
    except UnicodeEncodeError:
        encoding = sys.stdout.encoding or "utf-8"
        print(text.encode(encoding, "backslashreplace").decode(encoding))


def _tap_dict(tap: TapOptions) -> dict[str, Any]:
    return {
        "owner": tap.owner,
        "group": tap.group,
        "multi_queue": tap.multi_queue,
        "vnet_hdr": tap.vnet_hdr,
    }


def _tap_text(tap: TapOptions) -> str:
    def onoff(flag: bool) -> str:
        return "on" if flag else "off"

    owner = "-" if tap.owner is None else str(tap.owner)
    group = "-" if tap.group is None else str(tap.group)
    return (
        f"owner={owner} group={group} multi_queue={onoff(tap.multi_queue)} "
        f"vnet_hdr={onoff(tap.vnet_hdr)}"
    )


def _status_text(status: HostStatus) -> str:
    def yes(flag: bool, word: str = "present") -> str:
        return word if flag else "MISSING"

    if not status.bridge_present:
        bridge = "MISSING"
    else:
        kind = "netvm bridge" if status.bridge_owned else f"NOT netvm's ({status.bridge_kind})"
        state = "up" if status.up else "DOWN"
        bridge = f"{kind}, mtu {status.mtu} (want {status.expected_mtu}), {state}"
    lines = [
        f"bridge      {status.bridge}: {bridge}",
        f"gateway     {status.gateway}: {yes(status.gateway_present)}",
        f"subnet      {status.subnet} via {status.egress}",
        f"ip_forward  {'on' if status.ip_forward else 'OFF'}",
    ]
    firewall = status.firewall
    lines.append(f"firewall    {firewall.kind or 'NONE'} ({firewall.reason})")
    for rule in firewall.rules:
        lines.append(f"rule        {rule.chain}: {rule.text}")
    for missing in firewall.missing:
        lines.append(f"rule        MISSING {missing}")
    lines.append(f"vms         {status.vms_attached} attached, {status.vms_leased} leased")
    lines.append(f"ready       {'yes' if status.ready else 'no'}")
    return "\n".join(lines)


def _vmm_config(
    args: argparse.Namespace, network: VmNetwork, tap: TapOptions, ip_arg: str, mtu: int
) -> tuple[dict[str, Any], str]:
    import json

    vmm: glue.Vmm = args.vmm
    if vmm == "firecracker":
        body = glue.firecracker_network_interface(network, tap, args.iface_id)
        path = f"/network-interfaces/{body['iface_id']}"
        return (
            {"name": vmm, "api_path": path, "network_interface": body, "boot_args": ip_arg},
            f"firecracker: PUT {path}\n  {json.dumps(body)}\n"
            f"firecracker: append to boot_args\n  {ip_arg}",
        )
    if vmm == "cloud-hypervisor":
        net = glue.cloud_hypervisor_net(network, tap, args.queues, mtu)
        return (
            {"name": vmm, "net": net, "cmdline": ip_arg},
            f"cloud-hypervisor: --net {net}\ncloud-hypervisor: append to --cmdline\n  {ip_arg}",
        )
    qemu = glue.qemu_args(network, tap, args.queues, vhost=args.vhost, mtu=mtu)
    return (
        {"name": vmm, "args": qemu, "append": ip_arg},
        f"qemu: {' '.join(qemu)}\nqemu: append to -append\n  {ip_arg}",
    )


def _attachment_dict(a: Attachment) -> dict[str, Any]:
    net = a.network
    return {
        "vm_id": a.vm_id,
        "tap_name": a.tap_name,
        "guest_ip": str(net.guest_ip) if net is not None else None,
        "guest_mac": net.mac_string() if net is not None else None,
        "tap_present": a.tap_present,
        "on_bridge": a.on_bridge,
        "policy": cli_policy.policy_json(a.policy),
    }


def _guarantees(manager: NetworkManager, status: HostStatus) -> dict[str, Any]:
    """`status`'s guarantees: the default policy, each VM's, what becomes of guest IPv6."""
    default = cli_policy.default_policy(manager.config, status.firewall.kind)
    vms = manager.list() if status.bridge_present else []
    ipv6 = _ipv6([a.policy for a in vms])
    lines = [
        f"policy      default {default.describe()}; " + cli_policy.summary([a.policy for a in vms]),
        f"guest IPv6  {ipv6}",
    ]
    return {
        "default": default.to_json(),
        "vms": [
            {"vm_id": a.vm_id, "tap_name": a.tap_name, "policy": cli_policy.policy_json(a.policy)}
            for a in vms
        ],
        "ipv6": ipv6,
        "text": "\n".join(lines),
    }


def _ipv6(policies: list[GuestPolicy | None]) -> str:
    """What becomes of the guests' IPv6, for the VMs there are (the rule with none)."""
    guarded = sum(1 for policy in policies if policy is not None and policy.anti_spoof)
    if not policies:
        return cli_policy.IPV6
    why = "netvm is IPv4-only: no IPv6 source check"
    if not guarded:
        return f"passes unchecked: no VM has anti_spoof ({why}; under anti_spoof it is dropped)"
    if guarded == len(policies):
        return f"dropped under anti_spoof, which every VM has ({why})"
    return (
        f"dropped under anti_spoof, for the {guarded} VM(s) that have it ({why}); passes "
        f"unchecked for the {len(policies) - guarded} without"
    )


def _attachment_state(a: Attachment) -> str:
    if a.network is None:
        return "no-lease"
    if not a.tap_present:
        return "tap-missing"
    return "attached" if a.on_bridge else "off-bridge"


# Commands -------------------------------------------------------------------------------


def _attach(args: argparse.Namespace, manager: NetworkManager) -> int:
    """One VM: its document. Several (attach_many): {"vms": [one per VM, in order]}, a
    VM that failed as {"vm_id", "error": {"type", "message"}}; exit 1 if one failed."""
    if args.vmm is not None:
        tap = glue.tap_options_for(args.vmm, args.owner, args.group, args.multi_queue)
        if args.vmm == "firecracker" and args.owner is None and args.group is None:
            _log().warning(
                "firecracker: no --owner/--group, so only a privileged Firecracker can open "
                "the TAP; under the jailer pass the jailer's --uid/--gid"
            )
    else:
        tap = TapOptions(args.owner, args.group, args.multi_queue, args.vnet_hdr)
    if args.vnet_hdr:
        tap = TapOptions(tap.owner, tap.group, tap.multi_queue, True)
    try:
        glue.queue_pairs_for(tap, args.queues)
    except ConfigError as exc:  # under the option's name
        raise ConfigError("--queues", exc.value, exc.allowed) from None
    policy = cli_policy.policy_from_args(args, manager.config.guest_policy)
    # Check the ip= and VMM fields before anything is created.
    for vm_id in args.vm_id:
        probe = VmNetwork.for_slot(vm_id, manager.config.vm_subnet, 0)
        try:
            probe.kernel_ip_arg(args.hostname, args.guest_device, tuple(args.dns))
        except ConfigError as exc:  # under the option's name, as every bad option value
            option = _IP_ARG_OPTIONS.get(exc.field, exc.field)
            raise ConfigError(option, exc.value, exc.allowed) from None
        if args.vmm is not None:  # the VMM fields too (--iface-id, --queues)
            try:
                _vmm_config(args, probe, tap, "", manager.config.mtu)
            except ConfigError as exc:
                option = _VMM_OPTIONS.get(exc.field, exc.field)
                raise ConfigError(option, exc.value, exc.allowed) from None
    if len(args.vm_id) == 1:
        network = manager.attach(args.vm_id[0], tap, policy)
        link = manager.backend.get_link(network.tap_name)
        document, text = _attached(args, manager, network, _made_with(link, tap))
        _emit(args, document, text)
        return 0
    result = manager.attach_many(args.vm_id, tap, policy)
    links = manager.backend.get_links([n.tap_name for n in result.networks.values()])
    documents: list[dict[str, Any]] = []
    texts: list[str] = []
    for vm_id in dict.fromkeys(args.vm_id):
        if vm_id in result.networks:
            network = result.networks[vm_id]
            made = _made_with(links.get(network.tap_name), tap)
            document, text = _attached(args, manager, network, made)
            documents.append(document)
            texts.append(text)
        else:
            error = result.errors[vm_id]
            message = " ".join(str(error).split())
            print(f"netvm attach: error: {vm_id}: {message}", file=sys.stderr)
            documents.append(
                {"vm_id": vm_id, "error": {"type": type(error).__name__, "message": message}}
            )
    _emit(args, {"vms": documents}, "\n".join(texts))
    return 1 if result.errors else 0


def _made_with(link: Link | None, requested: TapOptions) -> TapOptions:
    """The flags the kernel says the TAP was made with: a TAP attached again keeps its own
    (IFF_VNET_HDR is not compared on a re-attach), whatever was requested."""
    return link.tap if link is not None and link.tap is not None else requested


def _attached(
    args: argparse.Namespace, manager: NetworkManager, network: VmNetwork, tap: TapOptions
) -> tuple[dict[str, Any], str]:
    """One attached VM's document and text, with the guarantees the kernel holds for it
    and `tap`, the flags its TAP was made with (_made_with)."""
    held = cli_policy.held(manager, network.tap_name)
    ip_arg = network.kernel_ip_arg(args.hostname, args.guest_device, tuple(args.dns))
    vm = {**network.to_dict(), "kernel_ip_arg": ip_arg}
    document: dict[str, Any] = {
        "vm": vm,
        "tap": _tap_dict(tap),
        "policy": cli_policy.policy_json(held),
        "vmm": None,
    }
    lines = [
        f"attached {network.vm_id}",
        f"  tap        {network.tap_name}",
        f"  guest_ip   {network.guest_ip}/{network.prefixlen}",
        f"  guest_mac  {network.mac_string()}",
        f"  gateway    {network.gateway_ip}",
        f"  kernel_ip  {ip_arg}",
        f"  policy     {cli_policy.policy_text(held)}",
        f"  tap_flags  {_tap_text(tap)}",
    ]
    if args.vmm is not None:
        document["vmm"], text = _vmm_config(args, network, tap, ip_arg, manager.config.mtu)
        lines.append(text)
    return document, "\n".join(lines)


def _list(args: argparse.Namespace, manager: NetworkManager) -> None:
    attachments = manager.list()
    rows = [("VM_ID", "TAP", "GUEST_IP", "GUEST_MAC", "STATE", "POLICY")]
    for a in attachments:
        d = _attachment_dict(a)
        rows.append(
            (
                a.vm_id,
                a.tap_name,
                d["guest_ip"] or "-",
                d["guest_mac"] or "-",
                _attachment_state(a),
                cli_policy.policy_text(a.policy),
            )
        )
    widths = [max(len(row[i]) for row in rows) for i in range(5)]
    text = "\n".join(
        "  ".join(cell.ljust(width) for cell, width in zip(row[:5], widths, strict=True))
        + "  "
        + row[5]
        for row in rows
    )
    if not attachments:
        text = f"no VMs on {manager.config.bridge_name}"
    _emit(args, {"vms": [_attachment_dict(a) for a in attachments]}, text)


def _doctor(args: argparse.Namespace, manager: NetworkManager) -> int:
    """Exit 1 when a finding blocks guest traffic, else 0."""
    from netvm.diagnosis import doctor

    findings = doctor(manager)
    blocking = any(f.blocking for f in findings)
    lines = []
    for f in findings:
        lines += [f"{f.severity.upper():8} {f.message}", f"         evidence: {f.evidence}"]
        lines.append(f"         fix: {f.fix}")
    verdict = "guests will NOT get out" if blocking else "guests will get out"
    lines.append(f"{manager.config.bridge_name}: {verdict}")
    document = {
        "bridge": manager.config.bridge_name,
        "guests_get_out": not blocking,
        "findings": [f.to_dict() for f in findings],
    }
    _emit(args, document, "\n".join(lines))
    return 1 if blocking else 0


def _run(args: argparse.Namespace, manager: NetworkManager) -> int:
    name = manager.config.bridge_name
    if args.command == "doctor":
        return _doctor(args, manager)
    if args.command == "ensure-host":
        from netvm.status import host_status

        manager.ensure_host()
        status = host_status(manager)
        _emit(args, status.to_dict(), _status_text(status))
    elif args.command == "status":
        from netvm.status import host_status

        status = host_status(manager)
        guarantees = _guarantees(manager, status)
        *lines, ready = _status_text(status).split("\n")
        text = "\n".join([*lines, guarantees.pop("text"), ready])
        _emit(args, {**status.to_dict(), "guarantees": guarantees}, text)
    elif args.command == "attach":
        return _attach(args, manager)
    elif args.command == "detach":
        vm_ids: list[str] = args.vm_id
        if len(vm_ids) == 1:
            manager.detach(vm_ids[0])
            _emit(args, {"vm_id": vm_ids[0], "detached": True}, f"detached {vm_ids[0]}")
        else:  # one lock, one deletion of all the TAPs
            manager.detach_many(vm_ids)
            _emit(args, {"vm_ids": vm_ids, "detached": True}, "detached " + " ".join(vm_ids))
    elif args.command == "list":
        _list(args, manager)
    elif args.command == "gc":
        removed = manager.gc(keep=args.keep)
        text = f"removed {len(removed)} VM(s) from {name}" + "".join(
            f"\n  {vm_id}" for vm_id in removed
        )
        _emit(args, {"removed": removed, "kept": sorted(set(args.keep))}, text)
    elif args.command == "teardown":
        manager.teardown_host()
        _emit(args, {"bridge": name, "torn_down": True}, f"tore down {name}")
    else:  # pragma: no cover - argparse only accepts the commands above
        raise AssertionError(args.command)
    return 0


_IP_ARG_OPTIONS = {"hostname": "--hostname", "device": "--guest-device", "dns": "--dns"}
_VMM_OPTIONS = {"iface_id": "--iface-id", "queue_pairs": "--queues", "multi_queue": "--multi-queue"}
STATE_DIR_OPTION_HINT = "--state-dir (MICROVM_NETWORK_STATE_DIR) must be a writable directory"


def _message(exc: NetvmError) -> str:
    """The error's text with what to do, in the command's words (its options), for the
    few errors whose message does not say it already."""
    text = str(exc)
    if isinstance(exc, NotFound) and exc.operation == "open network namespace":
        return text + "; create it first (ip netns add NAME) or fix --netns"
    if isinstance(exc, StateStoreError):
        from netvm.statefile import STATE_DIR_HINT

        if STATE_DIR_HINT in text:  # the library's hint, named as the command's option
            return text.replace(STATE_DIR_HINT, f"{STATE_DIR_OPTION_HINT} with free space")
        return f"{text}; {STATE_DIR_OPTION_HINT}"
    return text


def _fail(args: argparse.Namespace, kind: str, message: str) -> int:
    """Report an error in one line on stderr (and as JSON on stdout with --json): exit 1."""
    message = " ".join(message.split())
    print(f"netvm {args.command}: error: {message}", file=sys.stderr)
    if args.json:
        _json_error(kind, message)
    return 1


def _json_error(kind: str, message: str) -> None:
    """The error's JSON document, unless this run printed its document already (an error
    or an interruption after it, while the manager closes: stderr and the exit status
    say so)."""
    if _emitted[0]:
        return
    import json

    _emitted[0] = True
    error = {"type": kind, "message": message}
    print(json.dumps({"version": JSON_SCHEMA_VERSION, "error": error}, indent=2))


def _check_arguments(args: argparse.Namespace) -> None:
    """Refuse argument text that netvm could not pass on, before anything is done.

    Undecodable bytes of argv arrive as lone surrogates (PEP 383). A path may carry them
    (the file system takes the bytes back), any other text must have a UTF-8 form.
    """
    if args.netns is not None and (
        not args.netns or "\x00" in args.netns or not _fs_encodable(args.netns)
    ):
        raise ConfigError("--netns", args.netns, "a name under /run/netns or a path, without NUL")
    for dest, value in vars(args).items():
        if dest in _PATH_DESTS:
            continue
        values = value if isinstance(value, list) else [value]
        for text in values:
            if isinstance(text, str) and not _utf8_encodable(text):
                option = "VM_ID" if dest == "vm_id" else "--" + dest.replace("_", "-")
                raise ConfigError(
                    option,
                    text,
                    "text that UTF-8 can encode: an argument with bytes "
                    "that are not UTF-8 is refused",
                )


_PATH_DESTS = frozenset({"netns", "state_dir"})
"""Checked elsewhere: --netns above, --state-dir by NetworkConfig."""


def _fs_encodable(text: str) -> bool:
    try:
        os.fsencode(text)
    except UnicodeEncodeError:
        return False
    return True


def _utf8_encodable(text: str) -> bool:
    try:
        text.encode()
    except UnicodeEncodeError:
        return False
    return True


def _execute(args: argparse.Namespace, factory: BackendFactory, environ: Mapping[str, str]) -> int:
    from netvm.manager import NetworkManager

    _check_arguments(args)
    config = load_config(args, environ)
    backend = factory(args.netns)
    try:
        with NetworkManager(config, backend) as manager:
            return _run(args, manager)
    finally:
        backend.close()


def _sqlite_errors() -> tuple[type[Exception], ...]:
    """sqlite3.Error if the lease store loaded sqlite3; else nothing can have raised it."""
    sqlite3 = sys.modules.get("sqlite3")
    return (sqlite3.Error,) if sqlite3 is not None else ()


def _quiet_stdout() -> None:
    """stdout to /dev/null, so that the interpreter's flush at exit fails no more (exit 1,
    as Python does on EPIPE: the signal module's note on SIGPIPE)."""
    try:
        devnull = os.open(os.devnull, os.O_WRONLY)
        os.dup2(devnull, sys.stdout.fileno())
        os.close(devnull)
    except (OSError, ValueError):  # no stdout at all
        pass


def main(
    argv: Sequence[str] | None = None,
    *,
    backend_factory: BackendFactory | None = None,
    environ: Mapping[str, str] | None = None,
) -> int:
    """Run the `netvm` command; return its exit status (it never calls sys.exit itself).

    Whatever goes wrong ends in one line on stderr: a netvm error, an error of the lease
    store's database or of the operating system (exit 1), a usage error (exit 2). Anything
    else is a bug, reported as one "internal error" line (exit 1); -v adds the traceback.
    A closed pipe on stdout (`netvm list | head -0`), wherever it shows, ends the command
    silently with 1: what it changed stands.
    """
    try:
        return _main(argv, backend_factory, environ)
    except BrokenPipeError:
        _quiet_stdout()
        return 1


def _main(
    argv: Sequence[str] | None,
    backend_factory: BackendFactory | None,
    environ: Mapping[str, str] | None,
) -> int:
    parser = build_parser()
    _Parser.usage_error = None
    _emitted[0] = False
    words = sys.argv[1:] if argv is None else list(argv)
    json_asked = any(len(w) > 2 and "--json".startswith(w) for w in words)  # --js too
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # usage error (2), or --help / --version (0)
        code = exc.code if isinstance(exc.code, int) else 2
        if code == 2 and json_asked and _Parser.usage_error is not None:
            _json_error("UsageError", _Parser.usage_error)
        return code
    except KeyboardInterrupt:
        print("netvm: interrupted", file=sys.stderr)
        return 130
    import logging

    log = logging.getLogger("netvm")
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("netvm: %(levelname)s: %(message)s"))
    log.addHandler(handler)
    log.setLevel({0: logging.WARNING, 1: logging.INFO}.get(args.verbose, logging.DEBUG))
    try:
        env = os.environ if environ is None else environ
        code = _execute(args, backend_factory or _kernel_backend, env)
        sys.stdout.flush()  # a closed pipe shows here, not at the interpreter's exit
        return code
    except NetvmError as exc:
        return _fail(args, type(exc).__name__, _message(exc))
    except BrokenPipeError:
        raise  # main's: also from the printing of an error below
    except _sqlite_errors() as exc:
        # Last resort: the lease store should have turned this into a netvm error.
        return _fail(
            args,
            type(exc).__name__,
            f"the lease store's database is unusable ({exc}): move it out of the state_dir "
            "or choose another --state-dir",
        )
    except OSError as exc:
        return _fail(args, type(exc).__name__, str(exc))
    except KeyboardInterrupt:
        message = "interrupted"
        if args.command == "attach" and len(set(args.vm_id)) > 1:
            message += (
                ": the VMs attached before it stay attached (netvm list); the same command "
                "again attaches the rest"
            )
        print(f"netvm {args.command}: {message}", file=sys.stderr)
        if args.json:
            _json_error("Interrupted", message)
        return 130
    except Exception as exc:
        if args.verbose:
            import traceback

            traceback.print_exc(file=sys.stderr)
        return _fail(
            args,
            "InternalError",
            f"internal error: {type(exc).__name__}: {exc}; this is a bug in netvm, please "
            "report it with the command that caused it"
            + ("" if args.verbose else " (run it again with -v to see the traceback)"),
        )
    finally:
        log.removeHandler(handler)
