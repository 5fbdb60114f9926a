"""Memory and latency as a bridge fills: 1 to 1000 attached VMs in one process.

Run through scripts/bench or as `python -m bench.scale` (root). One throwaway namespace,
one NetworkManager on the kernel (the default firewall choice, so each attach also writes
the VM's guarantees), ensure_host, then VMs attached one by one up to 1020 (a /22 holds
1021, a bridge 1023 ports), twice:

1. timed: attach latency p50 over the WINDOW attaches that follow 1, 500 and 1000 existing
   leases, and the process's RSS (VmRSS of /proc/self/status) every STEP VMs;
2. traced: the same attaches (after a teardown) under tracemalloc, whose snapshots every
   STEP VMs count the bytes still held that netvm's own code allocated (a trace whose
   newest frame is in the netvm package). SQLite's and the kernel's memory are not Python
   allocations: they show in the RSS only.

netvm keeps no per-VM state in the process (leases are in SQLite, the truth is the kernel),
so its own bytes must not grow with N: the target allows 64 bytes per VM (64 KiB per 1000)
for allocator noise.
"""

from __future__ import annotations

import argparse
import gc
import ipaddress
import os
import statistics
import sys
import tempfile
import time
import tracemalloc
from collections.abc import Callable, Sequence
from pathlib import Path

import netvm
from bench.report import target, write_result
from netvm import KernelBackend, NetworkConfig, NetworkManager
from netvm.testing import throwaway_netns

LEASES = (1, 500, 1000)
WINDOW = 20
"""Attaches timed after each of LEASES (the last window ends at 1020 VMs)."""
STEP = 100
TOTAL = LEASES[-1] + WINDOW
OWN_LIMIT_KIB_PER_1000 = 64
NETVM_DIR = str(Path(netvm.__file__).resolve().parent)


def rss_kib() -> int:
    with open("/proc/self/status") as status:
        for line in status:
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    raise RuntimeError("no VmRSS in /proc/self/status")


def netvm_bytes() -> int:
    """Bytes held now that netvm's code allocated (tracing must be on)."""
    gc.collect()
    snapshot = tracemalloc.take_snapshot()
    own = snapshot.filter_traces([tracemalloc.Filter(True, NETVM_DIR + "/*")])
    return sum(stat.size for stat in own.statistics("filename"))


def fill(netns: str, state: Path, probe: Callable[[int], None]) -> list[float]:
    """ensure_host, TOTAL attaches (probe(n) after every STEP and at 1), teardown; the
    latency of each attach in ms."""
    config = NetworkConfig(
        bridge_name="nvscale0",
        vm_subnet=ipaddress.IPv4Network("172.30.0.0/22"),
        host_egress_iface="up0",
        state_dir=state,
    )
    backend = KernelBackend(netns)
    latencies: list[float] = []
    try:
        with NetworkManager(config, backend) as manager:
            manager.ensure_host()
            probe(0)
            for i in range(TOTAL):
                start = time.perf_counter()
                manager.attach(f"vm-{i}")
                latencies.append((time.perf_counter() - start) * 1000)
                n = i + 1
                if n == 1 or n % STEP == 0:
                    probe(n)
            if len(manager.list()) != TOTAL:
                raise RuntimeError(f"expected {TOTAL} VMs on the bridge")
            manager.teardown_host()
    finally:
        backend.close()
    return latencies


def window_p50(latencies: list[float], leases: int) -> float:
    """p50 of the WINDOW attaches made with `leases` or more leases already held."""
    return statistics.median(latencies[leases : leases + WINDOW])


def chart(
    path: Path,
    p50: dict[int, float],
    rss: dict[int, int],
    own: dict[int, int],
) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is missing (install netvm[bench]): no PNG drawn"
    fig, (left, right) = plt.subplots(1, 2, figsize=(11, 4.2))
    left.plot(list(p50), list(p50.values()), marker="o")
    left.set(xlabel="leases held before the attach", ylabel="ms", ylim=(0, None))
    left.set_title(f"attach p50 ({WINDOW} attaches)")
    base_rss, base_own = rss[0], own[0]
    right.plot(list(rss), [(v - base_rss) / 1024 for v in rss.values()], marker="o", label="RSS")
    right.plot(
        list(own), [(v - base_own) / 2**20 for v in own.values()], marker="o", label="netvm's own"
    )
    right.set(xlabel="VMs attached", ylabel="MiB more than after ensure_host")
    right.set_title("memory of the process")
    right.legend()
    for ax in (left, right):
        ax.grid(True, alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart: {path}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/scale.py needs root (namespaces, bridges, TAPs)", file=sys.stderr)
        return 2
    rss: dict[int, int] = {}
    own: dict[int, int] = {}
    with tempfile.TemporaryDirectory(prefix="netvm-bench-scale-", dir="/run") as state:
        with throwaway_netns("nvbench-scale-") as netns:
            latencies = fill(netns, Path(state) / "timed", lambda n: rss.__setitem__(n, rss_kib()))
        with throwaway_netns("nvbench-scale-") as netns:
            tracemalloc.start()
            try:
                fill(netns, Path(state) / "traced", lambda n: own.__setitem__(n, netvm_bytes()))
            finally:
                tracemalloc.stop()
    p50 = {n: window_p50(latencies, n) for n in LEASES}
    last = LEASES[-1]
    rss_growth = (rss[last] - rss[1]) / 1024
    own_growth = (own[last] - own[1]) / 1024
    figures: dict[str, float] = {}
    for n in LEASES:
        figures[f"{n} leases.attach_p50_ms"] = round(p50[n], 3)
        figures[f"{n} leases.rss_mib"] = round(rss[n] / 1024, 1)
        figures[f"{n} leases.netvm_own_kib"] = round(own[n] / 1024, 1)
    figures["attach p50 at 1000 over at 1 leases_x"] = round(p50[last] / p50[1], 2)
    figures["rss growth from 1 to 1000 VMs_mib"] = round(rss_growth, 2)
    figures["netvm's own growth from 1 to 1000 VMs_kib"] = round(own_growth, 1)
    targets = [
        target(
            "netvm's own Python memory growth per 1000 VMs (KiB)",
            own_growth,
            OWN_LIMIT_KIB_PER_1000,
            own_growth <= OWN_LIMIT_KIB_PER_1000,
            "tracemalloc, allocations made by netvm's code",
        ),
    ]
    command = "python -m bench.scale " + " ".join(argv if argv is not None else sys.argv[1:])
    path = write_result(args.out, "scale", command.strip(), figures, targets)
    print(f"{command.strip()}: {TOTAL} VMs on one bridge")
    for key, value in figures.items():
        print(f"  {key:45} {value}")
    for t in targets:
        mark = "met   " if t["ok"] else "MISSED"
        print(f"  {mark} {t['name']}: {t['value']} (limit {t['limit']})")
    print(f"JSON: {path}")
    print(chart(args.out / "scale.png", p50, rss, own))
    return 0


if __name__ == "__main__":
    sys.exit(main())
