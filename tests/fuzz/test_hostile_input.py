"""Arbitrary values and bytes thrown at the API and the CLI (hypothesis).

The property, everywhere: a call either succeeds or raises a netvm error (the CLI: exits 0,
1 with one error line, or 2 for usage), never anything else, and after every refusal the
namespace is exactly as before (netvm.testing.snapshot, and the leases). Most examples run
on the in-memory FakeBackend; a few run the same checks on the kernel in a throwaway
namespace.
"""

from __future__ import annotations

import contextlib
import io
import ipaddress
import tempfile
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, TypeVar

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st

from netvm import (
    ConfigError,
    ConflictError,
    FakeBackend,
    FakeState,
    KernelBackend,
    NetvmError,
    NetworkConfig,
    NetworkManager,
    TapOptions,
)
from netvm.backends.base import MAX_ID, Backend
from netvm.cli import main
from netvm.config import UNUSABLE_NETWORKS, validate_ifname
from netvm.testing import snapshot, throwaway_netns

T = TypeVar("T")

FAST = settings(
    max_examples=150,
    deadline=None,
    database=None,
    suppress_health_check=[HealthCheck.too_slow],
)
CLI = settings(FAST, max_examples=100)
ON_KERNEL = settings(FAST, max_examples=12)

# Values --------------------------------------------------------------------------------


SURROGATES = st.characters(min_codepoint=0xD800, max_codepoint=0xDFFF)
CHARACTERS = st.one_of(st.characters(), SURROGATES)
NASTY = [
    *("", " ", "\x00", "\n", "a\x00b", "é", "\u200b", "\udcff", "\ud800"),
    *("!br0", "br+", "br*", "-j", "'", '"', "\\", "all", "default", ".", ".."),
    *(
        "\u0661\u0665\u0660\u0660",
        "\u00b2",
        "\u0663\u0660\u0660\u0660",
        "99999999999",
        "-1",
        "0",
        "4294967295",
        "4294967294",
        "1e3",
    ),
    *("0.0.0.0/0", "224.0.0.0/24", "127.0.0.0/24", "169.254.0.0/24", "240.0.0.0/24"),
    *("255.255.255.252/30", "0.0.0.0/8", "192.0.2.0/24", "198.51.100.0/24", "2001:db8::/64"),
    *("x" * 15, "x" * 16, "v" * 64, "v" * 65, "é" * 33),
]
# Numbers in other scripts: int() reads the decimal digits of every script, and str.isdigit()
# also accepts superscripts and circled digits, which int() refuses.
_ODD_DIGITS = [chr(c) for c in range(0x110000) if chr(c).isdigit() and not chr(c).isascii()]
NUMERALS = st.one_of(
    st.text(st.sampled_from(_ODD_DIGITS), min_size=1, max_size=6),
    st.text(st.sampled_from(_ODD_DIGITS + list("0123456789")), min_size=1, max_size=6),
    st.text(st.characters(categories=("Nd", "No", "Nl")), min_size=1, max_size=6),
)
# Text with bytes that are not UTF-8, as argv and os.environ carry them (PEP 383).
UNDECODABLE = st.builds(
    lambda head, stray, raw, tail: head + (stray + raw).decode("utf-8", "surrogateescape") + tail,
    st.text(max_size=4),
    st.integers(0x80, 0xBF).map(lambda byte: bytes([byte])),  # never valid where text starts
    st.binary(max_size=4),
    st.text(max_size=4),
)
TEXT = st.one_of(
    st.sampled_from(NASTY),
    NUMERALS,
    UNDECODABLE,
    st.text(CHARACTERS, max_size=20),
    st.binary(max_size=20).map(lambda raw: raw.decode("utf-8", "surrogateescape")),
)
ANYTHING: st.SearchStrategy[Any] = st.one_of(
    TEXT,
    st.none(),
    st.booleans(),
    st.integers(),
    st.sampled_from([-1, 0, 1, 2**31, 2**32 - 2, 2**32 - 1, 2**32, 2**64]),
    st.floats(),
    st.binary(max_size=8),
    st.lists(TEXT, max_size=3),
    st.builds(object),
    st.just(ipaddress.IPv4Network("192.0.2.0/24")),
    st.just(ipaddress.IPv6Network("2001:db8::/64")),
    st.just(Path("/nonexistent")),
)
NETWORKS = st.builds(
    lambda address, prefix: ipaddress.IPv4Network((address, prefix), strict=False),
    st.one_of(
        st.ip_addresses(v=4),
        st.ip_addresses(network="198.51.100.0/22"),
        st.ip_addresses(network="203.0.112.0/22"),
    ),
    st.integers(0, 32),
)
UNUSABLE = st.sampled_from(
    [
        *("0.0.0.0/0", "0.0.0.0/8", "127.0.0.0/24", "169.254.1.0/24", "224.0.0.0/24"),
        *("240.0.0.0/4", "255.255.255.252/30", "128.0.0.0/1", "192.0.0.0/2"),
        "10.0.0.0/7",  # usable
    ]
)
SUBNETS = st.one_of(NETWORKS, NETWORKS.map(str), UNUSABLE, ANYTHING)
NAMES = st.one_of(st.sampled_from(["nvbr0", "up0", "br-1.2", "_x"]), TEXT, ANYTHING)
VM_IDS = st.one_of(st.sampled_from(["vm-a", "vm-b", "vm-c", "é-1"]), TEXT, ANYTHING)
ID_NUMBERS = st.one_of(st.none(), st.integers(0, MAX_ID), ANYTHING)
TAP_ARGS = st.one_of(
    st.fixed_dictionaries(
        {},
        optional={
            "owner": ID_NUMBERS,
            "group": ID_NUMBERS,
            "multi_queue": st.one_of(st.booleans(), ANYTHING),
            "vnet_hdr": st.one_of(st.booleans(), ANYTHING),
        },
    ),
    st.fixed_dictionaries({"owner": st.integers(0, MAX_ID), "vnet_hdr": st.booleans()}),
)


