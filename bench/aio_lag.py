"""How late the event loop wakes while AsyncNetworkManager attaches and detaches VMs.

Run as root: .venv/bin/python bench/aio_lag.py (after scripts/test or scripts/bench has
made .venv). Each configuration works in its own throwaway network namespace (made and
deleted here with netvm.testing.throwaway_netns, also on error and ^C), its lease store
in a temporary directory under /run, removed afterwards; the root namespace is not touched.

A ticker coroutine sleeps 1 ms again and again and records how much later than asked it
woke: that lag is the time the loop could not run anything else. It is recorded per
phase: idle (the floor), N attaches and N detaches issued at once (asyncio.gather) and
one after another, and a control in which a plain NetworkManager attaches and detaches on
the loop's own thread (it must show the ~16 ms detaches, else the ticker is blind).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Awaitable, Callable, Sequence
from pathlib import Path
from typing import Any

from bench.report import write_result
from netvm import KernelBackend, NetworkConfig, NetworkManager
from netvm.aio import AsyncNetworkManager
from netvm.testing import throwaway_netns

TICK = 0.001
CONTROL_VMS = 20
now = time.perf_counter


class Ticker:
    """Sleeps TICK in a loop; `lags` holds how late each wake-up was, in seconds."""

    def __init__(self) -> None:
        self.lags: list[float] = []
        self._task: asyncio.Task[None] | None = None

    async def _run(self) -> None:
        while True:
            start = now()
            await asyncio.sleep(TICK)
            self.lags.append(now() - start - TICK)

    def start(self) -> None:
        self.lags = []
        self._task = asyncio.create_task(self._run())

    async def stop(self) -> list[float]:
        assert self._task is not None
        self._task.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await self._task
        return self.lags


def summary(name: str, seconds: float, ops: int, lags: Sequence[float]) -> dict[str, Any]:
    ms = sorted(lag * 1000 for lag in lags)
    p99 = statistics.quantiles(ms, n=100, method="inclusive")[98] if len(ms) >= 2 else ms[-1]
    return {
        "phase": name,
        "seconds": round(seconds, 3),
        "ops_per_s": round(ops / seconds) if ops else None,
        "ticks": len(ms),
        "lag_p50_ms": round(statistics.median(ms), 3),
        "lag_p99_ms": round(p99, 3),
        "lag_max_ms": round(ms[-1], 3),
    }


async def measure(
    ticker: Ticker, name: str, ops: int, work: Callable[[], Awaitable[object]]
) -> dict[str, Any]:
    ticker.start()
    await asyncio.sleep(0.05)  # the ticker is running before the work starts
    start = now()
    await work()
    seconds = now() - start
    return summary(name, seconds, ops, await ticker.stop())


async def run_config(netns: str, state_dir: Path, vms: int, detachers: int) -> list[dict[str, Any]]:
    config = NetworkConfig(
        bridge_name="nvlag0",
        vm_subnet="172.30.0.0/23",
        host_egress_iface="up0",
        state_dir=state_dir,
    )
    ticker = Ticker()
    rows = [await measure(ticker, "idle 3 s", 0, lambda: asyncio.sleep(3))]
    net = await AsyncNetworkManager.open(config, netns, detach_managers=detachers)
    try:
        await net.ensure_host()
        vm_ids = [f"vm-{n}" for n in range(vms)]

        async def check(expected: int) -> None:
            attached = sum(a.on_bridge for a in await net.list())
            if attached != expected:
                raise SystemExit(f"{attached} VMs on the bridge, expected {expected}")

        async def gather_attach() -> None:
            await asyncio.gather(*(net.attach(v) for v in vm_ids))

        async def gather_detach() -> None:
            await asyncio.gather(*(net.detach(v) for v in vm_ids))

        async def serial_attach() -> None:
            for v in vm_ids:
                await net.attach(v)

        async def serial_detach() -> None:
            for v in vm_ids:
                await net.detach(v)

        rows.append(await measure(ticker, f"{vms} attaches, gather", vms, gather_attach))
        await check(vms)
        rows.append(await measure(ticker, f"{vms} detaches, gather", vms, gather_detach))
        await check(0)
        rows.append(await measure(ticker, f"{vms} attaches, one by one", vms, serial_attach))
        await check(vms)
        rows.append(await measure(ticker, f"{vms} detaches, one by one", vms, serial_detach))
        await check(0)
        await net.teardown_host()
    finally:
        await net.aclose()
    return rows


async def run_control(netns: str, state_dir: Path) -> dict[str, Any]:
    """The sync manager on the loop's thread: what the ticker reports when it is blocked."""
    config = NetworkConfig(
        bridge_name="nvlag0",
        vm_subnet="172.30.0.0/23",
        host_egress_iface="up0",
        state_dir=state_dir,
    )
    backend = KernelBackend(netns)
    try:
        with NetworkManager(config, backend) as manager:
            manager.ensure_host()
            ticker = Ticker()

            async def blocking() -> None:
                for n in range(CONTROL_VMS):
                    manager.attach(f"c-{n}")
                    await asyncio.sleep(0)
                for n in range(CONTROL_VMS):
                    manager.detach(f"c-{n}")
                    await asyncio.sleep(0)

            row = await measure(
                ticker, f"control: sync {CONTROL_VMS}+{CONTROL_VMS} on the loop", 0, blocking
            )
            manager.teardown_host()
    finally:
        backend.close()
    return row


