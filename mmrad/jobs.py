"""What every ``python -m ray_jobs.<job>`` entry point shares: ``--config FILE`` plus
``key.sub=value`` overrides, validated before Ray starts."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence

from pydantic import BaseModel

from mmrad.config import ConfigError, ConfigT, load_config


def parse_job_args(model: type[ConfigT], argv: Sequence[str] | None = None) -> ConfigT:
    parser = argparse.ArgumentParser(description=model.__doc__)
    parser.add_argument("--config", "-c", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="key.sub=value")
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        return load_config(model, args.config, args.overrides)
    except ConfigError as err:
        print(f"config error: {err}", file=sys.stderr)
        raise SystemExit(2) from None


def print_result(result: object) -> None:
    fields = result.model_dump() if isinstance(result, BaseModel) else vars(result)
    for key, value in fields.items():
        print(f"{key}: {value}")