def make_tap(kwargs: dict[str, Any]) -> TapOptions:
    return TapOptions(**kwargs)


def attempt(call: Callable[[], T]) -> T | NetvmError:
    """The result of `call`, or the netvm error it raised (any other exception escapes)."""
    try:
        return call()
    except NetvmError as error:
        return error


# Pure values: configuration and TAP options ----------------------------------------------


def one_hostile(
    valid: dict[str, st.SearchStrategy[Any]], hostile: dict[str, st.SearchStrategy[Any]]
) -> st.SearchStrategy[dict[str, Any]]:
    """Mostly one hostile value among valid ones (so that it gets past the other checks and
    reaches its own), sometimes hostile values everywhere."""
    return st.one_of(
        st.sampled_from(sorted(hostile)).flatmap(
            lambda key: st.fixed_dictionaries(
                {key: hostile[key]}, optional={k: v for k, v in valid.items() if k != key}
            )
        ),
        st.fixed_dictionaries({}, optional=hostile),
    )


CONFIG_FIELDS = one_hostile(
    {
        "bridge_name": st.sampled_from(["nvbr0", "br-1.2", "_x"]),
        "vm_subnet": st.sampled_from(["192.0.2.0/24", "10.0.0.0/30"]),
        "host_egress_iface": st.just("up0"),
        "mtu": st.sampled_from([68, 1500, 65521]),
        "state_dir": st.just("/tmp/netvm-fuzz"),
        "firewall": st.sampled_from(["auto", "nftables", "iptables"]),
    },
    {
        "bridge_name": NAMES,
        "vm_subnet": SUBNETS,
        "host_egress_iface": NAMES,
        "mtu": st.one_of(st.integers(0, 70000), NUMERALS, ANYTHING),
        "state_dir": st.one_of(UNDECODABLE, TEXT, ANYTHING),
        "firewall": st.one_of(TEXT, ANYTHING),
    },
)
ENVIRONMENTS = one_hostile(
    {
        "MICROVM_NETWORK_BRIDGE": st.just("nvbr0"),
        "MICROVM_NETWORK_SUBNET": st.just("192.0.2.0/24"),
        "MICROVM_NETWORK_EGRESS": st.just("up0"),
        "MICROVM_NETWORK_MTU": st.just("1500"),
        "MICROVM_NETWORK_STATE_DIR": st.just("/tmp/netvm-fuzz"),
        "MICROVM_NETWORK_FIREWALL": st.just("auto"),
    },
    {
        "MICROVM_NETWORK_BRIDGE": st.one_of(NAMES, TEXT),
        "MICROVM_NETWORK_SUBNET": st.one_of(NETWORKS.map(str), TEXT, ANYTHING),
        "MICROVM_NETWORK_EGRESS": st.one_of(NAMES, TEXT),
        "MICROVM_NETWORK_MTU": st.one_of(NUMERALS, st.integers(0, 70000).map(str), ANYTHING),
        "MICROVM_NETWORK_STATE_DIR": st.one_of(UNDECODABLE, TEXT, ANYTHING),
        "MICROVM_NETWORK_FIREWALL": st.one_of(TEXT, ANYTHING),
        "UNRELATED": ANYTHING,
    },
)


