"""Named network namespaces made without a process, and running code inside one."""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TypeVar

from netvm.backends.iptc_compat import load_iptc
from netvm.backends.netns import CLONE_NEWNET, NETNS_RUN_DIR, NamespaceThread
from netvm.errors import NetvmError, host_error
from netvm.firewall.libnftables import binding_unavailable

MS_BIND = 0x1000
MS_REC = 0x4000
MS_SHARED = 1 << 20
MNT_DETACH = 0x2
_libc = ctypes.CDLL(None, use_errno=True)


def _fail(operation: str, device: str) -> None:
    raise host_error(operation, device, ctypes.get_errno() or errno.EIO)


def _share_run_dir() -> None:
    """Make /run/netns a shared mount of its own, as `ip netns add` does.

    Otherwise the first `ip netns add` after a namespace of ours bind-mounts the directory
    over itself, which hides our namespace's mount under it: the file can then be neither
    unmounted ("not mounted") nor removed (EBUSY), and the namespace leaks.
    """
    directory = str(NETNS_RUN_DIR).encode()
    if _libc.mount(b"none", directory, None, MS_SHARED | MS_REC, None) == 0:
        return
    if ctypes.get_errno() != errno.EINVAL:  # EINVAL: not a mount point yet
        _fail("share the mount of", str(NETNS_RUN_DIR))
    if _libc.mount(directory, directory, b"none", MS_BIND | MS_REC, None) != 0:
        _fail("bind-mount", str(NETNS_RUN_DIR))
    if _libc.mount(b"none", directory, None, MS_SHARED | MS_REC, None) != 0:
        _fail("share the mount of", str(NETNS_RUN_DIR))


def create_netns(name: str) -> None:
    """Create the named network namespace /run/netns/NAME (EEXIST if it exists)."""
    NETNS_RUN_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
    _share_run_dir()
    path = NETNS_RUN_DIR / name
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CREAT | os.O_EXCL, 0)
    except OSError as exc:
        raise host_error("create network namespace", str(path), exc.errno or errno.EIO) from None
    os.close(fd)
    failure: list[BaseException] = []

    def make() -> None:
        try:
            if _libc.unshare(CLONE_NEWNET) != 0:
                _fail("unshare network namespace", name)
            source = f"/proc/self/task/{threading.get_native_id()}/ns/net".encode()
            if _libc.mount(source, str(path).encode(), None, MS_BIND, None) != 0:
                _fail("bind-mount network namespace", str(path))
        except BaseException as exc:
            failure.append(exc)

    worker = threading.Thread(target=make, name=f"netvm-create-{name}")
    worker.start()
    worker.join()
    if failure:
        path.unlink(missing_ok=True)
        raise failure[0]


def delete_netns(name: str) -> None:
    """Delete a named network namespace; one that is gone already is success."""
    path = NETNS_RUN_DIR / name
    if not path.exists():
        return
    if _libc.umount2(str(path).encode(), MNT_DETACH) != 0 and ctypes.get_errno() != errno.EINVAL:
        _fail("unmount network namespace", str(path))
    path.unlink(missing_ok=True)


@contextmanager
def throwaway_netns(prefix: str = "netvm-") -> Iterator[str]:
    """A fresh, randomly named network namespace, deleted on exit (also on error or ^C)."""
    name = f"{prefix}{secrets.token_hex(4)}"
    create_netns(name)
    try:
        yield name
    finally:
        delete_netns(name)


T = TypeVar("T")


def run_in_netns(netns: str | None, fn: Callable[[], T]) -> T:
    """Run `fn` on a fresh thread inside `netns` (None: this process's own) and return its result.

    Sockets, TUN descriptors and /proc/sys/net files that `fn` opens belong to that namespace.
    The calling thread's namespace is never changed.
    """
    worker = NamespaceThread(netns)
    try:
        return worker.call(fn)
    finally:
        worker.stop()


CAP_NET_ADMIN = 12


def kernel_unavailable() -> str | None:
    """Why netvm cannot act on the kernel here (no CAP_NET_ADMIN, no /dev/net/tun, no
    python-iptables libraries, no libnftables binding), or None when it can: for skipping
    one's own kernel tests."""
    with open("/proc/self/status") as status:
        caps = next((line for line in status if line.startswith("CapEff:")), "CapEff: 0")
    if not int(caps.split()[1], 16) >> CAP_NET_ADMIN & 1:
        return "needs CAP_NET_ADMIN (run as root)"
    if not os.path.exists("/dev/net/tun"):
        return "needs /dev/net/tun"
    try:
        load_iptc()
    except NetvmError as exc:
        return f"needs python-iptables with Debian's iptables package: {exc}"
    missing = binding_unavailable()
    if missing is not None:
        return f"needs libnftables: {missing}"
    return None
