"""Running a ``python -m ray_jobs.<job>`` entry point inside the test process (no new
interpreter, no Ray unless the job starts it)."""

from __future__ import annotations

import runpy
import sys


def run_job_module(job: str, *argv: str) -> int:
    """``python -m ray_jobs.<job> ARGV`` in this process; returns its exit status."""
    saved = sys.argv
    sys.argv = [f"ray_jobs/{job}.py", *argv]
    try:
        runpy.run_module(f"ray_jobs.{job}", run_name="__main__")
    except SystemExit as exit_:
        return exit_.code or 0
    finally:
        sys.argv = saved
    return 0