@FAST
@given(CONFIG_FIELDS)
def test_network_config_accepts_only_what_the_kernel_and_firewalls_take(
    fields: dict[str, Any],
) -> None:
    config = attempt(lambda: NetworkConfig(**fields))
    if isinstance(config, NetvmError):
        assert isinstance(config, ConfigError)
        assert config.field in fields
        return
    assert validate_ifname("bridge_name", config.bridge_name) != config.host_egress_iface
    validate_ifname("host_egress_iface", config.host_egress_iface)
    assert isinstance(config.vm_subnet, ipaddress.IPv4Network)
    assert config.vm_subnet.prefixlen <= 30
    assert not any(config.vm_subnet.overlaps(net) for net, _ in UNUSABLE_NETWORKS)
    assert type(config.mtu) is int
    assert 68 <= config.mtu <= 65521
    str(config.state_dir).encode()
    assert "\x00" not in str(config.state_dir)


@FAST
@given(ENVIRONMENTS)
def test_from_env_raises_only_config_errors_naming_the_variable(env: dict[str, Any]) -> None:
    result = attempt(lambda: NetworkConfig.from_env(env))
    if isinstance(result, NetvmError):
        assert isinstance(result, ConfigError)
        assert result.field in env, result


@FAST
@given(TAP_ARGS)
def test_tap_options_are_type_and_range_checked(kwargs: dict[str, Any]) -> None:
    tap = attempt(lambda: make_tap(kwargs))
    if isinstance(tap, NetvmError):
        assert isinstance(tap, ConfigError)
        assert tap.field in kwargs
        return
    for value in (tap.owner, tap.group):
        assert value is None or (type(value) is int and 0 <= value <= MAX_ID)
    assert type(tap.multi_queue) is bool
    assert type(tap.vnet_hdr) is bool


# The manager on a namespace -----------------------------------------------------------

SUBNET = "192.0.2.0/24"
ADDRESS = ipaddress.IPv4Interface("198.51.100.2/24")
ROUTED = ipaddress.IPv4Network("203.0.113.0/25")
ROUTES = (
    "Iface\tDestination\tGateway\tFlags\tRefCnt\tUse\tMetric\tMask\tMTU\tWindow\tIRTT\n"
    "up0\t00000000\t017100CB\t0003\t0\t0\t0\t00000000\t0\t0\t0\n"
    "up0\t007100CB\t00000000\t0001\t0\t0\t0\t80FFFFFF\t0\t0\t0\n"
)


def fake_host() -> FakeBackend:
    """An uplink with an address and a route, as a host has them."""
    backend = FakeBackend(FakeState())
    backend.add_link("up0", "veth")
    up0 = backend.get_link("up0")
    assert up0 is not None
    backend.add_address(up0.index, ADDRESS)
    backend.state.proc["/proc/thread-self/net/route"] = ROUTES
    return backend


