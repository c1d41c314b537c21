"""What SFT refuses in its manifest before Ray starts: records without reasoning (unless
``data.require_reasoning`` is false) and an empty train or val split."""

from __future__ import annotations

import logging

import pytest

from mmrad.data.manifest import write_manifest
from mmrad.data.schema import ManifestError
from mmrad.model.export import ExportError
from mmrad.model.loading import check_model_dir
from mmrad.sft import job as sft_job
from mmrad.sft.job import check_reasoning, run_sft
from mmrad.storage import Storage
from tests.helpers.manifests import normal_record as record
from tests.sft.helpers import sft_config

PARTIAL = [
    record("t1", "train", "The surface is even."),
    record("t2", "train", None),
    record("t3", "train", "  "),
    record("v1", "val", None),
    record("v2", "val", "Nothing stands out."),
    record("x1", "test", None),  # SFT does not read the test split
]


@pytest.fixture
def no_ray(monkeypatch):
    """Starting Ray (or tracking) fails the test: the checks must come first."""

    def started(*args, **kwargs):
        raise AssertionError("Ray started before the manifest was checked")

    monkeypatch.setattr(sft_job, "init_ray", started)
    monkeypatch.setattr(sft_job, "check_tracking", started)


def sft_on(tmp_path, records: list[dict], *overrides: str):
    manifest = write_manifest(Storage(), records, str(tmp_path / "data"))
    return sft_config("unused-model", manifest, str(tmp_path / "runs"), "r", *overrides)


def test_records_without_reasoning_are_refused_before_ray_starts(tmp_path, no_ray):
    job = sft_on(tmp_path, PARTIAL)
    with pytest.raises(ManifestError) as err:
        run_sft(job)
    message = str(err.value)
    assert f"data.manifest {job.data.manifest}: records without reasoning" in message
    assert "train 2 (t2, t3), val 1 (v1);" in message
    assert "mmrad annotate" in message and "data.require_reasoning=false" in message
    assert not (tmp_path / "runs").exists()


def test_allowed_records_without_reasoning_are_counted_and_logged(tmp_path, caplog):
    job = sft_on(tmp_path, PARTIAL, "data.require_reasoning=false")
    splits = sft_job.sft_splits(job, Storage())
    with caplog.at_level(logging.WARNING, logger="mmrad.sft.job"):
        info = check_reasoning(job, splits)
    assert info == {"records_without_reasoning": {"train": 2, "val": 1}}
    assert "train 2 (t2, t3), val 1 (v1)" in caplog.text


def test_without_a_think_block_reasoning_is_not_needed(tmp_path):
    job = sft_on(tmp_path, PARTIAL, "prompt.reasoning=false")
    assert check_reasoning(job, sft_job.sft_splits(job, Storage())) == {}


def test_many_missing_ids_are_cut_short(tmp_path):
    records = [record(f"t{i:02d}", "train", None) for i in range(8)] + PARTIAL[4:5]
    job = sft_on(tmp_path, records)
    with pytest.raises(ManifestError, match=r"train 8 \(t00, t01, t02, t03, t04, \.\.\.\);"):
        check_reasoning(job, sft_job.sft_splits(job, Storage()))


@pytest.mark.parametrize(
    ("split", "purpose"), [("val", "SFT's validation loss"), ("train", "SFT trains on it")]
)
def test_an_empty_train_or_val_split_is_refused_before_ray_starts(tmp_path, no_ray, split, purpose):
    kept = [r for r in PARTIAL if r["split"] != split and r["reasoning"]]
    job = sft_on(tmp_path, kept)
    with pytest.raises(ManifestError) as err:
        run_sft(job)
    assert str(err.value) == (
        f"data.manifest {job.data.manifest}: no records in split {split!r} ({purpose})"
    )


def test_a_missing_model_directory_is_refused_before_ray_starts(tmp_path, no_ray, monkeypatch):
    """On the driver, at once: not as a worker's error after the learners started (when
    mmrad starts Ray here; a cluster's workers may have paths its driver lacks)."""
    monkeypatch.delenv("RAY_ADDRESS", raising=False)
    good = [r for r in PARTIAL if (r["reasoning"] or "").strip() and r["split"] != "test"]
    job = sft_on(tmp_path, good, f"model.path={tmp_path / 'no-model'}")
    with pytest.raises(ExportError, match=r"model path .*no-model: no such directory"):
        run_sft(job)
    (tmp_path / "a-file").write_text("")
    with pytest.raises(ExportError, match="a-file: not a directory"):
        run_sft(sft_on(tmp_path, good, f"model.path={tmp_path / 'a-file'}"))
    check_model_dir("Qwen/Qwen2.5-VL-7B-Instruct")  # hub ids are opened where they are used


def test_validation_scores_a_fixed_spread_of_every_val_category():
    """The first ids of a val split of whole categories would all be one category's."""
    val = [{**record(f"synthetic/{category}/{i:03d}", "val"), "category": category}
           for category in ("gravel", "tissue") for i in range(48)]  # fmt: skip
    chosen = sft_job.validation_rows(val, 16)
    assert len(chosen) == 16 and {r["category"] for r in chosen} == {"gravel", "tissue"}
    assert chosen == sft_job.validation_rows(list(reversed(val)), 16)
    assert len(sft_job.validation_rows(val, 500)) == 96
