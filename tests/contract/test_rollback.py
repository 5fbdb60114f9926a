"""A failure at any step of ensure_host or attach leaves the state exactly as before.

On the fake, FakeBackend.fail_at(k) fails the k-th change; on the kernel, a thin wrapper
fails the k-th mutating call before it reaches the kernel. Each test walks k = 1, 2, ...
until the operation succeeds, so every step is made to fail once.
"""

from __future__ import annotations

import dataclasses
import errno
from collections.abc import Callable
from typing import Any

import pytest

from netvm import FakeBackend, HostError, NetworkConfig, NetworkManager
from netvm.backends.base import Backend
from netvm.errors import host_error
from netvm.firewall import Firewall, FirewallKind
from netvm.firewall.xtables import XtablesFirewall
from netvm.testing import snapshot

MUTATORS = frozenset(
    {
        "create_bridge",
        "create_tap",
        "set_link",
        "delete_link",
        "delete_links",
        "add_address",
        "delete_address",
        "set_ip_forward",
        "set_accept_ra",
        "set_bridge_options",
        "forget_connections",
        "create_chain",
        "delete_chain",
        "insert_rule",
        "delete_rule",
    }
)


class FailingFirewall:
    """An nftables firewall whose changes (one transaction each) count as mutating calls."""

    def __init__(self, inner: Firewall, kernel: FailingKernel) -> None:
        self.inner = inner
        self.kernel = kernel

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if name not in ("ensure", "remove"):
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            # A removal with nothing to remove sends nothing to the kernel (as on the fake).
            if name == "ensure" or self.inner.listing(*args):
                self.kernel.count(name)
            return attribute(*args, **kwargs)

        return call


class FailingKernel:
    """Delegates to a backend; the k-th mutating call raises EIO instead."""

    def __init__(self, inner: Backend) -> None:
        self.inner = inner
        self.remaining: int | None = None

    def fail_at(self, k: int | None) -> None:
        self.remaining = k

    def count(self, name: str) -> None:
        if self.remaining is not None:
            self.remaining -= 1
            if self.remaining == 0:
                self.remaining = None
                raise host_error(name, None, errno.EIO, "injected fault")

    def firewall(self, kind: FirewallKind) -> Any:
        if kind == "iptables":
            return XtablesFirewall(self)
        return FailingFirewall(self.inner.firewall(kind), self)

    def __getattr__(self, name: str) -> Any:
        attribute = getattr(self.inner, name)
        if name not in MUTATORS:
            return attribute

        def call(*args: Any, **kwargs: Any) -> Any:
            self.count(name)
            return attribute(*args, **kwargs)

        return call


def armed(backend: Backend) -> Any:
    return backend if isinstance(backend, FakeBackend) else FailingKernel(backend)


def walk_failures(
    target: Any, operation: Callable[[NetworkManager], object], manager: NetworkManager
) -> int:
    """Fail step k of `operation` for k = 1.. until it succeeds; return the number of steps."""
    for k in range(1, 50):
        before = snapshot(target)
        leases = manager.leases.all()
        target.fail_at(k)
        try:
            operation(manager)
        except HostError as exc:
            failure = str(exc)
            assert "injected fault" in failure
            assert snapshot(target) == before, f"step {k} left state behind"
            assert manager.leases.all() == leases, f"step {k} left a lease behind"
            continue
        target.fail_at(None)
        return k - 1
    pytest.fail("the operation never succeeded")


@pytest.mark.parametrize(
    ("kind", "firewall_steps"),
    [
        ("nftables", 1),  # one transaction
        ("iptables", 9),  # 2 chains, 5 rules in them, 2 jumps
    ],
)
def test_every_step_of_ensure_host_rolls_back(
    backend: Backend, config: NetworkConfig, kind: FirewallKind, firewall_steps: int
) -> None:
    target = armed(backend)
    with NetworkManager(dataclasses.replace(config, firewall=kind), target) as manager:
        steps = walk_failures(target, lambda m: m.ensure_host(), manager)
    # bridge, accept_ra, its MAC, up, address, ip_forward, then the firewall
    assert steps == 6 + firewall_steps


def test_every_step_of_attach_rolls_back(backend: Backend, config: NetworkConfig) -> None:
    target = armed(backend)
    with NetworkManager(config, target) as manager:
        manager.ensure_host()
        steps = walk_failures(target, lambda m: m.attach("vm-1"), manager)
        # The address's old connections (a rolled-back lease leaves its slot stale), TAP,
        # the guarantees' elements (one transaction; only the fake can fail it), enslave
        assert steps == (4 if isinstance(target, FakeBackend) else 3)
        assert [a.vm_id for a in manager.list()] == ["vm-1"]


def test_ensure_host_repairs_after_a_partial_state(backend: Backend, config: NetworkConfig) -> None:
    """A half set-up host (as after a crash) is completed, not duplicated."""
    with NetworkManager(config, backend) as manager:
        manager.ensure_host()
        complete = snapshot(backend)
        manager.backend.firewall("nftables").remove(config.bridge_name)
        manager.backend.set_ip_forward(False)
        manager.ensure_host()
        assert snapshot(backend) == complete


def test_fake_fail_at_fails_exactly_the_kth_change() -> None:
    fake = FakeBackend()
    fake.fail_at(2, errno.ENOMEM)
    fake.create_bridge("br0", 1500)
    with pytest.raises(HostError) as failed:
        fake.create_bridge("br1", 1500)
    assert failed.value.errno == errno.ENOMEM
    fake.create_bridge("br1", 1500)
    assert {link.name for link in fake.list_links()} == {"lo", "br0", "br1"}


def test_an_interrupt_right_after_switching_ip_forward_leaves_it_off(
    backend: Backend, config: NetworkConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    """KeyboardInterrupt as the switch returns: the rollback must switch it off again, not
    only forget that netvm switched it on (which would leave it on for ever)."""
    switch = backend.set_ip_forward

    def interrupted(enabled: bool) -> None:
        switch(enabled)
        if enabled:
            raise KeyboardInterrupt

    with NetworkManager(config, backend) as manager:
        monkeypatch.setattr(backend, "set_ip_forward", interrupted)
        with pytest.raises(KeyboardInterrupt):
            manager.ensure_host()
        monkeypatch.undo()
        assert backend.get_ip_forward() is False
        manager.ensure_host()
        assert backend.get_ip_forward() is True
        manager.teardown_host()
        assert backend.get_ip_forward() is False


def test_threads_of_one_manager_take_turns_at_the_host_lock(
    backend: Backend, config: NetworkConfig
) -> None:
    """ensure_host and teardown_host from several threads of one manager: each waits for the
    others (the lock file is per process; a StateFile is not thread-safe)."""
    import threading

    errors: list[BaseException] = []
    with NetworkManager(config, backend) as manager:

        def work() -> None:
            try:
                for _ in range(5):
                    manager.ensure_host()
                    manager.list()
            except BaseException as exc:
                errors.append(exc)

        threads = [threading.Thread(target=work) for _ in range(4)]
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join(60)
        assert errors == []
        manager.teardown_host()
