"""What importing netvm and running a command load (issue 10): each command imports what it
needs when it needs it. Checked by the modules a fresh interpreter holds afterwards, never
by a timed assertion (the times are in bench/cli.py). pyroute2 only with netvm.testing, with
a clear error naming the `testing` extra when it is missing."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ALWAYS_ABSENT = {
    "pyroute2",  # netvm.testing only
    "hypothesis",
    "pytest",
    "asyncio",  # netvm.aio only
    "netvm.aio",
    "netvm.testing",
    "netvm.demo",
}
"""Never loaded by `import netvm` or by any command."""

FIREWALL_LIBRARIES = {"iptc", "nftables"}
"""python-iptables and libnftables' binding."""
FIREWALL_LOADERS = {"netvm.backends.iptc_compat", "netvm.firewall.libnftables"}
"""netvm's modules that load them (still imported by netvm.backends.kernel at its top)."""


def loaded_after(code: str) -> set[str]:
    """Names of every module a fresh interpreter holds after running `code`."""
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    modules: list[str] = json.loads(result.stdout.splitlines()[-1])
    return set(modules)


def added_by(code: str) -> set[str]:
    """The modules `code` loads beyond what a bare interpreter holds (site, a .pth file)."""
    return loaded_after(code) - loaded_after("pass")


def top_level(modules: set[str]) -> set[str]:
    return {name.split(".")[0] for name in modules}


def after_command(state_dir: Path, *argv: str, status: int = 0) -> set[str]:
    """The modules loaded by `netvm ARGV` run on the FakeBackend (ensure-host run before, in
    another interpreter, would lose the fake's state: it runs in the same one, first)."""
    base = ["--state-dir", str(state_dir), "--bridge", "nvbr0", "--subnet", "192.0.2.0/24"]
    code = (
        "import contextlib, io\n"
        "from netvm.backends.fake import FakeBackend, FakeState\n"
        "from netvm.cli import main\n"
        "state = FakeState()\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        f"    for argv in ({[*base, 'ensure-host']!r}, {[*base, *argv]!r}):\n"
        "        code = main(argv, backend_factory=lambda ns: FakeBackend(state), environ={})\n"
        f"        assert code in (0, {status}), code\n"
    )
    return loaded_after(code)


def test_import_netvm_loads_no_submodule() -> None:
    loaded = added_by("import netvm")
    assert "netvm" in loaded
    assert {m for m in loaded if m.startswith("netvm.")} == set()
    for heavy in ("sqlite3", "dataclasses", "logging", "typing", "ctypes", "socket"):
        assert heavy not in loaded, heavy
    assert not loaded & (ALWAYS_ABSENT | FIREWALL_LIBRARIES | FIREWALL_LOADERS)


def test_a_public_name_loads_its_module_only_when_used() -> None:
    loaded = loaded_after("from netvm import NetworkConfig, TapOptions")
    assert {"netvm.config", "netvm.backends.base"} <= loaded
    assert not loaded & {"netvm.manager", "netvm.backends.kernel", "netvm.backends.fake", "sqlite3"}
    # The control: the same probe sees the fake and the manager once they are asked for.
    loaded = loaded_after("from netvm import FakeBackend, NetworkManager")
    assert {"netvm.backends.fake", "netvm.manager", "sqlite3"} <= loaded


def test_netvm_help_loads_no_backend_and_no_lease_store() -> None:
    code = (
        "import contextlib, io\n"
        "from netvm.cli import main\n"
        "with contextlib.redirect_stdout(io.StringIO()):\n"
        "    assert main(['--help']) == 0\n"
        "    assert main(['attach', '--help']) == 0\n"
    )
    loaded = loaded_after(code)
    assert "netvm.cli" in loaded
    absent = {
        "sqlite3",
        "logging",
        "importlib.metadata",  # --version only
        "netvm.manager",
        "netvm.leases",
        "netvm.backends.kernel",
        "netvm.backends.fake",
        "netvm.firewall",
        "netvm.firewall.nftables",
        "netvm.diagnosis",
        "netvm.status",
    }
    assert not loaded & (absent | ALWAYS_ABSENT | FIREWALL_LIBRARIES | FIREWALL_LOADERS)


def test_netvm_version_loads_the_metadata_reader() -> None:
    # The control for --help above: the probe sees importlib.metadata when it is used.
    code = (
        "import contextlib, io\n"
        "from netvm.cli import main\n"
        "out = io.StringIO()\n"
        "with contextlib.redirect_stdout(out):\n"
        "    assert main(['--version']) == 0\n"
        "assert out.getvalue().startswith('netvm '), out.getvalue()\n"
    )
    assert "importlib.metadata" in loaded_after(code)


def test_attach_loads_neither_the_doctor_nor_the_status_report(tmp_path: Path) -> None:
    loaded = after_command(tmp_path / "state", "attach", "vm-1")
    assert {"netvm.manager", "sqlite3"} <= loaded
    absent = {"netvm.diagnosis", "importlib.metadata", "json.tool"}
    assert not loaded & (absent | ALWAYS_ABSENT | FIREWALL_LIBRARIES)


@pytest.mark.parametrize(
    ("command", "module"), [("doctor", "netvm.diagnosis"), ("status", "netvm.status")]
)
def test_the_command_that_needs_a_module_loads_it(
    tmp_path: Path, command: str, module: str
) -> None:
    # The control for the attach test above: the same probe sees what a command does load.
    loaded = after_command(tmp_path / "state", command, status=1)
    assert module in loaded
    assert not loaded & ALWAYS_ABSENT


def test_netvm_testing_imports_pyroute2() -> None:
    # The control for ALWAYS_ABSENT: the same probe sees pyroute2 when it is imported.
    assert "pyroute2" in top_level(loaded_after("import netvm.testing"))


def test_netvm_testing_without_pyroute2_names_the_extra() -> None:
    # A None entry in sys.modules makes `import pyroute2` fail as if it were not installed.
    script = (
        "import sys\n"
        "sys.modules['pyroute2'] = None\n"
        "try:\n"
        "    import netvm.testing\n"
        "except ModuleNotFoundError as exc:\n"
        "    print(exc.name, exc, sep='|')\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True)
    assert result.returncode == 0, result.stderr
    name, message = result.stdout.strip().split("|", 1)
    assert name == "pyroute2"
    assert "pip install 'netvm[testing]'" in message
