"""``make bench``: every benchmark in one go, one JSON and one Markdown table per run.

Runs each script of :data:`BENCHMARKS` in turn (a failing one is recorded and the rest
still run), collects the entries they publish (:mod:`record`) and writes
``runs/bench/<timestamp>.json`` (the machine, each script's wall time and exit status,
each entry: name, ratio, what the baseline is, each arm's counted work) and
``runs/bench/<timestamp>.md``. ``--publish RUN.json`` puts a run's table, with its date
and machine, into the README between the ``bench:start``/``bench:end`` markers.

    make bench                                             # after make demo
    .venv/bin/python benchmarks/run_all.py --only grpo_step,serve_load
    .venv/bin/python benchmarks/run_all.py --publish runs/bench/<timestamp>.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from datetime import UTC, datetime
from pathlib import Path

from record import RECORD_ENV, describe_work, ratio_text

HERE = Path(__file__).resolve().parent
OUT_DIR = Path("runs/bench")
README_START = "<!-- bench:start -->"
README_END = "<!-- bench:end -->"

BENCHMARKS: dict[str, list[str]] = {
    "data_throughput": [],
    "sft_throughput": [],
    "idle_data_loop": [],
    "prompt_wording": [],
    "rollout_throughput": [],
    "grpo_step": [],
    "serve_load": [],
    "sweep_reuse": [],
    "weight_sync": ["--repeats", "1"],
    "learner_memory": [],
    "engine_child_process": [],
}
"""Script (``benchmarks/<name>.py``) → its arguments under ``make bench``."""


def machine() -> dict[str, object]:
    """What the figures were measured on."""
    import psutil
    import torch

    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {
        "cpus": os.cpu_count(),
        "cpu": cpu_model(),
        "memory_gib": round(psutil.virtual_memory().total / 2**30, 1),
        "gpu": gpu,
        "python": platform.python_version(),
        "torch": torch.__version__,
    }


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def run_script(name: str, args: list[str], record: Path) -> dict[str, object]:
    """Run one benchmark with its output shown as it comes; its entries and status."""
    print(f"\n=== {name} {' '.join(args)}", flush=True)
    record.unlink(missing_ok=True)
    started = time.perf_counter()
    proc = subprocess.run(
        [sys.executable, str(HERE / f"{name}.py"), *args],
        env={**os.environ, RECORD_ENV: str(record)},
        check=False,
    )
    entries = []
    if record.exists():
        entries = [json.loads(line) for line in record.read_text().splitlines() if line]
    return {
        "script": name,
        "args": args,
        "seconds": round(time.perf_counter() - started, 1),
        "returncode": proc.returncode,
        "entries": entries,
    }


def ratio_cell(entry: dict) -> str:
    if entry["ratio"] is None:
        return f"refused: {entry['refused']}"
    return f"{ratio_text(entry['ratio'])}×"


def markdown_table(run: dict) -> str:
    """One row per entry; a script that failed or published nothing gets a row too."""
    lines = [
        "| benchmark | measure | candidate | baseline | work (each arm) | × | goal |",
        "|---|---|---|---|---|---|---|",
    ]
    for script in run["scripts"]:
        if not script["entries"]:
            status = f"exit {script['returncode']}, no entry"
            lines.append(f"| {script['script']} | {status} | | | | | |")
        for e in script["entries"]:
            cand, base = e["candidate"], e["baseline"]
            work = describe_work(cand["work"])
            if cand["work"] != base["work"]:
                work = f"{work} / {describe_work(base['work'])}"
            lines.append(
                f"| {e['name']} | {e['unit']} | {cand['label']}: {cand['value']:.4g} | "
                f"{base['label']}: {base['value']:.4g} | {work} | {ratio_cell(e)} | "
                f"{e['goal'] or ''} |"
            )
    return "\n".join(lines)


def heading(run: dict) -> str:
    m = run["machine"]
    device = m["gpu"] or "no GPU"
    minutes = sum(s["seconds"] for s in run["scripts"]) / 60
    return (
        f"Last run: {run['date']} on {m['cpus']} CPU cores ({m['cpu']}), "
        f"{m['memory_gib']} GiB, {device}; torch {m['torch']}; {minutes:.0f} minutes."
    )


def write_run(run: dict, out_dir: Path) -> Path:
    out_dir.mkdir(parents=True, exist_ok=True)
    path = out_dir / f"{run['timestamp']}.json"
    path.write_text(json.dumps(run, indent=2))
    path.with_suffix(".md").write_text(f"{heading(run)}\n\n{markdown_table(run)}\n")
    return path


def publish_readme(run_json: Path, readme: Path) -> None:
    """Replace the README's table between the markers with ``run_json``'s."""
    run = json.loads(run_json.read_text())
    text = readme.read_text()
    start, end = text.find(README_START), text.find(README_END)
    if start < 0 or end < start:
        raise SystemExit(f"{readme}: no {README_START} ... {README_END} markers")
    table = f"{README_START}\n{heading(run)}\n\n{markdown_table(run)}\n"
    readme.write_text(text[:start] + table + text[end:])
    print(f"{readme}: table of {run_json}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--only", help="comma-separated scripts (default: all)")
    parser.add_argument("--out", type=Path, default=OUT_DIR)
    parser.add_argument("--publish", type=Path, help="put this run's table in the README")
    parser.add_argument("--readme", type=Path, default=Path("README.md"))
    args = parser.parse_args()
    if args.publish:
        publish_readme(args.publish, args.readme)
        return
    names = args.only.split(",") if args.only else list(BENCHMARKS)
    unknown = sorted(set(names) - set(BENCHMARKS))
    if unknown:
        parser.error(f"unknown benchmarks {unknown}; known: {', '.join(BENCHMARKS)}")
    now = datetime.now(UTC)
    run = {
        "timestamp": now.strftime("%Y%m%dT%H%M%SZ"),
        "date": now.strftime("%Y-%m-%d %H:%M UTC"),
        "machine": machine(),
        "scripts": [],
    }
    with tempfile.TemporaryDirectory(prefix="mmrad-bench-record-") as tmp:
        for name in names:
            run["scripts"].append(run_script(name, BENCHMARKS[name], Path(tmp, "record.jsonl")))
            write_run(run, args.out)  # what ran so far survives an interrupted run
    path = write_run(run, args.out)
    print(f"\n{heading(run)}\n\n{markdown_table(run)}\n\nwritten: {path}")
    failed = [s["script"] for s in run["scripts"] if s["returncode"] != 0]
    if failed:
        raise SystemExit(f"failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
