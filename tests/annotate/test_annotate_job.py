"""The annotation job: selection, the new manifest and its side files (fast), then end to
end with the tiny model as teacher, and an SFT run on the new manifest (integration).
A Serve deployment as teacher is tested in tests/serve/test_endpoint_as_target.py."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pyarrow.parquet as pq
import pytest

from mmrad.annotate.config import AnnotateJobConfig
from mmrad.annotate.job import (
    ACCEPTANCE_NAME,
    REJECTED_NAME,
    AnnotateError,
    check_counts,
    judge_image,
    select_records,
    write_annotation,
)
from mmrad.config import ConfigError, load_config
from mmrad.data.manifest import read_manifest
from mmrad.eval.consistency import REASONS
from mmrad.storage import Storage
from mmrad.task.answer import GENERIC_REASONING, format_answer, parse_answer

CONFIG = "configs/local/annotate.yaml"
TEACHER_REASONING = (
    "Compared with the reference, the query shows a thin bright line in the upper part "
    "that the normal sample does not have: a scratch."
)


def record(rid, *, split="train", category="brick", anomalous=True, reasoning=None):
    boxes = [[10.0, 10.0, 40.0, 30.0]] if anomalous else []
    return {
        "id": rid, "source": "synthetic", "category": category, "split": split,
        "image_uri": f"/data/{rid}.png", "reference_uri": "/data/ref.png", "width": 112,
        "height": 112, "is_anomalous": anomalous, "boxes": boxes,
        "labels": ["scratch"] * len(boxes), "defect_type": "scratch" if anomalous else "good",
        "reasoning": reasoning,
    }  # fmt: skip


def good_answer(rec) -> str:
    return format_answer(rec["is_anomalous"], rec["boxes"], rec["labels"], TEACHER_REASONING)


def judged(rec, texts, n=2, error=None):
    verdicts = [parse_answer(t) for t in texts]  # 112 px images are their own grid
    return judge_image(rec, texts, verdicts, error, n, 0.5)


def job(*overrides) -> AnnotateJobConfig:
    return load_config(AnnotateJobConfig, CONFIG, list(overrides))


# -- fast: selection, judging, the new manifest -----------------------------------------


def test_selection_by_mode_split_category_and_limit():
    records = [
        record("c", reasoning="old"), record("a"), record("b", split="test"),
        record("d", category="grass"), record("e", split="val"),
    ]  # fmt: skip
    ids = lambda *o: [r["id"] for r in select_records(records, job(*o))]  # noqa: E731
    assert ids("mode=fill_missing") == ["a", "d", "e"]  # train/val, no reasoning, by id
    assert ids("mode=replace") == ["a", "c", "d", "e"]
    assert ids("mode=replace", "select.categories=[grass]") == ["d"]
    # a trial takes categories round-robin, each one's first ids first
    assert ids("mode=replace", "select.splits=[train, val, test]", "select.max_images=2") == [
        "a",
        "d",
    ]


def test_config_refuses_to_overwrite_the_input_to_skip_reasoning_and_cell_boxes(tmp_path):
    with pytest.raises(ConfigError, match="never modified"):
        job(f"input={tmp_path}/set", f"output={tmp_path}/set/manifest.parquet")
    with pytest.raises(ConfigError, match="reasoning"):
        job("prompt.reasoning=false")
    with pytest.raises(ConfigError, match="prompt.box_units: annotation gives the teacher"):
        job("prompt.box_units=cells")
    with pytest.raises(ConfigError, match="not allowed for kind 'endpoint'"):
        job("teacher.kind=endpoint")


def test_bad_jobs_fail_before_ray_starts(tmp_path, monkeypatch):
    from mmrad.annotate.job import run_annotate
    from mmrad.data.manifest import write_manifest
    from mmrad.eval.endpoint import EndpointConfigError

    source = write_manifest(Storage(), [record("a", reasoning="done")], str(tmp_path / "in"))
    common = [f"input={source}", f"output={tmp_path}/out", f"run.storage_path={tmp_path}/runs"]
    with pytest.raises(AnnotateError, match="no record to annotate"):
        run_annotate(job(*common, "mode=fill_missing"))
    monkeypatch.delenv("MMRAD_TEST_UNSET_KEY", raising=False)
    teacher = {"kind": "endpoint", "url": "http://127.0.0.1:9/v1", "model": "m",
               "api_key_env": "MMRAD_TEST_UNSET_KEY"}  # fmt: skip
    with pytest.raises(EndpointConfigError, match="MMRAD_TEST_UNSET_KEY"):
        run_annotate(job(*common, "mode=replace", f"teacher={json.dumps(teacher)}"))
    assert not (tmp_path / "runs").exists() and not (tmp_path / "out").exists()


def test_every_sample_gets_one_outcome_and_missing_ones_are_errors():
    rec = record("a")
    image = judged(rec, [good_answer(rec)], n=3)  # the teacher returned 1 of 3
    assert [j.outcome for j in image.judgements] == ["accepted", "error", "error"]
    assert image.best.sample == 0
    failed = judged(rec, [], n=2, error="HTTP 500 after 5 retries")
    outcomes = [(j.outcome, j.detail) for j in failed.judgements]
    assert outcomes == [("error", "HTTP 500 after 5 retries")] * 2
    assert failed.best is None


def test_counts_that_do_not_add_up_are_refused():
    counts = {"samples": 4, "accepted": 1, "rejected": dict.fromkeys(REASONS, 0) | {"error": 2}}
    with pytest.raises(AnnotateError, match="1 accepted \\+ 2 rejected = 3"):
        check_counts(counts, 4, "m.parquet")


@pytest.mark.parametrize("on_rejected", ["drop", "keep"])
def test_new_manifest_and_side_files(tmp_path, on_rejected):
    """Accepted images get the teacher's reasoning, rejected ones are dropped or kept
    without reasoning, records not sent to the teacher are unchanged."""
    storage = Storage()
    records = [record("a"), record("b", anomalous=False), record("c", reasoning="kept as is")]
    a, b = records[0], records[1]
    images = [
        judged(a, ["garbage", good_answer(a)]),
        judged(b, [good_answer(a), "<think>x</think><answer>No.</answer>"[:20]]),
    ]
    uri, summary = write_annotation(
        storage, str(tmp_path / "out"), records, images, on_rejected=on_rejected
    )
    written = {r["id"]: r for r in read_manifest(storage, uri)}
    assert written["a"]["reasoning"] == TEACHER_REASONING
    assert written["c"] == records[2]  # untouched
    if on_rejected == "drop":
        assert set(written) == {"a", "c"}
    else:
        assert set(written) == {"a", "b", "c"} and written["b"]["reasoning"] is None
    rejected = pq.read_table(tmp_path / "out" / REJECTED_NAME).to_pylist()
    assert [(r["id"], r["sample"], r["reason"]) for r in rejected] == [
        ("a", 0, "bad_format"), ("b", 0, "wrong_decision"), ("b", 1, "bad_format"),
    ]  # fmt: skip
    assert rejected[0]["completion"] == "garbage"
    on_disk = json.loads((tmp_path / "out" / ACCEPTANCE_NAME).read_text())
    assert on_disk == summary
    assert (summary["samples"], summary["accepted"], summary["images_accepted"]) == (4, 1, 1)
    assert summary["per_category"]["synthetic/brick"]["rejected"]["wrong_decision"] == 1
    assert summary["manifest"]["untouched"] == 1


def test_report_tables_and_figures(tmp_path):
    import numpy as np
    from PIL import Image

    from mmrad.annotate.report import write_annotate_report
    from mmrad.config import PixelBudget

    storage = Storage()
    records = []
    for rid, anomalous in (("a", True), ("b", False)):
        rec = record(rid, anomalous=anomalous)
        rec["image_uri"] = str(tmp_path / f"{rid}.png")
        Image.fromarray(np.full((112, 112, 3), 90, np.uint8)).save(rec["image_uri"])
        records.append(rec)
    a, b = records
    images = [judged(a, ["garbage", good_answer(a)]), judged(b, ["", ""], error="HTTP 503")]
    _, summary = write_annotation(
        storage, str(tmp_path / "out"), records, images, on_rejected="drop",
        extra={"n": 2, "iou_threshold": 0.5},
    )  # fmt: skip
    report = write_annotate_report(
        storage, str(tmp_path / "run"), images, summary, pixels=PixelBudget(), max_examples=6
    )
    text = Path(report).read_text()
    assert "each image 2 times" in text and "IoU >= 0.5" in text
    assert "| synthetic/brick | 2 | 50.0 | 4 | 25.0 | 2 | 1 | 0 | 0 | 0 | 0 |" in text
    assert "| bad_format | 1 | 25.0 |" in text and "| error | 2 | 50.0 |" in text
    for name in ("acceptance.png", "examples.png"):
        assert f"]({name})" in text
        assert (tmp_path / "run" / name).read_bytes()[:4] == b"\x89PNG"


# -- integration: the job end to end ------------------------------------------------------

TEST_RUN = (
    "ray.num_cpus=2", "sampling.n=2", "sampling.max_tokens=48", "sampling.temperature=1.0",
    "engine.max_model_len=2048", "engine.kv_cache_bytes=134217728", "predictors.batch_size=4",
    "prompt.pixels.max_pixels=12544", "mode=replace", "report.max_examples=8",
)  # fmt: skip


def sha256(path: str) -> str:
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def assert_counts_add_up(result, out_dir: Path, images: int, n: int) -> dict:
    """acceptance.json, rejected.parquet and the result agree, and accepted plus rejected
    per reason is every sample generated, overall and per category."""
    summary = json.loads((out_dir / ACCEPTANCE_NAME).read_text())
    rejected = pq.read_table(out_dir / REJECTED_NAME).to_pylist()
    assert summary["images"] == result.images == images
    assert summary["samples"] == result.samples == images * n
    for counts in (summary, *summary["per_category"].values()):
        assert counts["accepted"] + sum(counts["rejected"].values()) == counts["samples"]
        assert counts["samples"] == counts["images"] * n
    assert len(rejected) == sum(summary["rejected"].values())
    for reason in REASONS:
        assert sum(r["reason"] == reason for r in rejected) == summary["rejected"][reason]
    return summary


@pytest.fixture(scope="module")
def tiny_teacher_run(ray_cluster, tiny_model, synthetic_local, tmp_path_factory):
    from mmrad.annotate.job import run_annotate

    root = tmp_path_factory.mktemp("annotate-tiny")
    before = sha256(synthetic_local)
    annotate_job = job(
        f"input={synthetic_local}", f"output={root}/out", f"run.storage_path={root}/runs",
        "run.name=tiny", f"teacher.path={tiny_model}", "select.max_images=8", *TEST_RUN,
    )  # fmt: skip
    return run_annotate(annotate_job), root, before


@pytest.mark.integration
def test_tiny_teacher_end_to_end(tiny_teacher_run, synthetic_local):
    result, root, before = tiny_teacher_run
    summary = assert_counts_add_up(result, root / "out", images=8, n=2)
    # a random tiny model gets (almost) nothing accepted, and the report says why
    assert summary["sample_acceptance"] <= 0.25
    worst = max(REASONS, key=lambda reason: summary["rejected"][reason])
    assert summary["rejected"][worst] >= 8
    report = Path(result.report_uri).read_text()
    assert f"| {worst} | {summary['rejected'][worst]} |" in report
    assert "| **Overall** | 8 |" in report
    for name in ("acceptance.png", "examples.png"):
        assert (root / "runs" / "tiny" / name).read_bytes()[:4] == b"\x89PNG"
    assert {"config.yaml", "run_info.json"} <= {p.name for p in (root / "runs" / "tiny").iterdir()}
    # the original is untouched; the new manifest is the input minus dropped images,
    # loads anywhere (absolute image URIs) and keeps everything not annotated as it was
    assert sha256(synthetic_local) == before
    storage = Storage()
    original = {r["id"]: r for r in read_manifest(storage, synthetic_local)}
    written = {r["id"]: r for r in read_manifest(storage, result.manifest_uri)}
    selection = select_records(list(original.values()), job(*TEST_RUN, "select.max_images=8"))
    judged_ids = [r["id"] for r in selection]
    assert len({r["category"] for r in selection}) == 4  # round-robin: every train/val one
    dropped = set(judged_ids) - set(written)
    assert len(dropped) == 8 - summary["images_accepted"]
    assert set(written) == set(original) - dropped
    assert all(written[i] == original[i] for i in written if i not in judged_ids)
    raw = pq.read_table(result.manifest_uri).column("image_uri").to_pylist()
    assert all(Path(uri).is_absolute() and Path(uri).exists() for uri in raw)
    rejected = pq.read_table(root / "out" / REJECTED_NAME).to_pylist()
    assert {r["id"] for r in rejected} <= set(judged_ids)
    assert all(r["completion"] for r in rejected if r["reason"] != "error")


@pytest.mark.integration
def test_annotated_manifest_trains_with_sft_unchanged(
    ray_cluster, tiny_model, synthetic_local, tmp_path
):
    """The job's writer on a small set, with one hand-made accepted teacher answer and the
    rest rejected (kept without reasoning), then the stock SFT job (its local config, one
    worker to save time) on the new manifest, allowed records without reasoning: it trains
    every record and counts those without reasoning in run_info.json, and the annotated
    one's target is the teacher's reasoning, the others' the generic one."""
    from transformers import AutoProcessor

    from mmrad.model.collate import SFTCollator
    from mmrad.sft.job import run_sft
    from mmrad.task.geometry import grid_scale, model_grid, to_model_grid
    from mmrad.task.prompt import PromptVariant
    from mmrad.train.metrics_log import read_metrics
    from tests.sft.helpers import sft_config

    storage = Storage()
    everything = read_manifest(storage, synthetic_local)
    train = [r for r in everything if r["split"] == "train"]
    anomalous = [r for r in train if r["is_anomalous"]]
    normal = [r for r in train if not r["is_anomalous"]]
    val = [r for r in everything if r["split"] == "val"]
    records = [anomalous[0], *normal[:3], *anomalous[1:5], *val[:2]]
    annotated = records[0]
    size = (annotated["width"], annotated["height"])
    grid = model_grid(size, max_pixels=12544)
    boxes = to_model_grid(annotated["boxes"], size, grid)
    teacher_text = format_answer(True, boxes, annotated["labels"], TEACHER_REASONING)
    verdicts = [parse_answer("no idea"), parse_answer(teacher_text, scale=grid_scale(size, grid))]
    images = [judge_image(annotated, ["no idea", teacher_text], verdicts, None, 2, 0.5)]
    images += [judged(r, ["<think>hm</think><answer>maybe</answer>"] * 2) for r in records[1:]]
    assert [image.best is not None for image in images] == [True] + [False] * 9
    out = str(tmp_path / "annotated")
    uri, summary = write_annotation(storage, out, records, images, on_rejected="keep")
    assert summary["manifest"]["annotated"] == 1
    assert summary["manifest"]["kept_without_reasoning"] == 9

    steps = ("schedule.max_steps=2", "schedule.checkpoint_every=2", "learners.num_workers=1",
             "data.require_reasoning=false")  # fmt: skip
    result = run_sft(sft_config(tiny_model, uri, str(tmp_path / "sft"), "annotated", *steps))
    run_info = json.loads((Path(result.run_uri) / "run_info.json").read_text())
    assert run_info["records_without_reasoning"] == {"train": 7, "val": 2}
    losses = [m["train/loss"] for m in read_metrics(storage, result.run_uri) if "train/loss" in m]
    assert len(losses) == 2 and all(0 < loss < 100 for loss in losses)
    state = json.loads((Path(result.run_uri) / "checkpoint_000002/trainer_state.json").read_text())
    assert set(state["extra"]["trained_ids"]) == {r["id"] for r in records if r["split"] == "train"}
    # what the SFT collator (the worker's own target builder) trains on for each record
    collator = SFTCollator(AutoProcessor.from_pretrained(tiny_model), PromptVariant())
    rows = {r["id"]: r for r in read_manifest(storage, uri)}
    grid_size = {"grid_width": grid[0], "grid_height": grid[1]}
    assert collator.target({**rows[annotated["id"]], **grid_size}) == teacher_text
    assert GENERIC_REASONING[False] in collator.target({**rows[records[1]["id"]], **grid_size})
