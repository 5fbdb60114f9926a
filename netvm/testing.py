"""Helpers for tests of code that uses netvm: throwaway namespaces and state snapshots.

Everything here works without a child process: a namespace is made the way `ip netns add`
makes it (unshare in a thread, bind-mounted under /run/netns), so `ip netns list` shows it
and `ip netns exec` works in it.
"""

from __future__ import annotations

import ctypes
import errno
import os
import secrets
import threading
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from netvm.backends.base import FILTER, NAT, Backend
from netvm.backends.netns import CLONE_NEWNET, NETNS_RUN_DIR
from netvm.errors import host_error

MS_BIND = 0x1000
MNT_DETACH = 0x2
_libc = ctypes.CDLL(None, use_errno=True)


def _fail(operation: str, device: str) -> None:
    raise host_error(operation, device, ctypes.get_errno() or errno.EIO)


def create_netns(name: str) -> None:
    """Create the named network namespace /run/netns/NAME (EEXIST if it exists)."""
    NETNS_RUN_DIR.mkdir(mode=0o755, parents=True, exist_ok=True)
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


def snapshot(backend: Backend) -> dict[str, Any]:
    """The state netvm cares about, by name (not index), for before/after comparisons."""
    links = backend.list_links()
    names = {link.index: link.name for link in links}
    return {
        "links": sorted(
            (
                link.name,
                link.kind,
                names.get(link.master) if link.master else None,
                link.mtu,
                link.up,
                link.alias,
                link.tap,
            )
            for link in links
        ),
        "addresses": sorted((names[a.index], str(a.interface)) for a in backend.list_addresses()),
        "ip_forward": backend.get_ip_forward(),
        "rules": {
            table: {chain: backend.list_rules(table, chain) for chain in backend.list_chains(table)}
            for table in (FILTER, NAT)
        },
    }
