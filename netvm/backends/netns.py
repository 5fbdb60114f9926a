"""A worker thread that lives in one network namespace and runs calls there.

A TAP belongs to the namespace of the thread that opens /dev/net/tun, /proc/sys/net follows
the opening thread's namespace, and a netlink socket acts in the namespace it was opened in:
so a KernelBackend opens its sockets and descriptors on this one thread, and runs here what
depends on the calling thread's namespace (ip_forward, libiptc). setns() changes only the
calling thread, so the caller's own namespace is never touched and no process is created.
"""

from __future__ import annotations

import ctypes
import errno
import os
import queue
import threading
from collections.abc import Callable
from concurrent.futures import Future
from pathlib import Path
from typing import Any, TypeVar

from netvm.errors import Closed, PermissionDenied, host_error

CLONE_NEWNET = 0x40000000
NETNS_RUN_DIR = Path("/run/netns")

T = TypeVar("T")

_libc = ctypes.CDLL(None, use_errno=True)


def netns_path(netns: str) -> Path:
    """A name made by `ip netns add` (under /run/netns), or a path such as /proc/PID/ns/net."""
    return Path(netns) if "/" in netns else NETNS_RUN_DIR / netns


def enter_netns(netns: str) -> None:
    """Move the calling thread (only) into the network namespace `netns`."""
    path = netns_path(netns)
    try:
        fd = os.open(path, os.O_RDONLY | os.O_CLOEXEC)
    except OSError as exc:
        raise host_error("open network namespace", str(path), exc.errno or errno.ENOENT) from None
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            code = ctypes.get_errno()
            if code == errno.EPERM:  # setns(CLONE_NEWNET) checks CAP_SYS_ADMIN
                raise PermissionDenied(
                    "enter network namespace",
                    str(path),
                    code,
                    hint="entering a network namespace needs CAP_SYS_ADMIN (and CAP_NET_ADMIN "
                    "in it): run as root or grant both capabilities",
                )
            detail = "not a network namespace" if code == errno.EINVAL else ""
            raise host_error("enter network namespace", str(path), code, detail)
    finally:
        os.close(fd)


class NamespaceThread:
    """Runs callables, one at a time, on a thread inside `netns` (None: the caller's own)."""

    def __init__(self, netns: str | None, setup: Callable[[], Any] | None = None) -> None:
        self.netns = netns
        self._queue: queue.SimpleQueue[tuple[Callable[[], Any], Future[Any]] | None] = (
            queue.SimpleQueue()
        )
        self._closed = False
        self._lock = threading.Lock()
        ready: Future[None] = Future()
        self._thread = threading.Thread(
            target=self._run, args=(ready, setup), name=f"netvm:{netns or 'self'}", daemon=True
        )
        self._thread.start()
        ready.result()

    def _run(self, ready: Future[None], setup: Callable[[], Any] | None) -> None:
        try:
            if self.netns is not None:
                enter_netns(self.netns)
            if setup is not None:
                setup()
        except BaseException as exc:
            ready.set_exception(exc)
            return
        ready.set_result(None)
        while (item := self._queue.get()) is not None:
            fn, future = item
            try:
                future.set_result(fn())
            except BaseException as exc:
                future.set_exception(exc)

    def call(self, fn: Callable[[], T]) -> T:
        if threading.current_thread() is self._thread:
            return fn()
        future: Future[T] = Future()
        with self._lock:
            if self._closed or not self._thread.is_alive():
                raise Closed(f"the KernelBackend of {self.netns or 'this namespace'}")
            self._queue.put((fn, future))
        return future.result()

    def stop(self) -> None:
        """Run what is queued already, then end the thread; later calls raise."""
        with self._lock:
            if self._closed:
                return
            self._closed = True
            if self._thread.is_alive():
                self._queue.put(None)
        if threading.current_thread() is not self._thread:
            self._thread.join()
