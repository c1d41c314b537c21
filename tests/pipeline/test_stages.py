"""Pipeline stages are skipped only when the hash of their resolved config and inputs
matches what was recorded with their output; a changed config runs in a new folder."""

from __future__ import annotations

from pathlib import Path

import pytest

from mmrad.config import PipelineConfig, PromptConfig, load_config
from mmrad.data.build import build_dataset
from mmrad.data.schema import ManifestError
from mmrad.pipeline import Ledger, check_splits_read, drop_stale_latest, plan, run_pipeline
from mmrad.storage import Storage

SMALL_DATA = [
    "data.synthetic.categories=[brick, coins]",
    "data.synthetic.images_per_category=4",
    "data.synthetic.image_size=64",
    "data.split.test_categories=[coins]",
]


WITH_VAL = [*SMALL_DATA, "data.split.val_fraction=0.5"]  # 4 images at 0.15 give no val
NO_TEST_SPLIT = f"data.overrides={[*WITH_VAL, 'data.split.test_categories=[]']}"
EMPTY_TEST_SPLIT = (
    r"pipeline stage eval_base reads split 'test' \(data.split\), but the data stage's"
)


def pipeline_config(root: Path, *overrides: str) -> PipelineConfig:
    return load_config(
        PipelineConfig,
        None,
        [
            f"run.storage_path={root}",
            "run.name=p",
            "ray.num_cpus=1",
            "data.config=configs/local/data.yaml",
            f"data.overrides={SMALL_DATA}",
            "sft.enabled=false",
            "grpo.enabled=false",
            "eval.enabled=false",
            "serve.enabled=false",
            *overrides,
        ],
    )


def test_plan_wires_outputs_and_names_folders_by_hash(tmp_path):
    config = pipeline_config(tmp_path, "sft.enabled=true", "sft.config=configs/local/sft.yaml")
    stages = {s.name: s for s in plan(config, str(tmp_path / "p"))}
    assert list(stages) == ["tiny_model", "data", "sft"]
    sft = stages["sft"]
    assert sft.job.data.manifest == stages["data"].outputs["manifest"]
    assert sft.job.model.path == stages["tiny_model"].outputs["model"]
    assert sft.folder.endswith(f"sft-{sft.hash[:10]}")
    assert sft.job.export.out.startswith(sft.folder)


def test_where_a_stage_is_tracked_is_not_part_of_its_hash(tmp_path):
    """Adding W&B (or another MLflow server) to a pipeline reruns no stage; a setting
    that changes what a stage computes does."""

    def hashes(*overrides: str) -> dict[str, str]:
        config = pipeline_config(tmp_path, "sft.enabled=true", *overrides)
        return {stage.name: stage.hash for stage in plan(config, str(tmp_path))}

    base = hashes()
    tracked = "sft.overrides=['run.loggers=[mlflow, wandb]', run.mlflow.tracking_uri=http://m:80]"
    assert hashes(tracked) == base
    assert hashes("sft.overrides=[schedule.seed=3]")["sft"] != base["sft"]


def test_links_to_another_runs_folders_are_dropped_before_a_run(tmp_path):
    """So that latest/ never mixes two runs: a stage whose folder changed has no link
    until it finishes again."""
    stages = {s.name: s for s in plan(pipeline_config(tmp_path), str(tmp_path / "p"))}
    latest = tmp_path / "latest"
    latest.mkdir()
    for name, target in (("data", stages["data"].folder), ("tiny_model", tmp_path / "old"),
                         ("sft", tmp_path / "sft-old")):  # fmt: skip
        Path(target).mkdir(parents=True, exist_ok=True)
        (latest / name).symlink_to(target)
    drop_stale_latest(str(tmp_path), list(stages.values()))
    assert [p.name for p in latest.iterdir()] == ["data"]


def test_a_run_named_like_the_links_folder_is_refused(tmp_path):
    with pytest.raises(ValueError, match="'latest' names the folder of links"):
        pipeline_config(tmp_path, "run.name=latest")


def test_bad_stage_config_fails_before_anything_runs(tmp_path):
    config = pipeline_config(tmp_path, "data.overrides=[data.synthetic.image_sise=64]")
    with pytest.raises(ValueError, match=r"configs/local/data.yaml(.|\n)*image_sise"):
        plan(config, str(tmp_path / "p"))
    assert not (tmp_path / "p").exists()


