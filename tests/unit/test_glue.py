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
        ({"hostname": 5}, "hostname"),
        ({"hostname": b"vm"}, "hostname"),
        ({"dns": "192.0.2.53"}, "dns"),
        ({"dns": None}, "dns"),
        ({"dns": (53,)}, "dns"),
        ({"device": 0}, "device"),
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
    monkeypatch.setattr(glue, "vhost_net_usable", lambda **owner: usable)
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


# The VMMs' own rules ------------------------------------------------------------------------
# Neither Firecracker nor Cloud Hypervisor is in a package registry, so their binaries cannot
# run here. These tests hold the glue to the rules their sources state, read at
# firecracker-microvm/firecracker 81b38b9dad60 (API 1.17.0-dev, 2026-08-21) and
# cloud-hypervisor/cloud-hypervisor ae44c2971c83 (2026-08-22). The rules are restated here
# from those sources, not copied; QEMU's arguments are checked by booting a guest
# (tests/guest).

# Firecracker: src/firecracker/swagger/firecracker.yaml, definitions/NetworkInterface:
# required host_dev_name and iface_id; properties guest_mac, host_dev_name, iface_id (strings),
# mtu (integer), rx_rate_limiter, tx_rate_limiter. The body is deserialized into
# NetworkInterfaceConfig (src/vmm/src/vmm_config/net.rs) with deny_unknown_fields.
FC_REQUIRED = {"host_dev_name", "iface_id"}
FC_PROPERTIES = {
    "guest_mac": str,
    "host_dev_name": str,
    "iface_id": str,
    "mtu": int,
    "rx_rate_limiter": dict,
    "tx_rate_limiter": dict,
}


def fc_mac_parses(text: str) -> bool:
    """MacAddr::from_str (src/vmm/src/utils/net/mac.rs): six ':'-separated parts of exactly
    two characters, each parsed as base-16."""
    parts = text.split(":")
    return len(parts) == 6 and all(
        len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts
    )


def fc_id_accepted(iface_id: str) -> bool:
    """checked_id (src/firecracker/src/api_server/parsed_request.rs): not empty, only '_' and
    alphanumerics; parse_put_net (request/net.rs) also wants the body's iface_id to be the
    path's."""
    return bool(iface_id) and all(c == "_" or c.isalnum() for c in iface_id)


@pytest.mark.parametrize("iface_id", ["eth0", "net_1", "N9"])
def test_firecracker_body_follows_the_api_schema(net: VmNetwork, iface_id: str) -> None:
    body = glue.firecracker_network_interface(net, glue.tap_options_for("firecracker"), iface_id)
    assert FC_REQUIRED <= body.keys() <= FC_PROPERTIES.keys()
    assert all(isinstance(value, FC_PROPERTIES[key]) for key, value in body.items())
    assert fc_mac_parses(body["guest_mac"])
    assert fc_id_accepted(body["iface_id"])
    assert body["iface_id"] == iface_id  # what the PUT path must carry too
    # Tap::open_named (src/vmm/src/devices/virtio/net/tap.rs) refuses a name of
    # IFNAMSIZ (16) bytes or more; it opens IFF_TAP | IFF_NO_PI | IFF_VNET_HDR.
    assert len(body["host_dev_name"].encode()) < 16
    assert glue.tap_options_for("firecracker").vnet_hdr is True


@pytest.mark.parametrize("iface_id", ["net-1", "a b", "", "eth/0"])
def test_firecracker_ids_its_api_server_refuses_are_refused_first(
    net: VmNetwork, iface_id: str
) -> None:
    assert not fc_id_accepted(iface_id)
    with pytest.raises(ConfigError) as caught:
        glue.firecracker_network_interface(net, TapOptions(), iface_id=iface_id)
    assert caught.value.field == "iface_id"


def test_firecracker_boot_args_have_the_network_guides_shape(net: VmNetwork) -> None:
    """docs/network-setup.md: `ip=G::T:GM::GI:off` (guest IP, TAP-side gateway, long mask,
    guest interface), appended to boot-source's boot_args (a string)."""
    fields = glue.firecracker_boot_args(net).removeprefix("ip=").split(":")
    assert fields == [
        str(net.guest_ip),
        "",
        str(net.gateway_ip),
        str(net.netmask),
        "",
        "eth0",
        "off",
    ]


# Cloud Hypervisor: NetConfig::parse (vmm/src/config.rs) registers these options with an
# OptionParser whose parse() fails on any other key (option_parser/src/lib.rs, UnknownOption)
# and on an option without '='. `mac` goes through MacAddr::parse_str (net_util/src/mac.rs: six
# ':'-separated pairs of ASCII hex digits); `num_queues` is a usize, and NetConfig::validate
# refuses fewer than 2 (VnetQueueLowerThan2) and more than 2 per boot vCPU (TooManyQueues).
# Tap::open_named (net_util/src/tap.rs) opens the TAP with IFF_MULTI_QUEUE exactly when
# num_queues / 2 > 1, and the kernel wants that flag to match the TAP's.
CH_NET_OPTIONS = {
    "tap", "ip", "mask", "mac", "host_mac", "offload_tso", "offload_ufo", "offload_csum", "mtu",
    "queue_size", "num_queues", "vhost_user", "socket", "vhost_mode", "fd", "bw_size",
    "bw_one_time_burst", "bw_refill_time", "ops_size", "ops_one_time_burst",
    "ops_refill_time", "id", "iommu", "pci_segment", "pci_device_id",
}  # fmt: skip


