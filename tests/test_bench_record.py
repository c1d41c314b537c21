"""benchmarks/record.py and run_all.py: a ratio only when both arms did the same work,
entries recorded for make bench, and the run's table in the README."""

from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
import record  # noqa: E402
import run_all  # noqa: E402

FAST = record.Arm("fast", 40.0, {"images_decoded": 200, "samples": 100})
SLOW = record.Arm("slow", 10.0, {"images_decoded": 200, "samples": 100})


def test_ratio_when_the_counted_work_matches():
    entry = record.compare("data", "samples/s", FAST, SLOW, same=("images_decoded", "samples"))
    assert entry.ratio == pytest.approx(4.0) and entry.refused is None


def test_no_ratio_when_a_count_differs_and_it_says_which():
    slow = record.Arm("slow", 10.0, {"images_decoded": 400, "samples": 100})
    entry = record.compare("data", "samples/s", FAST, slow, same=("images_decoded", "samples"))
    assert entry.ratio is None
    assert entry.refused == "counted work differs: images_decoded 200 vs 400"
    assert "no ratio: counted work differs" in record.format_entry(entry)


def test_a_count_only_one_arm_made_refuses_the_ratio():
    entry = record.compare("data", "samples/s", FAST, SLOW, same=("tokens",))
    assert entry.ratio is None and "tokens not counted by both arms" in entry.refused


def test_tolerance_is_relative_and_per_count():
    a = record.Arm("a", 2.0, {"tokens": 1000})
    within = record.Arm("b", 1.0, {"tokens": 1040})
    beyond = record.Arm("b", 1.0, {"tokens": 1200})
    loose = {"tokens": 0.05}
    assert record.compare("x", "u", a, within, same=("tokens",), tolerance=loose).ratio == 2.0
    assert record.compare("x", "u", a, beyond, same=("tokens",), tolerance=loose).ratio is None
    assert record.compare("x", "u", a, within, same=("tokens",)).ratio is None


def test_publish_appends_one_json_line_per_entry(tmp_path, monkeypatch, capsys):
    path = tmp_path / "record.jsonl"
    monkeypatch.setenv(record.RECORD_ENV, str(path))
    record.publish(record.compare("one", "u", FAST, SLOW, same=("samples",), goal=">= 2x"))
    record.publish(record.compare("two", "u", SLOW, FAST, same=("samples",)))
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert [e["name"] for e in lines] == ["one", "two"]
    assert lines[0]["ratio"] == pytest.approx(4.0) and lines[0]["goal"] == ">= 2x"
    assert lines[0]["baseline"]["work"] == {"images_decoded": 200, "samples": 100}
    assert "ratio 4.00x (goal: >= 2x)" in capsys.readouterr().out


def fake_run(entries: list[dict], failed: bool = False) -> dict:
    return {
        "timestamp": "20261206T170000Z",
        "date": "2026-12-06 17:00 UTC",
        "machine": {
            "cpus": 2,
            "cpu": "Test CPU",
            "memory_gib": 24.0,
            "gpu": None,
            "python": "3.11",
            "torch": "2.13.0+cpu",
        },  # fmt: skip
        "scripts": [
            {
                "script": "data_throughput",
                "args": [],
                "seconds": 60.0,
                "returncode": 0,
                "entries": entries,
            },
            {
                "script": "serve_load",
                "args": [],
                "seconds": 30.0,
                "returncode": int(failed),
                "entries": [],
            },
        ],  # fmt: skip
    }


def test_table_has_a_row_per_entry_and_per_silent_script():
    ok = record.compare("data", "samples/s", FAST, SLOW, same=("samples",)).to_json()
    slow = record.Arm("slow", 10.0, {"images_decoded": 400, "samples": 100})
    refused = record.compare("data2", "samples/s", FAST, slow, same=("images_decoded",))
    table = run_all.markdown_table(fake_run([ok, refused.to_json()], failed=True))
    rows = table.splitlines()[2:]
    assert len(rows) == 3
    assert "| 4.00× |" in rows[0] and "fast: 40" in rows[0] and "slow: 10" in rows[0]
    assert "refused: counted work differs: images_decoded 200 vs 400" in rows[1]
    assert rows[2].startswith("| serve_load | exit 1, no entry")


def test_write_run_and_publish_into_the_readme(tmp_path):
    ok = record.compare("data", "samples/s", FAST, SLOW, same=("samples",)).to_json()
    path = run_all.write_run(fake_run([ok]), tmp_path / "bench")
    assert path.name == "20261206T170000Z.json" and path.with_suffix(".md").is_file()
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n{run_all.README_START}\nold table\n{run_all.README_END}\nafter\n")
    run_all.publish_readme(path, readme)
    text = readme.read_text()
    assert "old table" not in text and text.endswith(f"{run_all.README_END}\nafter\n")
    assert "Last run: 2026-12-06 17:00 UTC on 2 CPU cores (Test CPU)" in text
    assert "| data | samples/s |" in text


def test_publish_refuses_a_readme_without_markers(tmp_path):
    ok = record.compare("data", "samples/s", FAST, SLOW, same=("samples",)).to_json()
    path = run_all.write_run(fake_run([ok]), tmp_path)
    readme = tmp_path / "README.md"
    readme.write_text("# no markers\n")
    with pytest.raises(SystemExit, match="no <!-- bench:start -->"):
        run_all.publish_readme(path, readme)
    assert readme.read_text() == "# no markers\n"


def test_make_bench_runs_every_script_and_each_publishes_its_entries():
    helpers = {"record", "run_all", "workload", "learning_sft"}  # modules the scripts share
    scripts = {p.stem for p in Path(run_all.HERE).glob("*.py")} - helpers
    assert set(run_all.BENCHMARKS) == scripts
    for name in scripts:
        assert "publish(" in (Path(run_all.HERE) / f"{name}.py").read_text(), name


def test_small_ratios_keep_three_decimals():
    assert record.ratio_text(1.064) == "1.06" and record.ratio_text(0.0148) == "0.015"
