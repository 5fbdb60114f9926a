"""Without CAP_NET_ADMIN, netvm says so, with the hint, and changes nothing."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from netvm import KernelBackend
from netvm.testing import snapshot

pytestmark = pytest.mark.privileged

WITHOUT_NET_ADMIN = ["setpriv", "--bounding-set", "-net_admin", "--inh-caps", "-net_admin"]
ATTEMPT = textwrap.dedent(
    """
    import sys
    from netvm import KernelBackend, NetworkConfig, NetworkManager, PermissionDenied
    config = NetworkConfig(bridge_name="nvbr0", vm_subnet="192.0.2.0/24",
                           host_egress_iface="up0", state_dir=sys.argv[2])
    backend = KernelBackend(sys.argv[1])
    with NetworkManager(config, backend) as manager:
        try:
            manager.ensure_host()
        except PermissionDenied as exc:
            print(type(exc).__name__, exc.errno, exc)
    backend.close()
    """
)


def test_missing_cap_net_admin_is_permission_denied(netns: str, tmp_path: Path) -> None:
    backend = KernelBackend(netns)
    before = snapshot(backend)
    result = subprocess.run(
        [*WITHOUT_NET_ADMIN, sys.executable, "-c", ATTEMPT, netns, str(tmp_path)],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("PermissionDenied 1 create bridge on nvbr0 failed")
    assert "needs CAP_NET_ADMIN: run as root or grant the capability" in result.stdout
    assert snapshot(backend) == before
    backend.close()


ENTER = textwrap.dedent(
    """
    import sys
    from netvm import KernelBackend, PermissionDenied
    try:
        KernelBackend(sys.argv[1]).get_link("lo")
    except PermissionDenied as exc:
        print(type(exc).__name__, exc.errno, exc)
    """
)


def test_entering_a_namespace_without_cap_sys_admin_names_that_capability(netns: str) -> None:
    """setns(CLONE_NEWNET) checks CAP_SYS_ADMIN: a hint naming CAP_NET_ADMIN alone would
    send the user to grant one that does not help."""
    without = ["setpriv", "--bounding-set", "-sys_admin", "--inh-caps", "-sys_admin"]
    result = subprocess.run(
        [*without, sys.executable, "-c", ENTER, netns],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("PermissionDenied 1 enter network namespace"), result.stdout
    assert "needs CAP_SYS_ADMIN" in result.stdout


LEGACY = textwrap.dedent(
    """
    from netvm import KernelBackend, PermissionDenied
    try:
        KernelBackend().legacy_tables()
    except PermissionDenied as exc:
        print(type(exc).__name__, exc.errno, exc)
    """
)


def test_the_firewall_choice_without_root_is_permission_denied() -> None:
    """`auto` reads which legacy tables exist (/proc/net/ip_tables_names, root's only): a
    refusal there is netvm's PermissionDenied with its hint, not a bare OSError. In a
    namespace of its own (unshare -n), as nobody."""
    nobody = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]
    usable = subprocess.run([*nobody, sys.executable, "-c", "import netvm"], capture_output=True)
    if usable.returncode:
        pytest.skip("this checkout's interpreter or netvm cannot be read by nobody")
    result = subprocess.run(
        ["unshare", "-n", *nobody, sys.executable, "-c", LEGACY],
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("PermissionDenied 13 read the legacy xtables tables")
    assert "needs CAP_NET_ADMIN" in result.stdout
