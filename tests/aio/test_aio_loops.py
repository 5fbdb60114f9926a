"""AsyncNetworkManager outside pytest-asyncio: several loops, and the import boundary."""

from __future__ import annotations

import asyncio
import subprocess
import sys
import threading
from typing import Any

from netvm import NetworkManager
from netvm.aio import AsyncNetworkManager


def test_one_manager_serves_several_loops(manager: NetworkManager) -> None:
    """Made outside any loop, used by two loops in two threads at once, then by a third."""
    net = AsyncNetworkManager(manager)
    asyncio.run(net.ensure_host())
    results: dict[int, list[Any]] = {}

    def run_loop(number: int) -> None:
        async def attach_some() -> list[Any]:
            return await asyncio.gather(*(net.attach(f"loop{number}-{n}") for n in range(20)))

        results[number] = asyncio.run(attach_some())

    threads = [threading.Thread(target=run_loop, args=(n,)) for n in range(2)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    networks = results[0] + results[1]
    assert len({vm.guest_ip for vm in networks}) == 40

    async def finish() -> int:
        count = len(await net.list())
        await net.aclose()
        return count

    assert asyncio.run(finish()) == 40


def test_importing_netvm_imports_no_asyncio() -> None:
    code = "import sys, netvm; print('asyncio' in sys.modules, 'netvm.aio' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.split() == ["False", "False"]
