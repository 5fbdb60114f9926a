"""What the real `netvm attach` loads, in a throwaway namespace (issue 10): each command
imports what it needs when it needs it. The process runs the command's own entry point
(`netvm.cli.main`) and then reports its sys.modules; no time is asserted (bench/cli.py
measures it)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.privileged

NEVER = {"pyroute2", "hypothesis", "pytest", "asyncio", "netvm.testing", "netvm.aio"}
NOT_FOR_ATTACH = {"netvm.diagnosis", "netvm.status", "netvm.backends.fake", "shutil", "hashlib"}


def modules_after(netns: str, state: Path, *commands: list[str]) -> set[str]:
    """Run the commands in one fresh interpreter (as the netvm script would, one after the
    other); the modules it holds at the end."""
    base = ["--netns", netns, "--bridge", "nvbr0", "--subnet", "192.0.2.0/24"]
    base += ["--egress", "up0", "--state-dir", str(state)]
    code = (
        "import json, sys\n"
        "from netvm.cli import main\n"
        f"for argv in {[[*base, *c] for c in commands]!r}:\n"
        "    code = main(argv)\n"
        "    assert code == 0 or (code == 1 and argv[-1] == 'doctor'), argv\n"
        "print(json.dumps(sorted(sys.modules)), file=sys.stderr)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("MICROVM_NETWORK_")}
    done = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=60
    )
    assert done.returncode == 0, done.stderr
    modules: list[str] = json.loads(done.stderr.splitlines()[-1])
    return set(modules)


@pytest.fixture
def host(netns: str, tmp_path: Path) -> Path:
    """A namespace where ensure-host ran (in another process)."""
    modules_after(netns, tmp_path / "state", ["ensure-host"])
    return tmp_path / "state"


def test_attach_loads_neither_the_doctor_nor_the_fake_nor_test_tools(
    netns: str, host: Path
) -> None:
    loaded = modules_after(netns, host, ["attach", "vm-1"])
    assert {"netvm.manager", "netvm.backends.kernel", "sqlite3"} <= loaded
    assert not loaded & (NEVER | NOT_FOR_ATTACH)


def test_doctor_loads_the_doctor(netns: str, host: Path) -> None:
    # The control for the test above: the same probe sees the doctor when a command uses it.
    loaded = modules_after(netns, host, ["status"], ["doctor"])
    assert {"netvm.status", "netvm.diagnosis"} <= loaded


def test_attach_on_an_nftables_host_does_not_load_python_iptables(netns: str, host: Path) -> None:
    loaded = modules_after(netns, host, ["attach", "vm-1"])
    assert not loaded & {
        "iptc",
        "importlib.metadata",
        "distutils",
        "setuptools",
        "pkg_resources",
        "netvm.backends.iptables",
    }
