"""Reading and writing netvm's own rules never swaps the process's stdout (fd 1) the way
python-iptables' option printer does; options netvm does not write still show up."""

from __future__ import annotations

import dataclasses
import ipaddress
import os

import pytest

from netvm import KernelBackend, NetworkConfig, NetworkManager, Rule
from netvm.backends.base import FILTER, NAT
from netvm.firewall.xtables import XtablesFirewall

pytestmark = pytest.mark.privileged


def test_ensure_host_and_teardown_never_touch_fd_1(
    netns: str, config: NetworkConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = KernelBackend(netns)
    backend.list_chains(FILTER)  # load python-iptables before dup2 is refused

    def refuse(*args: object) -> None:
        raise AssertionError("fd 1 was swapped")

    try:
        legacy = dataclasses.replace(config, firewall="iptables")
        with NetworkManager(legacy, backend) as manager, monkeypatch.context() as patch:
            patch.setattr(os, "dup2", refuse)
            manager.ensure_host()
            manager.ensure_host()
            manager.attach("vm-1")
            manager.teardown_host()
    finally:
        backend.close()


def test_netvms_rules_are_read_without_touching_fd_1(
    netns: str, config: NetworkConfig, monkeypatch: pytest.MonkeyPatch
) -> None:
    backend = KernelBackend(netns)
    try:
        legacy = dataclasses.replace(config, firewall="iptables")
        with NetworkManager(legacy, backend) as manager:
            manager.ensure_host()
            expected = XtablesFirewall(backend).expected(manager.firewall_policy)

            # A change, so that the reads below decode the tables anew.
            backend.insert_rule(FILTER, "INPUT", Rule("ACCEPT", comment="fresh"))

            def refuse(*args: object) -> None:
                raise AssertionError("fd 1 was swapped while rules were decoded")

            with monkeypatch.context() as patch:
                patch.setattr(os, "dup2", refuse)
                read = {key: backend.list_rules(*key) for key in expected}
                fresh = backend.list_rules(FILTER, "INPUT")
            assert read == expected
            assert fresh == [Rule("ACCEPT", comment="fresh")]
    finally:
        backend.close()


def test_options_netvm_does_not_write_are_kept_in_other(netns: str) -> None:
    backend = KernelBackend(netns)
    try:
        masquerade = Rule("MASQUERADE", source=ipaddress.IPv4Network("192.0.2.0/24"))
        backend.insert_rule(NAT, "POSTROUTING", masquerade)
        (plain,) = backend.list_rules(NAT, "POSTROUTING")
        assert plain == masquerade
        os.system(
            f"ip netns exec {netns} iptables-legacy -t nat -A POSTROUTING -s 192.0.2.0/24 "
            "-p udp -j MASQUERADE --to-ports 1000-2000"
        )
        os.system(
            f"ip netns exec {netns} iptables-legacy -A FORWARD -m conntrack ! --ctstate NEW "
            "-m comment --comment netvm:nvbr0 -j ACCEPT"
        )
        _, ported = backend.list_rules(NAT, "POSTROUTING")
        assert ported.target == "MASQUERADE"
        assert "--to-ports 1000-2000" in ported.other
        (inverted,) = backend.list_rules(FILTER, "FORWARD")
        assert inverted.ctstate == ()
        assert "conntrack" in inverted.other
        assert inverted.comment == "netvm:nvbr0"
    finally:
        backend.close()
