"""netvm's exceptions, one hierarchy.

    NetvmError
    ├── ConfigError        bad input: names the field, the value and what is allowed
    ├── SubnetExhausted    every guest address of the subnet (or bridge port) is leased
    ├── ConflictError      something that is not netvm's is in the way; it is left untouched
    ├── StateStoreError    state_dir cannot hold netvm's records (full, read-only, unusable)
    ├── UsedAfterFork      a backend or lease store made before fork() used in the child
    └── HostError          the kernel refused an operation (operation, device, errno)
        ├── PermissionDenied   EPERM/EACCES: CAP_NET_ADMIN is missing
        ├── DeviceExists       EEXIST/EBUSY: the name or entry is taken
        └── NotFound           ENODEV/ENOENT/EADDRNOTAVAIL: the device or entry is gone

Backends raise only these; `host_error` is the one place that picks the class for an errno.
"""

from __future__ import annotations

import errno as errno_codes
import ipaddress
import os


class NetvmError(Exception):
    """Base class of every error netvm raises on purpose."""


class ConfigError(NetvmError, ValueError):
    """A value given to netvm is invalid; nothing was changed."""

    def __init__(self, field: str, value: object, allowed: str) -> None:
        self.field = field
        self.value = value
        self.allowed = allowed
        super().__init__(f"invalid {field}: {value!r}: {allowed}")


class SubnetExhausted(NetvmError):
    """No guest address is free on this bridge."""

    def __init__(self, subnet: ipaddress.IPv4Network, capacity: int, reason: str) -> None:
        self.subnet = subnet
        self.capacity = capacity
        super().__init__(
            f"subnet {subnet} is exhausted: all {capacity} guest addresses are leased ({reason}); "
            "detach or gc VMs, or use a larger subnet or another bridge"
        )


class ConflictError(NetvmError):
    """A device, address or rule that netvm did not create stands where netvm needs to act."""


class StateStoreError(NetvmError):
    """netvm's records under state_dir (leases, locks, intents) cannot be read or written.

    Raised before the kernel is touched, or after what the call changed in it was undone.
    """

    def __init__(self, operation: str, path: str, detail: str) -> None:
        self.operation = operation
        self.path = path
        self.detail = detail
        super().__init__(f"{operation} {path} failed: {detail}")


class Closed(NetvmError, RuntimeError):
    """A NetworkManager, KernelBackend or AsyncNetworkManager used after close()."""

    def __init__(self, what: str) -> None:
        self.what = what
        super().__init__(f"{what} is closed: make a new one")


class UsedAfterFork(NetvmError):
    """A backend or lease store made before fork() is used in the child: its netlink
    sockets and lock file descriptors are the parent's (a reply could reach either
    process, and a lock held by one would be held by both). Make a new KernelBackend and
    NetworkManager in the child."""

    def __init__(self, what: str, parent: int) -> None:
        self.what = what
        self.parent = parent
        super().__init__(
            f"{what} was made by process {parent}, before a fork(): it cannot be used in "
            f"process {os.getpid()}; make a new KernelBackend and NetworkManager in the child"
        )


class HostError(NetvmError):
    """The kernel refused an operation."""

    def __init__(self, operation: str, device: str | None, errno: int, detail: str = "") -> None:
        self.operation = operation
        self.device = device
        self.errno = errno
        where = f" on {device}" if device else ""
        reason = ""
        if errno:
            name = errno_codes.errorcode.get(errno, str(errno))
            reason = f": {os.strerror(errno)} ({name})"
        extra = f": {detail}" if detail else ""
        super().__init__(f"{operation}{where} failed{reason}{extra}")


class PermissionDenied(HostError):
    """The process lacks CAP_NET_ADMIN (or access to /dev/net/tun)."""

    HINT = "needs CAP_NET_ADMIN: run as root or grant the capability"

    def __init__(
        self, operation: str, device: str | None, errno: int, detail: str = "", hint: str = HINT
    ) -> None:
        super().__init__(operation, device, errno, f"{detail}; {hint}" if detail else hint)


class DeviceExists(HostError):
    """The name, address or entry already exists."""


class NotFound(HostError):
    """The device, address, chain or rule does not exist."""


_BY_ERRNO: dict[int, type[HostError]] = {
    errno_codes.EPERM: PermissionDenied,
    errno_codes.EACCES: PermissionDenied,
    errno_codes.EEXIST: DeviceExists,
    errno_codes.EBUSY: DeviceExists,
    errno_codes.ENODEV: NotFound,
    errno_codes.ENOENT: NotFound,
    errno_codes.EADDRNOTAVAIL: NotFound,
}


def host_error(operation: str, device: str | None, errno: int, detail: str = "") -> HostError:
    """Return the HostError subclass that fits `errno`."""
    return _BY_ERRNO.get(errno, HostError)(operation, device, errno, detail)
