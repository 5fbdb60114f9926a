"""What a test does when something it needs is missing: skip with the reason, except under
NETVM_REQUIRE_PRIVILEGED=1 (.ci/run, a root machine where it must be there), where it fails,
so that nothing CI should run hides behind a skip."""

from __future__ import annotations

import os
from typing import NoReturn

import pytest


def cannot_run(what: str, reason: str) -> NoReturn:
    if os.environ.get("NETVM_REQUIRE_PRIVILEGED") == "1":
        pytest.fail(f"{what} cannot run, and NETVM_REQUIRE_PRIVILEGED=1: {reason}")
    pytest.skip(reason)
