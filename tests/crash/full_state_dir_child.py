"""Run by test_full_state_dir.py in a private mount namespace (unshare -m): state_dir is a
tiny tmpfs mounted here, filled, then remounted read-only. Prints a JSON report."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from netvm import KernelBackend, NetvmError, NetworkConfig, NetworkManager, StateStoreError
from netvm.naming import tap_name


def taps_and_leases(backend: KernelBackend, manager: NetworkManager) -> tuple[list[str], list[str]]:
    taps = sorted(link.name for link in backend.list_links() if link.kind == "tun")
    leases = sorted(lease.tap_name for lease in manager.leases.all())
    return taps, leases


def main(netns: str, state_dir: Path) -> dict[str, Any]:
    state_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=256k", "netvm-test", str(state_dir)], check=True
    )
    config = NetworkConfig(
        bridge_name="nvfull0",
        vm_subnet="192.0.2.0/24",
        host_egress_iface="up0",
        state_dir=state_dir,
    )
    report: dict[str, Any] = {"outcomes": [], "mismatches": []}
    backend = KernelBackend(netns)
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        fd = os.open(state_dir / "filler", os.O_WRONLY | os.O_CREAT, 0o644)
        try:
            while os.write(fd, b"x" * 4096):
                pass
        except OSError:
            pass
        finally:
            os.close(fd)
        for i in range(40):
            try:
                manager.attach(f"vm-{i}")
                report["outcomes"].append("attached")
            except StateStoreError as exc:
                report["outcomes"].append("refused")
                report["error"] = str(exc)
            taps, leases = taps_and_leases(backend, manager)
            if taps != leases:
                report["mismatches"].append([i, taps, leases])
        (state_dir / "filler").unlink()
        manager.attach("vm-after")
        report["after"] = taps_and_leases(backend, manager)
    subprocess.run(["mount", "-o", "remount,ro", str(state_dir)], check=True)
    with NetworkManager(config, backend) as manager:
        try:
            manager.attach("vm-ro")
            report["read_only_attach"] = "attached"
        except StateStoreError as exc:
            report["read_only_attach"] = str(exc)
        report["read_only_tap"] = backend.get_link(tap_name("vm-ro")) is not None
        report["gc"] = manager.gc(keep=["vm-after"])
        try:
            manager.teardown_host()
            report["teardown"] = "done"
        except NetvmError as exc:
            report["teardown"] = str(exc)
        report["left"] = sorted(link.name for link in backend.list_links())
    backend.close()
    return report


if __name__ == "__main__":
    print(json.dumps(main(sys.argv[1], Path(sys.argv[2]))))