def test_every_stage_lists_the_splits_it_reads_and_an_empty_one_is_refused(tmp_path):
    """The check the pipeline makes right after the data stage, before any training."""

    def stages_and_manifest(*overrides: str):
        config = load_config(PipelineConfig, "configs/local/pipeline.yaml",
                             [f"run.storage_path={tmp_path}", *overrides])  # fmt: skip
        stages = plan(config, str(tmp_path / config.run.name))
        data = next(s for s in stages if s.name == "data")
        build_dataset(data.job.data, Storage(), progress=False)
        return stages, data.outputs["manifest"]

    validating = "grpo.overrides=[validation.every=3, validation.split=test]"
    stages, manifest = stages_and_manifest(f"data.overrides={WITH_VAL}", validating)
    assert {s.name: [split for split, _ in s.reads] for s in stages} == {
        "tiny_model": [], "data": [], "sft": ["train", "val"], "grpo": ["train", "test"],
        "eval_base": ["test"], "eval_sft": ["test"], "eval": ["test"], "serve": ["test"],
    }  # fmt: skip
    assert stages[3].reads == (("train", "data.split"), ("test", "validation.split"))
    check_splits_read(stages, manifest, Storage())  # every split has records

    stages, manifest = stages_and_manifest(NO_TEST_SPLIT, "run.name=no-test")
    with pytest.raises(ManifestError, match=EMPTY_TEST_SPLIT) as err:
        check_splits_read(stages, manifest, Storage())
    assert f"manifest {manifest} has none (train " in str(err.value)
    assert "data.split.test_categories, data.split.test_sources" in str(err.value)


@pytest.mark.integration
def test_rerun_skips_done_stages_and_a_changed_config_reruns_in_a_new_folder(tmp_path, ray_cluster):
    first = run_pipeline(pipeline_config(tmp_path))
    assert first.stages == {"tiny_model": "ran", "data": "ran"}
    manifest = Path(first.outputs["data"]["manifest"])
    written = manifest.stat().st_mtime_ns

    again = run_pipeline(pipeline_config(tmp_path))
    assert again.stages == {"tiny_model": "skipped", "data": "skipped"}
    assert manifest.stat().st_mtime_ns == written

    latest = tmp_path / "latest"
    assert (latest / "data/manifest.parquet").samefile(manifest)
    assert (latest / "tiny_model/config.json").is_file()
    assert not (latest / "data").readlink().is_absolute()  # runs/ can move

    reseeded = f"data.overrides={[*SMALL_DATA, 'data.seed=5']}"
    changed = run_pipeline(pipeline_config(tmp_path, reseeded))
    assert changed.stages == {"tiny_model": "skipped", "data": "ran"}
    assert changed.outputs["data"]["manifest"] != str(manifest)
    assert manifest.exists(), "the earlier output is kept"
    assert (latest / "data/manifest.parquet").samefile(changed.outputs["data"]["manifest"])
    assert sorted(p.name for p in latest.iterdir()) == ["data", "tiny_model"]

    # A recorded stage whose output is gone runs again.
    Path(changed.outputs["data"]["manifest"]).unlink()
    assert (
        Ledger(Storage(), first.run_uri).read("data").folder in changed.outputs["data"]["manifest"]
    )
    rerun = run_pipeline(pipeline_config(tmp_path, reseeded))
    assert rerun.stages == {"tiny_model": "skipped", "data": "ran"}
    assert Path(changed.outputs["data"]["manifest"]).exists()

    # A split a later stage reads is empty: refused right after the data stage.
    training = ("sft.enabled=true", "eval.enabled=true", NO_TEST_SPLIT)
    with pytest.raises(ManifestError, match=EMPTY_TEST_SPLIT) as err:
        run_pipeline(pipeline_config(tmp_path, *training))
    ledger = Ledger(Storage(), first.run_uri)
    assert ledger.read("data").outputs["manifest"] in str(err.value)  # built, then checked
    assert ledger.read("sft") is None and not list(tmp_path.glob("p/sft-*"))


def test_rl_without_sft_starts_from_the_base_model_and_sft_only_evaluates_its_export(tmp_path):
    def stages_of(*overrides: str) -> dict:
        config = load_config(PipelineConfig, "configs/local/pipeline.yaml",
                             [f"run.storage_path={tmp_path}", *overrides])  # fmt: skip
        return {s.name: s for s in plan(config, str(tmp_path / config.run.name))}

    rl_only = stages_of("sft.enabled=false")
    tiny = rl_only["tiny_model"].outputs["model"]
    assert "sft" not in rl_only and rl_only["grpo"].job.model.path == tiny
    assert rl_only["eval_base"].job.target.path == tiny
    assert "eval_sft" not in rl_only  # nothing between the base and the final model
    assert rl_only["eval"].job.target.path == rl_only["grpo"].outputs["export"]

    sft_only = stages_of("grpo.enabled=false", "eval.baselines=[sft]")
    assert [n for n in sft_only if n.startswith("eval")] == ["eval"]
    assert sft_only["eval"].job.target.path == sft_only["sft"].outputs["export"]
    assert (
        sft_only["serve"].job.serve_config["applications"][0]["args"]["model_dir"]
        == (sft_only["sft"].outputs["export"])
    )