def ch_parse(value: str) -> dict[str, str]:
    """The option parser's rules for the values the glue can produce (no quotes, no brackets)."""
    options: dict[str, str] = {}
    for part in value.split(","):
        key, sep, val = part.partition("=")
        assert key in CH_NET_OPTIONS, f"UnknownOption({key})"
        assert sep, f"InvalidSyntax({part})"
        options[key] = val.strip()
    return options


@pytest.mark.parametrize(("multi_queue", "pairs"), [(False, None), (True, None), (True, 8)])
def test_cloud_hypervisor_net_passes_its_parser_and_validation(
    net: VmNetwork, multi_queue: bool, pairs: int | None
) -> None:
    tap = glue.tap_options_for("cloud-hypervisor", multi_queue=multi_queue)
    options = ch_parse(glue.cloud_hypervisor_net(net, tap, pairs))
    assert options["tap"] == net.tap_name
    assert len(options["tap"].encode()) < 16
    parts = options["mac"].split(":")
    assert len(parts) == 6
    assert all(len(p) == 2 and all(c in "0123456789abcdefABCDEF" for c in p) for p in parts)
    num_queues = int(options["num_queues"])
    assert num_queues >= 2
    assert num_queues % 2 == 0
    # The open flag Cloud Hypervisor will use agrees with the TAP netvm made.
    assert (num_queues // 2 > 1) is tap.multi_queue
    # --cpus boot= must be at least this for validate() to pass; say so to the user.
    assert num_queues // 2 == glue.queue_pairs_for(tap, pairs)


@pytest.mark.parametrize(
    "netdev_id", ["", "n,script=/tmp/x", "0net", "n et", "n\u00e9t", "x" * 129, 7]
)
def test_qemu_netdev_id_cannot_add_options(net: VmNetwork, netdev_id: object) -> None:
    for make in (glue.qemu_netdev, glue.qemu_device):
        with pytest.raises(ConfigError) as caught:
            make(net, TapOptions(), netdev_id=netdev_id)  # type: ignore[arg-type]
        assert caught.value.field == "netdev_id"
    assert "id=net-1.a_b," in glue.qemu_netdev(net, TapOptions(), netdev_id="net-1.a_b")


@pytest.mark.parametrize(
    "make", [glue.qemu_netdev, glue.cloud_hypervisor_net, glue.firecracker_network_interface]
)
def test_glue_refuses_what_is_not_tap_options(net: VmNetwork, make: object) -> None:
    with pytest.raises(ConfigError) as caught:
        make(net, {"multi_queue": True})  # type: ignore[operator]
    assert caught.value.field == "tap"


def test_qemu_vhost_must_be_a_bool_or_none(net: VmNetwork) -> None:
    with pytest.raises(ConfigError) as caught:
        glue.qemu_netdev(net, TapOptions(), vhost="off")  # type: ignore[arg-type]
    assert caught.value.field == "vhost"


def test_the_bridges_mtu_is_offered_to_the_guest_where_the_vmm_can_carry_it(
    net: VmNetwork,
) -> None:
    tap = glue.tap_options_for("qemu")
    assert glue.qemu_device(net, tap, mtu=9000).endswith(",host_mtu=9000")
    assert glue.qemu_args(net, tap, mtu=9000)[3].endswith(",host_mtu=9000")
    assert glue.qemu_device(net, tap, mtu=1500) == glue.qemu_device(net, tap)  # the default
    ch = glue.tap_options_for("cloud-hypervisor")
    assert glue.cloud_hypervisor_net(net, ch, mtu=1400).endswith(",num_queues=2,mtu=1400")
    assert glue.cloud_hypervisor_net(net, ch, mtu=1500) == glue.cloud_hypervisor_net(net, ch)
    for bad in (0, 67, 70000, "9000x", True, 9000.0):
        with pytest.raises(ConfigError, match="mtu"):
            glue.qemu_device(net, tap, mtu=bad)  # type: ignore[arg-type]


def test_vhost_by_default_asks_whether_the_taps_owner_can_open_vhost_net(
    net: VmNetwork, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """netvm may run as root for a QEMU that runs as the TAP's owner: that user's access
    decides, from the device's mode, not netvm's (QEMU would abort with vhost=on)."""
    device = tmp_path / "vhost-net"
    device.write_bytes(b"")
    device.chmod(0o660)  # rw-rw----: not for a uid that neither owns it nor is in its group
    stranger = os.stat(device).st_uid + 1000
    assert glue.vhost_net_usable(device, owner=stranger) is False
    group = os.stat(device).st_gid
    assert glue.vhost_net_usable(device, owner=stranger, group=group) is True
    device.chmod(0o666)
    assert glue.vhost_net_usable(device, owner=stranger) is True  # the control: anyone may
    monkeypatch.setattr(glue, "VHOST_NET", device)
    owned = glue.tap_options_for("qemu", owner=stranger, multi_queue=True)
    assert "vhost=on" in glue.qemu_netdev(net, owned)
    device.chmod(0o660)
    assert "vhost=on" not in glue.qemu_netdev(net, owned)


def test_vhost_for_a_tap_with_a_group_and_no_owner_is_judged_for_that_group(
    tmp_path: Path,
) -> None:
    device = tmp_path / "vhost-net"
    device.write_bytes(b"")
    device.chmod(0o600)  # its owner only: not a VMM of the TAP's group
    group = os.stat(device).st_gid
    assert glue.vhost_net_usable(device, group=group) is False
    device.chmod(0o660)
    assert glue.vhost_net_usable(device, group=group) is True  # the control