def print_table(config: str, rows: list[dict[str, Any]]) -> None:
    print(f"\n{config}")
    print(f"{'phase':<40} {'s':>7} {'ops/s':>7} {'ticks':>6} {'p50':>7} {'p99':>7} {'max':>7}")
    for r in rows:
        ops = "-" if r["ops_per_s"] is None else str(r["ops_per_s"])
        print(
            f"{r['phase']:<40} {r['seconds']:>7.3f} {ops:>7} {r['ticks']:>6} "
            f"{r['lag_p50_ms']:>7.3f} {r['lag_p99_ms']:>7.3f} {r['lag_max_ms']:>7.3f}"
        )


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--vms", type=int, default=200, help="VMs per phase (default 200)")
    parser.add_argument(
        "--detach-managers",
        default="0,2",
        help="detach manager counts to run, comma-separated (default 0,2)",
    )
    parser.add_argument(
        "--switch-interval",
        type=float,
        help="sys.setswitchinterval() in ms for the run (default: Python's, 5 ms)",
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    parser.add_argument(
        "--out", type=Path, help="write DIR/aio_lag.json in the bench schema (bench/report.py)"
    )
    args = parser.parse_args(argv)
    if args.switch_interval is not None:
        sys.setswitchinterval(args.switch_interval / 1000)
    counts = [int(part) for part in args.detach_managers.split(",")]
    print(
        f"Python {platform.python_version()}, Linux {platform.release()}, "
        f"GIL switch interval {sys.getswitchinterval() * 1000:g} ms; "
        f"lag in ms over {TICK * 1000:g} ms ticks"
    )
    results: dict[str, list[dict[str, Any]]] = {}
    for count in counts:
        with (
            throwaway_netns("netvm-aiolag-") as netns,
            tempfile.TemporaryDirectory(prefix="netvm-aiolag-", dir="/run") as state,
        ):
            name = f"AsyncNetworkManager.open(detach_managers={count})"
            results[name] = asyncio.run(run_config(netns, Path(state), args.vms, count))
        print_table(name, results[name])
    with (
        throwaway_netns("netvm-aiolag-") as netns,
        tempfile.TemporaryDirectory(prefix="netvm-aiolag-", dir="/run") as state,
    ):
        results["control"] = [asyncio.run(run_control(netns, Path(state)))]
    print_table(
        "control (negative): NetworkManager called on the loop's thread", results["control"]
    )
    if args.json is not None:
        args.json.write_text(json.dumps(results, indent=2) + "\n")
    if args.out is not None:
        command = "python -m bench.aio_lag " + " ".join(argv if argv is not None else sys.argv[1:])
        write_result(args.out, "aio_lag", command.strip(), schema_figures(counts, results))
    return 0


def schema_figures(
    counts: Sequence[int], results: dict[str, list[dict[str, Any]]]
) -> dict[str, float | int]:
    """One table: a row per (detach managers, phase), the lag's p50/p99/max and ops/s."""
    labels = {
        f"AsyncNetworkManager.open(detach_managers={n})": f"{n} detach managers" for n in counts
    }
    labels["control"] = ""  # its phase says what it is
    figures: dict[str, float | int] = {}
    for name, rows in results.items():
        for row in rows:
            label = f"{labels[name]}: " if labels[name] else ""
            key = f"lag/{label}{row['phase']}".replace(".", ",")
            figures[f"{key}.p50_ms"] = row["lag_p50_ms"]
            figures[f"{key}.p99_ms"] = row["lag_p99_ms"]
            figures[f"{key}.max_ms"] = row["lag_max_ms"]
            if row["ops_per_s"] is not None:
                figures[f"{key}.ops per s"] = row["ops_per_s"]
    return figures


if __name__ == "__main__":
    sys.exit(main())
