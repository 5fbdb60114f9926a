"""Where an attach spends its time: each step inside and outside the lease lock, in µs.

Run as root: `python -m bench.attach_profile` (also from scripts/bench). In a throwaway
namespace, ensure_host on nftables, then N attaches of new VMs (default policy, then
`OPEN`, then every guarantee with a port forward of its own: bench/guard.py's `all`), with
a timer around each step of the hot path. Steps nest (the lock hold contains
the kernel steps, `create_tap` contains the ioctls and the close): every figure is
inclusive, a median over the attaches. `lock held` is from the moment the lock is taken
to the moment it is let go. Timers cost about 1 µs each, so the sum of the parts exceeds
the untimed attach slightly; `attach (untimed)` is measured in a separate pass.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from bench.guard import every
from bench.report import write_result
from netvm import KernelBackend, NetworkConfig, NetworkManager
from netvm.backends import kernel, rtnl, tun
from netvm.firewall import elements, nftables
from netvm.leases import LeaseStore, LeaseTransaction
from netvm.policy import OPEN, GuestPolicy
from netvm.statefile import StateFile
from netvm.testing import throwaway_netns

ns = time.perf_counter_ns


class Timers:
    """Inclusive time per label for the attach in progress."""

    def __init__(self) -> None:
        self.current: dict[str, int] = {}
        self.samples: dict[str, list[int]] = {}
        self._held_since: int | None = None

    def add(self, label: str, elapsed: int) -> None:
        self.current[label] = self.current.get(label, 0) + elapsed

    def flush(self) -> None:
        for label, value in self.current.items():
            self.samples.setdefault(label, []).append(value)
        self.current = {}

    def wrap(self, owner: Any, name: str, label: str) -> Callable[[], None]:
        inner = getattr(owner, name)

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = ns()
            try:
                return inner(*args, **kwargs)
            finally:
                self.add(label, ns() - start)

        setattr(owner, name, timed)
        return lambda: setattr(owner, name, inner)

    def lock_hold(self) -> Callable[[], None]:
        acquire, release = StateFile.acquire, StateFile.release

        def timed_acquire(file: StateFile) -> None:
            start = ns()
            acquire(file)
            self._held_since = ns()
            self.add("lock: acquire (uncontended)", self._held_since - start)

        def timed_release(file: StateFile) -> None:
            if self._held_since is not None and file.held:
                self.add("lock held", ns() - self._held_since)
                self._held_since = None
            release(file)

        setattr(StateFile, "acquire", timed_acquire)  # noqa: B010 (a method, replaced)
        setattr(StateFile, "release", timed_release)  # noqa: B010

        def undo() -> None:
            setattr(StateFile, "acquire", acquire)  # noqa: B010
            setattr(StateFile, "release", release)  # noqa: B010

        return undo


class _TimedModule:
    """A module seen through a proxy that times some of its functions."""

    def __init__(self, real: Any, timers: Timers, labels: dict[str, str]) -> None:
        self._real, self._timers, self._labels = real, timers, labels

    def __getattr__(self, name: str) -> Any:
        value = getattr(self._real, name)
        label = self._labels.get(name)
        if label is None:
            return value

        def timed(*args: Any, **kwargs: Any) -> Any:
            start = ns()
            try:
                return value(*args, **kwargs)
            finally:
                self._timers.add(label, ns() - start)

        return timed


@contextmanager
def instrumented(timers: Timers) -> Iterator[None]:
    undo = [
        timers.lock_hold(),
        timers.wrap(NetworkManager, "attach", "attach"),
        timers.wrap(LeaseStore, "_ensure_open", "sqlite: stat the database"),
        timers.wrap(LeaseStore, "begin", "sqlite: BEGIN IMMEDIATE"),
        timers.wrap(LeaseTransaction, "acquire", "sqlite: lease lookup + insert"),
        timers.wrap(LeaseTransaction, "commit", "sqlite: COMMIT"),
        timers.wrap(StateFile, "read_intent", "intent: read"),
        timers.wrap(StateFile, "write_intent", "intent: write"),
        timers.wrap(StateFile, "clear_intent", "intent: clear"),
        timers.wrap(kernel.KernelBackend, "create_tap", "create_tap (all)"),
        timers.wrap(kernel.KernelBackend, "_tun_fd", "create_tap: pooled tun fd"),
        timers.wrap(rtnl.Rtnl, "get_link", "rtnl: RTM_GETLINK"),
        timers.wrap(rtnl.Rtnl, "set_link", "rtnl: RTM_NEWLINK (enslave, up, alias)"),
        timers.wrap(rtnl.Rtnl, "set_port_isolated", "rtnl: RTM_SETLINK (isolation)"),
        timers.wrap(nftables.NftablesFirewall, "guard", "guard: nftables elements (all)"),
        timers.wrap(nftables.NftablesFirewall, "record", "guard: read the record"),
        timers.wrap(nftables.NftablesFirewall, "_check_forwards", "guard: listeners (forwards)"),
        timers.wrap(elements.KernelElements, "commit", "guard: element batch"),
    ]
    module = vars(tun)
    real_fcntl, real_os = module["fcntl"], module["os"]
    module["fcntl"] = _TimedModule(real_fcntl, timers, {"ioctl": "tun: ioctls"})
    module["os"] = _TimedModule(real_os, timers, {"close": "tun: close(fd)"})
    try:
        yield
    finally:
        module["fcntl"], module["os"] = real_fcntl, real_os
        for step in reversed(undo):
            step()


def config(state_dir: Path) -> NetworkConfig:
    return NetworkConfig("nvprof0", "10.64.0.0/20", "up0", state_dir=state_dir, firewall="nftables")


PolicyOf = Callable[[int], GuestPolicy | None]


def profile(attaches: int, policy_of: PolicyOf, residents: int = 0) -> dict[str, float]:
    """Median µs per step over `attaches` attaches, and the untimed attach p50, with
    `residents` VMs of every guarantee (each its own forward) attached first."""
    timers = Timers()
    with throwaway_netns("netvm-prof-") as netns, tempfile.TemporaryDirectory(dir="/run") as d:
        backend = KernelBackend(netns)
        try:
            with NetworkManager(config(Path(d)), backend) as net:
                net.ensure_host()
                for n in range(residents):
                    net.attach(f"resident-{n}", policy=every(40000 + n))
                net.attach("warm-up", policy=policy_of(0))
                untimed = []
                for i in range(attaches):
                    start = ns()
                    net.attach(f"plain-{i}", policy=policy_of(1 + i))
                    untimed.append(ns() - start)
                with instrumented(timers):
                    for i in range(attaches):
                        net.attach(f"timed-{i}", policy=policy_of(1 + attaches + i))
                        timers.flush()
                net.teardown_host()
        finally:
            backend.close()
    figures = {label: statistics.median(v) / 1000 for label, v in timers.samples.items()}
    figures["attach (untimed)"] = statistics.median(untimed) / 1000
    return figures


def key(label: str) -> str:
    cleaned = "".join(c if c.isalnum() else "_" for c in label.lower())
    return "_".join(part for part in cleaned.split("_") if part) + "_us"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--attaches", type=int, default=200)
    parser.add_argument(
        "--residents",
        type=int,
        default=0,
        help="VMs with every guarantee attached before the profile (a bridge holds 1024 ports: "
        "residents + 2 x attaches must stay below)",
    )
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    if args.residents + 2 * args.attaches + 1 >= 1024:
        parser.error("--residents + 2 x --attaches must stay below a bridge's 1024 ports")
    runs = {
        "default": profile(args.attaches, lambda _: None, args.residents),
        "open": profile(args.attaches, lambda _: OPEN, args.residents),
        "all": profile(args.attaches, lambda i: every(20000 + i), args.residents),
    }
    labels = sorted({label for run in runs.values() for label in run})
    command = f"python -m bench.attach_profile --attaches {args.attaches}"
    if args.residents:
        command += f" --residents {args.residents}"
    print(f"{command}: median µs per attach")
    print(f"{'step':<44} {'default':>9} {'OPEN':>9} {'all':>9}")
    for label in labels:
        cells = [f"{runs[k][label]:9.1f}" if label in runs[k] else f"{'-':>9}" for k in runs]
        print(f"{label:<44} " + " ".join(cells))
    figures = {
        f"{k}_{key(label)}": round(v, 1) for k, run in runs.items() for label, v in run.items()
    }
    print(f"JSON: {write_result(args.out, 'attach_profile', command, figures)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
