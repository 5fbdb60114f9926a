"""The `netvm` command's wall time, against a bare `python -c pass`, interleaved.

Run through scripts/bench or as `python -m bench.cli` (root: it makes a throwaway network
namespace for `attach`). One round runs, one after the other: `python -c pass`, the import
of netvm in a fresh interpreter (timed inside it, so without the interpreter's start),
`netvm --help`, `netvm attach VM` (a new VM each round, the bridge made once by
`ensure-host`) and `netvm list`. p50 over the rounds; the `over python` figures subtract the
bare interpreter's p50, which is what netvm adds, and what the noise of a shared machine
moves least. Then what single imports cost, each alone in a fresh interpreter (so with
everything it imports in turn, less what the interpreter's start loaded already: a module
a .pth file of the environment imports costs 0 here): the standard library modules netvm's
use, and netvm's. Bytecode is written once before the first round (PYTHONDONTWRITEBYTECODE
is dropped), as an installed package has it.
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

from bench.report import target, write_result
from netvm.testing import throwaway_netns

PYTHON = sys.executable
NETVM = str(Path(sys.executable).with_name("netvm"))
IMPORT_TIMER = (
    "import time\nt = time.perf_counter()\nimport {module}\nprint((time.perf_counter() - t) * 1000)"
)
IMPORTS = (
    "argparse",
    "dataclasses",
    "typing",
    "logging",
    "ipaddress",
    "hashlib",
    "json",
    "socket",
    "ctypes",
    "sqlite3",
    "importlib.metadata",
    "netvm.config",
    "netvm.cli",
    "netvm.leases",
    "netvm.firewall.nftables",
    "netvm.backends.kernel",
    "netvm.manager",
    "netvm.backends.fake",
    "netvm.diagnosis",
)
IMPORT_ROUNDS = 7
ATTACH_LIMIT_MS = 60
IMPORT_LIMIT_MS = 30


def environment() -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICROVM_NETWORK_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env


def wall(argv: Sequence[str], env: dict[str, str]) -> float:
    """Milliseconds from start to exit of the process; it must succeed."""
    start = time.perf_counter()
    subprocess.run(argv, env=env, check=True, stdout=subprocess.DEVNULL)
    return (time.perf_counter() - start) * 1000


def import_ms(module: str, env: dict[str, str]) -> float:
    code = IMPORT_TIMER.format(module=module)
    out = subprocess.run([PYTHON, "-c", code], env=env, check=True, capture_output=True, text=True)
    return float(out.stdout)


def run(rounds: int) -> dict[str, list[float]]:
    env = environment()
    samples: dict[str, list[float]] = {
        "python": [],
        "import": [],
        "import_cli": [],
        "help": [],
        "attach": [],
        "list": [],
    }
    with (
        throwaway_netns("nvbench-cli-") as netns,
        tempfile.TemporaryDirectory(prefix="netvm-bench-cli-", dir="/run") as state,
    ):
        base = [NETVM, "--netns", netns, "--bridge", "nvcli0", "--subnet", "172.30.0.0/22"]
        base += ["--egress", "up0", "--state-dir", state]
        wall([*base, "ensure-host"], env)
        # Warm-up: bytecode written, page cache filled; not counted.
        wall([*base, "attach", "vm-warm"], env)
        wall([NETVM, "--help"], env)
        for i in range(rounds):
            samples["python"].append(wall([PYTHON, "-c", "pass"], env))
            samples["import"].append(import_ms("netvm", env))
            samples["import_cli"].append(import_ms("netvm.cli", env))
            samples["help"].append(wall([NETVM, "--help"], env))
            samples["attach"].append(wall([*base, "attach", f"vm-{i}"], env))
            samples["list"].append(wall([*base, "list"], env))
        wall([*base, "teardown"], env)
    for _ in range(IMPORT_ROUNDS):
        for module in IMPORTS:
            samples.setdefault(f"import {module}", []).append(import_ms(module, env))
    return samples


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--rounds", type=int, default=30)
    parser.add_argument("--out", type=Path, default=Path("bench-results"))
    args = parser.parse_args(argv)
    if os.geteuid() != 0:
        print("bench/cli.py needs root (a network namespace for attach)", file=sys.stderr)
        return 2
    samples = run(args.rounds)
    p50 = {name: statistics.median(values) for name, values in samples.items()}
    python = p50["python"]
    rows = {
        "python -c pass": "python",
        "import netvm (in the process)": "import",
        "import netvm.cli (in the process)": "import_cli",
        "netvm --help": "help",
        "netvm attach VM": "attach",
        "netvm list": "list",
    }
    figures: dict[str, float] = {}
    for label, name in rows.items():
        figures[f"{label}.p50_ms"] = p50[name]
        if name not in ("import", "import_cli"):
            figures[f"{label}.over python p50_ms"] = p50[name] - python
    for module in IMPORTS:
        figures[f"imports/import {module}.alone p50_ms"] = p50[f"import {module}"]
    figures["rounds"] = args.rounds
    figures = {k: round(v, 2) if isinstance(v, float) else v for k, v in figures.items()}
    targets = [
        target(
            "netvm attach wall time p50 (ms)",
            p50["attach"],
            ATTACH_LIMIT_MS,
            p50["attach"] <= ATTACH_LIMIT_MS,
            f"a bare python -c pass: {python:.1f} ms in the same rounds",
        ),
        target(
            "import netvm p50 (ms)",
            p50["import"],
            IMPORT_LIMIT_MS,
            p50["import"] <= IMPORT_LIMIT_MS,
        ),
    ]
    command = "python -m bench.cli " + " ".join(argv if argv is not None else sys.argv[1:])
    path = write_result(args.out, "cli", command.strip(), figures, targets)
    print(f"{command.strip()}: p50 over {args.rounds} rounds, interleaved (ms)")
    for key, value in figures.items():
        print(f"  {key:40} {value}")
    for t in targets:
        mark = "met   " if t["ok"] else "MISSED"
        print(f"  {mark} {t['name']}: {t['value']} (limit {t['limit']})")
    print(f"JSON: {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
