"""Random operation sequences run on the fake and on the kernel must end in the same state."""

from __future__ import annotations

import tempfile
from pathlib import Path

import pytest
from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule

from netvm import FakeBackend, KernelBackend, NetvmError, NetworkConfig, NetworkManager
from netvm.testing import create_netns, delete_netns, snapshot

pytestmark = pytest.mark.privileged

VM_IDS = st.sampled_from(["vm-a", "vm-b", "vm-c", "vm-d"])


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
        self.managers = [
            NetworkManager(self._config(name), backend)
            for name, backend in (("fake", FakeBackend()), ("kernel", self.kernel))
        ]

    def _config(self, name: str) -> NetworkConfig:
        return NetworkConfig(
            bridge_name="nvbr0",
            vm_subnet="192.0.2.0/29",
            host_egress_iface="up0",
            state_dir=Path(self.tmp.name) / name,
        )

    def both(self, action: str, *args: object) -> None:
        results = [outcome(lambda m=m: getattr(m, action)(*args)) for m in self.managers]
        assert results[0] == results[1], f"{action}{args}: fake {results[0]}, kernel {results[1]}"

    @rule()
    def ensure_host(self) -> None:
        self.both("ensure_host")

    @rule(vm_id=VM_IDS)
    def attach(self, vm_id: str) -> None:
        self.both("attach", vm_id)

    @rule(vm_id=VM_IDS)
    def detach(self, vm_id: str) -> None:
        self.both("detach", vm_id)

    @rule(keep=st.lists(VM_IDS, max_size=2))
    def gc(self, keep: list[str]) -> None:
        self.both("gc", keep)

    @rule()
    def teardown_host(self) -> None:
        self.both("teardown_host")

    @precondition(lambda self: self.kernel.get_link("nvbr0") is not None)
    @rule()
    def bridge_goes_down(self) -> None:
        for manager in self.managers:
            manager.backend.set_link("nvbr0", up=False)

    @invariant()
    def same_state(self) -> None:
        fake, kernel = (snapshot(m.backend) for m in self.managers)
        assert fake == kernel
        leases = [[(a.vm_id, a.network, a.on_bridge) for a in m.list()] for m in self.managers]
        assert leases[0] == leases[1]

    def teardown(self) -> None:  # type: ignore[override]
        for manager in self.managers:
            manager.close()
        self.kernel.close()
        delete_netns(self.netns)
        self.tmp.cleanup()


FakeAgreesWithKernel.TestCase.settings = settings(
    max_examples=30,
    stateful_step_count=12,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
test_fake_agrees_with_kernel = FakeAgreesWithKernel.TestCase
