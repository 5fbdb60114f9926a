"""Frames on a link, captured with an AF_PACKET socket inside a namespace."""

from __future__ import annotations

import select
import socket
import struct
import threading
from dataclasses import dataclass

from netvm.testing.guest import MAX_FRAME
from netvm.testing.watcher import SocketWatcher, bound_socket

ETH_P_ALL = 0x0003
PACKET_OUTGOING = 4


@dataclass(frozen=True)
class Frame:
    """One Ethernet frame seen on a link: who sent it, to whom, which protocol."""

    source: bytes
    destination: bytes
    ethertype: int
    outgoing: bool
    """True for a frame the namespace sent out on the link, False for one it received."""


class FrameCapture(SocketWatcher):
    """Records the Ethernet headers of frames on `ifname` in `netns` (an AF_PACKET socket).

    On a host TAP, received (not outgoing) frames are the ones the guest sent.
    """

    def __init__(self, netns: str | None, ifname: str) -> None:
        self.frames: list[Frame] = []
        self._lock = threading.Lock()
        protocol = socket.htons(ETH_P_ALL)
        super().__init__(
            netns,
            lambda: bound_socket(socket.AF_PACKET, socket.SOCK_RAW, protocol, (ifname, 0)),
            "netvm-capture",
        )

    def _run(self) -> None:
        poller = select.poll()
        poller.register(self._sock, select.POLLIN)
        poller.register(self._stop, select.POLLIN)
        stopping = False
        while True:
            ready = {fd for fd, _ in poller.poll(0 if stopping else None)}
            if self._stop in ready:
                # Read what is queued already before stopping.
                stopping = True
                poller.unregister(self._stop)
            if self._sock.fileno() not in ready:
                if stopping:
                    return
                continue
            try:
                data, where = self._sock.recvfrom(MAX_FRAME)
            except OSError:
                return
            if len(data) < 14:
                continue
            (ethertype,) = struct.unpack("!H", data[12:14])
            frame = Frame(data[6:12], data[0:6], ethertype, where[2] == PACKET_OUTGOING)
            with self._lock:
                self.frames.append(frame)

    def received(self) -> list[Frame]:
        with self._lock:
            return [frame for frame in self.frames if not frame.outgoing]
