"""Random operation sequences run on the fake and on the kernel must end in the same state."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from netvm import (
    FakeBackend,
    KernelBackend,
    NetvmError,
    NetworkConfig,
    NetworkManager,
    TapOptions,
)
from netvm.backends.base import Backend
from netvm.naming import tap_name
from netvm.testing import create_netns, delete_netns, snapshot

pytestmark = pytest.mark.privileged

VM_IDS = st.sampled_from(["vm-a", "vm-b", "vm-c", "vm-d"])
BRIDGES = st.sampled_from(["nvbr0", "nvbr1"])


def outcome(call: object) -> str:
    try:
        result = call() if callable(call) else None
    except NetvmError as exc:
        return type(exc).__name__
    return repr(result)


class FakeAgreesWithKernel(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.tmp = tempfile.TemporaryDirectory()
        self.netns = f"netvm-test-diff-{id(self):x}"[:40]
        create_netns(self.netns)
        self.kernel = KernelBackend(self.netns)
        fake = FakeBackend()
        self.backends: list[Backend] = [fake, self.kernel]
        # Two bridges in each namespace: managers[bridge][0] is the fake's, [1] the kernel's.
        self.managers = {
            bridge: [
                NetworkManager(self._config(name, bridge, subnet), backend)
                for name, backend in (("fake", fake), ("kernel", self.kernel))
            ]
            for bridge, subnet in (("nvbr0", "192.0.2.0/29"), ("nvbr1", "198.51.100.0/29"))
        }

    def _config(self, name: str, bridge: str, subnet: str) -> NetworkConfig:
        return NetworkConfig(
            bridge_name=bridge,
            vm_subnet=subnet,
            host_egress_iface="up0",
            # One directory for both: their files are named after their namespaces, and the
            # bridge records the store's directory (naming.store_id), which must be equal.
            state_dir=Path(self.tmp.name),
        )

    def both(self, bridge: str, action: str, *args: object) -> None:
        results = [outcome(lambda m=m: getattr(m, action)(*args)) for m in self.managers[bridge]]
        assert results[0] == results[1], f"{action}{args}: fake {results[0]}, kernel {results[1]}"

    def on_backends(self, action: str, *args: object, **kwargs: object) -> None:
        results = [outcome(lambda b=b: getattr(b, action)(*args, **kwargs)) for b in self.backends]
        if action == "create_tap":  # the ifindex each returns is its own to choose
            results = [r if not r.isdigit() else "an ifindex" for r in results]
        assert results[0] == results[1], f"{action}{args}: fake {results[0]}, kernel {results[1]}"

    @rule(bridge=BRIDGES)
    def ensure_host(self, bridge: str) -> None:
        self.both(bridge, "ensure_host")

    @rule(bridge=BRIDGES, vm_id=VM_IDS)
    def attach(self, bridge: str, vm_id: str) -> None:
        self.both(bridge, "attach", vm_id)

    @rule(bridge=BRIDGES, vm_id=VM_IDS, multi_queue=st.booleans())
    def attach_with_flags(self, bridge: str, vm_id: str, multi_queue: bool) -> None:
        self.both(bridge, "attach", vm_id, TapOptions(owner=1000, multi_queue=multi_queue))

    @rule(bridge=BRIDGES, vm_id=VM_IDS)
    def detach(self, bridge: str, vm_id: str) -> None:
        self.both(bridge, "detach", vm_id)

    @rule(bridge=BRIDGES, keep=st.lists(VM_IDS, max_size=2))
    def gc(self, bridge: str, keep: list[str]) -> None:
        self.both(bridge, "gc", keep)

    @rule(bridge=BRIDGES)
    def teardown_host(self, bridge: str) -> None:
        self.both(bridge, "teardown_host")

    @rule(bridge=BRIDGES)
    def bridge_goes_down(self, bridge: str) -> None:
        self.on_backends("set_link", bridge, up=False)

    @rule(vm_id=VM_IDS)
    def foreign_tap_takes_a_vms_name(self, vm_id: str) -> None:
        self.on_backends("create_tap", tap_name(vm_id), TapOptions())

    @rule(vm_id=VM_IDS)
    def someone_deletes_a_tap(self, vm_id: str) -> None:
        self.on_backends("delete_link", tap_name(vm_id))

    @rule(vm_id=VM_IDS, bridge=BRIDGES)
    def someone_moves_a_tap(self, vm_id: str, bridge: str) -> None:
        link = self.kernel.get_link(bridge)
        index = link.index if link is not None else 999_999
        fake_link = self.backends[0].get_link(bridge)
        fake_index = fake_link.index if fake_link is not None else 999_999
        results = [
            outcome(lambda b=b, i=i: b.set_link(tap_name(vm_id), master=i))
            for b, i in ((self.backends[0], fake_index), (self.backends[1], index))
        ]
        assert results[0] == results[1], f"move {vm_id} to {bridge}: {results}"

    @invariant()
    def same_state(self) -> None:
        for pair in self.managers.values():
            for manager in pair:
                assert manager.wait_detached()  # the reapers' deletions, at their own pace
        fake, kernel = (snapshot(b) for b in self.backends)
        assert fake == kernel
        for fake_manager, kernel_manager in self.managers.values():
            listed = [
                [(a.vm_id, a.network, a.tap_present, a.on_bridge) for a in m.list()]
                for m in (fake_manager, kernel_manager)
            ]
            assert listed[0] == listed[1]

    def teardown(self) -> None:
        for pair in self.managers.values():
            for manager in pair:
                manager.close()
        self.kernel.close()
        delete_netns(self.netns)
        self.tmp.cleanup()


FakeAgreesWithKernel.TestCase.settings = settings(
    max_examples=40,
    stateful_step_count=20,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_fake_agrees_with_kernel = FakeAgreesWithKernel.TestCase
