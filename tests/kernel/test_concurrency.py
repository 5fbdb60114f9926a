"""Several processes attaching into one namespace at once, sharing one lease store."""

from __future__ import annotations

import multiprocessing
from pathlib import Path

import pytest

from netvm import KernelBackend, NetworkConfig, NetworkManager

pytestmark = pytest.mark.privileged


def _config(state_dir: str) -> NetworkConfig:
    return NetworkConfig(
        bridge_name="nvbr0", vm_subnet="192.0.2.0/24", host_egress_iface="up0", state_dir=state_dir
    )


def _attach_all(netns: str, state_dir: str, vm_ids: list[str]) -> list[tuple[str, str, str]]:
    backend = KernelBackend(netns)
    with NetworkManager(_config(state_dir), backend) as manager:
        result = []
        for vm_id in vm_ids:
            vm = manager.attach(vm_id)
            result.append((vm.vm_id, str(vm.guest_ip), vm.mac_string()))
    backend.close()
    return result


def test_processes_attaching_at_once_share_nothing_by_mistake(netns: str, tmp_path: Path) -> None:
    backend = KernelBackend(netns)
    with NetworkManager(_config(str(tmp_path)), backend) as manager:
        manager.ensure_host()
        context = multiprocessing.get_context("spawn")
        jobs = [(netns, str(tmp_path), [f"p{p}-vm{i}" for i in range(10)]) for p in range(4)]
        jobs += [(netns, str(tmp_path), ["shared-vm"])] * 4
        with context.Pool(8) as pool:
            runs = pool.starmap(_attach_all, jobs)
        distinct = [vm for run in runs[:4] for vm in run]
        assert len({ip for _, ip, _ in distinct}) == len({mac for _, _, mac in distinct}) == 40
        shared = {run[0] for run in runs[4:]}
        assert len(shared) == 1
        bridge = backend.get_link("nvbr0")
        assert bridge is not None
        assert len(backend.list_links(master=bridge.index)) == 41
        assert len(manager.leases.all()) == 41
        (shared_vm,) = shared
        assert any(a.vm_id == "shared-vm" and a.on_bridge for a in manager.list())
        assert shared_vm[1] in {str(a.network.guest_ip) for a in manager.list() if a.network}
        manager.teardown_host()
    backend.close()
