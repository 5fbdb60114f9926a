"""The guest tier's helpers on their own: module order, kernel choice, ELF check, the cpio
archive (read back by busybox's own cpio, an implementation that is not netvm's), reports."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest

from netvm.testing.qemu import (
    CpioWriter,
    GuestKernel,
    GuestRun,
    GuestSetupError,
    GuestTools,
    find_kernel,
    guest_cmdline,
    is_static_elf,
    module_paths,
)


def fake_kernel(tmp_path: Path) -> GuestKernel:
    modules = tmp_path / "lib" / "6.1.0-9-cloud-amd64"
    modules.mkdir(parents=True)
    (modules / "modules.dep").write_text(
        "kernel/drivers/net/virtio_net.ko: kernel/drivers/net/net_failover.ko "
        "kernel/net/core/failover.ko kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/net/net_failover.ko: kernel/net/core/failover.ko\n"
        "kernel/net/core/failover.ko:\n"
        "kernel/drivers/virtio/virtio_pci.ko: kernel/drivers/virtio/virtio.ko\n"
        "kernel/drivers/virtio/virtio.ko: kernel/drivers/virtio/virtio_ring.ko\n"
        "kernel/drivers/virtio/virtio_ring.ko:\n"
        "kernel/drivers/char/hw_random/virtio-rng.ko: kernel/drivers/virtio/virtio.ko\n"
    )
    (modules / "modules.builtin").write_text("kernel/drivers/virtio/virtio_ring.ko\n")
    return GuestKernel("6.1.0-9-cloud-amd64", tmp_path / "vmlinuz", modules)


def test_modules_come_after_what_they_need_and_built_ins_are_left_out(tmp_path: Path) -> None:
    kernel = fake_kernel(tmp_path)
    names = [p.name for p in module_paths(kernel, ["virtio_pci", "virtio_net", "virtio-rng"])]
    assert names == [
        "virtio.ko",
        "virtio_pci.ko",
        "failover.ko",
        "net_failover.ko",
        "virtio_net.ko",
        "virtio-rng.ko",
    ]
    with pytest.raises(GuestSetupError, match="no module e1000"):
        module_paths(kernel, ["e1000"])


def test_find_kernel_prefers_a_cloud_kernel_with_modules(tmp_path: Path) -> None:
    boot, lib = tmp_path / "boot", tmp_path / "lib"
    boot.mkdir()
    for version in ("6.1.0-9-amd64", "6.1.0-8-cloud-amd64", "6.9.0-1-cloud-amd64"):
        (boot / f"vmlinuz-{version}").write_bytes(b"")
    for version in ("6.1.0-9-amd64", "6.1.0-8-cloud-amd64"):  # 6.9 has no modules
        (lib / version).mkdir(parents=True)
        (lib / version / "modules.dep").write_text("")
    found = find_kernel(boot, lib)
    assert found is not None
    assert found.version == "6.1.0-8-cloud-amd64"
    assert found.image == boot / "vmlinuz-6.1.0-8-cloud-amd64"
    assert find_kernel(tmp_path / "nothing", lib) is None


def test_static_elf_check(tmp_path: Path) -> None:
    assert not is_static_elf(Path("/bin/sh"))  # dynamically linked: has PT_INTERP
    script = tmp_path / "script"
    script.write_text("#!/bin/sh\n")
    assert not is_static_elf(script)
    assert not is_static_elf(tmp_path / "missing")


def test_busybox_cpio_reads_the_archive_back(guest_tools: GuestTools, tmp_path: Path) -> None:
    archive = CpioWriter()
    archive.directory("etc")
    archive.file("etc/odd", b"123")  # lengths that need padding
    archive.file("init", b"#!/bin/sh\necho hi\n", 0o755)
    archive.directory("lib")
    archive.file("lib/empty", b"")
    listed = subprocess.run(
        [str(guest_tools.busybox), "cpio", "-tv"],
        input=archive.finish(),
        capture_output=True,
        check=True,
        timeout=30,
    ).stdout.decode()
    rows = [line.split() for line in listed.splitlines()]
    assert [(row[0], row[-1]) for row in rows] == [
        ("drwxr-xr-x", "etc"),
        ("-rw-r--r--", "etc/odd"),
        ("-rwxr-xr-x", "init"),
        ("drwxr-xr-x", "lib"),
        ("-rw-r--r--", "lib/empty"),
    ]
    assert [row[2] for row in rows if row[0].startswith("-")] == ["3", "18", "0"]


def test_reports_are_the_guests_marker_lines_only() -> None:
    console = (
        "[    0.5] Linux version 6.1\r\n"
        "NETVM-GUEST boot=ok\r\n"
        "noise NETVM-GUEST fake=1\n"
        "NETVM-GUEST ping:192.0.2.1=ok\n"
        "NETVM-GUEST ip_arg=192.0.2.5::192.0.2.1:255.255.255.0::eth0:off\n"
        "NETVM-GUEST end=ok\n"
    )
    run = GuestRun((), console, "", 0, 1.0, False)
    assert run.reports() == {
        "boot": "ok",
        "ping:192.0.2.1": "ok",
        "ip_arg": "192.0.2.5::192.0.2.1:255.255.255.0::eth0:off",
        "end": "ok",
    }


def test_guest_cmdline_keeps_the_ip_fragment_verbatim() -> None:
    ip_arg = "ip=192.0.2.5::192.0.2.1:255.255.255.0:web1:eth0:off:192.0.2.53"
    assert guest_cmdline(ip_arg, ping=["203.0.113.1"], udp=("203.0.113.1", 7)).split() == [
        "console=ttyS0",
        "panic=-1",
        "quiet",
        ip_arg,
        "netvm.ping=203.0.113.1",
        "netvm.udp=203.0.113.1:7",
    ]
