"""Detach: the caller's time of netvm's detach and detach_many, next to `ip -batch` deleting.

    .venv/bin/python -m bench.detach [--sizes 10,100,1000] [--rounds 3] [--out DIR]

As root. Each round runs, interleaved, netvm (bench/run.py's netvm phases: N attaches, 50
detaches timed one by one, then detach_many of all N) and `ip -batch` deleting the same N
TAPs one `link del` each, each in a fresh throwaway namespace. netvm's figures are what
its caller waits: the TAPs are down, marked and off the VM's name when detach returns,
and the reaper's thread deletes them (one RCU grace period per batch); the bench waits
for that and counts the TAPs left on the bridge from the kernel before it goes on.
Writes DIR/detach.json (default bench-results/) in the bench schema of the project.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.report import write_result
from bench.run import percentile, run_one
from netvm.backends.iptc_compat import load_iptc

P50_LIMIT_MS = 1.0
"""The target: the caller's detach p50 at most 1 ms."""


def _ms(seconds: float) -> float:
    return round(seconds * 1000, 4)


def measure(sizes: Sequence[int], rounds: int) -> dict[str, float]:
    state_root = Path(tempfile.mkdtemp(prefix="netvm-bench-", dir="/run"))
    figures: dict[str, float] = {}
    try:
        for n in sizes:
            netvm: list[dict[str, Any]] = []
            batch: list[dict[str, Any]] = []
            for _ in range(rounds):
                netvm.append(run_one("netvm", n, state_root))
                batch.append(run_one("batch", n, state_root))
            detach = [seconds for run in netvm for seconds in run["detach"]]
            figures[f"n{n}_netvm_detach_p50_ms"] = _ms(percentile(detach, 50))
            figures[f"n{n}_netvm_detach_p99_ms"] = _ms(percentile(detach, 99))
            many = statistics.median(run["detach_many_per_vm"] for run in netvm)
            figures[f"n{n}_netvm_detach_many_per_vm_ms"] = _ms(many)
            reaped = statistics.median(run["detach_many_reaped"] for run in netvm)
            figures[f"n{n}_netvm_detach_many_reaper_ms"] = _ms(reaped)
            per_vm = statistics.median(run["detach_per_vm"] for run in batch)
            figures[f"n{n}_ip_batch_delete_per_vm_ms"] = _ms(per_vm)
            figures[f"n{n}_ip_batch_over_netvm_detach_p50_x"] = round(
                per_vm / max(percentile(detach, 50), 1e-9), 2
            )
            print(
                f"N={n}: netvm detach p50 {figures[f'n{n}_netvm_detach_p50_ms']} ms, "
                f"p99 {figures[f'n{n}_netvm_detach_p99_ms']} ms, detach_many "
                f"{figures[f'n{n}_netvm_detach_many_per_vm_ms']} ms/VM (reaper "
                f"{figures[f'n{n}_netvm_detach_many_reaper_ms']} ms for all); ip -batch "
                f"`link del` {figures[f'n{n}_ip_batch_delete_per_vm_ms']} ms/VM",
                flush=True,
            )
    finally:
        shutil.rmtree(state_root, ignore_errors=True)
    return figures


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--sizes", type=lambda s: [int(x) for x in s.split(",")])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/detach.py needs root (namespaces, bridges, TAPs)", file=sys.stderr)
        return 2
    sizes = args.sizes or [10, 100, 1000]
    load_iptc()
    figures = measure(sizes, args.rounds)
    targets = [
        {
            "name": f"N={n}: caller's detach p50 (ms)",
            "value": figures[f"n{n}_netvm_detach_p50_ms"],
            "limit": P50_LIMIT_MS,
            "ok": figures[f"n{n}_netvm_detach_p50_ms"] <= P50_LIMIT_MS,
            "note": "the grace period is paid by the reaper's thread, once per batch",
        }
        for n in sizes
    ]
    command = "python -m bench.detach " + " ".join(argv if argv is not None else sys.argv[1:])
    path = write_result(args.out, "detach", command.strip(), figures, targets)
    for target in targets:
        print(f"  {'met   ' if target['ok'] else 'MISSED'} {target['name']}: {target['value']}")
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
