"""pyroute2's IPRoute against netvm's own rtnetlink messages and TUN ioctls, side by side.

Why netvm's host path packs its own messages (docs/design.md), measured again in one run:

  tap create  pyroute2: link("add", kind="tuntap", mode="tap", ifr={"no_pi": True})
              netvm:    open_tun() + create_persistent_tap() (TUNSETIFF with IFF_TUN_EXCL,
                        TUNSETPERSIST: what KernelBackend.create_tap does)
  getlink     pyroute2: link("get", ifname=NAME)
              netvm:    Rtnl.get_link(NAME), one RTM_GETLINK by name
  enslave     pyroute2: link("set", index=INDEX, master=BRIDGE, mtu=1500, state="up")
              (given the index, so it needs no look-up)
              netvm:    Rtnl.set_link(NAME, master=BRIDGE, mtu=1500, up=True)
  import      a fresh interpreter's `import pyroute2` against `import netvm`

Both clients are opened and called on one thread inside a throwaway network namespace (made
and deleted by netvm.testing.throwaway_netns, also on error or ^C), with an up bridge. The
work goes in rounds: each client creates ROUND TAPs, then reads each, then enslaves each.
The two clients take turns call by call (who goes first alternates), so that drift hits
both alike; with --blocks each makes its calls of one operation in a row instead. Then the
round's TAPs are checked (up, on the bridge) and deleted in one request (not timed), so the
bridge never holds more than 2 * ROUND ports. The first round is a warm-up and is not
counted. Two behaviours are checked on the way: whether creating a TAP whose name exists
fails, and in which namespace an IPRoute made on the namespace thread acts when another
thread calls it (a read-only look-up).

Run as root:  .venv/bin/python bench/rtnl_vs_pyroute2.py [--rounds 6] [--blocks] [--json]
"""

from __future__ import annotations

import argparse
import importlib.metadata
import json
import math
import os
import platform
import secrets
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from functools import partial
from typing import Any

from pyroute2 import IPRoute
from pyroute2.netlink.exceptions import NetlinkError

from netvm.backends.base import TapOptions
from netvm.backends.netns import NamespaceThread
from netvm.backends.rtnl import Rtnl
from netvm.backends.tun import create_persistent_tap, open_tun
from netvm.errors import NetvmError
from netvm.testing import throwaway_netns

CLIENTS = ("pyroute2", "netvm")
OPERATIONS = ("tap create", "getlink", "enslave")
MTU = 1500
ROUND = 50
IMPORT_CODE = "import time; t = time.perf_counter(); import {}; print(time.perf_counter() - t)"


def percentile(values: Sequence[float], p: float) -> float:
    """Nearest-rank percentile."""
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


class Pyroute2Client:
    """pyroute2's IPRoute, as a user of its documented API would call it."""

    def __init__(self) -> None:
        self.ipr = IPRoute()

    def create_tap(self, name: str) -> None:
        self.ipr.link("add", ifname=name, kind="tuntap", mode="tap", ifr={"no_pi": True})

    def get_link(self, name: str) -> int:
        (link,) = self.ipr.link("get", ifname=name)
        index: int = link["index"]
        return index

    def enslave(self, name: str, index: int, master: int) -> None:
        self.ipr.link("set", index=index, master=master, mtu=MTU, state="up")

    def close(self) -> None:
        self.ipr.close()


class NetvmClient:
    """What netvm's KernelBackend sends for the same three steps."""

    def __init__(self) -> None:
        self.rtnl = Rtnl()

    def create_tap(self, name: str) -> None:
        create_persistent_tap(name, TapOptions(), open_tun())

    def get_link(self, name: str) -> int:
        return self.rtnl.get_link(name).index

    def enslave(self, name: str, index: int, master: int) -> None:
        self.rtnl.set_link(name, master=master, mtu=MTU, up=True)

    def close(self) -> None:
        self.rtnl.close()


Client = Pyroute2Client | NetvmClient
Times = dict[str, dict[str, list[float]]]
"""operation -> client -> seconds per call."""


