"""netvm against process-per-step and `ip -batch`, in one run, each in a fresh namespace.

Run through scripts/bench (as root; `python -m bench.run` from the checkout). It writes
`--out DIR/run.json` in the benches' schema (bench/report.py renders it into
docs/performance.md) and `DIR/bench-<time>.json` with every sample.

Every implementation works in its own throwaway network namespace, created and deleted
here (also on error and ^C); nothing touches the root namespace. Rounds are interleaved
(netvm, process-per-step, ip -batch, netvm, ...) so that machine drift hits all three alike.

Implementations:
  netvm    NetworkManager(config, KernelBackend(netns)), in this process.
  pps      process-per-step, the original's approach: one `ip` / `iptables-legacy`
           process per step, checking before adding.
  batch    `ip -batch -`: the same link operations for N VMs fed to one `ip` process
           (C netlink, no process per step): the floor.

The child processes of pps and batch are started from a thread that has entered the
namespace (setns), so they are the plain commands the original ran; `ip netns exec`
would add about 2 ms per step (it also remounts /sys), flattering netvm.
"""

from __future__ import annotations

import argparse
import ipaddress
import json
import math
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from functools import partial
from pathlib import Path
from typing import Any

from bench.report import target, write_result
from netvm import KernelBackend, NetworkConfig, NetworkManager, naming
from netvm.backends.iptc_compat import load_iptc
from netvm.backends.netns import NamespaceThread
from netvm.testing import throwaway_netns

BRIDGE = "nvbench0"
EGRESS = "up0"
MTU = 1500
SUBNET = "172.30.0.0/22"  # 1021 guest addresses: room for N = 1000 (a bridge takes 1023)
GATEWAY = "172.30.0.1/22"
IMPLS = ("netvm", "pps", "batch")
LABELS = {"netvm": "netvm", "pps": "process-per-step", "batch": "ip -batch"}
WARM_REPEATS = 30
BATCH_VMS = 100
"""ip -batch at small N is repeated until it has made this many VMs (start-up noise)."""
DETACH_SAMPLES = 50
"""Detach latency (the caller's) is measured on this many VMs, spread over the N; then
detach_many of all N."""

Timer = Callable[[], float]
now = time.perf_counter


class BrokenRun(RuntimeError):
    """A run whose kernel state is not what it claims: its figures must not count."""


def ms(seconds: float) -> float:
    return round(seconds * 1000, 4)


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def vm_ids(n: int) -> list[str]:
    return [f"vm-{i}" for i in range(n)]


class Shell:
    """Runs processes from a thread inside the namespace, as the original would have."""

    def __init__(self, netns: str) -> None:
        self.thread = NamespaceThread(netns)

    def run(self, *argv: str, stdin: str | None = None, check: bool = True) -> tuple[int, str]:
        return self.thread.call(lambda: self._run(argv, stdin, check))

    @staticmethod
    def _run(argv: Sequence[str], stdin: str | None, check: bool) -> tuple[int, str]:
        done = subprocess.run(argv, input=stdin, capture_output=True, text=True, check=False)
        if check and done.returncode != 0:
            raise BrokenRun(f"{' '.join(argv)}: exit {done.returncode}: {done.stderr.strip()}")
        return done.returncode, done.stdout

    def timed(self, step: Callable[[], object]) -> float:
        """Seconds that `step` takes on the namespace thread (the hop is not counted)."""

        def run() -> float:
            start = now()
            step()
            return now() - start

        return self.thread.call(run)

    def taps_on_bridge(self) -> int:
        """TAPs on the bridge, counted from the kernel by `ip` (whoever made them)."""
        code, out = self.run(
            "ip", "-o", "link", "show", "master", BRIDGE, "type", "tun", check=False
        )
        return len(out.splitlines()) if code == 0 else 0

    def close(self) -> None:
        self.thread.stop()


def verify(shell: Shell, expected: int, phase: str) -> None:
    found = shell.taps_on_bridge()
    if found != expected:
        raise BrokenRun(f"after {phase}: {found} TAPs on {BRIDGE}, expected {expected}")


# netvm ------------------------------------------------------------------------------------


