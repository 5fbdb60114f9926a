"""Everything netvm needs of python-iptables' internals, in one place, for the versions it
was checked against (SUPPORTED): any other version is refused with a clear error rather
than half-working.

- `load_iptc`: `import iptc` normally runs ldconfig, gcc and modprobe (about 17 processes,
  ~200 ms) to find its libraries; here they are found by soname, so no netvm call starts a
  process. This patches `iptc.util` before `iptc` imports it.
- errno of the last libiptc failure (`ip4tc._get_errno_loc`).
- inserting and deleting entries without `Rule.final_check`, which prints every option
  through libxtables while fd 1 is swapped for a pipe (output of other threads is lost).
- the raw bytes of a match or a target, which netvm decodes itself.
- `Rule.tables` limited to the tables the kernel has (reading a jump opened all five).
"""

from __future__ import annotations

import ctypes
import importlib.util
import os
import sys
import sysconfig
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any

from netvm.errors import NetvmError

SUPPORTED = ("1.2.",)
"""python-iptables versions (prefixes) whose internals this module was checked against."""
SUPPORTED_RULE = "python-iptables >=1.2,<1.3"


def check_version() -> str:
    """The installed python-iptables version; NetvmError if it is missing or unsupported."""
    import importlib.metadata  # ~20 ms: only when python-iptables is first loaded

    try:
        version = importlib.metadata.version("python-iptables")
    except importlib.metadata.PackageNotFoundError:
        raise NetvmError(
            f"python-iptables is not installed: pip install '{SUPPORTED_RULE}'"
        ) from None
    if not version.startswith(SUPPORTED):
        raise NetvmError(
            f"python-iptables {version} is not supported: netvm relies on internals checked "
            f"against {SUPPORTED_RULE} (pip install '{SUPPORTED_RULE}')"
        )
    return version


_SONAMES = {
    "ip4tc": ("libip4tc.so.2", "libip4tc.so.0"),
    "ip6tc": ("libip6tc.so.2", "libip6tc.so.0"),
    "iptc": ("libiptc.so.0",),
    "xtables": tuple(f"libxtables.so.{v}" for v in range(12, 9, -1)),
}
MISSING_IPTABLES = (
    "python-iptables needs the xtables libraries and extensions: "
    "install Debian's 'iptables' package (apt-get install iptables)"
)


def _xtables_dir() -> str:
    multiarch = sysconfig.get_config_var("MULTIARCH") or ""
    for candidate in (
        f"/usr/lib/{multiarch}/xtables",
        "/usr/lib64/xtables",
        "/usr/lib/xtables",
        "/usr/local/lib/xtables",
    ):
        if os.path.isdir(candidate):
            return candidate
    raise NetvmError(MISSING_IPTABLES)


def load_iptc() -> ModuleType:
    """Import python-iptables without the process spawns of its library search."""
    loaded = sys.modules.get("iptc")
    if loaded is not None:
        return loaded
    check_version()
    os.environ.setdefault("XTABLES_LIBDIR", _xtables_dir())
    spec = importlib.util.find_spec("iptc")
    if spec is None or spec.origin is None:
        raise NetvmError("python-iptables is not installed (pip install python-iptables)")
    util_spec = importlib.util.spec_from_file_location(
        "iptc.util", Path(spec.origin).with_name("util.py")
    )
    assert util_spec is not None
    assert util_spec.loader is not None
    util = importlib.util.module_from_spec(util_spec)
    # iptc.util tries `distutils.sysconfig` first and falls back to sysconfig; in a venv
    # with setuptools, distutils is setuptools' (~80 ms of imports): take the fallback.
    blocked = "distutils" not in sys.modules
    if blocked:
        sys.modules["distutils"] = None  # type: ignore[assignment]
    try:
        util_spec.loader.exec_module(util)
    finally:
        if blocked:
            del sys.modules["distutils"]
    patched: Any = util
    search_by_path: Callable[[str], Any] = patched._do_find_library

    def find_without_spawning(name: str) -> Any:
        if "/" in name:
            return search_by_path(name)
        stem = name.removeprefix("lib").split(".")[0]
        for soname in _SONAMES.get(stem, ()):
            try:
                return ctypes.CDLL(soname, mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
        for folder in sys.path:
            try:
                return ctypes.CDLL(os.path.join(folder, name), mode=ctypes.RTLD_GLOBAL)
            except OSError:
                continue
        return None

    patched._do_find_library = find_without_spawning
    patched.find_libc = lambda: ctypes.CDLL("libc.so.6", mode=ctypes.RTLD_GLOBAL)
    # The kernel loads ip_tables and iptable_* itself when a table is first asked for.
    patched.load_kernel = lambda *args, **kwargs: None
    sys.modules["iptc.util"] = util
    try:
        import iptc
    except Exception as exc:
        sys.modules.pop("iptc.util", None)
        raise NetvmError(f"{MISSING_IPTABLES} ({exc})") from exc
    module: ModuleType = iptc
    module.ip4tc.Rule.tables = property(_instantiated_tables)
    return module


def _instantiated_tables(rule: Any) -> list[Any]:
    """Rule.tables, the tables in which python-iptables looks for a chain named like a
    target (a jump), reading or writing any rule: only those the kernel has instantiated in
    the caller's namespace. Its own list opens all five, which instantiates raw, mangle and
    security where nothing used them, and teardown cannot take a table back; a chain cannot
    be in a table that does not exist anyway. (Its cache of which tables exist is also
    shared by every namespace, and is not consulted here.)"""
    iptc: Any = sys.modules["iptc"]
    try:
        with open("/proc/thread-self/net/ip_tables_names") as names:
            present = set(names.read().split())
    except OSError:
        present = set()
    return [iptc.Table(name) for name in iptc.Table.ALL if name in present]


def last_errno(iptc: ModuleType) -> int:
    """The errno libiptc set for its last failure in this thread."""
    code: int = iptc.ip4tc._get_errno_loc()[0]
    return code


def insert_entry(handle: Any, chain: str, rule: Any, position: int) -> None:
    """What Chain.insert_rule does, less its final_check (which re-reads every option
    through libxtables' printer, swapping fd 1): the options were parsed into the entry
    when they were set; the extensions' own checks still run."""
    for match in rule.matches:
        match._final_check()
    rule.target._final_check()
    handle.insert_entry(chain, rule.rule, position)


def delete_entry(iptc: ModuleType, handle: Any, chain: str, number: int) -> None:
    """Delete the entry `number` of `chain` (Chain.delete_rule would run final_check)."""
    if handle._iptc.iptc_delete_num_entry(chain.encode(), number, handle._handle) != 1:
        raise iptc.IPTCError(f"can't delete rule {number} of {chain}")


def match_bytes(match: Any) -> bytes:
    return bytes(match.match_buf)


def target_bytes(target: Any) -> bytes:
    return ctypes.string_at(ctypes.addressof(target.target), target.size)
