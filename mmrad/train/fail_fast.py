"""Ending a training run at once when restarting its workers cannot help.

Ray Train restarts a failed worker group up to ``run.max_failures`` times, each with a
full model reload. That heals a dead worker, not bad data or a bad config, which fail
again the same way, nor a run whose other actors died. :class:`StopUnrecoverable` runs
in Ray Train's controller after every worker failure and ends the run with
:class:`RunCannotRecover` (an error Ray Train does not retry) when:

- a worker raised one of :data:`NOT_RETRIED` (a bad-image policy or budget, a config
  error, a missing file such as a model path that does not exist), or
- ``ask()`` names a reason (the GRPO coordinator died, or recorded a fatal fault:
  :func:`mmrad.rl.guard.why_unrecoverable`).

Run the trainer with :func:`fit` to get that reason rather than Ray Train's wrapper.
"""

from __future__ import annotations

from collections.abc import Callable

from ray.train import TrainingFailedError, UserCallback

from mmrad.config import ConfigError
from mmrad.data.loading import BadImageError
from mmrad.model.loading import ModelPathMissing

NOT_RETRIED: tuple[type[BaseException], ...] = (BadImageError, ConfigError, ModelPathMissing)


class RunCannotRecover(RuntimeError):
    """The run ended: restarting its workers cannot fix what failed."""


class StopUnrecoverable(UserCallback):
    """A Ray Train callback (it runs in the controller); ``ask`` must pickle (a
    module-level function, or a ``functools.partial`` of one)."""

    def __init__(self, ask: Callable[[], str | None] | None = None):
        self.ask = ask

    def after_exception(self, run_context, worker_exceptions: dict[int, Exception]) -> None:
        for rank, error in sorted(worker_exceptions.items()):
            if isinstance(error, NOT_RETRIED):
                raise RunCannotRecover(f"worker rank {rank}: {type(error).__name__}: {error}")
        reason = self.ask() if self.ask is not None else None
        if reason is not None:
            raise RunCannotRecover(reason)


def fit(trainer):
    """``trainer.fit()``; a run that :class:`StopUnrecoverable` ended raises its
    :class:`RunCannotRecover` (the user needs the reason, not the controller's traceback)."""
    try:
        return trainer.fit()
    except TrainingFailedError as err:
        cause = getattr(err, "controller_failure", None)
        if isinstance(cause, RunCannotRecover):
            raise cause from err
        raise
