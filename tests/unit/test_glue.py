"""Hypervisor glue: the exact strings and dicts each VMM's documented syntax asks for.

Sources: Firecracker's API (PUT /network-interfaces/{iface_id}: iface_id, host_dev_name,
guest_mac) and network-setup guide; Cloud Hypervisor's docs/networking.md (`--net
tap=<name>,mac=<mac>,num_queues=<rx+tx queues>`, multi-queue only on a multi-queue TAP);
QEMU's `-netdev tap,id=,ifname=,script=,downscript=,vhost=,queues=` and virtio-net-pci
`netdev=,mac=,mq=,vectors=`; the kernel's nfsroot.rst for `ip=`.
"""

from __future__ import annotations

import ipaddress
import os
from pathlib import Path

import pytest

from netvm import ConfigError, TapOptions, VmNetwork, glue

SUBNET = ipaddress.IPv4Network("172.30.0.0/24")


@pytest.fixture
def net() -> VmNetwork:
    # Slot 40 is 172.30.0.42, the address the original's tests used.
    return VmNetwork.for_slot("vm-42", SUBNET, 40)


def test_kernel_ip_arg_default_is_the_originals(net: VmNetwork) -> None:
    assert str(net.guest_ip) == "172.30.0.42"
    assert net.kernel_ip_arg() == "ip=172.30.0.42::172.30.0.1:255.255.255.0::eth0:off"


def test_kernel_ip_arg_fills_hostname_device_and_dns_in_the_kernels_order(
    net: VmNetwork,
) -> None:
    assert (
        net.kernel_ip_arg(hostname="vm42", device="ens3", dns=("192.0.2.53", "192.0.2.54"))
        == "ip=172.30.0.42::172.30.0.1:255.255.255.0:vm42:ens3:off:192.0.2.53:192.0.2.54"
    )
    assert (
        net.kernel_ip_arg(dns=(ipaddress.IPv4Address("192.0.2.53"),))
        == "ip=172.30.0.42::172.30.0.1:255.255.255.0::eth0:off:192.0.2.53"
    )
    assert net.kernel_ip_arg(hostname="a.b-c") == (
        "ip=172.30.0.42::172.30.0.1:255.255.255.0:a.b-c:eth0:off"
    )


@pytest.mark.parametrize(
    ("kwargs", "field"),
    [
        ({"hostname": "has:colon"}, "hostname"),
        ({"hostname": ""}, "hostname"),
        ({"hostname": "x" * 65}, "hostname"),
        ({"device": "eth:0"}, "device"),
        ({"device": "x" * 16}, "device"),
        ({"dns": ("192.0.2.1", "192.0.2.2", "192.0.2.3")}, "dns"),
        ({"dns": ("2001:db8::1",)}, "dns"),
        ({"dns": ("not-an-ip",)}, "dns"),
    ],
)
def test_kernel_ip_arg_rejects_what_would_break_the_field_list(
    net: VmNetwork, kwargs: dict[str, object], field: str
) -> None:
    with pytest.raises(ConfigError) as caught:
        net.kernel_ip_arg(**kwargs)  # type: ignore[arg-type]
    assert caught.value.field == field


def test_firecracker_body_and_boot_args(net: VmNetwork) -> None:
    tap = glue.tap_options_for("firecracker", owner=123, group=456)
    assert tap == TapOptions(owner=123, group=456, multi_queue=False, vnet_hdr=True)
    assert glue.firecracker_network_interface(net, tap) == {
        "iface_id": "eth0",
        "host_dev_name": net.tap_name,
        "guest_mac": "02:6e:ac:1e:00:2a",
    }
    assert glue.firecracker_network_interface(net, tap, iface_id="net1")["iface_id"] == "net1"
    assert glue.firecracker_boot_args(net) == "ip=172.30.0.42::172.30.0.1:255.255.255.0::eth0:off"
    assert glue.firecracker_boot_args(net, hostname="fc", dns=("192.0.2.53",)) == (
        "ip=172.30.0.42::172.30.0.1:255.255.255.0:fc:eth0:off:192.0.2.53"
    )


def test_firecracker_refuses_multi_queue(net: VmNetwork) -> None:
    with pytest.raises(ConfigError, match="Firecracker"):
        glue.tap_options_for("firecracker", multi_queue=True)
    with pytest.raises(ConfigError, match="multi-queue TAP"):
        glue.firecracker_network_interface(net, TapOptions(multi_queue=True))


def test_firecracker_iface_id_must_be_a_path_segment(net: VmNetwork) -> None:
    with pytest.raises(ConfigError):
        glue.firecracker_network_interface(net, TapOptions(), iface_id="a/b")


