"""Run by test_full_state_dir.py in a private mount namespace (unshare -m): a healthy lease
store, closed, on a tmpfs that then fills up; the next manager's attach must find it full,
not damaged. `--control` takes every I/O error for damage, as netvm did before.
Prints a JSON report."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

from netvm import NetworkConfig, NetworkManager, StateStoreError
from netvm.backends.fake import FakeBackend, FakeState


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT, 0o644)
    try:
        while os.write(fd, b"x" * 4096):
            pass
    except OSError:
        pass
    finally:
        os.close(fd)
    return filler


def main(state_dir: Path, control: bool) -> dict[str, Any]:
    state_dir.mkdir(parents=True, exist_ok=True)
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=2m", "netvm-test", str(state_dir)], check=True
    )
    if control:
        import netvm.leases

        netvm.leases._out_of_room = lambda directory: False
    config = NetworkConfig(
        bridge_name="nvfull1",
        vm_subnet="192.0.2.0/24",
        host_egress_iface="up0",
        state_dir=state_dir,
    )
    state = FakeState()
    backend = FakeBackend(state)
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        for i in range(4):
            manager.attach(f"vm-{i}")
        # A VM that is stopped keeps its address: its lease is in the store alone.
        manager.leases.all()
    (store,) = state_dir.glob("*.sqlite")
    before = hashlib.sha256(store.read_bytes()).hexdigest()
    tap = next(link.name for link in state.links.values() if link.kind == "tun")
    FakeBackend(state).delete_link(tap)
    filler = fill(state_dir)
    report: dict[str, Any] = {}
    with NetworkManager(config, FakeBackend(state)) as manager:
        try:
            manager.attach("vm-new")
            report["attach"] = "attached"
        except StateStoreError as exc:
            report["attach"] = f"{type(exc).__name__}: {exc}"
    report["files"] = sorted(path.name for path in state_dir.iterdir())
    report["unchanged"] = (
        store.exists() and hashlib.sha256(store.read_bytes()).hexdigest() == before
    )
    filler.unlink()
    with NetworkManager(config, FakeBackend(state)) as manager:
        manager.attach("vm-new")
        report["leases"] = sorted(lease.vm_id for lease in manager.leases.all())
    return report


if __name__ == "__main__":
    print(json.dumps(main(Path(sys.argv[1]), "--control" in sys.argv)))
