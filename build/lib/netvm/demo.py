"""The demo: netvm's whole job on a throwaway host, with real packets when it can.

`python -m netvm.demo` (or `scripts/demo`) builds a "host" namespace with an uplink to a
small "internet" namespace, runs ensure_host there, attaches three VMs, drives an emulated
guest per VM through the data path, prints what each guest got and saw, tears everything
down and checks that nothing was left behind. Without CAP_NET_ADMIN (or with --fake) the
same flow runs on the in-memory FakeBackend and moves no packets. The process's own network
namespace is never changed.
"""

from __future__ import annotations

import argparse
import socket
import sys
import tempfile
from collections.abc import Sequence
from contextlib import ExitStack
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from netvm.backends.base import Backend
from netvm.backends.fake import FakeBackend
from netvm.backends.kernel import KernelBackend
from netvm.backends.netns import NETNS_RUN_DIR
from netvm.config import NetworkConfig
from netvm.manager import NetworkManager
from netvm.naming import VmNetwork
from netvm.testing import (
    GuestEmulator,
    Topology,
    UdpEchoServer,
    internet_topology,
    kernel_unavailable,
    snapshot,
)

VM_IDS = ("vm-alpha", "vm-bravo", "vm-charlie")


@dataclass(frozen=True)
class Row:
    network: VmNetwork
    gateway: str
    internet: str
    seen_as: str


def _namespaces() -> list[str]:
    return sorted(p.name for p in NETNS_RUN_DIR.iterdir()) if NETNS_RUN_DIR.is_dir() else []


def _yes(flag: bool) -> str:
    return "yes" if flag else "NO"


def _table(rows: Sequence[Row], out: TextIO) -> None:
    header = ("vm_id", "TAP", "IP", "MAC", "ip= argument", "gateway", "internet", "seen as")
    cells = [
        (
            r.network.vm_id,
            r.network.tap_name,
            str(r.network.guest_ip),
            r.network.mac_string(),
            r.network.kernel_ip_arg(),
            r.gateway,
            r.internet,
            r.seen_as,
        )
        for r in rows
    ]
    widths = [max(len(row[i]) for row in [header, *cells]) for i in range(len(header))]
    for row in [header, tuple("-" * w for w in widths), *cells]:
        print("  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip(), file=out)


def _drive(
    net: NetworkManager,
    topo: Topology,
    internet_host: UdpEchoServer,
    vms: list[VmNetwork],
    created: list[str],
) -> list[Row]:
    rows: list[Row] = []
    with ExitStack() as guests:
        emulators = [
            guests.enter_context(GuestEmulator(vm, topo.host_netns, mtu=net.config.mtu))
            for vm in vms
        ]
        created.extend(guest.netns for guest in emulators)
        for guest in emulators:
            vm = guest.network
            gateway = guest.ping(vm.gateway_ip)
            before = len(internet_host.peers)
            payload = f"hello from {vm.vm_id}".encode()
            reply = guest.udp_request(internet_host.address, internet_host.port, payload)
            seen = internet_host.seen()[before:]
            rows.append(
                Row(vm, _yes(gateway), _yes(reply == payload), ",".join(seen) or "(nothing)")
            )
    return rows


def run_demo(out: TextIO = sys.stdout, *, force_fake: bool = False) -> int:
    """Run the whole flow, print it to `out`; 0 when every check passed."""
    reason = "--fake was given" if force_fake else kernel_unavailable()
    namespaces_before = _namespaces()
    root_links_before = sorted(name for _, name in socket.if_nameindex())
    failures: list[str] = []
    created: list[str] = []
    with tempfile.TemporaryDirectory(prefix="netvm-demo-") as state_dir:
        config = NetworkConfig(state_dir=Path(state_dir))
        print(
            f"netvm demo: bridge {config.bridge_name}, subnet {config.vm_subnet}, "
            f"gateway {config.gateway}, egress {config.host_egress_iface}, MTU {config.mtu}",
            file=out,
        )
        with ExitStack() as stack:
            topo: Topology | None = None
            backend: Backend
            if reason is None:
                topo = stack.enter_context(
                    internet_topology(config.host_egress_iface, prefix="netvm-demo-")
                )
                created += [topo.host_netns, topo.internet_netns]
                kernel = KernelBackend(topo.host_netns)
                stack.callback(kernel.close)
                backend = kernel
                print(
                    f"backend: the kernel, in namespace {topo.host_netns} "
                    f"(uplink {topo.host_netns}:{topo.egress_iface} {topo.uplink}, "
                    f"internet host {topo.internet.ip} in {topo.internet_netns})",
                    file=out,
                )
            else:
                backend = FakeBackend()
                print(f"backend: FakeBackend, the in-memory model ({reason})", file=out)
            pristine = snapshot(backend)
            net = stack.enter_context(NetworkManager(config, backend))
            net.ensure_host()
            vms = [net.attach(vm_id) for vm_id in VM_IDS]
            print(f"ensure_host done; attached {len(vms)} VMs", file=out)
            if topo is not None:
                internet_host = stack.enter_context(
                    UdpEchoServer(topo.internet_netns, topo.internet.ip)
                )
                rows = _drive(net, topo, internet_host, vms, created)
                print(
                    "each guest: ICMP echo to its gateway, UDP echo with the internet host",
                    file=out,
                )
            else:
                rows = [Row(vm, "-", "-", "-") for vm in vms]
            print(file=out)
            _table(rows, out)
            print(file=out)
            if topo is not None:
                expected = str(topo.uplink.ip)
                for row in rows:
                    if (row.gateway, row.internet, row.seen_as) != ("yes", "yes", expected):
                        failures.append(f"{row.network.vm_id}: data path check failed")
            else:
                print(
                    "NO PACKETS MOVED: this run used the in-memory FakeBackend. "
                    "Run as root (CAP_NET_ADMIN) for real packets.",
                    file=out,
                )
            for vm in vms:
                net.detach(vm.vm_id)
            net.teardown_host()
            if snapshot(backend) != pristine:
                failures.append("teardown_host left state behind in the host namespace")
    namespaces_after = _namespaces()
    root_links_after = sorted(name for _, name in socket.if_nameindex())
    left = sorted(set(created) & set(namespaces_after))
    if left:
        failures.append(f"namespaces left behind: {', '.join(left)}")
    if namespaces_after == namespaces_before:
        ns_report = f"the namespace list ({NETNS_RUN_DIR}) before and after is equal"
    else:
        # Another program on this machine may add or remove namespaces meanwhile.
        ns_report = f"none of the {len(created)} namespaces it made is left in {NETNS_RUN_DIR}"
    if root_links_after != root_links_before:
        failures.append("this process's own namespace changed")
    if failures:
        for failure in failures:
            print(f"FAILED: {failure}", file=out)
        return 1
    made = f"{len(created)} namespaces made and deleted; " if created else ""
    print(
        f"teardown: detached {len(VM_IDS)} VMs and ran teardown_host: the host state equals "
        f"the state before ensure_host; {made}{ns_report}; "
        "this process's own namespace untouched. Nothing left behind.",
        file=out,
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="scripts/demo", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--fake", action="store_true", help="use the in-memory backend even when root"
    )
    args = parser.parse_args(argv)
    return run_demo(force_fake=args.fake)


if __name__ == "__main__":
    sys.exit(main())
