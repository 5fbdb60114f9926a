"""Boot a real Linux guest under QEMU: Debian's packages, a tiny busybox initramfs, the runner.

The guest is configured only from what netvm hands out: QEMU's NIC arguments (from
`glue.qemu_args`, passed verbatim, with the MAC in them) and the kernel's `ip=` fragment
(`VmNetwork.kernel_ip_arg`). Debian's cloud kernel has no CONFIG_IP_PNP, so the guest's /init
applies `ip=` itself. It reports what it sees and what its probes gave as `NETVM-GUEST
key=value` lines on the serial console, then powers off; `GuestRun.reports` parses them.

Probes are asked for on the kernel command line (`guest_cmdline`): `netvm.ping=A,B` pings
more addresses than the gateway, `netvm.udp=ADDR:PORT` sends one UDP request there and waits
for the answer (busybox's `nslookup`: a UDP echo server's reply is an answer to it), which a
`UdpEchoServer` records with its sender.

Only QEMU runs as a process, started under `ip netns exec` and killed by its PID on timeout.
"""

from __future__ import annotations

import gzip
import os
import platform
import shutil
import stat
import struct
import subprocess
import time
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

GUEST_PACKAGES = ("qemu-system-x86", "linux-image-cloud-amd64", "busybox-static")
"""Debian packages the guest tier needs: the VMM, a guest kernel, a static busybox."""
QEMU = "qemu-system-x86_64"
NIC_MODULES = ("virtio_pci", "virtio_net")
"""Kernel modules the guest loads (with what they depend on) unless they are built in."""
REPORT = "NETVM-GUEST "
APT_OPTIONS = ("-o", "DPkg::Lock::Timeout=300")


class GuestSetupError(Exception):
    """The guest's tools are missing and cannot be installed, or QEMU cannot run here."""


# Finding and installing the tools ------------------------------------------------------


@dataclass(frozen=True)
class GuestKernel:
    """An installed Debian kernel: its image and its modules folder."""

    version: str
    image: Path
    modules: Path


@dataclass(frozen=True)
class GuestTools:
    qemu: Path
    kernel: GuestKernel
    busybox: Path


def find_kernel(boot: Path = Path("/boot"), lib: Path = Path("/lib/modules")) -> GuestKernel | None:
    """The newest kernel in `boot` that has its modules in `lib`, a cloud kernel first."""
    found = []
    for image in boot.glob("vmlinuz-*"):
        version = image.name.removeprefix("vmlinuz-")
        modules = lib / version
        if (modules / "modules.dep").is_file() and os.access(image, os.R_OK):
            found.append(GuestKernel(version, image, modules))
    # Version strings sort well enough for picking one: the newest of the preferred flavour.
    found.sort(key=lambda k: (k.version.endswith("-cloud-amd64"), k.version))
    return found[-1] if found else None


def is_static_elf(path: Path) -> bool:
    """An x86-64 ELF executable without a PT_INTERP header: runs without a loader or libc."""
    try:
        data = path.read_bytes()
    except OSError:
        return False
    if data[:5] != b"\x7fELF\x02" or data[5] != 1:  # ELF64, little-endian
        return False
    phoff = struct.unpack_from("<Q", data, 0x20)[0]
    phentsize, phnum = struct.unpack_from("<HH", data, 0x36)
    pt_interp = 3
    return all(
        struct.unpack_from("<I", data, phoff + i * phentsize)[0] != pt_interp for i in range(phnum)
    )


def find_static_busybox(
    candidates: Iterable[Path] = (Path("/bin/busybox"), Path("/usr/bin/busybox")),
) -> Path | None:
    return next((path for path in candidates if is_static_elf(path)), None)


def find_qemu() -> Path | None:
    found = shutil.which(QEMU)
    return Path(found) if found else None


def missing_packages() -> list[str]:
    """The Debian packages of `GUEST_PACKAGES` whose tool is not found here."""
    present = (find_qemu(), find_kernel(), find_static_busybox())
    return [package for package, tool in zip(GUEST_PACKAGES, present, strict=True) if not tool]


