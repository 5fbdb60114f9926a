"""A foreign rule that jumps into netvm's chain: teardown reports it and removes the rest."""

from __future__ import annotations

import dataclasses

import pytest

from netvm import ConflictError, NetworkConfig, NetworkManager, Rule
from netvm.backends.base import FILTER, NAT, Backend
from netvm.firewall.xtables import forward_chain, nat_chain


def test_teardown_removes_everything_else_and_reports_the_foreign_jump(
    backend: Backend, config: NetworkConfig
) -> None:
    with NetworkManager(dataclasses.replace(config, firewall="iptables"), backend) as manager:
        manager.ensure_host()
        vm = manager.attach("vm-a")
        backend.create_chain(FILTER, "FOREIGN")
        backend.insert_rule(FILTER, "FOREIGN", Rule(forward_chain("nvbr0")))
        with pytest.raises(ConflictError, match="a rule netvm did not write jumps to it"):
            manager.teardown_host()
        assert backend.get_link("nvbr0") is None
        assert backend.get_link(vm.tap_name) is None
        assert backend.get_ip_forward() is False
        assert nat_chain("nvbr0") not in backend.list_chains(NAT)
        assert backend.list_rules(FILTER, forward_chain("nvbr0")) == []  # emptied, kept
        assert manager.leases.all() == []
        # Once the foreign rule is gone, teardown finishes the job.
        backend.delete_rule(FILTER, "FOREIGN", Rule(forward_chain("nvbr0")))
        backend.delete_chain(FILTER, "FOREIGN")
        manager.teardown_host()
        assert forward_chain("nvbr0") not in backend.list_chains(FILTER)