def state_of(manager: NetworkManager) -> tuple[dict[str, Any], list[Any]]:
    leases = [(a.vm_id, a.network, a.tap_present, a.on_bridge) for a in manager.list()]
    return snapshot(manager.backend), leases


Op = tuple[str, Any, Any]
OPS: st.SearchStrategy[Op] = st.one_of(
    st.tuples(st.just("attach"), VM_IDS, st.one_of(st.none(), TAP_ARGS, ANYTHING)),
    st.tuples(st.just("attach-policy"), st.sampled_from(["vm-a", "vm-c"]), ANYTHING),
    st.tuples(
        st.just("attach-many"),
        st.one_of(VM_IDS, st.lists(VM_IDS, max_size=3)),
        st.one_of(st.none(), ANYTHING),
    ),
    st.tuples(st.just("detach"), VM_IDS, st.none()),
    st.tuples(
        st.just("gc"),
        st.one_of(VM_IDS, st.lists(VM_IDS, max_size=3), st.tuples(VM_IDS), st.frozensets(TEXT)),
        st.none(),
    ),
)


def apply(manager: NetworkManager, op: Op) -> None:
    """Run one operation; on a refusal, check that nothing changed."""
    kind, value, tap_args = op
    assert manager.wait_detached()  # the TAPs of earlier detaches are deleted in the background
    before = state_of(manager)
    attached = {vm_id for vm_id, network, *_ in before[1] if network is not None}
    try:
        if kind == "attach":
            # A dict is built into TapOptions (its checks); anything else is passed as it is.
            tap = make_tap(tap_args) if isinstance(tap_args, dict) else tap_args
            network = manager.attach(value, tap)
            assert network.vm_id == value
        elif kind == "attach-policy":
            assert manager.attach(value, policy=tap_args).vm_id == value
        elif kind == "attach-many":
            result = manager.attach_many(value, tap_args)
            assert not isinstance(value, str), "a str must never be read as its characters"
            assert set(result.networks) | set(result.errors) == set(value)
        elif kind == "detach":
            manager.detach(value)
        else:
            removed = manager.gc(keep=value)
            assert not isinstance(value, str), "a str must never be read as its characters"
            assert not set(removed) & set(value), "gc removed a VM it was told to keep"
            assert set(removed) <= attached
    except NetvmError:
        assert manager.wait_detached()
        assert state_of(manager) == before, f"{op!r} was refused but changed the namespace"


@contextlib.contextmanager
def fake_manager(subnet: str = SUBNET) -> Iterator[NetworkManager]:
    with tempfile.TemporaryDirectory() as state_dir:
        config = NetworkConfig("nvbr0", subnet, "up0", state_dir=state_dir)
        with NetworkManager(config, fake_host()) as manager:
            yield manager


@FAST
@given(st.lists(OPS, min_size=1, max_size=4))
def test_attach_detach_gc_refuse_hostile_values_and_change_nothing(ops: list[Op]) -> None:
    with fake_manager() as manager:
        manager.ensure_host()
        manager.attach("vm-a")
        manager.attach("vm-b", TapOptions(owner=1000, vnet_hdr=True))
        for op in ops:
            apply(manager, op)


@FAST
@given(NETWORKS)
def test_ensure_host_refuses_a_subnet_in_use_before_changing_anything(
    subnet: ipaddress.IPv4Network,
) -> None:
    in_use = subnet.overlaps(ADDRESS.network) or subnet.overlaps(ROUTED)
    with tempfile.TemporaryDirectory() as state_dir:
        try:
            config = NetworkConfig("nvbr0", subnet, "up0", state_dir=state_dir)
        except ConfigError:
            return
        manager = NetworkManager(config, fake_host())
        check_ensure_host(manager, subnet, in_use)


def check_ensure_host(manager: NetworkManager, subnet: ipaddress.IPv4Network, in_use: bool) -> None:
    with manager:
        before = snapshot(manager.backend)
        error = attempt(manager.ensure_host)
    if error is None:
        assert not in_use, f"{subnet} overlaps what up0 has, but ensure_host accepted it"
        return
    assert isinstance(error, ConflictError)
    assert in_use, error
    assert str(subnet) in str(error)
    assert snapshot(manager.backend) == before


