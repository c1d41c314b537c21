"""Named actors of a run that a rerun takes over.

A run's coordinator and progress board are named after ``run.name``. When a driver is
killed, Ray ends the actors it owned, but not at once: a rerun started right away may
find the old names still taken. :func:`wait_until_free` waits for them; a name still
taken after that belongs to a run that is alive, and the rerun must not touch it.
"""

from __future__ import annotations

import logging
import time

import ray

log = logging.getLogger(__name__)

FREE_WAIT_S = 60.0


class RunStillAlive(RuntimeError):
    """Another live driver runs under the same name."""


def name_taken(name: str) -> bool:
    """Whether an actor of this job's namespace holds ``name``; a dead one may hold it
    for a moment, until Ray has ended it."""
    try:
        ray.get_actor(name)
    except ValueError:
        return False
    return True


def wait_until_free(name: str, what: str, timeout_s: float = FREE_WAIT_S) -> None:
    """Return once no live actor is named ``name``; raise :class:`RunStillAlive` naming
    ``what`` (e.g. ``run.name my-run``) when one still is after ``timeout_s``."""
    started = time.monotonic()
    deadline = started + timeout_s
    if not name_taken(name):
        return
    log.info("%s: waiting for the actor %s of an earlier driver to end", what, name)
    while name_taken(name):
        if time.monotonic() > deadline:
            raise RunStillAlive(
                f"{what} is still running: its actor {name} is alive after {timeout_s:.0f} s "
                "(a killed driver's actors end within seconds). Stop that run, or choose "
                "another run.name"
            )
        time.sleep(0.5)
    log.info("%s: %s ended after %.1f s", what, name, time.monotonic() - started)
