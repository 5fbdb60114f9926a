"""Several bridges, namespaces and processes side by side: none takes or frees another's."""

from __future__ import annotations

import dataclasses
import ipaddress
import threading

import pytest

from netvm import ConflictError, FakeBackend, NetworkConfig, NetworkManager
from netvm.backends.base import Backend
from netvm.naming import tap_name
from netvm.testing import snapshot


def second_bridge(config: NetworkConfig) -> NetworkConfig:
    return dataclasses.replace(
        config, bridge_name="nvbr1", vm_subnet=ipaddress.IPv4Network("198.51.100.0/24")
    )


def test_two_bridges_never_share_a_vm(config: NetworkConfig, backend: Backend) -> None:
    with (
        NetworkManager(config, backend) as a,
        NetworkManager(second_bridge(config), backend) as b,
    ):
        a.ensure_host()
        b.ensure_host()
        vm = a.attach("vm-1")
        before = snapshot(backend)
        with pytest.raises(ConflictError, match="not netvm's TAP for 'vm-1' on nvbr1"):
            b.attach("vm-1")
        with pytest.raises(ConflictError):
            b.detach("vm-1")
        assert b.gc() == []
        assert snapshot(backend) == before
        assert [(x.vm_id, x.on_bridge) for x in a.list()] == [("vm-1", True)]
        assert b.list() == []
        tap = backend.get_link(vm.tap_name)
        bridge = backend.get_link("nvbr0")
        assert tap is not None
        assert bridge is not None
        assert tap.master == bridge.index


def test_ip_forward_goes_off_with_the_last_netvm_bridge(
    config: NetworkConfig, backend: Backend
) -> None:
    with (
        NetworkManager(config, backend) as a,
        NetworkManager(second_bridge(config), backend) as b,
    ):
        a.ensure_host()
        b.ensure_host()
        a.teardown_host()
        assert backend.get_ip_forward() is True, "nvbr1 still needs forwarding"
        b.teardown_host()
        assert backend.get_ip_forward() is False


def test_ensure_host_from_several_threads_at_once(config: NetworkConfig, backend: Backend) -> None:
    """Each caller finds, creates or waits; none fails and none undoes another's work."""
    errors: list[BaseException] = []
    start = threading.Barrier(4)

    def run() -> None:
        with NetworkManager(config, backend) as manager:
            start.wait()
            try:
                manager.ensure_host()
            except BaseException as exc:
                errors.append(exc)

    threads = [threading.Thread(target=run) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    with NetworkManager(config, backend) as manager:
        once = snapshot(backend)
        manager.ensure_host()
        assert snapshot(backend) == once
        assert backend.get_ip_forward() is True


def test_same_bridge_name_in_two_fake_namespaces_has_two_lease_stores(
    config: NetworkConfig,
) -> None:
    """The kernel variant (two real namespaces) is in tests/kernel/test_namespaces.py."""
    one, other = FakeBackend(), FakeBackend()
    with NetworkManager(config, one) as a, NetworkManager(config, other) as b:
        a.ensure_host()
        b.ensure_host()
        a.attach("vm-a")
        assert b.gc() == []
        assert [x.vm_id for x in a.list()] == ["vm-a"]
        assert one.get_link(tap_name("vm-a")) is not None
