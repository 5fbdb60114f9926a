"""TAP flags done right: the owner (or group) set by `netvm attach --owner/--group` can
open the TAP after dropping every privilege, another uid (or gid) cannot, and the
multi-queue flag is the one the VMM must open it with.

The child is a fresh Python process (no preexec_fn, no fork of the threaded test process):
as root it enters the test's namespace and opens /dev/net/tun (mode 0600 on this machine;
a jailer makes its own node for the VMM), then drops to the uid/gid and asks for the TAP
with TUNSETIFF, which is where the kernel checks the TAP's owner and group.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from netvm import KernelBackend
from netvm.backends.tun import IFF_MULTI_QUEUE, IFF_NO_PI, IFF_TAP, IFF_VNET_HDR
from netvm.naming import tap_name

pytestmark = pytest.mark.privileged

NETVM = Path(sys.executable).with_name("netvm")

OPEN_AS = """
import ctypes, errno, fcntl, os, struct, sys
netns, name, uid, gid, flags = sys.argv[1], sys.argv[2], *map(int, sys.argv[3:6])
libc = ctypes.CDLL(None, use_errno=True)
ns = os.open("/run/netns/" + netns, os.O_RDONLY)
if libc.setns(ns, 0x40000000) != 0:
    sys.exit("setns failed")
tun = os.open("/dev/net/tun", os.O_RDWR)
os.setgroups([])
os.setgid(gid)
os.setuid(uid)
assert os.geteuid() == uid and os.getegid() == gid
try:
    fcntl.ioctl(tun, 0x400454CA, struct.pack("16sH22x", name.encode(), flags))  # TUNSETIFF
except OSError as exc:
    print(errno.errorcode[exc.errno])
else:
    print("OK")
"""


def open_as(netns: str, name: str, uid: int, gid: int, flags: int) -> str:
    done = subprocess.run(
        [sys.executable, "-c", OPEN_AS, netns, name, str(uid), str(gid), str(flags)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    return done.stdout.strip()


def netvm(netns: str, state_dir: Path, *argv: str) -> None:
    done = subprocess.run(
        [
            str(NETVM),
            *("--netns", netns, "--bridge", "nvbr0", "--subnet", "192.0.2.0/24"),
            *("--egress", "up0", "--state-dir", str(state_dir)),
            *argv,
        ],
        capture_output=True,
        text=True,
        env={k: v for k, v in os.environ.items() if not k.startswith("MICROVM_NETWORK_")},
        timeout=60,
    )
    assert done.returncode == 0, done.stderr


FLAGS = IFF_TAP | IFF_NO_PI | IFF_VNET_HDR  # what Firecracker asks for


def test_only_the_owner_uid_can_open_the_tap(netns: str, tmp_path: Path) -> None:
    netvm(netns, tmp_path, "ensure-host")
    netvm(netns, tmp_path, "attach", "vm-fc", "--for", "firecracker", "--owner", "64000")
    name = tap_name("vm-fc")
    assert open_as(netns, name, 64000, 64000, FLAGS) == "OK"
    assert open_as(netns, name, 64001, 64000, FLAGS) == "EPERM"


def test_only_the_group_can_open_the_tap(netns: str, tmp_path: Path) -> None:
    netvm(netns, tmp_path, "ensure-host")
    netvm(netns, tmp_path, "attach", "vm-q", "--for", "qemu", "--group", "64010")
    name = tap_name("vm-q")
    assert open_as(netns, name, 64011, 64010, FLAGS) == "OK"
    assert open_as(netns, name, 64011, 64012, FLAGS) == "EPERM"


def test_without_owner_or_group_any_uid_holding_a_tun_fd_can_open_it(
    netns: str, tmp_path: Path
) -> None:
    """The kernel checks owner and group only when they are set: without them, access to
    /dev/net/tun is the only gate (docs/cli.md says so: always give --owner or --group)."""
    netvm(netns, tmp_path, "ensure-host")
    netvm(netns, tmp_path, "attach", "vm-plain")
    assert open_as(netns, tap_name("vm-plain"), 64000, 64000, FLAGS) == "OK"


def test_a_multi_queue_tap_must_be_opened_multi_queue(netns: str, tmp_path: Path) -> None:
    netvm(netns, tmp_path, "ensure-host")
    netvm(netns, tmp_path, "attach", "vm-mq", "--for", "qemu", "--multi-queue", "--owner", "64000")
    name = tap_name("vm-mq")
    assert open_as(netns, name, 64000, 64000, FLAGS | IFF_MULTI_QUEUE) == "OK"
    assert open_as(netns, name, 64000, 64000, FLAGS) == "EINVAL"
    backend = KernelBackend(netns)
    try:
        link = backend.get_link(name)
    finally:
        backend.close()
    assert link is not None
    assert link.tap is not None
    assert (link.tap.owner, link.tap.multi_queue, link.tap.vnet_hdr) == (64000, True, True)
