"""Which worker failures end a training run at once instead of a restart (the callback's
rule; that Ray Train honours it is tested with real runs in tests/faults/)."""

from __future__ import annotations

import pytest

from mmrad.config import ConfigError
from mmrad.data.loading import TooManyBadImages
from mmrad.model.loading import ModelPathMissing
from mmrad.train.fail_fast import RunCannotRecover, StopUnrecoverable


def test_bad_data_bad_config_and_a_missing_file_end_the_run_naming_the_rank():
    missing = ModelPathMissing("model path /m: no such directory")
    for error in (TooManyBadImages("3 of 50 images bad"), ConfigError("lr: must be > 0"), missing):
        with pytest.raises(RunCannotRecover, match=f"worker rank 1: {type(error).__name__}"):
            StopUnrecoverable().after_exception(None, {0: RuntimeError("collateral"), 1: error})


def test_a_dead_worker_is_left_to_ray_trains_restarts():
    StopUnrecoverable().after_exception(None, {0: RuntimeError("worker died")})
    StopUnrecoverable().after_exception(None, {0: FileNotFoundError("/tmp/triton/x.lock")})
    StopUnrecoverable(lambda: None).after_exception(None, {0: RuntimeError("worker died")})


def test_a_reason_from_outside_the_workers_ends_the_run():
    stop = StopUnrecoverable(lambda: "the GRPO coordinator actor mmrad-grpo-coordinator-x died")
    with pytest.raises(RunCannotRecover, match="coordinator-x died"):
        stop.after_exception(None, {0: RuntimeError("lost its coordinator")})
