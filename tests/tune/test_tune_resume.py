"""What a sweep was started with is kept, and a rerun with another search space or base
config is refused, naming every changed key (local storage; no Ray)."""

from __future__ import annotations

import json

import pytest

from mmrad.config import ConfigError
from mmrad.storage import Storage
from mmrad.tune.resume import (
    SWEEP_FILE,
    changed_keys,
    check_or_record_sweep,
    sweep_identity,
)

SPACE = {"optimizer.lr": {"loguniform": [1e-5, 1e-3]}}
BASE = {"optimizer": {"lr": 1e-4}, "rollout": {"max_tokens": 64, "group_size": 4}}


def test_changed_keys_are_dotted_and_cover_added_and_removed_ones():
    new = {"optimizer": {"lr": 1e-4}, "rollout": {"max_tokens": 48}, "seed": 1}
    assert changed_keys(BASE, new) == [
        ("rollout.group_size", 4, None), ("rollout.max_tokens", 64, 48), ("seed", None, 1),
    ]  # fmt: skip
    assert changed_keys(BASE, new, one_sided=False) == [("rollout.max_tokens", 64, 48)]
    assert changed_keys(BASE, BASE) == []


def test_a_base_field_that_another_mmrad_version_added_does_not_refuse_a_resume(tmp_path):
    sweep, storage = str(tmp_path / "sweep"), Storage()
    check_or_record_sweep(storage, sweep, sweep_identity(SPACE, BASE), resuming=False)
    newer = {**BASE, "coordinator": {"wait_timeout_s": 1800.0}}
    check_or_record_sweep(storage, sweep, sweep_identity(SPACE, newer), resuming=True)


def test_a_new_sweep_is_recorded_and_the_same_one_resumes(tmp_path):
    sweep, storage = str(tmp_path / "sweep"), Storage()
    identity = sweep_identity(SPACE, BASE)
    check_or_record_sweep(storage, sweep, identity, resuming=False)
    assert json.loads((tmp_path / "sweep" / SWEEP_FILE).read_text()) == identity
    check_or_record_sweep(storage, sweep, identity, resuming=True)  # no error


@pytest.mark.parametrize(
    ("space", "base", "message"),
    [
        ({"optimizer.lr": {"loguniform": [1e-5, 1e-2]}}, BASE,
         "another search space: optimizer.lr.loguniform: [1e-05, 0.001] then, "
         "[1e-05, 0.01] now"),
        (SPACE, {**BASE, "rollout": {"max_tokens": 48, "group_size": 4}},
         "another base GRPO config (file and overrides): rollout.max_tokens: 64 then, 48 now"),
    ],
)  # fmt: skip
def test_a_resumed_sweep_with_another_space_or_base_is_refused(tmp_path, space, base, message):
    sweep, storage = str(tmp_path / "sweep"), Storage()
    check_or_record_sweep(storage, sweep, sweep_identity(SPACE, BASE), resuming=False)
    with pytest.raises(ConfigError) as refused:
        check_or_record_sweep(storage, sweep, sweep_identity(space, base), resuming=True)
    assert message in str(refused.value)
    assert "choose a new run.name" in str(refused.value)
    assert json.loads((tmp_path / "sweep" / SWEEP_FILE).read_text())["base"] == BASE  # kept


def test_asha_counts_grpo_steps_not_reports():
    """Checkpoint reports advance Tune's training_iteration too: the rungs are in the
    steps every report carries, so checkpoints between validations move nothing."""
    from mmrad.tune.config import TuneJobConfig
    from mmrad.tune.scheduler import make_scheduler

    job = TuneJobConfig.model_validate({
        "validate_every": 2, "scheduler": {"kind": "asha", "grace_period": 2},
        "search_space": {"optimizer.lr": {"choice": [1e-4]}},
    })  # fmt: skip
    asha = make_scheduler(job, max_steps=10)
    assert (asha._time_attr, asha._max_t) == ("step", 10)
    # rungs at 2 validations (step 4) and twice that, whatever checkpoints come between
    assert sorted(milestone for milestone, _ in asha._brackets[0]._rungs) == [4, 8]


def test_asha_lets_a_trial_at_its_last_step_finish():
    """A trial's last report comes before its run's export: stopping it there (ASHA's
    max_t) would end its process mid-export. It goes on; the rungs before still cut."""
    from ray.tune.experiment import Trial
    from ray.tune.schedulers import TrialScheduler

    from mmrad.rl.config import LAST_STEP
    from mmrad.tune.config import TuneJobConfig
    from mmrad.tune.scheduler import make_scheduler

    job = TuneJobConfig.model_validate({
        "validate_every": 1, "scheduler": {"kind": "asha", "grace_period": 1},
        "search_space": {"optimizer.lr": {"choice": [1e-4]}},
    })  # fmt: skip
    asha = make_scheduler(job, max_steps=2)
    asha.set_search_properties("val/objective", "max")
    best, weak = (Trial("__fake", stub=True, config={}) for _ in range(2))
    for trial in (best, weak):
        asha.on_trial_add(None, trial)

    def decide(trial, step, objective, last_step=2):
        result = {"step": step, "val/objective": objective, LAST_STEP: last_step}
        return asha.on_trial_result(None, trial, result)

    assert decide(best, 1, 0.9) == TrialScheduler.CONTINUE
    assert decide(weak, 1, 0.1) == TrialScheduler.STOP  # cut at the step-1 rung
    assert decide(best, 2, 0.9) == TrialScheduler.CONTINUE  # max_t: it ends by itself
    # a trial whose run goes on past max_t (the sweep varies max_steps) is stopped there
    longer = Trial("__fake", stub=True, config={})
    asha.on_trial_add(None, longer)
    assert decide(longer, 1, 0.95) == TrialScheduler.CONTINUE
    assert decide(longer, 2, 0.95, last_step=10) == TrialScheduler.STOP
