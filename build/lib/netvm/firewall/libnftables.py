"""libnftables through its official Python binding, run on a namespace's thread.

The binding (Debian's `python3-nftables`, a small ctypes module over libnftables.so.1) is
imported as `nftables` when the environment has it, else from Debian's system path, since
a virtual environment does not see the system's site-packages. libnftables reports a
failure as text; the errno of the netlink error it got is read right after the call, so
that netvm's errors are picked by code (ENOENT, EPERM...), not by message.
"""

from __future__ import annotations

import ctypes
import errno
import functools
import importlib.util
import sys
import threading
from collections.abc import Callable
from pathlib import Path
from types import ModuleType
from typing import Any, TypeVar

from netvm.errors import NetvmError, host_error
from netvm.firewall.generation import GenerationReader

T = TypeVar("T")
Json = dict[str, Any]
SYSTEM_BINDING = Path("/usr/lib/python3/dist-packages/nftables/__init__.py")
MISSING_NFTABLES = (
    "the nftables firewall needs libnftables and its Python binding: "
    "apt-get install python3-nftables (it brings libnftables1)"
)
_libc = ctypes.CDLL(None, use_errno=True)
_errno_location = _libc.__errno_location
_errno_location.restype = ctypes.POINTER(ctypes.c_int)


def load_binding() -> ModuleType:
    """The `nftables` module (NetvmError naming the package to install when missing)."""
    loaded = sys.modules.get("nftables")
    if loaded is not None:
        return loaded
    try:
        import nftables
    except ImportError:
        pass
    else:
        module: ModuleType = nftables
        return module
    if not SYSTEM_BINDING.exists():
        raise NetvmError(MISSING_NFTABLES)
    spec = importlib.util.spec_from_file_location(
        "nftables", SYSTEM_BINDING, submodule_search_locations=[str(SYSTEM_BINDING.parent)]
    )
    assert spec is not None
    assert spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    sys.modules["nftables"] = module
    try:
        spec.loader.exec_module(module)
    except Exception as exc:
        sys.modules.pop("nftables", None)
        raise NetvmError(f"{MISSING_NFTABLES} ({exc})") from exc
    return module


@functools.cache
def binding_unavailable() -> str | None:
    """Why libnftables cannot be used here, or None (asked once per process)."""
    try:
        load_binding().Nftables()
    except (NetvmError, OSError) as exc:
        return str(exc) if isinstance(exc, NetvmError) else f"{MISSING_NFTABLES} ({exc})"
    return None


class KernelNftRunner:
    """A libnftables context made on the namespace's thread, used from any thread.

    libnftables opens its netlink socket when the context is made, and a socket acts in
    the namespace it was opened in: after the one hop that makes the context, commands run
    in the calling thread (tests/kernel/test_namespaces.py checks it). A context is not
    thread-safe: one lock serialises its use.
    """

    def __init__(self, call: Callable[[Callable[[], Any]], Any]) -> None:
        self._call = call
        self._context: Any = None
        self._generations: GenerationReader | None = None
        self._lock = threading.Lock()

    def generation(self) -> int | None:
        """The ruleset's generation, read on a socket opened in the namespace."""
        if self._generations is None:
            try:
                self._generations = self._call(GenerationReader)
            except OSError:
                return None
        try:
            return self._generations.generation()
        except OSError:
            return None

    def _make_context(self) -> Any:
        try:
            return load_binding().Nftables()
        except OSError as exc:
            raise NetvmError(f"{MISSING_NFTABLES} ({exc})") from None

    def run(self, commands: list[Json], operation: str, where: str | None) -> list[Json]:
        with self._lock:
            if self._context is None:
                self._context = self._call(self._make_context)
            _errno_location()[0] = 0
            rc, output, error = self._context.json_cmd({"nftables": commands})
            code = _errno_location()[0]
        if rc != 0:
            detail = " ".join(str(error).split())
            raise host_error(operation, where, code or errno.EIO, detail)
        if not output:
            return []
        return [item for item in output.get("nftables", []) if "metainfo" not in item]

    def close(self) -> None:
        with self._lock:
            self._context = None
            if self._generations is not None:
                self._generations.close()
                self._generations = None
