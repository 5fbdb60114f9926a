"""Helpers for tests of code that uses netvm: namespaces, a small internet, emulated guests.

- `throwaway_netns`, `create_netns`, `delete_netns` (namespaces.py): named network namespaces
  made the way `ip netns add` makes them (unshare in a thread, bind-mounted under /run/netns),
  so `ip netns list` shows them and `ip netns exec` works in them. `run_in_netns` runs a
  function on a thread inside one; `kernel_unavailable` says why kernel tests cannot run here.
- `internet_topology` (topology.py): a "host" namespace whose uplink (a veth named like the
  configured egress interface) leads to an "internet" namespace with one TEST-NET-3 address.
- `GuestEmulator` / `emulate_guest` (guest.py): plays the VM behind a TAP that `attach` made,
  with a real kernel network stack in a "guest" namespace and a frame pump between the TAPs.
- `ping`, `udp_request`, `UdpEchoServer` (probes.py), `FrameCapture` (capture.py): probes
  that run on threads inside a namespace. `snapshot` (state.py): netvm's state, by name, for
  before/after comparisons.
- `netvm.testing.qemu` (imported on its own): a real Linux guest under QEMU on a TAP, with
  Debian's kernel and a busybox initramfs built at test time (tests/guest, docs/guests.md).

Nothing here changes the caller's own namespace: namespace work runs on threads that entered
the namespace with setns(). Only `netvm.testing.qemu` starts processes (apt-get, and QEMU
under `ip netns exec`).

It needs pyroute2 (veths, routes, neighbours), which `netvm` itself never imports: install
`netvm[testing]`.
"""

try:
    import pyroute2  # noqa: F401  (imported here only to name the missing extra)
except ModuleNotFoundError as exc:
    if exc.name != "pyroute2":
        raise
    raise ModuleNotFoundError(
        "netvm.testing needs pyroute2, which netvm installs only with its 'testing' extra: "
        "pip install 'netvm[testing]'",
        name="pyroute2",
    ) from exc

from netvm.testing.capture import Frame, FrameCapture
from netvm.testing.guest import GuestEmulator, emulate_guest
from netvm.testing.namespaces import (
    create_netns,
    delete_netns,
    kernel_unavailable,
    run_in_netns,
    throwaway_netns,
)
from netvm.testing.probes import IP_UDP_HEADERS, UdpEchoServer, ping, udp_request
from netvm.testing.state import snapshot
from netvm.testing.topology import Topology, internet_topology

__all__ = [
    "IP_UDP_HEADERS",
    "Frame",
    "FrameCapture",
    "GuestEmulator",
    "Topology",
    "UdpEchoServer",
    "create_netns",
    "delete_netns",
    "emulate_guest",
    "internet_topology",
    "kernel_unavailable",
    "ping",
    "run_in_netns",
    "snapshot",
    "throwaway_netns",
    "udp_request",
]