def install_packages(packages: Sequence[str], timeout: float = 900.0) -> None:
    """`apt-get update` and `apt-get install` them, without recommended packages.

    Waits up to 300 s for a dpkg lock another installer holds. A failure raises
    GuestSetupError with the end of apt's output.
    """
    if not shutil.which("apt-get"):
        raise GuestSetupError(f"cannot install {' '.join(packages)}: no apt-get here")
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    for command in (
        ["apt-get", *APT_OPTIONS, "update", "-qq"],
        ["apt-get", *APT_OPTIONS, "install", "-y", "-qq", "--no-install-recommends", *packages],
    ):
        try:
            done = subprocess.run(
                command, env=env, capture_output=True, text=True, timeout=timeout, check=False
            )
        except subprocess.TimeoutExpired:
            raise GuestSetupError(f"{' '.join(command)}: no end after {timeout:.0f} s") from None
        if done.returncode != 0:
            tail = (done.stderr or done.stdout).strip().splitlines()[-5:]
            raise GuestSetupError(
                f"{' '.join(command)} exited {done.returncode}: " + " / ".join(tail)
            )


def find_guest_tools() -> GuestTools:
    """QEMU, a kernel and a static busybox, or GuestSetupError naming the missing packages."""
    qemu, kernel, busybox = find_qemu(), find_kernel(), find_static_busybox()
    if qemu is None or kernel is None or busybox is None:
        raise GuestSetupError("missing Debian packages: " + " ".join(missing_packages()))
    return GuestTools(qemu, kernel, busybox)