# The command line -----------------------------------------------------------------------

COMMANDS = ["ensure-host", "attach", "detach", "list", "gc", "teardown", "status", "doctor"]
OPTIONS = [
    *("--netns", "--bridge", "--subnet", "--egress", "--mtu", "--firewall", "--json"),
    *("--keep", "--owner", "--group", "--multi-queue", "--vnet-hdr", "--for", "--queues"),
    *(
        "--iface-id",
        "--hostname",
        "--guest-device",
        "--dns",
        "--mtu=\u0661\u0665\u0660\u0660",
        "--owner=\u00b2",
    ),
]
VALUES = [
    *("vm-a", "vm-b", "fcbr0", "eth0", "172.30.0.0/24", "172.30.0.0/16", "1500", "9000"),
    *("auto", "nftables", "iptables", "firecracker", "qemu", "cloud-hypervisor", "2", "root"),
]
TOKENS = st.one_of(
    st.sampled_from(COMMANDS), st.sampled_from(OPTIONS), st.sampled_from(VALUES), NUMERALS, TEXT
)
GLOBAL_VALUES = {
    "--netns": ["ns0"],
    "--bridge": ["fcbr0", "nvbr1"],
    "--subnet": ["172.30.0.0/24", "10.9.0.0/30"],
    "--mtu": ["1500", "9000"],
    "--firewall": ["auto", "iptables"],
}
ATTACH_VALUES = {
    "--owner": ["0", "1000", "root", "4294967294"],
    "--group": ["0", "root"],
    "--for": ["firecracker", "qemu", "cloud-hypervisor"],
    "--queues": ["1", "2"],
    "--iface-id": ["eth0"],
    "--hostname": ["guest1"],
    "--guest-device": ["eth0"],
    "--dns": ["192.0.2.53"],
}
VALUES_OF = {
    "attach": {**GLOBAL_VALUES, **ATTACH_VALUES},
    "gc": {**GLOBAL_VALUES, "--keep": ["vm-a"]},
    **{command: GLOBAL_VALUES for command in COMMANDS if command not in ("attach", "gc")},
}
HOSTILE_VALUES = st.one_of(NUMERALS, UNDECODABLE, TEXT)


def command_line(command: str, hostile: int = 0) -> st.SearchStrategy[list[str]]:
    """`COMMAND [VM_ID] OPTION VALUE...` with up to one hostile value among valid ones (with
    `hostile`, exactly one, in an option: the VM_ID is then a valid one)."""
    values = VALUES_OF[command]
    good = st.sampled_from(sorted(values)).flatmap(
        lambda option: st.tuples(st.just(option), st.sampled_from(values[option]))
    )
    bad = st.tuples(st.sampled_from(sorted(values)), HOSTILE_VALUES)
    needs_vm = command in ("attach", "detach")
    valid_ids = st.sampled_from(["vm-a", "vm-b"])
    vm_ids = valid_ids if hostile else st.one_of(valid_ids, HOSTILE_VALUES)
    return st.builds(
        lambda vm_id, pairs, hostile, at, flags: [
            command,
            *([vm_id] if needs_vm else []),
            *(token for pair in [*pairs[:at], *hostile, *pairs[at:]] for token in pair),
            *flags,
        ],
        vm_ids,
        st.lists(good, max_size=3),
        st.lists(bad, min_size=hostile, max_size=1),
        st.integers(0, 3),
        st.lists(st.sampled_from(["--json", "--multi-queue", "--vnet-hdr"]), max_size=2),
    )


ARGV = st.one_of(
    st.sampled_from(COMMANDS).flatmap(command_line),
    st.builds(lambda command, rest: [command, *rest], st.sampled_from(COMMANDS), st.lists(TOKENS)),
    st.lists(TOKENS, max_size=6),
)


