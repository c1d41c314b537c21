"""What a GRPO run reads from its manifest: prompts of ``data.split`` and a fixed spread
of validation records; an empty split is refused naming the setting. No Ray."""

from __future__ import annotations

import pytest

from mmrad.config import load_config
from mmrad.data.manifest import spread_subset, write_manifest
from mmrad.data.schema import ManifestError
from mmrad.rl.config import GRPOJobConfig
from mmrad.rl.job import grpo_records
from mmrad.storage import Storage
from tests.helpers.manifests import normal_record

SPLITS = {"t2": "train", "t1": "train", "v3": "val", "v1": "val", "v2": "val"}
RECORDS = [normal_record(id, split) for id, split in SPLITS.items()]


def job_on(tmp_path, *overrides: str) -> GRPOJobConfig:
    manifest = write_manifest(Storage(), RECORDS, str(tmp_path / "data"))
    return load_config(GRPOJobConfig, None, [f"data.manifest={manifest}", *overrides])


def test_prompts_and_a_fixed_spread_of_validation_records(tmp_path):
    job = job_on(tmp_path, "validation.every=2", "validation.samples=2")
    records = grpo_records(job, Storage())
    assert [r["id"] for r in records.prompts] == ["t2", "t1"]
    validated = [r["id"] for r in records.validation]
    assert validated == [r["id"] for r in spread_subset(RECORDS[2:], 2)] == sorted(validated)
    assert len(validated) == 2 and set(validated) < {"v1", "v2", "v3"}
    assert {r["split"] for r in records.train} == {"train"}
    assert grpo_records(job_on(tmp_path), Storage()).validation == []  # validation off


@pytest.mark.parametrize(
    ("overrides", "refused"),
    [
        (["data.split=test"], "split 'test' (data.split)"),
        (["validation.every=2", "validation.split=test"], "split 'test' (validation.split)"),
    ],
)
def test_an_empty_split_is_refused_naming_the_setting(tmp_path, overrides, refused):
    job = job_on(tmp_path, *overrides)
    with pytest.raises(ManifestError) as err:
        grpo_records(job, Storage())
    assert str(err.value) == f"data.manifest {job.data.manifest}: no records in {refused}"


def test_a_sweep_refuses_an_empty_validation_split_before_ray_starts(tmp_path, monkeypatch):
    from mmrad.tune import job as tune_job
    from mmrad.tune.config import TuneJobConfig

    def started(*args, **kwargs):
        raise AssertionError("Ray started before the manifest was checked")

    monkeypatch.setattr(tune_job, "init_ray", started)
    monkeypatch.setattr(tune_job, "check_tracking", started)
    train_only = [r for r in RECORDS if r["split"] == "train"]
    manifest = write_manifest(Storage(), train_only, str(tmp_path / "data"))
    overrides = [f"grpo.overrides=[data.manifest={manifest}]", f"run.storage_path={tmp_path}"]
    sweep = load_config(TuneJobConfig, "configs/local/tune.yaml", overrides)
    with pytest.raises(ManifestError, match=r"no records in split 'val' \(validation.split\)"):
        tune_job.run_tune(sweep)
    assert not (tmp_path / sweep.run.name).exists()