def qemu_unusable(qemu: Path, accel: str = "tcg") -> str | None:
    """Why QEMU cannot run a machine with `accel` here, or None: for skipping a guest tier.

    Amd64 guests are booted, so a host of another architecture is refused first (Debian's
    amd64 kernel packages do not install there). QEMU itself is asked to start an empty
    machine with the accelerator and to quit from its monitor.
    """
    if platform.machine() != "x86_64":
        return f"the guest tier boots an amd64 kernel; this host is {platform.machine()}"
    try:
        done = subprocess.run(
            [
                *(str(qemu), "-accel", accel, "-machine", "none", "-nodefaults"),
                *("-no-user-config", "-display", "none", "-monitor", "stdio"),
            ],
            input="quit\n",
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"{qemu} cannot start: {exc}"
    if done.returncode != 0:
        return f"{qemu} -accel {accel} cannot start: {done.stderr.strip()}"
    return None


# The initramfs ------------------------------------------------------------------------


def module_paths(kernel: GuestKernel, names: Iterable[str] = NIC_MODULES) -> list[Path]:
    """The module files to load for `names`, dependencies first, built-in modules left out.

    A name that is neither built in nor in modules.dep raises GuestSetupError.
    """

    def name_of(relative: str) -> str:
        return Path(relative).name.split(".ko")[0].replace("-", "_")

    deps: dict[str, tuple[str, list[str]]] = {}
    for line in (kernel.modules / "modules.dep").read_text().splitlines():
        target, _, needs = line.partition(":")
        deps[name_of(target)] = (target, [name_of(n) for n in needs.split()])
    builtin_file = kernel.modules / "modules.builtin"
    builtin = (
        {name_of(line) for line in builtin_file.read_text().split()}
        if builtin_file.exists()
        else set()
    )
    order: list[Path] = []
    seen: set[str] = set()

    def visit(name: str) -> None:
        name = name.replace("-", "_")
        if name in seen or name in builtin:
            return
        seen.add(name)
        if name not in deps:
            raise GuestSetupError(f"kernel {kernel.version} has no module {name}")
        target, needs = deps[name]
        for need in needs:
            visit(need)
        order.append(kernel.modules / target)

    for name in names:
        visit(name)
    return order


class CpioWriter:
    """An archive in the kernel's initramfs format: cpio "newc", entries written in order."""

    def __init__(self) -> None:
        self._parts: list[bytes] = []
        self._ino = 0

    def _entry(
        self, name: str, mode: int, data: bytes = b"", rdev: tuple[int, int] = (0, 0)
    ) -> None:
        self._ino += 1
        encoded = name.encode() + b"\0"
        fields = (self._ino, mode, 0, 0, 1, 0, len(data), 0, 0, *rdev, len(encoded), 0)
        header = b"070701" + b"".join(b"%08x" % value for value in fields)
        self._parts += [header, encoded, _pad(len(header) + len(encoded)), data, _pad(len(data))]

    def directory(self, name: str) -> None:
        self._entry(name, stat.S_IFDIR | 0o755)

    def file(self, name: str, data: bytes, mode: int = 0o644) -> None:
        self._entry(name, stat.S_IFREG | mode, data)

    def char_device(self, name: str, major: int, minor: int, mode: int = 0o600) -> None:
        self._entry(name, stat.S_IFCHR | mode, rdev=(major, minor))

    def finish(self) -> bytes:
        self._entry("TRAILER!!!", 0)
        return b"".join(self._parts)


def _pad(length: int) -> bytes:
    return b"\0" * (-length % 4)


GUEST_INIT = r"""#!/bin/busybox sh
# netvm's test guest: apply ip= from the kernel command line, report, probe, power off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
say() { echo "NETVM-GUEST $*"; }
finish() { say "end=$1"; poweroff -f; }
say boot=ok
while read -r module; do
    insmod "$module" || say "insmod=fail:$module"
done < /etc/netvm-modules
ip_arg='' udp='' more_ping=''
for word in $(cat /proc/cmdline); do
    case "$word" in
        ip=*) ip_arg=${word#ip=} ;;
        netvm.udp=*) udp=${word#netvm.udp=} ;;
        netvm.ping=*) more_ping=${word#netvm.ping=} ;;
    esac
done
[ -n "$ip_arg" ] || finish no-ip-argument
say "ip_arg=$ip_arg"
# ip=<client>:<server>:<gateway>:<netmask>:<hostname>:<device>:<autoconf>:<dns0>:<dns1>
IFS=: read -r addr server gw mask host dev autoconf dns0 dns1 <<EOF
$ip_arg
EOF
dev=${dev:-eth0}
tries=0
while [ ! -e "/sys/class/net/$dev" ]; do
    tries=$((tries + 1))
    [ "$tries" -le 100 ] || finish "no-device-$dev"
    usleep 100000
done
say "mac=$(cat "/sys/class/net/$dev/address")"
say "queues=$(ls -d "/sys/class/net/$dev/queues/"rx-* | wc -l)"
say "mtu=$(cat "/sys/class/net/$dev/mtu")"
[ -z "$host" ] || hostname "$host"
ip link set lo up
ifconfig "$dev" "$addr" netmask "$mask" up || finish ifconfig-failed
[ -z "$gw" ] || route add default gw "$gw" || finish route-failed
say "address=$(ip -o -4 addr show dev "$dev" | awk '{print $4}')"
say "default_via=$(ip route | awk '$1 == "default" {print $3}')"
probe_ping() {
    if ping -c 1 -W 3 "$1" >/dev/null 2>&1; then say "ping:$1=ok"; else say "ping:$1=fail"; fi
}
probe_udp() {
    if timeout 8 nslookup -type=a guest.netvm.test "$1" >/dev/null 2>&1; then
        say "udp:$1=ok"
    else
        say "udp:$1=fail"
    fi
}
# The probes run at once, so that failing ones (negative controls) wait in parallel.
[ -z "$gw" ] || probe_ping "$gw" &
for target in $(echo "$more_ping" | tr , ' '); do
    probe_ping "$target" &
done
[ -z "$udp" ] || probe_udp "$udp" &
wait
finish ok
"""
"""The guest's /init (busybox sh). Each report is `NETVM-GUEST key=value`; `end=ok` last."""


def build_initramfs(
    dest: Path, busybox: Path, modules: Sequence[Path] = (), init: str = GUEST_INIT
) -> Path:
    """Write a gzip-compressed initramfs to `dest`: busybox, `init`, the modules to insmod in
    order (listed in /etc/netvm-modules), /dev/console for init's output and /dev/null."""
    archive = CpioWriter()
    for folder in ("bin", "dev", "etc", "lib", "lib/modules", "proc", "sys", "tmp"):
        archive.directory(folder)
    archive.char_device("dev/console", 5, 1)
    archive.char_device("dev/null", 1, 3, 0o666)
    archive.file("bin/busybox", busybox.read_bytes(), 0o755)
    listed = []
    for n, module in enumerate(modules):
        inside = f"lib/modules/{n:02d}-{module.name}"
        archive.file(inside, module.read_bytes())
        listed.append("/" + inside)
    archive.file("etc/netvm-modules", "".join(f"{p}\n" for p in listed).encode())
    archive.file("init", init.encode(), 0o755)
    dest.write_bytes(gzip.compress(archive.finish(), compresslevel=6, mtime=0))
    return dest


# Running a guest --------------------------------------------------------------------------


def guest_cmdline(
    ip_arg: str,
    *,
    ping: Sequence[object] = (),
    udp: tuple[object, int] | None = None,
    console: str = "ttyS0",
) -> str:
    """The kernel command line: serial console, panic ends the run, `ip_arg` verbatim, probes."""
    words = [f"console={console}", "panic=-1", "quiet", ip_arg]
    if ping:
        words.append("netvm.ping=" + ",".join(str(address) for address in ping))
    if udp is not None:
        words.append(f"netvm.udp={udp[0]}:{udp[1]}")
    return " ".join(words)


@dataclass(frozen=True)
class GuestRun:
    """One boot: the serial console's text, QEMU's exit, how long it took."""

    command: tuple[str, ...]
    console: str
    stderr: str
    returncode: int | None
    seconds: float
    timed_out: bool

    def reports(self) -> dict[str, str]:
        """The guest's `NETVM-GUEST key=value` lines (a key given twice keeps the last value)."""
        found: dict[str, str] = {}
        for line in self.console.splitlines():
            line = line.strip("\r")
            if line.startswith(REPORT):
                key, _, value = line.removeprefix(REPORT).partition("=")
                found[key] = value
        return found

    def describe(self) -> str:
        """For assertion messages: the exit and the console."""
        how = "timed out" if self.timed_out else f"exited {self.returncode}"
        return f"QEMU {how} after {self.seconds:.1f} s\n{self.stderr}\n--- console\n{self.console}"


def run_guest(
    tools: GuestTools,
    initramfs: Path,
    nic_args: Sequence[str],
    append: str,
    *,
    netns: str | None = None,
    cpus: int = 1,
    memory_mib: int = 256,
    accel: str = "tcg",
    timeout: float = 60.0,
) -> GuestRun:
    """Boot the guest with `nic_args` exactly as given and wait for it to power off.

    QEMU runs under `ip netns exec NETNS` (where the TAP is) when `netns` is given; after
    `timeout` seconds it is killed by its PID (`ip netns exec` execs QEMU, so the PID is
    QEMU's own).
    """
    command = [
        *(["ip", "netns", "exec", netns] if netns is not None else []),
        str(tools.qemu),
        "-accel",
        accel,
        "-machine",
        "pc",
        "-m",
        str(memory_mib),
        "-smp",
        str(cpus),
        "-nodefaults",
        "-no-user-config",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
        "-kernel",
        str(tools.kernel.image),
        "-initrd",
        str(initramfs),
        "-append",
        append,
        *nic_args,
    ]
    start = time.monotonic()
    proc = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    timed_out = False
    try:
        out, err = proc.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        timed_out = True
        proc.kill()
        out, err = proc.communicate()
    except BaseException:
        proc.kill()
        proc.wait()
        raise
    return GuestRun(
        command=tuple(command),
        console=out.decode(errors="replace"),
        stderr=err.decode(errors="replace"),
        returncode=None if timed_out else proc.returncode,
        seconds=time.monotonic() - start,
        timed_out=timed_out,
    )