def usable(argv: list[str]) -> bool:
    """Leave out --state-dir (and its abbreviations): the fuzzer must not make directories
    wherever it likes; the test gives one. -v is left out so errors are alone on stderr."""
    return not any(t.startswith(("--st", "-v", "--ve")) for t in argv)


def run_cli(argv: list[str], factory: Callable[[str | None], Backend]) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        code = main(argv, backend_factory=factory, environ={})
    return code, out.getvalue(), err.getvalue()


def check_cli(argv: list[str], backend: Callable[[], Backend], state_dir: str) -> None:
    """Run `netvm --state-dir D --egress up0 ARGV...`; `backend()` opens the namespace."""
    config = NetworkConfig(host_egress_iface="up0", state_dir=state_dir)

    def state() -> tuple[dict[str, Any], list[Any]]:
        opened = backend()
        try:
            with NetworkManager(config, opened) as manager:
                return state_of(manager)
        finally:
            opened.close()

    before = state()
    code, _, err = run_cli(
        ["--state-dir", state_dir, "--egress", "up0", *argv], lambda netns: backend()
    )
    assert "Traceback" not in err
    assert "internal error" not in err, err
    assert code in (0, 1, 2), (code, err)
    if code == 2:
        assert "usage:" in err
    if code == 1:
        errors = [line for line in err.splitlines() if not line.startswith("netvm: WARNING: ")]
        if errors or "doctor" not in argv:  # doctor exits 1 for a blocking finding
            assert len(errors) == 1, err
            assert ": error: " in errors[0]
    if code != 0:
        assert state() == before, f"{argv!r} failed but changed the namespace"


def with_a_vm(backend: Backend, state_dir: str) -> None:
    config = NetworkConfig(host_egress_iface="up0", state_dir=state_dir)
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        manager.attach("vm-a")


def check_cli_on_fake(argv: list[str]) -> None:
    assume(usable(argv))
    host = fake_host()
    with tempfile.TemporaryDirectory() as state_dir:
        with_a_vm(host, state_dir)
        check_cli(argv, lambda: FakeBackend(host.state), state_dir)


@CLI
@given(ARGV)
def test_the_cli_never_prints_a_traceback_and_a_failure_changes_nothing(argv: list[str]) -> None:
    check_cli_on_fake(argv)


@CLI
@given(command_line("attach", hostile=1))
def test_attach_options_never_print_a_traceback(argv: list[str]) -> None:
    """attach has the most options: a test of its own, so that each gets hostile values."""
    check_cli_on_fake(argv)


# The same on the kernel, a few examples each ------------------------------------------------


@pytest.fixture(scope="module")
def kernel_netns() -> Iterator[str]:
    with throwaway_netns("netvm-fuzz-") as name:
        yield name


@pytest.mark.privileged
@ON_KERNEL
@given(ops=st.lists(OPS, min_size=1, max_size=3))
def test_on_the_kernel_hostile_values_are_refused_and_change_nothing(
    kernel_netns: str, ops: list[Op]
) -> None:
    with tempfile.TemporaryDirectory() as state_dir:
        config = NetworkConfig("nvbr0", SUBNET, "up0", state_dir=state_dir)
        with NetworkManager(config, KernelBackend(kernel_netns)) as manager:
            try:
                manager.ensure_host()
                manager.attach("vm-a")
                for op in ops:
                    apply(manager, op)
            finally:
                manager.teardown_host()
                manager.backend.close()


@pytest.mark.privileged
@ON_KERNEL
@given(argv=ARGV)
def test_on_the_kernel_the_cli_never_prints_a_traceback(kernel_netns: str, argv: list[str]) -> None:
    assume(usable(argv))
    backend = KernelBackend(kernel_netns)
    with tempfile.TemporaryDirectory() as state_dir:
        try:
            with_a_vm(backend, state_dir)
            check_cli(argv, lambda: KernelBackend(kernel_netns), state_dir)
        finally:
            with NetworkManager(NetworkConfig(state_dir=state_dir), backend) as manager:
                manager.teardown_host()
            backend.close()
