"""What every entry point shares: the ``mmrad`` commands and ``python -m ray_jobs.<job>``
alike take ``--config FILE`` plus ``key.sub=value`` overrides (validated before Ray
starts), ``--print-config``, and end a user error with one line and an exit status:

- ``2`` and ``config error: ...`` for a bad config, whether found while loading it or
  once the job runs (a resume under another data order, a GRPO starting point that
  does not fit): either way the config must change;
- ``1`` and ``error: ...`` for the other failures users cause or must act on (a bad
  manifest or model path, storage, placement, a failure budget spent, ...):
  :func:`user_errors` lists them;
- anything else is a bug and keeps its traceback.

Rejected: one ``try`` per command and per job (the CLI and the jobs drifted apart that
way: the jobs caught only config errors), and catching every exception (a bug would
print one line and no traceback to find it by).
"""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from functools import partial
from typing import Any, TypeVar

from pydantic import BaseModel

from mmrad.config import ConfigError, ConfigT, dump_config, load_config

CONFIG_ERROR_EXIT = 2
USER_ERROR_EXIT = 1
PRINT_CONFIG_HELP = "Print the resolved, validated config (YAML) and exit; nothing runs."

T = TypeVar("T")


def user_errors() -> tuple[type[BaseException], ...]:
    """The errors that end a job with ``error: <message>`` and status 1. Imported only
    when an error is being matched, so ``--help`` and ``--version`` stay fast."""
    from mmrad.actor_names import RunStillAlive
    from mmrad.annotate.job import AnnotateError
    from mmrad.data.builders.base import DataBuildError
    from mmrad.data.loading import BadImageError
    from mmrad.data.schema import ManifestError
    from mmrad.detect.inputs import DetectError
    from mmrad.eval.budget import EvalFailed
    from mmrad.eval.endpoint import EndpointConfigError
    from mmrad.model.export import ExportError
    from mmrad.placement import PlacementError
    from mmrad.serve.deploy import DeployError
    from mmrad.serve.smoke import SmokeTestError
    from mmrad.storage import StorageError
    from mmrad.tracking.run import TrackingError
    from mmrad.train.fail_fast import RunCannotRecover

    return (DataBuildError, ManifestError, BadImageError, StorageError, EndpointConfigError,
            ExportError, PlacementError, EvalFailed, TrackingError, AnnotateError, DetectError,
            DeployError, SmokeTestError, RunStillAlive, RunCannotRecover)  # fmt: skip


def one_line(error: BaseException) -> str:
    """The error's message on one line; a Ray task's error (``RayTaskError``, which
    carries the remote traceback in its text) gives the message of its ``cause``."""
    cause = getattr(error, "cause", None)
    text = str(cause if isinstance(cause, BaseException) else error)
    return "; ".join(line.strip() for line in text.splitlines() if line.strip())


def report(label: str, error: BaseException) -> None:
    """``label: message`` on stderr, red on a terminal, never wrapped."""
    from rich.console import Console
    from rich.markup import escape

    Console(stderr=True, soft_wrap=True, highlight=False).print(
        f"[red]{label}:[/red]", escape(one_line(error))
    )


@contextmanager
def exits_on_user_errors() -> Iterator[None]:
    """Turn a user error raised inside into its one line and ``SystemExit`` (see the
    module); other exceptions pass through untouched."""
    try:
        yield
    except ConfigError as err:
        report("config error", err)
        raise SystemExit(CONFIG_ERROR_EXIT) from None
    except Exception as err:
        # click's and typer's exits (--help, --print-config) pass before the imports
        if type(err).__module__.startswith(("click.", "typer.")) or not isinstance(
            err, user_errors()
        ):
            raise
        report("error", err)
        raise SystemExit(USER_ERROR_EXIT) from None


def job_arguments(description: str | None) -> argparse.ArgumentParser:
    """``--config FILE [--print-config] [key.sub=value ...]``, options and overrides in
    any order."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--config", "-c", help="YAML config file")
    parser.add_argument("--print-config", action="store_true", help=PRINT_CONFIG_HELP)
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    return parser


def run_entry(
    load: Callable[[str | None, list[str]], T],
    work: Callable[[T], object],
    *,
    dump: Callable[[T], str],
    description: str | None = None,
    argv: Sequence[str] | None = None,
) -> None:
    """A ``python -m ray_jobs.<job>`` entry point: parse the arguments, ``load`` the
    config (before Ray starts), then print its ``dump`` (``--print-config``) or run
    ``work`` on it; user errors end as in the CLI."""
    args = job_arguments(description).parse_intermixed_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    with exits_on_user_errors():
        config = load(args.config, args.overrides)
        if args.print_config:
            sys.stdout.write(dump(config))
            return
        work(config)


def print_result(result: object) -> None:
    fields = result.model_dump() if isinstance(result, BaseModel) else vars(result)
    for key, value in fields.items():
        print(f"{key}: {value}")


def run_job(
    model: type[ConfigT],
    work: Callable[[ConfigT], object],
    show: Callable[[Any], None] = print_result,
    argv: Sequence[str] | None = None,
    dump: Callable[[ConfigT], str] = dump_config,
) -> None:
    """:func:`run_entry` for a job whose config is ``model``: ``show`` prints what
    ``work`` returns."""
    run_entry(partial(load_config, model), lambda job: show(work(job)), dump=dump,
              description=model.__doc__, argv=argv)  # fmt: skip