def bench_config(state_dir: Path) -> NetworkConfig:
    """The bench's one bridge (every netvm run and the contention processes use it)."""
    return NetworkConfig(
        bridge_name=BRIDGE,
        vm_subnet=ipaddress.IPv4Network(SUBNET),
        host_egress_iface=EGRESS,
        mtu=MTU,
        state_dir=state_dir,
    )


def run_netvm(netns: str, n: int, state_root: Path) -> dict[str, Any]:
    shell = Shell(netns)
    state_dir = Path(tempfile.mkdtemp(prefix="state-", dir=state_root))
    config = bench_config(state_dir)
    try:
        start = now()
        manager = NetworkManager(config, KernelBackend(netns))
        opened = now() - start
        try:
            return _netvm_phases(manager, shell, n, opened)
        finally:
            manager.close()
    finally:
        shell.close()


def _timed(step: Callable[[], object]) -> float:
    start = now()
    step()
    return now() - start


def _netvm_phases(manager: NetworkManager, shell: Shell, n: int, opened: float) -> dict[str, Any]:
    ids = vm_ids(n)
    cold = _timed(manager.ensure_host)
    warm = [_timed(manager.ensure_host) for _ in range(WARM_REPEATS)]
    attach: list[float] = []
    start = now()
    for vm_id in ids:
        attach.append(_timed(partial(manager.attach, vm_id)))
    attach_total = now() - start
    verify(shell, n, "netvm attach")
    sample = ids[:: max(1, n // DETACH_SAMPLES)][:DETACH_SAMPLES]
    # The caller's time: the TAP is down and marked when detach returns; the reaper's
    # thread deletes it (one grace period per batch) before the count is taken.
    detach = [_timed(partial(manager.detach, vm_id)) for vm_id in sample]
    if not manager.wait_detached(60):
        raise BrokenRun("netvm detach: the reaper did not delete the TAPs")
    verify(shell, n - len(sample), "netvm detach")
    for vm_id in sample:
        manager.attach(vm_id)
    verify(shell, n, "netvm re-attach")
    detach_many = _timed(partial(manager.detach_many, ids))
    start = now()
    if not manager.wait_detached(60):
        raise BrokenRun("netvm detach_many: the reaper did not delete the TAPs")
    reaped = now() - start
    verify(shell, 0, "netvm detach_many")
    for vm_id in ids:
        manager.attach(vm_id)
    verify(shell, n, "netvm re-attach after detach_many")
    teardown = _timed(manager.teardown_host)
    verify(shell, 0, "netvm teardown")
    return {
        "open": opened,
        "ensure_cold": cold,
        "ensure_warm": warm,
        "attach": attach,
        "attach_total": attach_total,
        "detach": detach,
        "detach_many_per_vm": detach_many / n,
        "detach_many_reaped": reaped,
        "teardown_total": teardown,
        "teardown_how": "teardown_host(): TAPs moved to a link group, group deleted at once",
        "maxrss_kib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss,
    }


# process-per-step -------------------------------------------------------------------------

ACCEPT = ("-j", "ACCEPT")
PPS_RULES = (
    ("nat", "POSTROUTING", ("-s", SUBNET, "-o", EGRESS, "-j", "MASQUERADE")),
    ("filter", "FORWARD", ("-i", BRIDGE, "-o", EGRESS, "-j", "ACCEPT")),
    (
        "filter",
        "FORWARD",
        ("-i", EGRESS, "-o", BRIDGE, "-m", "state", "--state", "RELATED,ESTABLISHED", *ACCEPT),
    ),
)


def _pps_ensure(shell: Shell) -> None:
    run = Shell._run
    if run(("ip", "link", "show", BRIDGE), None, False)[0] != 0:
        run(("ip", "link", "add", BRIDGE, "mtu", str(MTU), "type", "bridge"), None, True)
    _, out = run(("ip", "addr", "show", "dev", BRIDGE), None, True)
    if f"inet {GATEWAY} " not in out:
        run(("ip", "addr", "add", GATEWAY, "dev", BRIDGE), None, True)
    run(("ip", "link", "set", BRIDGE, "up"), None, True)
    for table, chain, rule in PPS_RULES:
        base = ("iptables-legacy", "-w", "-t", table)
        if run((*base, "-C", chain, *rule), None, False)[0] != 0:
            run((*base, "-A", chain, *rule), None, True)


def _pps_attach(tap: str) -> None:
    run = Shell._run
    if run(("ip", "link", "show", tap), None, False)[0] == 0:
        raise BrokenRun(f"{tap} exists before attach")
    run(("ip", "tuntap", "add", "dev", tap, "mode", "tap"), None, True)
    run(("ip", "link", "set", "dev", tap, "master", BRIDGE), None, True)
    run(("ip", "link", "set", "dev", tap, "mtu", str(MTU), "up"), None, True)


def _pps_detach(tap: str) -> None:
    Shell._run(("ip", "link", "del", "dev", tap), None, True)


def run_pps(netns: str, n: int) -> dict[str, Any]:
    shell = Shell(netns)
    try:
        taps = [naming.tap_name(vm_id) for vm_id in vm_ids(n)]
        cold = shell.timed(lambda: _pps_ensure(shell))
        warm = [shell.timed(lambda: _pps_ensure(shell)) for _ in range(max(3, WARM_REPEATS // 6))]
        start = now()
        attach = [shell.timed(partial(_pps_attach, tap)) for tap in taps]
        attach_total = now() - start
        verify(shell, n, "process-per-step attach")
        start = now()
        detach = [shell.timed(partial(_pps_detach, tap)) for tap in taps]
        teardown = now() - start
        verify(shell, 0, "process-per-step detach")
        return {
            "ensure_cold": cold,
            "ensure_warm": warm,
            "attach": attach,
            "attach_total": attach_total,
            "detach": detach,
            "teardown_total": teardown,
            "teardown_how": "`ip link del` per TAP, one process each",
        }
    finally:
        shell.close()


# ip -batch --------------------------------------------------------------------------------


def run_batch(netns: str, n: int) -> dict[str, Any]:
    """Per-VM cost = (batch time - time of an empty batch) / N: process start-up excluded."""
    shell = Shell(netns)
    try:
        shell.run("ip", "-batch", "-", stdin=f"link add {BRIDGE} mtu {MTU} type bridge\n")
        shell.run("ip", "addr", "add", GATEWAY, "dev", BRIDGE)
        shell.run("ip", "link", "set", BRIDGE, "up")
        empty = statistics.median(
            shell.timed(lambda: Shell._run(("ip", "-batch", "-"), "", True)) for _ in range(5)
        )
        ids = vm_ids(n)
        add = "".join(
            f"tuntap add dev {naming.tap_name(v)} mode tap\n"
            f"link set dev {naming.tap_name(v)} master {BRIDGE} mtu {MTU} up "
            f"alias {naming.tap_alias(BRIDGE, v, slot)}\n"
            for slot, v in enumerate(ids)
        )
        delete = "".join(f"link del dev {naming.tap_name(v)}\n" for v in ids)
        attach_totals: list[float] = []
        teardowns: list[float] = []
        for _ in range(max(1, BATCH_VMS // n)):  # small N: repeat, for a stable mean
            attach_totals.append(shell.timed(lambda: Shell._run(("ip", "-batch", "-"), add, True)))
            verify(shell, n, "ip -batch attach")
            teardowns.append(shell.timed(lambda: Shell._run(("ip", "-batch", "-"), delete, True)))
            verify(shell, 0, "ip -batch delete")
        attach_total = statistics.median(attach_totals)
        teardown = statistics.median(teardowns)
        return {
            "empty_batch": empty,
            "attach_total": attach_total,
            "attach_per_vm": max(0.0, attach_total - empty) / n,
            "teardown_total": teardown,
            "detach_per_vm": max(0.0, teardown - empty) / n,
            "teardown_how": "`link del` per TAP in one `ip -batch` (one request per device)",
        }
    finally:
        shell.close()


# Contention -------------------------------------------------------------------------------

CONTENTION_PROCESSES = 8
CONTENTION_ATTACHES = 100


def _contended_attaches(
    netns: str, state_dir: str, worker: int, start: Any
) -> tuple[float, list[tuple[str, str, float]]]:
    """One of the processes: its own manager; one attach to warm it up (the first in a
    process loads libnftables and picks the firewall), then, once every process is
    ready, CONTENTION_ATTACHES timed attaches of new VMs."""
    config = bench_config(Path(state_dir))
    backend = KernelBackend(netns)
    found: list[tuple[str, str, float]] = []
    with NetworkManager(config, backend) as manager:
        manager.leases.open()
        began = now()
        vm = manager.attach(f"p{worker}-warm-up")
        first = now() - began
        found.append((vm.vm_id, str(vm.guest_ip), first))
        start.wait()
        for i in range(CONTENTION_ATTACHES):
            vm_id = f"p{worker}-vm{i}"
            began = now()
            vm = manager.attach(vm_id)
            found.append((vm_id, str(vm.guest_ip), now() - began))
    backend.close()
    return first, found


def run_contention(state_root: Path) -> dict[str, Any]:
    """CONTENTION_PROCESSES processes attaching at once into one bridge (one lease store)."""
    import multiprocessing

    with throwaway_netns("nvbench-") as netns:
        shell = Shell(netns)
        state_dir = Path(tempfile.mkdtemp(prefix="state-", dir=state_root))
        config = bench_config(state_dir)
        backend = KernelBackend(netns)
        try:
            with NetworkManager(config, backend) as manager:
                manager.ensure_host()
                context = multiprocessing.get_context("spawn")
                with context.Manager() as sync, context.Pool(CONTENTION_PROCESSES) as pool:
                    start = sync.Barrier(CONTENTION_PROCESSES)
                    jobs = [(netns, str(state_dir), w, start) for w in range(CONTENTION_PROCESSES)]
                    runs = pool.starmap(_contended_attaches, jobs)
                attached = [vm for _, run in runs for vm in run]
                total = CONTENTION_PROCESSES * (CONTENTION_ATTACHES + 1)
                if len({ip for _, ip, _ in attached}) != total:
                    raise BrokenRun("contention: two VMs got one address")
                verify(shell, total, "contended attaches")
                manager.teardown_host()
        finally:
            backend.close()
            shell.close()
    latencies = [seconds for _, run in runs for _, _, seconds in run[1:]]
    return {
        "processes": CONTENTION_PROCESSES,
        "attaches": len(latencies),
        "attach_p50_ms": ms(percentile(latencies, 50)),
        "attach_p99_ms": ms(percentile(latencies, 99)),
        "attach_max_ms": ms(max(latencies)),
        "first_attach_max_ms": ms(max(first for first, _ in runs)),
    }


# Driver -----------------------------------------------------------------------------------


def run_one(impl: str, n: int, state_root: Path) -> dict[str, Any]:
    with throwaway_netns("nvbench-") as netns:
        if impl == "netvm":
            return run_netvm(netns, n, state_root)
        if impl == "pps":
            return run_pps(netns, n)
        return run_batch(netns, n)


def summarise(impl: str, rounds: list[dict[str, Any]]) -> dict[str, Any]:
    """Latencies pooled over rounds; totals and single figures: median of the rounds."""

    def pooled(key: str) -> list[float]:
        return [v for r in rounds for v in r.get(key, [])]

    def median(key: str) -> float | None:
        values = [r[key] for r in rounds if key in r]
        return statistics.median(values) if values else None

    out: dict[str, Any] = {"rounds": len(rounds)}
    for key in ("ensure_cold", "attach_total", "teardown_total", "open"):
        value = median(key)
        if value is not None:
            out[key + "_ms"] = ms(value)
    for key in ("ensure_warm", "attach", "detach"):
        values = pooled(key)
        if values:
            out[key + "_p50_ms"] = ms(percentile(values, 50))
            out[key + "_p99_ms"] = ms(percentile(values, 99))
            out[key + "_samples"] = len(values)
    if impl == "batch":
        out["attach_p50_ms"] = ms(statistics.median(r["attach_per_vm"] for r in rounds))
        out["detach_p50_ms"] = ms(statistics.median(r["detach_per_vm"] for r in rounds))
        out["empty_batch_ms"] = ms(statistics.median(r["empty_batch"] for r in rounds))
    if impl == "netvm":
        out["maxrss_kib"] = max(r["maxrss_kib"] for r in rounds)
        out["detach_many_per_vm_ms"] = ms(
            statistics.median(r["detach_many_per_vm"] for r in rounds)
        )
        out["detach_many_reaped_ms"] = ms(
            statistics.median(r["detach_many_reaped"] for r in rounds)
        )
    out["teardown_how"] = rounds[0]["teardown_how"]
    return out


def _raw_ms(run: dict[str, Any]) -> dict[str, Any]:
    def convert(value: Any) -> Any:
        if isinstance(value, float):
            return ms(value)
        if isinstance(value, list):
            return [ms(v) for v in value]
        return value

    return {key: convert(value) for key, value in run.items()}


def fmt(value: float | None) -> str:
    if value is None:
        return "—"
    return f"{value:.3f}" if value < 10 else f"{value:.1f}" if value < 1000 else f"{value:.0f}"


def table(summary: dict[int, dict[str, dict[str, Any]]]) -> str:
    columns = (
        ("ensure cold", "ensure_cold_ms"),
        ("ensure warm p50", "ensure_warm_p50_ms"),
        ("attach p50", "attach_p50_ms"),
        ("attach p99", "attach_p99_ms"),
        ("attach N", "attach_total_ms"),
        ("detach p50", "detach_p50_ms"),
        ("detach p99", "detach_p99_ms"),
        ("teardown N", "teardown_total_ms"),
    )
    head = "| N | implementation | " + " | ".join(c for c, _ in columns) + " |"
    lines = [head, "|" + "---|" * (len(columns) + 2)]
    for n, by_impl in summary.items():
        for impl in IMPLS:
            row = by_impl.get(impl)
            if row is None:
                continue
            cells = [fmt(row.get(key)) for _, key in columns]
            lines.append(f"| {n} | {LABELS[impl]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def targets(summary: dict[int, dict[str, dict[str, Any]]]) -> list[dict[str, Any]]:
    checks: list[dict[str, Any]] = []

    def add(name: str, value: float, limit: float, ok: bool, note: str = "") -> None:
        checks.append(
            {"target": name, "value": round(value, 3), "limit": limit, "met": ok, "note": note}
        )

    ratios: dict[int, float] = {}
    for n, by_impl in summary.items():
        netvm, pps, batch = by_impl.get("netvm"), by_impl.get("pps"), by_impl.get("batch")
        if netvm is None:
            continue
        if batch is not None and batch["attach_p50_ms"] > 0:
            ratios[n] = netvm["attach_p50_ms"] / batch["attach_p50_ms"]
            add(f"N={n}: netvm attach p50 / ip -batch per VM", ratios[n], 1.5, ratios[n] <= 1.5)
        if pps is not None:
            speedup = pps["attach_p50_ms"] / netvm["attach_p50_ms"]
            add(f"N={n}: process-per-step attach p50 / netvm", speedup, 10, speedup >= 10)
        if batch is not None:
            speedup = batch["teardown_total_ms"] / netvm["teardown_total_ms"]
            add(
                f"N={n}: one-by-one delete (ip -batch) / netvm teardown_host",
                speedup,
                20,
                speedup >= 20 or n < 1000,
                "" if n >= 1000 else "target set for N=1000 only",
            )
        warm = netvm["ensure_warm_p50_ms"]
        add(f"N={n}: netvm ensure_host warm p50 (ms)", warm, 3, warm < 3)
    if len(ratios) >= 2:
        first, last = min(ratios), max(ratios)
        growth = ratios[last] / ratios[first]
        add(
            f"ratio to ip -batch, N={last} over N={first}",
            growth,
            1.0,
            growth <= 1.1,
            "must not grow (10% allowed for noise)",
        )
    return checks


COLUMNS = (
    "ensure_cold_ms",
    "ensure_warm_p50_ms",
    "attach_p50_ms",
    "attach_p99_ms",
    "attach_total_ms",
    "detach_p50_ms",
    "detach_p99_ms",
    "teardown_total_ms",
)
"""The columns of table(), as figures of the schema."""


def schema_figures(
    summary: dict[int, dict[str, dict[str, Any]]],
    contention: list[dict[str, Any]],
    rss_before_kib: int,
) -> dict[str, float]:
    """table()'s cells as `N=<n> <implementation>.<column>` figures, then RSS and contention."""
    figures: dict[str, float] = {}
    for n, by_impl in summary.items():
        for impl in IMPLS:
            row = by_impl.get(impl)
            if row is None:
                continue
            for key in COLUMNS:
                if row.get(key) is not None:
                    figures[f"N={n} {LABELS[impl]}.{key}"] = row[key]
            if "maxrss_kib" in row:
                figures[f"N={n} {LABELS[impl]}.peak_rss_mib"] = round(row["maxrss_kib"] / 1024, 1)
    figures["harness alone peak_rss_mib"] = round(rss_before_kib / 1024, 1)
    label = f"contention {CONTENTION_PROCESSES} x {CONTENTION_ATTACHES}"
    for i, row in enumerate(contention, 1):
        for key in ("attach_p50_ms", "attach_p99_ms", "attach_max_ms"):
            figures[f"{label}/round {i}.{key}"] = row[key]
    return figures


def schema_targets(checks: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [target(c["target"], c["value"], c["limit"], c["met"], c["note"]) for c in checks]


def machine() -> dict[str, Any]:
    return {
        "nproc": os.cpu_count(),
        "kernel": platform.release(),
        "python": platform.python_version(),
        "cpu": next(
            (
                line.split(":", 1)[1].strip()
                for line in Path("/proc/cpuinfo").read_text().splitlines()
                if line.startswith("model name")
            ),
            "?",
        ),
    }


def chart(summary: dict[int, dict[str, dict[str, Any]]], path: Path) -> str:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is missing (install netvm[bench]): no PNG drawn"
    sizes = sorted(summary)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4.2))
    for impl in IMPLS:
        xs = [n for n in sizes if impl in summary[n]]
        for ax, key in zip(axes, ("attach_p50_ms", "teardown_total_ms"), strict=True):
            ys = [summary[n][impl].get(key) for n in xs]
            points = [(x, y) for x, y in zip(xs, ys, strict=True) if y]
            if points:
                ax.plot(*zip(*points, strict=True), marker="o", label=LABELS[impl])
    titles = ("attach p50 per VM", "tearing down N VMs (total)")
    for ax, title in zip(axes, titles, strict=True):
        ax.set(xscale="log", yscale="log", xlabel="VMs on the bridge (N)", ylabel="ms")
        ax.set_title(title)
        ax.grid(True, which="both", alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return f"chart: {path}"


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="N = 10, 100; 2 rounds")
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--rounds", type=int)
    parser.add_argument(
        "--pps-max", type=int, default=1000, help="largest N for process-per-step (slow)"
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    parser.add_argument("--impls", default=",".join(IMPLS))
    parser.add_argument(
        "--contention-only", action="store_true", help="only the contention row (8 x 100)"
    )
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("scripts/bench needs root (namespaces, bridges, TAPs)", file=sys.stderr)
        return 2
    if args.contention_only:
        return contention_main(args.rounds or 3, args.out)
    sizes = args.sizes or ([10, 100] if args.quick else [10, 100, 1000])
    rounds = args.rounds or (2 if args.quick else 3)
    impls = [i for i in IMPLS if i in args.impls.split(",")]
    load_iptc()  # python-iptables' one-time import, outside every figure
    started = time.time()
    raw: dict[int, dict[str, list[dict[str, Any]]]] = {n: {i: [] for i in impls} for n in sizes}
    rss_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    state_root = Path(tempfile.mkdtemp(prefix="netvm-bench-", dir="/run"))
    contention: list[dict[str, Any]] = []
    try:
        for r in range(rounds):
            contention.append(run_contention(state_root))
            print(f"  contention round {r + 1}/{rounds}: {contention[-1]}", flush=True)
        for n in sizes:
            for r in range(rounds):
                for impl in impls:
                    if impl == "pps" and n > args.pps_max:
                        continue
                    t0 = now()
                    raw[n][impl].append(run_one(impl, n, state_root))
                    print(
                        f"  N={n:<5} round {r + 1}/{rounds} {LABELS[impl]:<17} {now() - t0:6.1f} s",
                        flush=True,
                    )
    finally:
        for path in sorted(state_root.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        state_root.rmdir()
    summary = {n: {i: summarise(i, raw[n][i]) for i in impls if raw[n][i]} for n in sizes}
    checks = targets(summary)
    command = "scripts/bench " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\n{command.strip()}  ({machine()['nproc']} vCPU, Linux {machine()['kernel']})")
    print(f"{rounds} rounds per N, interleaved; times in ms")
    if args.pps_max < max(sizes):
        print(f"process-per-step capped at N <= {args.pps_max}")
    print(table(summary))
    for key in ("netvm",):
        for n in sizes:
            row = summary[n].get(key)
            if row:
                print(
                    f"netvm N={n}: open {fmt(row['open_ms'])} ms, peak RSS "
                    f"{row['maxrss_kib'] / 1024:.1f} MiB "
                    f"(harness alone {rss_before / 1024:.1f} MiB)"
                )
    print(
        "ip -batch: per-VM figures are (batch time - empty batch) / N, a mean, not a p50; "
        f"detach samples for netvm: {DETACH_SAMPLES} VMs per round (RCU grace period each)"
    )
    print(contention_table(contention))
    checks += contention_targets(contention)
    print("\ntargets:")
    for check in checks:
        mark = "met   " if check["met"] else "MISSED"
        note = f"  ({check['note']})" if check["note"] else ""
        print(f"  {mark} {check['target']}: {check['value']} (limit {check['limit']}){note}")
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    result = {
        "command": command.strip(),
        "machine": machine(),
        "started": started,
        "seconds": round(time.time() - started, 1),
        "rounds": rounds,
        "summary": {str(n): v for n, v in summary.items()},
        "targets": checks,
        "contention": contention,
        "raw": {
            str(n): {i: [_raw_ms(r) for r in runs] for i, runs in by.items()}
            for n, by in raw.items()
        },
    }
    json_path = args.out / f"bench-{stamp}.json"
    json_path.write_text(json.dumps(result, indent=1))
    figures = schema_figures(summary, contention, rss_before)
    schema = write_result(args.out, "run", command.strip(), figures, schema_targets(checks))
    print(f"\nJSON: {json_path} (every sample), {schema} (figures and targets)")
    print(chart(summary, args.out / "run.png"))
    print(f"total {time.time() - started:.0f} s")
    return 0


def contention_table(rows: list[dict[str, Any]]) -> str:
    lines = [
        f"\ncontention: {CONTENTION_PROCESSES} processes x {CONTENTION_ATTACHES} attaches "
        "at once, one bridge, after one attach per process to warm it up (ms)",
        "| round | attach p50 | attach p99 | attach max | first attach of a process, max |",
        "|---|---|---|---|---|",
    ]
    for i, row in enumerate(rows, 1):
        keys = ("attach_p50_ms", "attach_p99_ms", "attach_max_ms", "first_attach_max_ms")
        cells = [fmt(row[k]) for k in keys]
        lines.append(f"| {i} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def contention_targets(rows: list[dict[str, Any]]) -> list[dict[str, Any]]:
    if not rows:
        return []
    p99 = max(row["attach_p99_ms"] for row in rows)
    worst = max(row["attach_max_ms"] for row in rows)
    return [
        {
            "target": "contention: attach p99 (ms), worst round",
            "value": p99,
            "limit": 10,
            "met": p99 <= 10,
            "note": "",
        },
        {
            "target": "contention: slowest attach (ms)",
            "value": worst,
            "limit": 50,
            "met": worst <= 50,
            "note": "",
        },
    ]


def contention_main(rounds: int, out: Path) -> int:
    state_root = Path(tempfile.mkdtemp(prefix="netvm-bench-", dir="/run"))
    try:
        rows = [run_contention(state_root) for _ in range(rounds)]
    finally:
        for path in sorted(state_root.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        state_root.rmdir()
    command = f"scripts/bench --contention-only --rounds {rounds}"
    print(f"{command}  ({machine()['nproc']} vCPU, Linux {machine()['kernel']})")
    print(contention_table(rows))
    checks = contention_targets(rows)
    for check in checks:
        mark = "met   " if check["met"] else "MISSED"
        print(f"  {mark} {check['target']}: {check['value']} (limit {check['limit']})")
    worst = {
        key: max(row[key] for row in rows)
        for key in ("attach_p50_ms", "attach_p99_ms", "attach_max_ms", "first_attach_max_ms")
    }
    figures = {f"contention_{key}": value for key, value in worst.items()}
    targets = [target(c["target"], c["value"], c["limit"], c["met"], c["note"]) for c in checks]
    print(f"JSON: {write_result(out, 'contention', command, figures, targets)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
