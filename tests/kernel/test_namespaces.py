"""One state_dir shared by managers of several namespaces and processes (as with the CLI's
--netns and the default /run/netvm)."""

from __future__ import annotations

import multiprocessing
import os
import subprocess
from pathlib import Path

import pytest

from netvm import KernelBackend, NetworkConfig, NetworkManager, UsedAfterFork
from netvm.backends.base import TapOptions
from netvm.naming import tap_name
from netvm.testing import snapshot, throwaway_netns

pytestmark = pytest.mark.privileged


def test_the_same_bridge_in_two_namespaces_keeps_separate_leases(
    netns: str, config: NetworkConfig
) -> None:
    with throwaway_netns("netvm-test-") as other_netns:
        one, other = KernelBackend(netns), KernelBackend(other_netns)
        try:
            with NetworkManager(config, one) as a, NetworkManager(config, other) as b:
                a.ensure_host()
                b.ensure_host()
                a.attach("vm-a")
                b.attach("vm-b")
                assert b.gc() == ["vm-b"]
                assert [x.vm_id for x in a.list()] == ["vm-a"]
                assert one.get_link(tap_name("vm-a")) is not None
                a.teardown_host()
                b.teardown_host()
        finally:
            one.close()
            other.close()


def test_a_namespace_reached_by_name_or_by_path_is_one_namespace(netns: str) -> None:
    by_name = KernelBackend(netns)
    by_path = KernelBackend(f"/run/netns/{netns}")
    try:
        assert by_name.namespace_id() == by_path.namespace_id()
        assert by_name.namespace_id().startswith("net")
    finally:
        by_name.close()
        by_path.close()


def _ensure(netns: str, state_dir: str) -> str:
    backend = KernelBackend(netns)
    config = NetworkConfig(
        bridge_name="nvbr0", vm_subnet="192.0.2.0/24", host_egress_iface="up0", state_dir=state_dir
    )
    try:
        with NetworkManager(config, backend) as manager:
            manager.ensure_host()
        return "ok"
    except Exception as exc:
        return f"{type(exc).__name__}: {exc}"
    finally:
        backend.close()


def test_processes_running_ensure_host_at_once_all_succeed(netns: str, tmp_path: Path) -> None:
    context = multiprocessing.get_context("spawn")
    with context.Pool(4) as pool:
        results = pool.starmap(_ensure, [(netns, str(tmp_path))] * 4)
    assert results == ["ok"] * 4
    backend = KernelBackend(netns)
    try:
        state = snapshot(backend)
        assert _ensure(netns, str(tmp_path)) == "ok"
        assert snapshot(backend) == state
        assert backend.get_ip_forward() is True
    finally:
        backend.close()


def test_nftables_acts_in_its_namespace_from_any_thread(netns: str, config: NetworkConfig) -> None:
    """The libnftables context is made on the namespace's thread and then used from the
    caller's (this test's thread, in the root namespace): what it reads and writes is the
    namespace's. A table made there by nft is seen; netvm's table is seen there by nft."""

    def nft(*args: str) -> str:
        command = ["ip", "netns", "exec", netns, "nft", *args]
        return subprocess.run(command, capture_output=True, text=True, check=True).stdout

    backend = KernelBackend(netns)
    try:
        nft("add", "table", "inet", "probe")
        nft("add", "chain", "inet", "probe", "c")
        nft("add", "rule", "inet", "probe", "c", "counter")  # a table in use holds a rule
        with NetworkManager(config, backend) as manager:
            manager.ensure_host()
            assert "table inet netvm-nvbr0" in nft("list", "tables")
            firewall = backend.firewall("nftables")
            assert firewall.in_use(), "the probe table is seen from this thread"
            assert backend.firewall("nftables").listing("nvbr0") != []
            manager.teardown_host()
        assert nft("list", "tables").split() == ["table", "inet", "probe"]
    finally:
        backend.close()


def test_a_backend_used_in_a_forked_child_is_refused_and_the_parents_still_works(
    netns: str, config: NetworkConfig
) -> None:
    """The child's copy shares the parent's netlink socket (a reply could reach either
    process) and pooled TUN descriptors: refused with a netvm error, and closing it there
    changes nothing; a backend made in the child works."""
    backend = KernelBackend(netns)
    try:
        with NetworkManager(config, backend) as manager:
            manager.ensure_host()
            manager.attach("vm-parent")
            read_end, write_end = os.pipe()
            pid = os.fork()
            if pid == 0:
                answer = "error"
                try:
                    outcome = []
                    for call in (
                        lambda: backend.get_link(config.bridge_name),
                        lambda: backend.create_tap("nvfork0", TapOptions()),
                        lambda: NetworkManager(config, backend).attach("vm-child"),
                    ):
                        try:
                            call()
                            outcome.append("used")
                        except UsedAfterFork:
                            outcome.append("refused")
                    backend.close()
                    own = KernelBackend(netns)
                    outcome.append("own" if own.get_link(config.bridge_name) else "none")
                    own.close()
                    answer = " ".join(outcome)
                finally:
                    os.write(write_end, answer.encode())
                    os._exit(0)
            os.close(write_end)
            _, status = os.waitpid(pid, 0)
            with os.fdopen(read_end) as pipe:
                answer = pipe.read()
            assert os.waitstatus_to_exitcode(status) == 0
            assert answer == "refused refused refused own"
            assert [a.vm_id for a in manager.list()] == ["vm-parent"]
            assert backend.get_link("nvfork0") is None
            manager.teardown_host()
    finally:
        backend.close()
