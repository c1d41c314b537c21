"""The suite's report of the tests that cost the machine the most CPU time."""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from tests.helpers.cpu_report import machine_busy_seconds

REPO = Path(__file__).resolve().parents[1]


def test_busy_seconds_count_work_done_on_the_machine():
    before = machine_busy_seconds()
    end = time.monotonic() + 0.5
    while time.monotonic() < end:  # half a second of one core
        pass
    assert machine_busy_seconds() - before >= 0.4


def test_the_run_ends_with_the_tests_by_cpu_time(tmp_path):
    (tmp_path / "test_costs.py").write_text(
        "import time\n\n"
        "def test_busy():\n    end = time.monotonic() + 1.5\n    while time.monotonic() < end:\n"
        "        pass\n\n"
        "def test_idle():\n    time.sleep(1.5)\n"
    )
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "tests.helpers.cpu_report", "-p",
         "no:cacheprovider", "--cpu-report", "5", str(tmp_path / "test_costs.py")],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )  # fmt: skip
    assert run.returncode == 0, run.stdout[-2000:]
    report = run.stdout.split("most CPU time", 1)[1].splitlines()[1:3]
    assert report[0].endswith("test_costs.py::test_busy"), report  # the busier first
    assert report[1].endswith("test_costs.py::test_idle"), report
    busy_cpu, idle_cpu = (float(line.split()[0]) for line in report)
    # CPU time of the whole machine: what else runs meanwhile adds to both
    assert busy_cpu >= 1.2 and busy_cpu - idle_cpu >= 0.9, report