def test_cloud_hypervisor_net_counts_rx_and_tx_queues(net: VmNetwork) -> None:
    single = glue.tap_options_for("cloud-hypervisor")
    assert glue.cloud_hypervisor_net(net, single) == (
        f"tap={net.tap_name},mac=02:6e:ac:1e:00:2a,num_queues=2"
    )
    multi = glue.tap_options_for("cloud-hypervisor", multi_queue=True)
    assert glue.cloud_hypervisor_net(net, multi) == (
        f"tap={net.tap_name},mac=02:6e:ac:1e:00:2a,num_queues=4"
    )
    assert glue.cloud_hypervisor_net(net, multi, queue_pairs=8).endswith(",num_queues=16")


def test_qemu_single_queue(net: VmNetwork) -> None:
    tap = glue.tap_options_for("qemu", owner=1000)
    assert glue.qemu_args(net, tap) == [
        "-netdev",
        f"tap,id=net0,ifname={net.tap_name},script=no,downscript=no",
        "-device",
        "virtio-net-pci,netdev=net0,mac=02:6e:ac:1e:00:2a",
    ]


def test_qemu_multi_queue_uses_queues_and_2n_plus_2_vectors(net: VmNetwork) -> None:
    tap = glue.tap_options_for("qemu", multi_queue=True)
    assert glue.qemu_args(net, tap, queue_pairs=4, netdev_id="n1", vhost=True) == [
        "-netdev",
        f"tap,id=n1,ifname={net.tap_name},script=no,downscript=no,vhost=on,queues=4",
        "-device",
        "virtio-net-pci,netdev=n1,mac=02:6e:ac:1e:00:2a,mq=on,vectors=10",
    ]
    assert glue.qemu_args(net, tap, queue_pairs=4, netdev_id="n1", vhost=False)[1] == (
        f"tap,id=n1,ifname={net.tap_name},script=no,downscript=no,queues=4"
    )
    assert glue.qemu_device(net, tap).endswith(",mq=on,vectors=6")


@pytest.mark.parametrize("usable", [True, False])
def test_qemu_vhost_by_default_only_on_a_multi_queue_tap_where_vhost_net_opens(
    net: VmNetwork, monkeypatch: pytest.MonkeyPatch, usable: bool
) -> None:
    """QEMU aborts at start with vhost=on where it cannot open /dev/vhost-net."""
    monkeypatch.setattr(glue, "vhost_net_usable", lambda: usable)
    multi = glue.tap_options_for("qemu", multi_queue=True)
    single = glue.tap_options_for("qemu")
    assert ("vhost=on" in glue.qemu_netdev(net, multi)) is usable
    assert "vhost=on" not in glue.qemu_netdev(net, single)
    # Explicit choices win over the probe either way, for either TAP.
    for tap in (multi, single):
        assert glue.qemu_netdev(net, tap, vhost=True).count(",vhost=on") == 1
        assert "vhost" not in glue.qemu_netdev(net, tap, vhost=False)


def test_vhost_net_usable_opens_the_device_read_write(tmp_path: Path) -> None:
    device = tmp_path / "vhost-net"
    assert glue.vhost_net_usable(device) is False  # missing
    device.write_bytes(b"")
    device.chmod(0o400)
    if os.geteuid() != 0:  # root opens a read-only file read-write all the same
        assert glue.vhost_net_usable(device) is False
    device.chmod(0o600)
    assert glue.vhost_net_usable(device) is True
    assert glue.vhost_net_usable(tmp_path) is False  # a directory cannot be opened O_RDWR


@pytest.mark.parametrize(
    ("multi_queue", "pairs"),
    [(False, 2), (True, 1), (True, 257), (False, 0)],
)
def test_queue_pairs_must_agree_with_the_taps_multi_queue_flag(
    net: VmNetwork, multi_queue: bool, pairs: int
) -> None:
    tap = TapOptions(multi_queue=multi_queue)
    with pytest.raises(ConfigError) as caught:
        glue.cloud_hypervisor_net(net, tap, queue_pairs=pairs)
    assert caught.value.field == "queue_pairs"
    with pytest.raises(ConfigError):
        glue.qemu_args(net, tap, queue_pairs=pairs)


def test_profiles_keep_owner_and_group_and_always_set_vnet_hdr() -> None:
    for vmm in glue.VMMS:
        assert glue.tap_options_for(vmm, owner=7, group=8) == TapOptions(7, 8, False, True)
    assert glue.tap_options_for("qemu", multi_queue=True).multi_queue is True
    with pytest.raises(ConfigError):
        glue.tap_options_for("crosvm")  # type: ignore[arg-type]
