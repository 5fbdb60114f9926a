"""Ready-made configuration for the VMMs netvm serves: Firecracker, Cloud Hypervisor, QEMU.

Each function takes the `VmNetwork` that `NetworkManager.attach` returned and the `TapOptions`
the TAP was created with, and returns what that VMM needs to open the existing TAP:

- Firecracker: the body of `PUT /network-interfaces/{iface_id}` and the boot-args fragment.
  Firecracker opens the TAP with IFF_TAP | IFF_NO_PI | IFF_VNET_HDR and never multi-queue;
  under the jailer it runs as an unprivileged uid/gid, so the TAP needs that owner or group.
- Cloud Hypervisor: the `--net` argument for an existing TAP. Its `num_queues` counts RX and
  TX queues together (2 per queue pair) and must agree with the TAP's multi-queue flag: it
  refuses a multi-queue TAP with one pair and a single-queue TAP with several.
- QEMU: `-netdev tap,...` and `-device virtio-net-pci,...`. QEMU opens the TAP with
  IFF_MULTI_QUEUE exactly when `queues` > 1, which the kernel requires to match the TAP.
  `vhost=on` makes QEMU open /dev/vhost-net and abort where it cannot, so it is emitted only
  where that device is usable (or when asked for explicitly).

`tap_options_for` is the profile that picks matching TAP flags for a VMM.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Literal, get_args

from netvm.backends.base import TapOptions
from netvm.errors import ConfigError
from netvm.naming import VmNetwork

Vmm = Literal["firecracker", "cloud-hypervisor", "qemu"]
VMMS: tuple[Vmm, ...] = get_args(Vmm)

DEFAULT_QUEUE_PAIRS = 2
"""Queue pairs of a multi-queue TAP when none is given (one per vCPU is the usual choice)."""
MAX_QUEUE_PAIRS = 256
"""The kernel's limit of queues on one TUN/TAP device (MAX_TAP_QUEUES)."""
QUEUE_PAIRS_RULE = (
    f"1 for a single-queue TAP, 2 to {MAX_QUEUE_PAIRS} for a multi-queue TAP "
    "(the count must agree with the TAP's multi-queue flag)"
)


def tap_options_for(
    vmm: Vmm,
    owner: int | None = None,
    group: int | None = None,
    multi_queue: bool = False,
) -> TapOptions:
    """TAP flags that suit `vmm`: vnet_hdr on (all three use the virtio-net header), the
    owner/group the unprivileged VMM runs as, multi-queue only where the VMM supports it.

    Firecracker with `multi_queue` is a ConfigError: Firecracker cannot open such a TAP.
    """
    if vmm not in VMMS:
        raise ConfigError("vmm", vmm, "one of " + ", ".join(VMMS))
    if vmm == "firecracker" and multi_queue:
        raise ConfigError(
            "multi_queue",
            True,
            "Firecracker opens its TAP without IFF_MULTI_QUEUE and cannot use a multi-queue TAP",
        )
    return TapOptions(owner=owner, group=group, multi_queue=multi_queue, vnet_hdr=True)


def _check_tap(tap: TapOptions) -> None:
    if not isinstance(tap, TapOptions):
        raise ConfigError("tap", tap, "the TapOptions the TAP was attached with")


def queue_pairs_for(tap: TapOptions, queue_pairs: int | None = None) -> int:
    """Queue pairs for a TAP: 1 unless multi-queue (then `DEFAULT_QUEUE_PAIRS` if not given).

    A count that disagrees with the TAP's multi-queue flag is a ConfigError: the VMM would
    fail to open the TAP.
    """
    _check_tap(tap)
    if queue_pairs is None:
        return DEFAULT_QUEUE_PAIRS if tap.multi_queue else 1
    if isinstance(queue_pairs, bool) or not isinstance(queue_pairs, int):
        raise ConfigError("queue_pairs", queue_pairs, QUEUE_PAIRS_RULE)
    valid = 2 <= queue_pairs <= MAX_QUEUE_PAIRS if tap.multi_queue else queue_pairs == 1
    if not valid:
        raise ConfigError("queue_pairs", queue_pairs, QUEUE_PAIRS_RULE)
    return queue_pairs


