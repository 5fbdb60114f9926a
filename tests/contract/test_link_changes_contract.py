"""The primitives of the deferred detach: changes by ifindex (rename, release, group),
pipelined look-ups and group deletion. The fake must do and refuse what the kernel does."""

from __future__ import annotations

import errno
import platform

import pytest

from netvm import FakeBackend, TapOptions
from netvm.backends.base import NO_MASTER, Backend, Link, LinkChange


def _link(backend: Backend, name: str) -> Link:
    link = backend.get_link(name)
    assert link is not None, name
    return link


def _linux_at_least(major: int, minor: int) -> bool:
    release = platform.release().split("-")[0].split(".")
    return (int(release[0]), int(release[1])) >= (major, minor)


def _port(backend: Backend, name: str = "tap0") -> tuple[Link, Link]:
    backend.create_bridge("br0", 1500)
    backend.create_tap(name, TapOptions())
    bridge = _link(backend, "br0")
    backend.set_link(name, master=bridge.index, up=True, alias="mine")
    return bridge, _link(backend, name)


def test_one_change_downs_releases_renames_marks_and_groups(backend: Backend) -> None:
    _, tap = _port(backend)
    change = LinkChange(
        tap.index, name="gone0", up=False, master=NO_MASTER, alias="doomed", group=77
    )
    assert backend.change_links([change]) == []
    assert backend.get_link("tap0") is None
    moved = _link(backend, "gone0")
    assert (moved.index, moved.up, moved.master, moved.alias, moved.group) == (
        tap.index,
        False,
        None,
        "doomed",
        77,
    )
    # The old name is free at once: a new TAP may take it.
    backend.create_tap("tap0", TapOptions())
    assert _link(backend, "tap0").index != tap.index


def test_a_device_that_is_up_can_be_renamed_since_linux_6_2(backend: Backend) -> None:
    _, tap = _port(backend)
    expected: list[object] | None = (
        [] if isinstance(backend, FakeBackend) or _linux_at_least(6, 2) else None
    )
    failed = backend.change_links([LinkChange(tap.index, name="live0")])
    if expected is None:  # an older kernel: EBUSY, as the fake with live_rename=False
        assert [code for _, code in failed] == [errno.EBUSY]
    else:
        assert failed == expected
        assert _link(backend, "live0").up


def test_an_older_kernel_refuses_to_rename_a_device_that_is_up() -> None:
    """What netvm's detach falls back from (the fake's model of Linux < 6.2)."""
    backend = FakeBackend()
    backend.state.live_rename = False
    _, tap = _port(backend)
    (failed,) = backend.change_links([LinkChange(tap.index, name="live0", up=False)])
    assert failed[1] == errno.EBUSY
    assert _link(backend, "tap0").up  # the flags come after the name: not applied
    assert backend.change_links([LinkChange(tap.index, up=False)]) == []
    assert backend.change_links([LinkChange(tap.index, name="live0")]) == []
    assert backend.get_link("live0") is not None


def test_change_refusals(backend: Backend) -> None:
    _, tap = _port(backend)
    backend.create_tap("other0", TapOptions())
    missing = LinkChange(999_999, up=False)
    taken = LinkChange(tap.index, name="other0")
    long = LinkChange(tap.index, name="x" * 16)
    bad = LinkChange(tap.index, name="a:b")
    failed = backend.change_links([missing, taken, long, bad])
    assert failed == [
        (missing, errno.ENODEV),
        (taken, errno.EEXIST),
        (long, errno.ERANGE),
        (bad, errno.EINVAL),
    ]
    assert _link(backend, "tap0").index == tap.index


def test_a_failed_rename_keeps_the_group_set_before_it(backend: Backend) -> None:
    """The kernel's order: the group is set before the name is changed."""
    _, tap = _port(backend)
    backend.create_tap("other0", TapOptions())
    failed = backend.change_links([LinkChange(tap.index, name="other0", group=55, up=False)])
    assert [code for _, code in failed] == [errno.EEXIST]
    after = _link(backend, "tap0")
    assert (after.group, after.up) == (55, True)


def test_releasing_a_device_that_is_no_port_is_fine(backend: Backend) -> None:
    backend.create_tap("tap0", TapOptions())
    tap = _link(backend, "tap0")
    assert backend.change_links([LinkChange(tap.index, master=NO_MASTER)]) == []
    backend.set_link("tap0", master=NO_MASTER)
    assert _link(backend, "tap0").master is None


def test_get_links_looks_up_many_and_leaves_out_the_missing(backend: Backend) -> None:
    names = [f"tap{i}" for i in range(40)]  # more than one datagram's worth
    for name in names[::2]:
        backend.create_tap(name, TapOptions())
    found = backend.get_links(names)
    assert sorted(found) == sorted(names[::2])
    assert all(found[name].name == name and found[name].kind == "tun" for name in found)
    assert backend.get_links([]) == {}


def test_delete_group_deletes_its_members_only(backend: Backend) -> None:
    bridge, _ = _port(backend)
    for name in ("tap1", "tap2", "tap3"):
        backend.create_tap(name, TapOptions())
    changes = [LinkChange(_link(backend, n).index, group=4242) for n in ("tap0", "tap1", "tap2")]
    assert backend.change_links(changes) == []
    assert 4242 in backend.link_groups()
    backend.delete_group(4242)
    assert sorted(link.name for link in backend.list_links()) == ["br0", "lo", "tap3"]
    assert 4242 not in backend.link_groups()
    backend.delete_group(4242)  # empty: success
    assert backend.list_links(master=bridge.index) == []


def test_a_deleter_deletes_groups_of_the_same_namespace(backend: Backend) -> None:
    backend.create_tap("tap0", TapOptions())
    tap = _link(backend, "tap0")
    assert backend.change_links([LinkChange(tap.index, group=99)]) == []
    deleter = backend.deleter()
    try:
        assert 99 in deleter.link_groups()
        deleter.delete_group(99)
    finally:
        deleter.close()
    assert backend.get_link("tap0") is None


@pytest.mark.parametrize("count", [1, 70])
def test_change_links_pipelines_many(backend: Backend, count: int) -> None:
    for i in range(count):
        backend.create_tap(f"tap{i}", TapOptions())
    found = backend.get_links([f"tap{i}" for i in range(count)])
    changes = [LinkChange(link.index, name=f"z{link.index}", alias="x") for link in found.values()]
    assert backend.change_links(changes) == []
    after = {link.name: link for link in backend.list_links() if link.kind == "tun"}
    assert sorted(after) == sorted(f"z{link.index}" for link in found.values())
    assert {link.alias for link in after.values()} == {"x"}
