import pytest

from mmrad.sft.job import start_position
from mmrad.sft.plan import SFTProgress, StepPlan
from mmrad.train.schedule import warmup_cosine_factor


def test_steps_and_positions_are_the_same_on_every_rank():
    plan = StepPlan(samples=50, world_size=2, batch_size=4, grad_accum=2, epochs=3)
    assert plan.per_step == 16
    assert plan.steps_per_epoch == 3  # 48 positions used, 2 left over each epoch
    assert plan.total_steps == 9
    assert plan.start_position(2) == 32
    assert plan.rank_rows_per_epoch() == 24


def test_a_checkpoint_at_an_epochs_end_resumes_with_the_next_epoch_in_driver_and_worker():
    """The driver builds data sets from the epoch a resumed worker asks for first (a
    checkpoint after an epoch's last step once made the worker ask for a data set the
    driver had skipped)."""
    plan = StepPlan(samples=50, world_size=2, batch_size=4, grad_accum=2, epochs=3)
    at_end = SFTProgress(epoch=1, step_in_epoch=3)
    assert start_position(at_end, plan) == (2, 0)
    at_end.next_epoch_if_done(plan.steps_per_epoch)  # what the restored worker does
    assert (at_end.epoch, at_end.step_in_epoch) == (2, 0)
    mid_epoch = SFTProgress(epoch=1, step_in_epoch=2)
    assert start_position(mid_epoch, plan) == (1, 32)
    mid_epoch.next_epoch_if_done(plan.steps_per_epoch)
    assert (mid_epoch.epoch, mid_epoch.step_in_epoch) == (1, 2)


def test_max_steps_caps_the_total():
    plan = StepPlan(samples=50, world_size=2, batch_size=4, grad_accum=2, epochs=3, max_steps=4)
    assert plan.total_steps == 4


def test_too_few_samples_for_one_step_is_a_clear_error():
    with pytest.raises(ValueError, match="3 training samples cannot fill one step of 8"):
        StepPlan(samples=3, world_size=2, batch_size=4, grad_accum=1, epochs=1).check()


def test_warmup_then_cosine_to_the_floor():
    factors = [warmup_cosine_factor(step, 10, 2, 0.1) for step in range(11)]
    assert factors[0] == pytest.approx(0.5) and factors[1] == pytest.approx(1.0)
    assert factors[2] == pytest.approx(1.0)
    assert factors[6] == pytest.approx(0.1 + 0.9 * 0.5)  # half-way through the decay
    assert factors[10] == pytest.approx(0.1)
    assert all(a >= b for a, b in zip(factors[1:], factors[2:], strict=False))


def test_local_paths_become_absolute_for_the_workers(tmp_path, monkeypatch):
    from mmrad.config import SFTJobConfig, load_config, with_absolute_paths

    monkeypatch.chdir(tmp_path)
    (tmp_path / "models" / "tiny").mkdir(parents=True)
    job = load_config(
        SFTJobConfig,
        None,
        ["model.path=models/tiny", "data.manifest=d/manifest.parquet", "run.storage_path=s3://b/r"],
    )
    resolved = with_absolute_paths(job)
    assert resolved.model.path == str(tmp_path / "models" / "tiny")
    assert resolved.data.manifest == str(tmp_path / "d" / "manifest.parquet")
    assert resolved.run.storage_path == "s3://b/r"
    assert with_absolute_paths(load_config(SFTJobConfig, None, ["model.path=Org/hub-model"])
                               ).model.path == "Org/hub-model"  # fmt: skip


def _record(record_id: str, **changes) -> dict:
    record = {"id": record_id, "image_uri": f"{record_id}.png", "reference_uri": None,
              "is_anomalous": False, "boxes": [], "labels": [], "defect_type": "good",
              "reasoning": None, "category": "brick"}  # fmt: skip
    return {**record, **changes}


def test_the_record_fingerprint_follows_content_not_order():
    from mmrad.sft.plan import records_fingerprint

    records = [_record("a"), _record("b")]
    assert records_fingerprint(records) == records_fingerprint(records[::-1])
    assert records_fingerprint(records) != records_fingerprint(records[:1])
    changed = [_record("a"), _record("b", boxes=[[1.0, 2.0, 3.0, 4.0]], labels=["hole"])]
    assert records_fingerprint(records) != records_fingerprint(changed)


def test_a_resume_under_another_data_order_names_what_changed():
    from dataclasses import asdict, replace

    from mmrad.sft.plan import DataOrder, DataOrderError, check_data_order

    saved = DataOrder(seed=0, manifest="abc", world_size=2, micro_batch_size=4, grad_accum=1)
    check_data_order(None, saved, "run r")  # a fresh run has nothing to agree with
    check_data_order(asdict(saved), saved, "run r")
    now = replace(saved, world_size=4, grad_accum=2)
    with pytest.raises(DataOrderError, match=r"run r: .*world_size 2 -> 4; grad_accum 1 -> 2"):
        check_data_order(asdict(saved), now, "run r")


def test_the_driver_reads_the_committed_progress_and_refuses_an_old_checkpoint(tmp_path):
    import json

    from mmrad.config import ConfigError
    from mmrad.sft.job import committed_progress
    from mmrad.storage import Storage

    assert committed_progress(Storage(), str(tmp_path)) is None  # a fresh run
    snapshot = {"latest_checkpoint_result": {"checkpoint_dir_name": "checkpoint_000004"}}
    (tmp_path / "checkpoint_manager_snapshot.json").write_text(json.dumps(snapshot))
    state = tmp_path / "checkpoint_000004" / "trainer_state.json"
    state.parent.mkdir()
    state.write_text(json.dumps({"step": 4, "extra": {"epoch": 1, "step_in_epoch": 2}}))
    progress = committed_progress(Storage(), str(tmp_path))
    assert (progress.epoch, progress.step_in_epoch) == (1, 2)
    state.write_text(json.dumps({"step": 4, "epoch": 1, "step_in_epoch": 2}))  # the old layout
    with pytest.raises(ConfigError, match="checkpoint of an older mmrad"):
        committed_progress(Storage(), str(tmp_path))
