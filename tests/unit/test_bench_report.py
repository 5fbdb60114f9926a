"""The figures in README.md and docs/*.md are bench/report.py's rendering of the committed
bench JSON (bench/results/), so they cannot drift from the run that produced them."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def report(*argv: str) -> subprocess.CompletedProcess[str]:
    """`python -m bench.report ARGV` from the checkout (bench/ is not an installed package)."""
    return subprocess.run(
        [sys.executable, "-m", "bench.report", *argv],
        cwd=ROOT,
        capture_output=True,
        text=True,
    )


def copy_checkout(into: Path) -> Path:
    for name in ("README.md", "docs", "bench/results"):
        source = ROOT / name
        if source.is_dir():
            shutil.copytree(source, into / name)
        else:
            (into / name).parent.mkdir(parents=True, exist_ok=True)
            shutil.copyfile(source, into / name)
    return into


def result(bench: str, figures: dict[str, float], ok: bool = True) -> dict[str, object]:
    return {
        "bench": bench,
        "command": f"python -m bench.{bench}",
        "when": "2026-12-02T12:00:00+00:00",
        "machine": {"cpus": 2, "kernel": "6.18", "python": "3.11.7"},
        "figures": figures,
        "targets": [{"name": "a target", "value": 1.5, "limit": 2, "ok": ok, "note": "n"}],
    }


def test_the_committed_docs_equal_their_rendering_from_the_committed_json() -> None:
    done = report("--check")
    assert done.returncode == 0, done.stderr
    blocks = {
        path.name: path.read_text().count("<!-- bench:")
        for path in (ROOT / "README.md", ROOT / "docs" / "performance.md")
    }
    assert blocks["README.md"] >= 1
    assert blocks["performance.md"] >= 3


def test_a_hand_edited_figure_is_found_and_update_docs_restores_it(tmp_path: Path) -> None:
    # The control for the test above: --check does fail on a block that was changed.
    root = copy_checkout(tmp_path / "checkout")
    doc = root / "docs" / "performance.md"
    text = doc.read_text()
    start = text.index("<!-- bench:run -->")
    body_at = text.index("|", start)
    doc.write_text(text[:body_at] + "| edited by hand " + text[body_at:])
    done = report("--check", "--root", str(root))
    assert done.returncode == 1
    assert "docs/performance.md" in done.stderr
    results = root / "bench" / "results"
    done = report("--update-docs", "--results", str(results), "--root", str(root))
    assert done.returncode == 0, done.stderr
    assert doc.read_text() == text
    assert report("--check", "--root", str(root)).returncode == 0


def test_a_new_bench_renders_without_code(tmp_path: Path) -> None:
    root = tmp_path / "checkout"
    (root / "docs").mkdir(parents=True)
    (root / "README.md").write_text("intro\n<!-- bench:summary -->\nold\n<!-- /bench -->\nend\n")
    doc = root / "docs" / "performance.md"
    doc.write_text("x\n<!-- bench:storm -->\n<!-- /bench -->\ny\n")
    out = tmp_path / "out"
    out.mkdir()
    figures = {"N=10.attach_p50_ms": 0.5, "N=10.speedup_x": 12.345, "N=100.attach_p50_ms": 0.6}
    figures["peak_rss_mib"] = 51.25
    (out / "storm.json").write_text(json.dumps(result("storm", figures, ok=False)))
    (out / "old-format.json").write_text(json.dumps({"summary": {}}))  # not the schema: skipped
    done = report("--update-docs", "--results", str(out), "--root", str(root))
    assert done.returncode == 0, done.stderr
    assert (root / "bench" / "results" / "storm.json").exists()
    assert doc.read_text() == (
        "x\n<!-- bench:storm -->\n"
        "`python -m bench.storm`, 2026-12-02; 2 vCPU, Linux 6.18, Python 3.11.7.\n\n"
        "|  | attach p50 (ms) | speedup (x) |\n|---|---|---|\n"
        "| N=10 | 0.500 | 12.35 |\n| N=100 | 0.600 | — |\n\n"
        "| figure | value |\n|---|---|\n| peak rss (MiB) | 51.2 |\n\n"
        "| target | value | limit | result | note |\n|---|---|---|---|---|\n"
        "| a target | 1.500 | 2 | **missed** | n |\n"
        "<!-- /bench -->\ny\n"
    )
    readme = (root / "README.md").read_text()
    assert "| storm | a target | 1.500 | 2 | **missed** | n |" in readme
    assert readme.startswith("intro\n")
    assert readme.endswith("<!-- /bench -->\nend\n")


def test_a_block_without_its_json_fails_the_check(tmp_path: Path) -> None:
    root = tmp_path / "checkout"
    (root / "docs").mkdir(parents=True)
    (root / "bench" / "results").mkdir(parents=True)
    (root / "README.md").write_text("<!-- bench:nothing -->\n<!-- /bench -->\n")
    done = report("--check", "--root", str(root))
    assert done.returncode == 1
    assert "no result for bench 'nothing'" in done.stderr


def test_a_result_outside_the_schema_is_refused(tmp_path: Path) -> None:
    bad = result("storm", {"N=10.attach_p50_ms": 0.5})
    bad["targets"] = [{"name": "no value"}]
    (tmp_path / "storm.json").write_text(json.dumps(bad))
    done = report("--results", str(tmp_path))
    assert done.returncode != 0
    assert "a target needs name, value, limit, ok, note" in done.stderr