# Firecracker ------------------------------------------------------------------------------


MAX_FIRECRACKER_ID = 64
"""The longest id Firecracker's API server takes (its checked_id)."""


def firecracker_network_interface(
    network: VmNetwork, tap: TapOptions, iface_id: str = "eth0"
) -> dict[str, str]:
    """The JSON body of Firecracker's `PUT /network-interfaces/{iface_id}`."""
    _check_tap(tap)
    if tap.multi_queue:
        raise ConfigError(
            "multi_queue",
            True,
            f"Firecracker cannot open the multi-queue TAP {network.tap_name}: "
            "detach it and attach again without multi-queue",
        )
    # Firecracker's API server takes only '_' and alphanumerics in an id (checked_id in
    # src/firecracker/src/api_server/parsed_request.rs): a '-' is a 400 InvalidID.
    if (
        not isinstance(iface_id, str)
        or not 0 < len(iface_id) <= MAX_FIRECRACKER_ID
        or not all(c.isascii() and (c.isalnum() or c == "_") for c in iface_id)
    ):
        rule = f"1 to {MAX_FIRECRACKER_ID} ASCII letters, digits and '_'"
        raise ConfigError("iface_id", iface_id, rule)
    return {
        "iface_id": iface_id,
        "host_dev_name": network.tap_name,
        "guest_mac": network.mac_string(),
    }


def firecracker_boot_args(
    network: VmNetwork,
    hostname: str | None = None,
    device: str = "eth0",
    dns: tuple[str, ...] = (),
) -> str:
    """The fragment to append to Firecracker's `boot-source` `boot_args`: the kernel's `ip=`."""
    return network.kernel_ip_arg(hostname=hostname, device=device, dns=dns)


# Cloud Hypervisor -------------------------------------------------------------------------


def _guest_mtu(mtu: int | None) -> int | None:
    """The MTU to give the guest's NIC: None for the default (1500, the guest's own)."""
    if mtu is None:
        return None
    from netvm.config import parse_mtu

    number = parse_mtu("mtu", mtu)
    return None if number == DEFAULT_GUEST_MTU else number


DEFAULT_GUEST_MTU = 1500
"""What a virtio-net guest uses unless the VMM offers it another (VIRTIO_NET_F_MTU)."""


def cloud_hypervisor_net(
    network: VmNetwork, tap: TapOptions, queue_pairs: int | None = None, mtu: int | None = None
) -> str:
    """The value of Cloud Hypervisor's `--net` for the existing TAP.

    `num_queues` is RX plus TX queues: twice the queue pairs. Cloud Hypervisor refuses more
    queue pairs than boot vCPUs (`--cpus boot=N`). `mtu` (the TAP's, `config.mtu`):
    offered to the guest when it is not 1500.
    """
    pairs = queue_pairs_for(tap, queue_pairs)
    value = f"tap={network.tap_name},mac={network.mac_string()},num_queues={2 * pairs}"
    guest_mtu = _guest_mtu(mtu)
    return value if guest_mtu is None else f"{value},mtu={guest_mtu}"


# QEMU -------------------------------------------------------------------------------------

NETDEV_ID_RULE = "an ASCII letter, then up to 127 ASCII letters, digits, '-', '.' or '_'"


def _check_netdev_id(netdev_id: str) -> str:
    """QEMU's rule for ids (id_wellformed: a letter, then letters, digits, '-', '.', '_').
    Anything else could end the `id=` field: a ',' would add options of the caller's choice."""
    if (
        not isinstance(netdev_id, str)
        or not 0 < len(netdev_id) <= 128
        or not netdev_id.isascii()
        or not netdev_id[0].isalpha()
        or not all(c.isalnum() or c in "-._" for c in netdev_id)
    ):
        raise ConfigError("netdev_id", netdev_id, NETDEV_ID_RULE)
    return netdev_id


