"""A pytest plugin: the tests that cost the machine the most CPU time, beside their wall
time, at the end of the run (``--cpu-report N``, 25 by default; 0 leaves it out).

On a 2-core machine the suite is CPU-bound: two test files run side by side finished
only about 12% sooner than one after the other. Wall times (``--durations``) then show
where the suite waits, not which work to cut; this shows the CPU-seconds of every
process on the machine (Ray's workers, engines and servers included) while each test ran
its setup, call and teardown. Linux only (``/proc/stat``); elsewhere it reports nothing."""

from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

PROC_STAT = Path("/proc/stat")
BUSY_FIELDS = slice(0, 8)  # user nice system idle iowait irq softirq steal
IDLE_FIELDS = (3, 4)  # idle, iowait


def machine_busy_seconds() -> float | None:
    """CPU-seconds every core of the machine has spent busy since boot (``None`` where
    ``/proc/stat`` is missing)."""
    try:
        first = PROC_STAT.read_text().split("\n", 1)[0].split()
    except OSError:
        return None
    ticks = [int(v) for v in first[1:]][BUSY_FIELDS]
    busy = sum(ticks) - sum(ticks[i] for i in IDLE_FIELDS)
    return busy / os.sysconf("SC_CLK_TCK")


class CpuReport:
    def __init__(self, shown: int):
        self.shown = shown
        self.costs: dict[str, tuple[float, float]] = {}  # node id → (CPU s, wall s)

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_protocol(self, item, nextitem):
        cpu, wall = machine_busy_seconds(), time.monotonic()
        yield
        if cpu is not None:
            self.costs[item.nodeid] = (machine_busy_seconds() - cpu, time.monotonic() - wall)

    def pytest_terminal_summary(self, terminalreporter):
        if not self.costs:
            return
        total = sum(cpu for cpu, _ in self.costs.values())
        terminalreporter.write_sep("=", f"most CPU time ({total:.0f} CPU-s in all)")
        ranked = sorted(self.costs.items(), key=lambda kv: kv[1][0], reverse=True)
        for nodeid, (cpu, wall) in ranked[: self.shown]:
            terminalreporter.write_line(f"{cpu:8.1f} CPU-s {wall:7.1f} s  {nodeid}")


def pytest_addoption(parser):
    parser.addoption("--cpu-report", type=int, default=25, metavar="N",
                     help="list the N tests that cost the machine the most CPU time")  # fmt: skip


def pytest_configure(config):
    shown = config.getoption("--cpu-report")
    if shown > 0:
        config.pluginmanager.register(CpuReport(shown), "mmrad-cpu-report")