class Bench:
    """Both clients and a bridge in one namespace; every method runs on its thread."""

    def __init__(self, tag: str) -> None:
        self.tag = tag
        self.bridge = f"nvb{tag}"
        self.clients: dict[str, Client] = {"pyroute2": Pyroute2Client(), "netvm": NetvmClient()}
        self.rtnl = Rtnl()
        self.rtnl.create_link(self.bridge, "bridge")
        self.rtnl.set_link(self.bridge, mtu=MTU, up=True)
        self.bridge_index = self.rtnl.get_link(self.bridge).index

    def close(self) -> None:
        for client in self.clients.values():
            client.close()
        self.rtnl.close()

    def round(self, number: int, size: int, times: Times, blocks: bool = False) -> None:
        """One round of `size` TAPs per client; its timings are added to `times`.

        The clients take turns call by call, or, with `blocks`, each makes all its calls of
        one operation in a row (warmer caches for both).
        """
        names = {c: [f"nv{c[0]}{self.tag}r{number}n{i}" for i in range(size)] for c in CLIENTS}
        indexes: dict[str, list[int]] = {c: [] for c in CLIENTS}

        def turn(k: int) -> tuple[str, ...]:
            return CLIENTS if (k + number) % 2 == 0 else CLIENTS[::-1]

        if blocks:
            calls = [(c, i) for c in turn(0) for i in range(size)]
        else:
            calls = [(c, i) for i in range(size) for c in turn(i)]
        now = time.perf_counter
        for op in OPERATIONS:
            for c, i in calls:
                client, name = self.clients[c], names[c][i]
                start = now()
                if op == "tap create":
                    client.create_tap(name)
                elif op == "getlink":
                    indexes[c].append(client.get_link(name))
                else:
                    client.enslave(name, indexes[c][i], self.bridge_index)
                times[op][c].append(now() - start)
        self._check_and_delete([name for c in CLIENTS for name in names[c]], number)

    def _check_and_delete(self, names: list[str], number: int) -> None:
        """Both clients must have done the same thing: every TAP up on the bridge."""
        ports = {
            link.name
            for link in self.rtnl.dump_links(master=self.bridge_index)
            if link.kind == "tun" and link.up
        }
        if ports != set(names):
            raise RuntimeError(f"round {number}: up TAPs on {self.bridge} are not the round's")
        group = 100 + number
        failed = self.rtnl.set_groups(names, group)
        if failed:
            raise RuntimeError(f"round {number}: could not move {failed} into group {group}")
        self.rtnl.delete_group(group)

    def existing_tap(self) -> dict[str, str]:
        """What each client does when asked to create a TAP whose name exists already."""
        name = f"nvx{self.tag}"
        create_persistent_tap(name, TapOptions(), open_tun())
        outcome: dict[str, str] = {}
        for c, client in self.clients.items():
            try:
                client.create_tap(name)
                outcome[c] = "succeeds: the existing TAP is adopted"
            except (NetlinkError, NetvmError) as exc:
                outcome[c] = f"refused: {exc}"
        self.rtnl.delete_link(name)
        return outcome


def cross_thread(bench: Bench) -> str:
    """Call, from this (root namespace) thread, the IPRoute made on the namespace thread.

    A read-only look-up of the bridge, which exists only in the namespace.
    """
    client = bench.clients["pyroute2"]
    try:
        client.get_link(bench.bridge)
    except NetlinkError as exc:
        return f"acts in the caller's namespace (the bridge is not found there: {exc})"
    return "acts in the namespace it was made in"


def import_seconds(module: str, runs: int) -> list[float]:
    code = IMPORT_CODE.format(module)
    return [
        float(subprocess.run([sys.executable, "-c", code], capture_output=True, check=True).stdout)
        for _ in range(runs)
    ]


def summary(values: Sequence[float]) -> dict[str, float]:
    us = [v * 1e6 for v in values]
    return {
        "p50_us": round(statistics.median(us), 1),
        "p99_us": round(percentile(us, 99), 1),
        "mean_us": round(statistics.fmean(us), 1),
        "n": len(us),
    }


