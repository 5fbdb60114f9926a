"""Render the benches' JSON into the docs, so that every figure there comes from one run.

Every bench writes `DIR/<bench>.json` in one schema (write_result below):

    {"bench": str, "command": str, "when": iso8601,
     "machine": {"cpus": int, "kernel": str, "python": str},
     "figures": {key: number, ...}, "targets": [{"name", "value", "limit", "ok", "note"}]}

A figure key is `[[TABLE/]GROUP.]NAME[_UNIT]`: the unit suffix (_ms, _us, _s, _mib, _kib,
_x) goes into the column header; keys with a GROUP (text before the last ".") make one row
per group and one column per NAME, in the order the bench wrote them, in one table per TABLE
(text before the first "/", named in its corner); keys without a GROUP make a "figure |
value" table. So a new bench plugs in without code here.

The docs hold generated blocks between markers, rewritten by `--update-docs`:

    <!-- bench:NAME -->            the run's line, its figures and its targets
    <!-- bench:NAME:figures -->    the figures only (likewise :targets, :chart, :run)
    <!-- bench:summary -->         every bench's targets, met or missed, in one table
    ...generated text...
    <!-- /bench -->

`--update-docs` first copies the JSON (and a `<bench>.png` chart, if any) from --results into
bench/results/, the copy committed with the docs; the docs are rendered from that copy, and
tests/unit/test_bench_report.py checks (`--check`) that the committed docs equal what it
renders. Without a flag the blocks are printed, and nothing is written.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import re
import shutil
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
COMMITTED = Path("bench/results")
"""Under the checkout: the JSON (and charts) the committed docs were rendered from."""
DOCS = ("README.md", "docs/*.md")
UNITS = {"_ms": "ms", "_us": "µs", "_s": "s", "_mib": "MiB", "_kib": "KiB", "_x": "x"}
BLOCK = re.compile(r"(<!-- bench:([a-z0-9_-]+)(?::([a-z]+))? -->\n)(.*?)(<!-- /bench -->)", re.S)
PARTS = ("run", "chart", "figures", "targets")

Result = dict[str, Any]


# Writing (used by every bench) ----------------------------------------------------------------


def machine() -> dict[str, Any]:
    return {
        "cpus": os.cpu_count() or 0,
        "kernel": platform.release(),
        "python": platform.python_version(),
    }


def target(name: str, value: float, limit: float, ok: bool, note: str = "") -> dict[str, Any]:
    return {"name": name, "value": round(value, 4), "limit": limit, "ok": ok, "note": note}


def write_result(
    out: Path,
    bench: str,
    command: str,
    figures: Mapping[str, float | int],
    targets: Sequence[Mapping[str, Any]] = (),
) -> Path:
    """Write `out/<bench>.json` in the schema above; return its path."""
    result = {
        "bench": bench,
        "command": command,
        "when": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "machine": machine(),
        "figures": dict(figures),
        "targets": [dict(t) for t in targets],
    }
    check(result)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{bench}.json"
    path.write_text(json.dumps(result, indent=1) + "\n")
    return path


def check(result: Mapping[str, Any]) -> None:
    """ValueError unless `result` follows the schema."""
    for key, kind in (("bench", str), ("command", str), ("when", str), ("machine", dict)):
        if not isinstance(result.get(key), kind):
            raise ValueError(f"bench result: {key!r} must be a {kind.__name__}")
    figures = result.get("figures")
    if not isinstance(figures, dict) or not all(
        isinstance(v, int | float) and not isinstance(v, bool) for v in figures.values()
    ):
        raise ValueError(f"{result['bench']}: 'figures' must map keys to numbers")
    targets = result.get("targets")
    if not isinstance(targets, list):
        raise ValueError(f"{result['bench']}: 'targets' must be a list")
    for t in targets:
        if not isinstance(t, dict) or set(t) != {"name", "value", "limit", "ok", "note"}:
            raise ValueError(f"{result['bench']}: a target needs name, value, limit, ok, note")


def load(folder: Path) -> dict[str, Result]:
    """The schema's results in `folder`, by bench name (other JSON files are skipped)."""
    found: dict[str, Result] = {}
    for path in sorted(folder.glob("*.json")):
        try:
            data = json.loads(path.read_text())
        except (OSError, ValueError):
            continue
        if isinstance(data, dict) and "bench" in data and "figures" in data:
            check(data)
            if path.stem != data["bench"]:
                raise ValueError(f"{path}: holds bench {data['bench']!r}, name it accordingly")
            found[data["bench"]] = data
    return found


# Rendering ----------------------------------------------------------------------------------


def fmt(value: float | int | None, unit: str = "") -> str:
    if value is None:
        return "—"
    if isinstance(value, int) or (float(value).is_integer() and abs(value) >= 1000):
        return str(int(value))
    if unit == "x":
        return f"{value:.2f}"
    magnitude = abs(value)
    if magnitude < 10:
        return f"{value:.3f}"
    return f"{value:.1f}" if magnitude < 1000 else f"{value:.0f}"


def split_unit(name: str) -> tuple[str, str]:
    for suffix, unit in UNITS.items():
        if name.endswith(suffix):
            return name[: -len(suffix)], unit
    return name, ""


def header(name: str) -> str:
    label, unit = split_unit(name)
    label = label.replace("_", " ")
    return f"{label} ({unit})" if unit else label