def test_an_evaluation_override_applies_to_every_row_the_base_included(tmp_path):
    config = load_config(PipelineConfig, "configs/local/pipeline.yaml",
                         [f"run.storage_path={tmp_path}",
                          "eval.overrides=[prompt.reasoning=false]"])  # fmt: skip
    stages = {s.name: s.job for s in plan(config, str(tmp_path / "p"))}
    assert [stages[n].prompt.reasoning for n in ("eval_base", "eval_sft", "eval")] == [False] * 3
    assert stages["eval_base"].prompt.pixels == stages["sft"].model.pixels  # the rest as SFT
    assert stages["eval_sft"].prompt.pixels is None  # the export's


def test_cluster_pipeline_plans_every_stage_from_the_cluster_configs():
    config = load_config(PipelineConfig, "configs/cluster/pipeline.yaml")
    stages = {s.name: s for s in plan(config, "s3://my-mmrad-bucket/pipeline/qwen7b-mmrad")}
    assert list(stages) == ["data", "sft", "grpo", "eval_base", "eval_sft", "eval", "serve"]
    assert stages["sft"].job.model.path == "Qwen/Qwen2.5-VL-7B-Instruct"
    assert stages["grpo"].job.model.path == stages["sft"].outputs["export"]
    assert stages["eval"].job.target.path == stages["grpo"].outputs["export"]
    assert stages["eval_sft"].job.target.path == stages["sft"].outputs["export"]
    base = stages["eval_base"].job
    assert base.target.path == "Qwen/Qwen2.5-VL-7B-Instruct"
    sft = stages["sft"].job  # the base model is prompted as SFT trains it
    assert base.prompt.pixels == sft.model.pixels
    for key in PromptConfig.VARIANT_KEYS:
        assert getattr(base.prompt, key) == getattr(sft.prompt, key), key
    for name in ("eval_base", "eval_sft", "eval"):  # one test split for every row
        assert stages[name].job.data == stages["eval"].job.data
    assert all(s.folder.startswith("s3://my-mmrad-bucket/") for s in stages.values())


def test_learning_pipeline_prompts_every_row_as_its_sft_trains(tmp_path):
    """The learning recipe's SFT answers in cells, tersely, without reasoning: the base
    model's row is asked the same, GRPO starts from SFT's export and every row reads the
    recipe's test split."""
    config = load_config(PipelineConfig, "configs/local/learning/pipeline.yaml",
                         [f"run.storage_path={tmp_path}"])  # fmt: skip
    stages = {s.name: s for s in plan(config, str(tmp_path / "learning"))}
    assert list(stages) == ["tiny_model", "data", "sft", "grpo", "eval_base", "eval_sft",
                            "eval", "serve"]  # fmt: skip
    sft, base = stages["sft"].job, stages["eval_base"].job
    assert (sft.prompt.box_units, sft.prompt.wording, sft.prompt.reasoning) == (
        "cells", "terse", False)  # fmt: skip
    for key in PromptConfig.VARIANT_KEYS:
        assert getattr(base.prompt, key) == getattr(sft.prompt, key), key
    assert stages["grpo"].job.model.path == stages["sft"].outputs["export"]
    assert {stages[n].job.data.limit for n in ("eval_base", "eval_sft", "eval")} == {192}


def test_a_data_stage_killed_before_its_record_keeps_its_data_set(tmp_path):
    """The data stage's folder is named by its config's hash: a manifest there (a run
    killed after the build, before recording the stage) is that data set, kept as it is;
    the build itself refuses to write over a manifest."""
    from mmrad.data.build import DataBuildError

    config = load_config(PipelineConfig, "configs/local/pipeline.yaml",
                         [f"run.storage_path={tmp_path}"])  # fmt: skip
    data = next(s for s in plan(config, str(tmp_path / config.run.name)) if s.name == "data")
    build_dataset(data.job.data, Storage(), progress=False)
    manifest = Path(data.outputs["manifest"])
    built = manifest.stat().st_mtime_ns
    data.work(data.job, Storage())  # the rerun's data stage
    assert manifest.stat().st_mtime_ns == built
    with pytest.raises(DataBuildError, match="already holds a data set"):
        build_dataset(data.job.data, Storage(), progress=False)
