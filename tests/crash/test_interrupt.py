"""KeyboardInterrupt (as ^C raises it, or SystemExit from a SIGTERM handler) before and after
every step of an attach: the program catches it and goes on with the same manager. Its next
calls must neither hang (a lock or in-flight slot kept) nor leave anything behind, and other
processes must not wait for it."""

from __future__ import annotations

import multiprocessing
import os
import threading
from pathlib import Path
from typing import Any

import pytest

from netvm import NetworkConfig
from netvm.policy import GuestPolicy
from tests.crash.test_crash import (
    OWNED,
    SCENARIOS,
    _instrument,
    add_foreign,
    check_clean,
    check_recovered,
    crash_config,
    managed,
)

pytestmark = pytest.mark.privileged


class _Interrupts:
    """The k-th step on the main thread raises KeyboardInterrupt (the reaper's steps run on
    its own thread, where a signal never lands)."""

    def __init__(self, at: int) -> None:
        self.at, self.count = at, 0

    def tick(self) -> None:
        if threading.current_thread() is not threading.main_thread():
            return
        self.count += 1
        if self.count == self.at:
            raise KeyboardInterrupt(f"step {self.at}")


def _child(
    netns: str, config: NetworkConfig, name: str, at: int, before: dict[str, str], out: Any
) -> None:
    scenario = SCENARIOS[name]
    steps = _Interrupts(at)
    _instrument(steps)  # type: ignore[arg-type]
    interrupted, failure = False, ""
    try:
        with managed(netns, config) as manager:
            try:
                scenario.operation(manager)
            except KeyboardInterrupt:
                interrupted = True
            steps.at = -1
            live: dict[str, str | None] = {v: before.get(v) for v in scenario.live}
            manager.ensure_host()
            for vm_id in live:
                manager.attach(vm_id, OWNED, GuestPolicy())
            manager.gc(keep=list(live))
            where = f"{name} interrupted at step {at}"
            check_recovered(netns, manager, live, where)
            manager.teardown_host()
            check_clean(netns, manager, where)
    except BaseException as exc:  # the report, not a traceback in a forked child
        failure = f"{type(exc).__name__}: {exc}"
    out.put((interrupted, failure))
    out.close()
    out.join_thread()
    os._exit(0)


@pytest.mark.parametrize("name", ["attach", "attach-guarded"])
def test_an_interrupt_at_any_step_of_an_attach_is_mended_by_the_same_manager(
    netns: str, tmp_path: Path, name: str
) -> None:
    add_foreign(netns)
    config = crash_config(tmp_path / "state")
    context = multiprocessing.get_context("fork")
    scenario = SCENARIOS[name]
    for at in range(1, 200):
        with managed(netns, config) as manager:
            if scenario.host:
                manager.ensure_host()
            before = {v: str(manager.attach(v, OWNED).guest_ip) for v in scenario.before}
        out = context.Queue()
        child = context.Process(target=_child, args=(netns, config, name, at, before, out))
        child.start()
        child.join(30)
        if child.is_alive():
            child.kill()
            child.join()
            pytest.fail(f"{name} interrupted at step {at}: the next calls hung")
        interrupted, failure = out.get(timeout=5)
        assert not failure, failure
        if not interrupted:
            assert at > 10, "the interrupts landed inside the attach, not only around it"
            return
    pytest.fail(f"{name} never completed")
