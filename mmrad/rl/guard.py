"""Ending a GRPO run that restarting its learners cannot save, within seconds.

Ray Train restarts a failed learner group up to ``run.max_failures`` times, each with a
full model reload. That heals a dead learner, but not a dead coordinator (every restart
would call a dead actor) nor a fault the coordinator recorded as fatal
(:meth:`~mmrad.rl.coordinator.Coordinator.fail`, e.g. a failed sync check).

- :func:`why_unrecoverable` is what :class:`~mmrad.train.fail_fast.StopUnrecoverable`
  asks in Ray Train's controller after every learner failure: the run then ends at once
  with the reason instead of restarting.
- :func:`watch_coordinator` runs in every learner: a learner that is training does not
  call the coordinator until its step ends, so a thread asks every few seconds and ends
  the learner's process when the coordinator has died (the failure above follows).

A rerun of the same ``run.name`` resumes from the last checkpoint.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import Any

import ray

log = logging.getLogger(__name__)

WATCH_EVERY_S = 5.0
ASK_TIMEOUT_S = 10.0  # the controller's event loop waits for the answer


def why_unrecoverable(coordinator: Any, name: str) -> str | None:
    """Why the run cannot go on (its coordinator died, or recorded a fatal fault), or
    ``None``. A coordinator that is only slow to answer is not judged."""
    try:
        reason = ray.get(coordinator.fatal.remote(), timeout=ASK_TIMEOUT_S)
    except ray.exceptions.ActorDiedError as err:
        return (
            f"the GRPO coordinator actor {name} died ({type(err).__name__}); restarting "
            "the learners cannot help, so the run ends. Rerun the same command to resume "
            "from the last checkpoint"
        )
    except Exception as err:  # slow or unreachable: a restart may still help
        log.warning("could not ask the GRPO coordinator %s whether the run can go on: %s",
                    name, err)  # fmt: skip
        return None
    return reason


def watch_coordinator(coordinator: Any, name: str) -> threading.Event:
    """Start a daemon thread that ends this learner process once the coordinator has
    died, so a learner busy training does not keep the run alive for a whole step; set
    the returned event when the learner is done (the driver then stops the coordinator)."""
    done = threading.Event()

    def watch() -> None:
        while not done.wait(WATCH_EVERY_S):
            try:
                ray.get(coordinator.generation.remote(), timeout=ASK_TIMEOUT_S)
            except ray.exceptions.ActorDiedError:
                if not done.is_set():
                    log.error("the GRPO coordinator actor %s died; this learner stops", name)
                    os._exit(1)
            except Exception:  # slow or unreachable: ask again
                continue

    threading.Thread(target=watch, name="coordinator-watch", daemon=True).start()
    return done
