"""A socket opened inside a namespace, served by a thread until close()."""

from __future__ import annotations

import contextlib
import os
import socket
import threading
from typing import Any, Self

from netvm.testing.namespaces import run_in_netns


def bound_socket(family: int, kind: int, proto: int, address: Any) -> socket.socket:
    """A socket bound to `address` (in the calling thread's namespace), closed on failure."""
    sock = socket.socket(family, kind, proto)
    try:
        sock.bind(address)
    except BaseException:
        sock.close()
        raise
    return sock


class SocketWatcher:
    """Opens a socket with `open_socket` inside `netns` and runs `_run` on a thread.

    `_run` polls `self._sock` and `self._stop` (an eventfd written by close()). Subclasses
    set up their own state before calling this constructor, which starts the thread.
    """

    def __init__(self, netns: str | None, open_socket: Any, thread_name: str) -> None:
        self._stop = os.eventfd(0, os.EFD_CLOEXEC)
        try:
            self._sock: socket.socket = run_in_netns(netns, open_socket)
        except BaseException:
            os.close(self._stop)
            raise
        self._thread = threading.Thread(target=self._run, name=thread_name, daemon=True)
        self._thread.start()

    def _run(self) -> None:
        raise NotImplementedError

    def close(self) -> None:
        if self._thread.is_alive():
            os.eventfd_write(self._stop, 1)
            self._thread.join()
        self._sock.close()
        with contextlib.suppress(OSError):
            os.close(self._stop)

    def __enter__(self) -> Self:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()
