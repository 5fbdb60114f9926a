"""The JSON every bench writes (`--out DIR/<bench>.json`), read by the docs generator."""

from __future__ import annotations

import json
import os
import platform
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any


def target(name: str, value: float, limit: float, ok: bool, note: str = "") -> dict[str, Any]:
    return {"name": name, "value": round(value, 3), "limit": limit, "ok": ok, "note": note}


def write(
    out: Path,
    bench: str,
    command: str,
    figures: Mapping[str, float],
    targets: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Write DIR/<bench>.json: figures flat, the unit as the key's suffix (_ms, _us, _x)."""
    result = {
        "bench": bench,
        "command": command,
        "when": datetime.now(UTC).isoformat(timespec="seconds"),
        "machine": {
            "cpus": os.cpu_count() or 0,
            "kernel": platform.release(),
            "python": platform.python_version(),
        },
        "figures": dict(figures),
        "targets": list(targets),
    }
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{bench}.json"
    path.write_text(json.dumps(result, indent=1))
    return path
