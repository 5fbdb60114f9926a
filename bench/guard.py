"""What the per-VM guarantees add to an attach, with N VMs already on the bridge.

Run through scripts/bench or as `python bench/guard.py` (root). In a throwaway namespace,
ensure_host on nftables, then N VMs attached with every guarantee on (each its own forward
port), then attaches of fresh vm_ids alternating between no guarantee (`OPEN`) and every
guarantee (anti-spoofing, isolation, an egress allow and deny list, a port forward), each
detached again untimed (and the kernel given 50 ms to finish deleting its TAP). Printed:
the p50/p90 of attach for both and the difference; also the firewall's own part (`guard`
of the elements, one nf_tables transaction).
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

from netvm import KernelBackend, NetworkConfig, NetworkManager
from netvm.firewall.guard import VmGuard
from netvm.policy import OPEN, GuestPolicy
from netvm.testing import throwaway_netns

now = time.perf_counter
SETTLE = 0.05
"""Seconds to wait after a detach: the kernel finishes deleting the TAP (RCU grace periods)
in the background, and an attach timed meanwhile measures that contention, not netvm."""


def every(port: int) -> GuestPolicy:
    return GuestPolicy.of(
        isolated=True,
        egress_allow=["203.0.113.0/24", "0.0.0.0/0:udp:53"],
        egress_deny=["198.51.100.0/24"],
        port_forwards=[f"{port}:80"],
    )


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run(size: int, samples: int) -> dict[str, list[float]]:
    times: dict[str, list[float]] = {"open": [], "all": [], "guard": []}
    with throwaway_netns("netvm-bench-") as netns, tempfile.TemporaryDirectory() as state:
        backend = KernelBackend(netns)
        config = NetworkConfig(
            "nvbr0", "10.64.0.0/20", "up0", state_dir=Path(state), firewall="nftables"
        )
        try:
            with NetworkManager(config, backend) as net:
                net.ensure_host()
                for n in range(size):
                    net.attach(f"resident-{n}", policy=every(20000 + n))
                firewall = backend.firewall("nftables")
                for k in range(samples):
                    for kind in ("open", "all"):
                        policy = OPEN if kind == "open" else every(40000 + k)
                        vm_id = f"probe-{kind}-{k}"
                        start = now()
                        vm = net.attach(vm_id, policy=policy)
                        times[kind].append((now() - start) * 1e6)
                        net.detach(vm_id)
                        time.sleep(SETTLE)
                    guard = VmGuard("tap-bench", vm.guest_mac, vm.guest_ip, every(50000 + k))
                    start = now()
                    firewall.guard("nvbr0", guard)
                    times["guard"].append((now() - start) * 1e6)
                    firewall.unguard("nvbr0", "tap-bench")
                    time.sleep(SETTLE)
                net.teardown_host()
        finally:
            backend.close()
    return times


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,1000")
    parser.add_argument("--samples", type=int, default=200)
    args = parser.parse_args(argv)
    print(f"python bench/guard.py --samples {args.samples}: attach, us (p50 / p90)")
    print(f"{'N':>5}  {'no guarantee':>16}  {'every guarantee':>16}  {'added p50':>9}  guard()")
    for size in (int(s) for s in args.sizes.split(",")):
        t = run(size, args.samples)
        p50 = {k: statistics.median(v) for k, v in t.items()}
        print(
            f"{size:>5}  {p50['open']:>7.0f} / {percentile(t['open'], 0.9):>6.0f}  "
            f"{p50['all']:>7.0f} / {percentile(t['all'], 0.9):>6.0f}  "
            f"{p50['all'] - p50['open']:>9.0f}  {p50['guard']:.0f} / "
            f"{percentile(t['guard'], 0.9):.0f}"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
