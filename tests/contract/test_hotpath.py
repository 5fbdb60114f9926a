"""The hot path's shortcuts: calls from any thread, group deletion in several datagrams.

KernelBackend runs link calls and TUNSETIFF in the calling thread on a socket and
descriptors opened in the namespace; these tests check that nothing lands elsewhere.
"""

from __future__ import annotations

import errno
import os
import struct
import threading

import pytest

from netvm import HostError, KernelBackend, Rule, TapOptions
from netvm.backends import rtnl
from netvm.backends.base import FILTER, Backend


def in_thread(fn: object) -> None:
    failures: list[BaseException] = []

    def run() -> None:
        try:
            fn()  # type: ignore[operator]
        except BaseException as exc:
            failures.append(exc)

    worker = threading.Thread(target=run)
    worker.start()
    worker.join()
    if failures:
        raise failures[0]


def test_a_tap_made_from_another_thread_lands_in_the_backend(backend: Backend) -> None:
    in_thread(lambda: backend.create_tap("tapthr0", TapOptions()))
    link = backend.get_link("tapthr0")
    assert link is not None
    assert link.kind == "tun"
    if isinstance(backend, KernelBackend):
        # This process's own namespace (the one /sys shows) must not have it.
        assert not os.path.exists("/sys/class/net/tapthr0")


def test_many_taps_are_deleted_in_one_group_over_several_datagrams(backend: Backend) -> None:
    names = [f"tapm{i}" for i in range(150)]  # more than one datagram of 64 moves
    for name in names:
        backend.create_tap(name, TapOptions())
    backend.delete_links([*names[:70], "gone0", *names[70:]])
    assert [link.name for link in backend.list_links()] == ["lo"]


def test_errors_keep_the_kernel_errno_after_many_taps(backend: Backend) -> None:
    for i in range(20):  # past the first batch of pooled /dev/net/tun descriptors
        backend.create_tap(f"tapp{i}", TapOptions())
    with pytest.raises(HostError) as taken:
        backend.create_tap("tapp3", TapOptions())
    assert taken.value.errno == errno.EBUSY
    with pytest.raises(HostError) as missing:
        backend.set_link("nope0", up=True)
    assert missing.value.errno == errno.ENODEV
    assert len(backend.list_links()) == 21


@pytest.mark.privileged
def test_concurrent_callers_share_one_socket(netns: str) -> None:
    backend = KernelBackend(netns)
    try:
        backend.create_bridge("br0", 1500)
        bridge = backend.get_link("br0")
        assert bridge is not None

        def attach(worker: int) -> None:
            for i in range(15):
                name = f"tapc{worker}x{i}"
                backend.create_tap(name, TapOptions())
                backend.set_link(name, master=bridge.index, mtu=1400, up=True, alias=name)
                assert backend.get_link(name) is not None

        threads = [threading.Thread(target=attach, args=(w,)) for w in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        ports = backend.list_links(master=bridge.index)
        assert len(ports) == 60
        assert all(p.alias == p.name and p.mtu == 1400 and p.up for p in ports)
    finally:
        backend.close()


def test_link_messages_round_trip_through_the_parser() -> None:
    """Attributes, nesting and padding as the kernel sends them (no root needed)."""
    info = rtnl.attr(
        rtnl.IFLA_LINKINFO,
        rtnl.attr(rtnl.IFLA_INFO_KIND, b"tun\0")
        + rtnl.attr(
            rtnl.IFLA_INFO_DATA | rtnl.NLA_F_NESTED,
            rtnl.u32_attr(rtnl.IFLA_TUN_OWNER, 1234)
            + rtnl.attr(rtnl.IFLA_TUN_VNET_HDR, b"\1")
            + rtnl.attr(rtnl.IFLA_TUN_MULTI_QUEUE, b"\0"),
        ),
    )
    body = (
        struct.pack("=BxHiII", 0, 1, 7, rtnl.IFF_UP, 0)
        + rtnl.name_attr("tap-x")
        + rtnl.u32_attr(rtnl.IFLA_MTU, 1400)
        + rtnl.u32_attr(rtnl.IFLA_MASTER, 3)
        + rtnl.attr(rtnl.IFLA_IFALIAS, b"netvm:a\0")
        + rtnl.u32_attr(rtnl.IFLA_GROUP, 9)
        + info
    )
    message = struct.pack("=IHHII", 16 + len(body), rtnl.RTM_NEWLINK, 0, 1, 0) + body
    link = rtnl.parse_link(message, 0, len(message))
    assert link == rtnl.LinkInfo(
        index=7,
        name="tap-x",
        kind="tun",
        master=3,
        mtu=1400,
        up=True,
        alias="netvm:a",
        group=9,
        tun=(1234, None, False, True),
    )


@pytest.mark.privileged
def test_decoded_rules_follow_changes_made_by_another_writer(netns: str) -> None:
    """The firewall reuses decoded rules only while the kernel's table bytes are the same."""
    reader, writer = KernelBackend(netns), KernelBackend(netns)
    try:
        assert reader.list_rules(FILTER, "FORWARD") == []
        first = Rule("ACCEPT", in_iface="aaaa0", comment="x")
        writer.insert_rule(FILTER, "FORWARD", first)
        assert reader.list_rules(FILTER, "FORWARD") == [first]
        assert reader.list_rules(FILTER, "FORWARD") == [first]
        same_size = Rule("ACCEPT", in_iface="bbbb0", comment="y")
        writer.delete_rule(FILTER, "FORWARD", first)
        writer.insert_rule(FILTER, "FORWARD", same_size)
        assert reader.list_rules(FILTER, "FORWARD") == [same_size]
        writer.create_chain(FILTER, "NETVM-T")
        assert "NETVM-T" in reader.list_chains(FILTER)
        writer.delete_chain(FILTER, "NETVM-T")
        assert "NETVM-T" not in reader.list_chains(FILTER)
    finally:
        reader.close()
        writer.close()
