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