def measure(rounds: int, size: int, imports: int, blocks: bool) -> dict[str, Any]:
    times: Times = {op: {c: [] for c in CLIENTS} for op in OPERATIONS}
    with throwaway_netns("nvrtnl-") as netns:
        thread = NamespaceThread(netns)
        try:
            bench = thread.call(partial(Bench, secrets.token_hex(2)))
            try:
                warmup: Times = {op: {c: [] for c in CLIENTS} for op in OPERATIONS}
                thread.call(partial(bench.round, 0, size, warmup, blocks))
                for number in range(1, rounds + 1):
                    thread.call(partial(bench.round, number, size, times, blocks))
                behaviour = {
                    "existing TAP name": thread.call(bench.existing_tap),
                    "IPRoute called from another thread": cross_thread(bench),
                }
            finally:
                thread.call(bench.close)
        finally:
            thread.stop()
    times["import"] = {c: import_seconds(c, imports) for c in CLIENTS}
    results: dict[str, Any] = {}
    for op, by_client in times.items():
        stats = {c: summary(values) for c, values in by_client.items()}
        results[op] = {
            **stats,
            "ratio_p50": round(stats["pyroute2"]["p50_us"] / stats["netvm"]["p50_us"], 1),
            "ratio_p99": round(stats["pyroute2"]["p99_us"] / stats["netvm"]["p99_us"], 1),
        }
    return {
        "environment": {
            "kernel": platform.release(),
            "python": platform.python_version(),
            "pyroute2": importlib.metadata.version("pyroute2"),
            "cpus": os.cpu_count(),
            "rounds": rounds,
            "round_size": size,
            "order": "blocks" if blocks else "interleaved",
            "import_runs": imports,
        },
        "operations": results,
        "behaviour": behaviour,
    }


def table(report: dict[str, Any]) -> str:
    env = report["environment"]
    lines = [
        f"pyroute2 {env['pyroute2']} IPRoute vs netvm Rtnl/tun; Linux {env['kernel']}, "
        f"Python {env['python']}, {env['cpus']} CPUs; {env['rounds']} rounds of "
        f"{env['round_size']} calls per operation and client ({env['order']}) after a "
        f"warm-up round ({env['import_runs']} fresh interpreters for import)",
        f"{'operation':<12} {'pyroute2 p50':>13} {'p99':>9} {'netvm p50':>10} {'p99':>9}"
        f" {'ratio p50':>10} {'p99':>6}",
    ]
    for op, row in report["operations"].items():
        unit, scale = ("ms", 1000.0) if op == "import" else ("us", 1.0)
        p, n = row["pyroute2"], row["netvm"]
        lines.append(
            f"{op:<12} {p['p50_us'] / scale:>10.1f} {unit} {p['p99_us'] / scale:>9.1f}"
            f" {n['p50_us'] / scale:>7.1f} {unit} {n['p99_us'] / scale:>9.1f}"
            f" {row['ratio_p50']:>9.1f}x {row['ratio_p99']:>5.1f}x"
        )
    lines.append("")
    for check, outcome in report["behaviour"].items():
        if isinstance(outcome, dict):
            for client, text in outcome.items():
                lines.append(f"{check}, {client}: {text}")
        else:
            lines.append(f"{check}: {outcome}")
    return "\n".join(lines)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=6, help="counted rounds (default 6)")
    parser.add_argument(
        "--round-size", type=int, default=ROUND, help=f"TAPs per client and round ({ROUND})"
    )
    parser.add_argument("--imports", type=int, default=5, help="fresh interpreters per import")
    parser.add_argument(
        "--blocks",
        action="store_true",
        help="each client makes its calls of one operation in a row instead of taking turns",
    )
    parser.add_argument("--json", action="store_true", help="print JSON instead of a table")
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("needs root: it creates a network namespace, a bridge and TAPs", file=sys.stderr)
        return 2
    report = measure(args.rounds, args.round_size, args.imports, args.blocks)
    print(json.dumps(report, indent=2) if args.json else table(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
