"""Boot storm: attach_many of N VMs against `ip -batch` making the same TAPs, per VM.

Run as root: `python -m bench.storm` (also from scripts/bench). Each round, in a fresh
throwaway namespace each, interleaved: netvm's attach_many of N new VMs (default policy,
then `OPEN`), N single attaches, and `ip -batch` with `tuntap add` + `link set master ...
up alias` per VM (the floor of bench/run.py). Per-VM figures: netvm's call time / N; ip's
(batch time - empty batch) / N. Medians over the rounds. The TAPs on the bridge are
counted from the kernel after each run.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from pathlib import Path

from bench.report import target, write_result
from bench.run import (
    BRIDGE,
    BrokenRun,
    Shell,
    bench_config,
    now,
    run_batch,
    verify,
    vm_ids,
)
from netvm import KernelBackend, NetworkManager
from netvm.policy import OPEN
from netvm.testing import throwaway_netns


def run_netvm(n: int, kind: str, state_root: Path) -> float:
    """Seconds per VM of attach_many ("many", "many-open") or of attach one by one."""
    with throwaway_netns("nvstorm-") as netns:
        shell = Shell(netns)
        backend = KernelBackend(netns)
        state_dir = Path(tempfile.mkdtemp(prefix="state-", dir=state_root))
        try:
            with NetworkManager(bench_config(state_dir), backend) as manager:
                manager.ensure_host()
                manager.attach("warm-up")  # the firewall choice, libnftables: not the storm's
                ids = vm_ids(n)
                start = now()
                if kind == "single":
                    for vm_id in ids:
                        manager.attach(vm_id)
                else:
                    result = manager.attach_many(ids, policy=OPEN if kind == "many-open" else None)
                    if not result.ok:
                        raise BrokenRun(f"attach_many: {next(iter(result.errors.values()))}")
                elapsed = now() - start
                verify(shell, n + 1, f"netvm {kind}")
                manager.teardown_host()
        finally:
            backend.close()
            shell.close()
    return float(elapsed / n)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="100,1000")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    sizes = [int(s) for s in args.sizes.split(",")]
    kinds = ("many", "many-open", "single", "batch")
    state_root = Path(tempfile.mkdtemp(prefix="netvm-storm-", dir="/run"))
    per_vm: dict[int, dict[str, list[float]]] = {n: {k: [] for k in kinds} for n in sizes}
    try:
        for n in sizes:
            for _ in range(args.rounds):
                for kind in kinds:
                    if kind == "batch":
                        with throwaway_netns("nvstorm-") as netns:
                            per_vm[n][kind].append(run_batch(netns, n)["attach_per_vm"])
                    else:
                        per_vm[n][kind].append(run_netvm(n, kind, state_root))
    finally:
        for path in sorted(state_root.rglob("*"), reverse=True):
            path.rmdir() if path.is_dir() else path.unlink()
        state_root.rmdir()
    command = f"python -m bench.storm --sizes {args.sizes} --rounds {args.rounds}"
    print(f"{command}: ms per VM, median of {args.rounds} rounds (bridge {BRIDGE})")
    print(f"{'N':>5} {'attach_many':>12} {'many, OPEN':>11} {'attach x N':>11} {'ip -batch':>10}")
    figures: dict[str, float] = {}
    targets = []
    for n in sizes:
        med = {k: statistics.median(v) * 1000 for k, v in per_vm[n].items()}
        print(
            f"{n:>5} {med['many']:>12.3f} {med['many-open']:>11.3f} "
            f"{med['single']:>11.3f} {med['batch']:>10.3f}"
        )
        for kind, value in med.items():
            figures[f"n{n}_{kind.replace('-', '_')}_per_vm_ms"] = round(value, 4)
        for kind in ("many", "many-open"):
            ratio = med[kind] / med["batch"]
            figures[f"n{n}_{kind.replace('-', '_')}_over_ip_batch_x"] = round(ratio, 3)
            targets.append(
                target(
                    f"N={n}: attach_many ({'default policy' if kind == 'many' else 'OPEN'}) "
                    "per VM / ip -batch per VM",
                    ratio,
                    0.5,
                    ratio <= 0.5,
                )
            )
    for t in targets:
        print(f"  {'met   ' if t['ok'] else 'MISSED'} {t['name']}: {t['value']} (limit 0.5)")
    print(f"JSON: {write_result(args.out, 'storm', command, figures, targets)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
