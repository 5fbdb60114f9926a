"""ensure_host on each firewall, side by side: cold (first) and warm (repeated), and teardown.

Run through scripts/bench or as `python -m bench.firewall` (root). Each round makes one
throwaway namespace per firewall and host layout, interleaved (nftables, iptables,
nftables, ...) so that machine drift hits both alike. Layouts: a bare host, and one with
Docker's iptables-nft (or legacy, for the iptables firewall) FORWARD chain and DOCKER-USER,
where netvm's accepts also go. For comparison, the same nftables ruleset applied by
`nft -f` as a process (what netvm does not do) is timed too.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.report import write_result
from netvm import KernelBackend, NetworkConfig, NetworkManager
from netvm.backends.iptc_compat import load_iptc
from netvm.config import FirewallChoice
from netvm.firewall.libnftables import load_binding
from netvm.testing import run_in_netns, throwaway_netns

WARM = 50
now = time.perf_counter


def docker_layout(tool: str) -> list[list[str]]:
    return [
        [tool, "-N", "DOCKER-USER"],
        [tool, "-A", "FORWARD", "-j", "DOCKER-USER"],
        [tool, "-P", "FORWARD", "DROP"],
    ]


def sh(netns: str, command: list[str], stdin: str | None = None) -> None:
    subprocess.run(["ip", "netns", "exec", netns, *command], check=True, input=stdin, text=True)


def one(kind: FirewallChoice, layout: str, state: Path) -> dict[str, Any]:
    with throwaway_netns("netvm-fwbench-") as netns:
        if layout == "docker":
            for command in docker_layout(
                "iptables-nft" if kind == "nftables" else "iptables-legacy"
            ):
                sh(netns, command)
        config = NetworkConfig("nvfw0", "192.0.2.0/24", "up0", state_dir=state, firewall=kind)
        backend = KernelBackend(netns)
        try:
            with NetworkManager(config, backend) as manager:
                manager.leases.open()
                t0 = now()
                manager.ensure_host()
                cold = now() - t0
                warm = []
                for _ in range(WARM):
                    t0 = now()
                    manager.ensure_host()
                    warm.append(now() - t0)
                t0 = now()
                manager.teardown_host()
                down = now() - t0
        finally:
            backend.close()
        return {
            "cold_ms": cold * 1e3,
            "warm_ms": [w * 1e3 for w in warm],
            "teardown_ms": down * 1e3,
        }


RULESET = """table inet netvm-nvfw0 {
  chain forward { type filter hook forward priority filter; policy accept;
    iifname "nvfw0" oifname "up0" accept comment "netvm:nvfw0"
    iifname "nvfw0" oifname "nvfw0" accept comment "netvm:nvfw0"
    iifname "up0" oifname "nvfw0" ct state established,related accept comment "netvm:nvfw0"
    iifname "up0" oifname "nvfw0" drop comment "netvm:nvfw0"
  }
  chain postrouting { type nat hook postrouting priority srcnat; policy accept;
    ip saddr 192.0.2.0/24 oifname "up0" masquerade comment "netvm:nvfw0"
  }
}
"""


def nft_process(samples: int) -> list[float]:
    """`nft -f` of netvm's table as a child process started inside the namespace."""
    times: list[float] = []
    with throwaway_netns("netvm-fwbench-") as netns, tempfile.NamedTemporaryFile("w") as f:
        f.write("add table inet netvm-nvfw0\ndelete table inet netvm-nvfw0\n" + RULESET)
        f.flush()

        def run() -> None:
            for _ in range(samples):
                t0 = now()
                subprocess.run(["nft", "-f", f.name], check=True)
                times.append((now() - t0) * 1e3)

        run_in_netns(netns, run)
    return times


def p50(values: Sequence[float]) -> float:
    return statistics.median(values)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/firewall.py needs root (namespaces)", file=sys.stderr)
        return 2
    load_iptc()  # the libraries' one-time imports, outside every figure
    load_binding()
    runs: dict[str, list[dict[str, Any]]] = {}
    with tempfile.TemporaryDirectory(prefix="netvm-fwbench-", dir="/run") as root:
        for r in range(args.rounds):
            for layout in ("bare", "docker"):
                kinds: list[FirewallChoice] = ["nftables", "iptables"]
                for kind in kinds:
                    state = Path(root) / f"{r}-{layout}-{kind}"
                    runs.setdefault(f"{kind}/{layout}", []).append(one(kind, layout, state))
    process = nft_process(WARM)
    summary: dict[str, dict[str, float]] = {}
    for key, results in runs.items():
        warm = [w for result in results for w in result["warm_ms"]]
        summary[key] = {
            "cold_ms_p50": round(p50([result["cold_ms"] for result in results]), 3),
            "warm_ms_p50": round(p50(warm), 3),
            "warm_ms_p99": round(sorted(warm)[int(len(warm) * 0.99) - 1], 3),
            "teardown_ms_p50": round(p50([result["teardown_ms"] for result in results]), 3),
        }
    summary["nft -f process/bare"] = {"cold_ms_p50": round(p50(process), 3)}
    command = "python -m bench.firewall " + " ".join(argv if argv is not None else sys.argv[1:])
    print(f"\n{command.strip()}: ensure_host per firewall, {args.rounds} rounds, ms")
    print(
        f"{'firewall/layout':<22} {'cold p50':>9} {'warm p50':>9} {'warm p99':>9} {'teardown':>9}"
    )
    for key, row in summary.items():
        cells = [
            row.get(k) for k in ("cold_ms_p50", "warm_ms_p50", "warm_ms_p99", "teardown_ms_p50")
        ]
        print(
            f"{key:<22} " + " ".join(f"{c:>9.3f}" if c is not None else f"{'-':>9}" for c in cells)
        )
    args.out.mkdir(parents=True, exist_ok=True)
    figures = {
        f"{key.replace('/', ', ')}.{column.replace('_ms_', ' ')}_ms": value
        for key, row in summary.items()
        for column, value in row.items()
        if isinstance(value, (int, float))
    }
    print(f"JSON: {write_result(args.out, 'firewall', command.strip(), figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