VHOST_NET = Path("/dev/vhost-net")


def vhost_net_usable(
    device: Path | None = None, owner: int | None = None, group: int | None = None
) -> bool:
    """Whether QEMU's `vhost=on` can open `device` (default /dev/vhost-net) read-write.
    With neither `owner` nor `group` (or `owner` this process's user, or root): this
    process, by opening it. Else a VMM of the TAP's owner, or of its group when only a
    group is given, judged by the device's mode (supplementary groups are not known
    here: pass `vhost` explicitly then)."""
    device = VHOST_NET if device is None else device
    another_user = owner is not None and owner not in (os.geteuid(), 0)
    if another_user or (owner is None and group is not None):  # a VMM of that group, then
        try:
            found = os.stat(device)
        except OSError:
            return False
        mode = found.st_mode
        if owner is not None and found.st_uid == owner:
            return mode & 0o600 == 0o600
        if group is not None and found.st_gid == group:
            return mode & 0o060 == 0o060
        return mode & 0o006 == 0o006
    try:
        fd = os.open(device, os.O_RDWR | os.O_CLOEXEC)
    except OSError:
        return False
    os.close(fd)
    return True


def qemu_netdev(
    network: VmNetwork,
    tap: TapOptions,
    queue_pairs: int | None = None,
    netdev_id: str = "net0",
    vhost: bool | None = None,
) -> str:
    """The value of QEMU's `-netdev` for the existing TAP (no ifup/ifdown scripts).

    A multi-queue TAP gets `queues=N`. `vhost` chooses `vhost=on`: True always, False never,
    None (the default) for a multi-queue TAP when /dev/vhost-net is usable by the TAP's
    owner (this process's user without one). QEMU aborts at start with `vhost=on` when it
    cannot open /dev/vhost-net.
    """
    _check_netdev_id(netdev_id)
    if vhost is not None and not isinstance(vhost, bool):
        raise ConfigError(
            "vhost", vhost, "True, False or None (use it where /dev/vhost-net is usable)"
        )
    pairs = queue_pairs_for(tap, queue_pairs)
    if vhost is None:
        vhost = tap.multi_queue and vhost_net_usable(owner=tap.owner, group=tap.group)
    value = f"tap,id={netdev_id},ifname={network.tap_name},script=no,downscript=no"
    if vhost:
        value += ",vhost=on"
    if tap.multi_queue:
        value += f",queues={pairs}"
    return value


def qemu_device(
    network: VmNetwork,
    tap: TapOptions,
    queue_pairs: int | None = None,
    netdev_id: str = "net0",
    mtu: int | None = None,
) -> str:
    """The value of QEMU's `-device` for the guest NIC.

    A multi-queue TAP gets `mq=on,vectors=2N+2` (one MSI-X vector per queue, one for the
    control queue and one for configuration changes). `mtu` (the TAP's, `config.mtu`):
    offered to the guest as `host_mtu` when it is not 1500.
    """
    _check_netdev_id(netdev_id)
    pairs = queue_pairs_for(tap, queue_pairs)
    guest_mtu = _guest_mtu(mtu)
    value = f"virtio-net-pci,netdev={netdev_id},mac={network.mac_string()}"
    if tap.multi_queue:
        value += f",mq=on,vectors={2 * pairs + 2}"
    if guest_mtu is not None:
        value += f",host_mtu={guest_mtu}"
    return value


def qemu_args(
    network: VmNetwork,
    tap: TapOptions,
    queue_pairs: int | None = None,
    netdev_id: str = "net0",
    vhost: bool | None = None,
    mtu: int | None = None,
) -> list[str]:
    """QEMU's command-line arguments for the NIC: `-netdev ... -device ...` (`vhost` as for
    `qemu_netdev`, `mtu` as for `qemu_device`)."""
    return [
        "-netdev",
        qemu_netdev(network, tap, queue_pairs, netdev_id, vhost),
        "-device",
        qemu_device(network, tap, queue_pairs, netdev_id, mtu),
    ]
