"""Named actors of a run that a rerun takes over.

A run's coordinator and progress board are named after ``run.name``. When a driver is
killed, Ray ends the actors it owned, but not at once: a rerun started right away may
find the old names still taken. :func:`wait_until_free` waits for them; a name still
taken after that belongs to a run that is alive, and the rerun must not touch it.
"""

from __future__ import annotations

import time

import ray

FREE_WAIT_S = 60.0


class RunStillAlive(RuntimeError):
    """Another live driver runs under the same name."""


def name_taken(name: str) -> bool:
    try:
        actor = ray.get_actor(name)
    except ValueError:
        return False
    try:  # a dead owner's actor can linger as a name until Ray has ended it
        ray.get(actor.__ray_ready__.remote(), timeout=10)
    except ray.exceptions.ActorDiedError:
        return False
    except ray.exceptions.RayError:
        pass
    return True


def wait_until_free(name: str, what: str, timeout_s: float = FREE_WAIT_S) -> None:
    """Return once no live actor is named ``name``; raise :class:`RunStillAlive` naming
    ``what`` (e.g. ``run.name my-run``) when one still is after ``timeout_s``."""
    deadline = time.monotonic() + timeout_s
    while name_taken(name):
        if time.monotonic() > deadline:
            raise RunStillAlive(
                f"{what} is still running: its actor {name} is alive after {timeout_s:.0f} s "
                "(a killed driver's actors end within seconds). Stop that run, or choose "
                "another run.name"
            )
        time.sleep(0.5)