def table(head: Sequence[str], rows: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    lines += ["| " + " | ".join(cell.replace("|", "\\|") for cell in row) + " |" for row in rows]
    return lines


def render_figures(result: Result) -> list[str]:
    figures: dict[str, float | int] = result["figures"]
    plain = [(k, v) for k, v in figures.items() if "." not in k]
    # table -> group -> name -> value, and table -> its columns, in the bench's order
    tables: dict[str, dict[str, dict[str, float | int]]] = {}
    columns: dict[str, dict[str, None]] = {}
    for key, value in figures.items():
        if "." in key:
            group, name = key.rsplit(".", 1)
            name_of_table, _, row = group.rpartition("/") if "/" in group else ("", "", group)
            tables.setdefault(name_of_table, {}).setdefault(row, {})[name] = value
            columns.setdefault(name_of_table, {}).setdefault(name)
    lines: list[str] = []
    for name_of_table, groups in tables.items():
        if lines:
            lines.append("")
        shown = columns[name_of_table]
        rows = [
            [group, *(fmt(values.get(c), split_unit(c)[1]) for c in shown)]
            for group, values in groups.items()
        ]
        lines += table([name_of_table, *(header(c) for c in shown)], rows)
    if plain:
        if lines:
            lines.append("")
        rows = [[header(k), fmt(v, split_unit(k)[1])] for k, v in plain]
        lines += table(["figure", "value"], rows)
    return lines


def render_targets(result: Result, with_bench: bool = False) -> list[str]:
    rows = []
    for t in result["targets"]:
        row = [
            t["name"],
            fmt(t["value"]),
            fmt(t["limit"]),
            "met" if t["ok"] else "**missed**",
            t["note"],
        ]
        rows.append([result["bench"], *row] if with_bench else row)
    if not rows:
        return []
    head = ["target", "value", "limit", "result", "note"]
    return table(["bench", *head] if with_bench else head, rows)


def render_run(result: Result) -> list[str]:
    m = result["machine"]
    return [
        f"`{result['command']}`, {result['when'][:10]}; {m['cpus']} vCPU, Linux {m['kernel']}, "
        f"Python {m['python']}."
    ]


def render_chart(result: Result, doc: Path, root: Path) -> list[str]:
    chart = root / COMMITTED / f"{result['bench']}.png"
    if not chart.exists():
        return []
    return [f"![{result['bench']}]({os.path.relpath(chart, doc.parent)})"]


def render(
    results: Mapping[str, Result], bench: str, part: str | None, doc: Path, root: Path
) -> str:
    """The text of one block (without its markers)."""
    if bench == "summary":
        lines = [row for r in results.values() for row in render_targets(r, True)[2:]]
        head = render_targets({"bench": "", "targets": [target("", 0, 0, True)]}, True)[:2]
        return "\n".join([*head, *lines]) + "\n" if lines else "no targets\n"
    if bench not in results:
        raise KeyError(bench)
    result = results[bench]
    sections = {
        "run": render_run(result),
        "chart": render_chart(result, doc, root),
        "figures": render_figures(result),
        "targets": render_targets(result),
    }
    chosen = PARTS if part is None else (part,)
    if part is not None and part not in sections:
        raise ValueError(f"unknown block part {part!r} (one of {', '.join(PARTS)})")
    blocks = ["\n".join(sections[p]) for p in chosen if sections[p]]
    return "\n\n".join(blocks) + "\n"


def rewrite(
    text: str, results: Mapping[str, Result], doc: Path, root: Path
) -> tuple[str, list[str]]:
    """`text` with every block rendered anew; and the blocks whose bench has no result."""
    missing: list[str] = []

    def block(match: re.Match[str]) -> str:
        opening, bench, part, _old, closing = match.groups()
        try:
            body = render(results, bench, part, doc, root)
        except KeyError:
            missing.append(bench)
            return match.group(0)
        return f"{opening}{body}{closing}"

    return BLOCK.sub(block, text), missing


def documents(root: Path) -> list[Path]:
    return sorted({path for pattern in DOCS for path in root.glob(pattern)})


def save(results_dir: Path, root: Path) -> None:
    """Copy the schema's JSON (and charts) of `results_dir` into bench/results/."""
    committed = root / COMMITTED
    committed.mkdir(parents=True, exist_ok=True)
    if committed.resolve() == results_dir.resolve():
        return
    for bench in load(results_dir):
        shutil.copyfile(results_dir / f"{bench}.json", committed / f"{bench}.json")
        chart = results_dir / f"{bench}.png"
        if chart.exists():
            shutil.copyfile(chart, committed / f"{bench}.png")
        else:
            (committed / f"{bench}.png").unlink(missing_ok=True)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--results", type=Path, default=Path("bench-results"))
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--update-docs",
        action="store_true",
        help="copy the results into bench/results/ and rewrite the docs' blocks from them",
    )
    mode.add_argument(
        "--check",
        action="store_true",
        help="exit 1 if a doc's block differs from what bench/results/ renders",
    )
    parser.add_argument(
        "--root", type=Path, default=ROOT, help="the checkout whose docs are meant (tests)"
    )
    args = parser.parse_args(argv)
    root: Path = args.root
    if args.update_docs:
        save(args.results, root)
    source = root / COMMITTED if args.update_docs or args.check else args.results
    results = load(source)
    if not args.update_docs and not args.check:
        for name in results:
            print(f"== {name} ({source / (name + '.json')})")
            print(render(results, name, None, root / "docs" / "performance.md", root))
        return 0
    stale: list[str] = []
    for doc in documents(root):
        text = doc.read_text()
        new, missing = rewrite(text, results, doc, root)
        where = doc.relative_to(root)
        for bench in missing:
            print(f"{where}: no result for bench {bench!r}", file=sys.stderr)
        if args.check and (new != text or missing):
            stale.append(str(where))
        elif args.update_docs and new != text:
            doc.write_text(new)
            print(f"rewrote the bench blocks of {where}")
    if stale:
        print(
            "generated blocks differ from bench/results/: " + ", ".join(stale) + " "
            "(run `python -m bench.report --update-docs` after scripts/bench)",
            file=sys.stderr,
        )
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
