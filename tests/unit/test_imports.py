"""What importing netvm costs a user: pyroute2 only with netvm.testing, and a clear error
naming the `testing` extra when it is missing."""

from __future__ import annotations

import json
import subprocess
import sys

import pytest


def loaded_after(code: str) -> set[str]:
    """Top-level names of the modules a fresh interpreter holds after running `code`."""
    script = f"import json, sys\n{code}\nprint(json.dumps(sorted(sys.modules)))"
    out = subprocess.run(
        [sys.executable, "-c", script], capture_output=True, text=True, check=True
    ).stdout
    return {name.split(".")[0] for name in json.loads(out)}


@pytest.mark.parametrize("module", ["netvm", "netvm.cli"])
def test_netvm_does_not_import_pyroute2(module: str) -> None:
    loaded = loaded_after(f"import {module}")
    assert "netvm" in loaded
    assert "pyroute2" not in loaded
    # python-iptables is loaded on first use of the kernel firewall, not on import.
    assert "iptc" not in loaded


def test_netvm_testing_imports_pyroute2() -> None:
    # The control for the test above: the same probe sees pyroute2 when it is imported.
    assert "pyroute2" in loaded_after("import netvm.testing")


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
