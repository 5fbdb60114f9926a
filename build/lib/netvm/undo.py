"""Undo: the steps that reverse what an operation did so far, run newest first on failure."""

from __future__ import annotations

import logging
from collections.abc import Callable

from netvm.errors import NetvmError

log = logging.getLogger("netvm")


class Undo:
    def __init__(self) -> None:
        self._steps: list[tuple[str, Callable[[], object]]] = []

    def push(self, description: str, step: Callable[[], object]) -> None:
        self._steps.append((description, step))

    def run(self) -> None:
        for description, step in reversed(self._steps):
            try:
                step()
            except NetvmError as exc:
                log.error("rollback: could not %s: %s", description, exc)
        self._steps.clear()
