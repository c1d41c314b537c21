"""Fast parts of the evaluation job: configs, prompt resolution, record selection,
unlabelled manifests, the predictions table, the comparison table."""

from __future__ import annotations

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from mmrad.config import ConfigError, load_config
from mmrad.data.schema import ManifestError
from mmrad.eval.compare import compare_table
from mmrad.eval.config import EvalDataConfig, EvalJobConfig, ModelTarget
from mmrad.eval.inference import answer_scale_of, resolve_adapter, verdicts_of
from mmrad.eval.job import predictions_table, read_eval_records, select_split
from mmrad.storage import Storage
from mmrad.task.answer import Verdict


@pytest.mark.parametrize("path", ["configs/local/eval.yaml", "configs/cluster/eval.yaml"])
def test_shipped_eval_configs_validate(path):
    job = load_config(EvalJobConfig, path)
    assert isinstance(job.target, ModelTarget)
    with pytest.raises(ConfigError, match="predictors.num_actor"):
        load_config(EvalJobConfig, path, ["predictors.num_actor=2"])  # did you mean


def test_adapter_resolution():
    target = ModelTarget(path="s3://b/export")
    assert resolve_adapter(target, {"lora": "adapter", "adapter_dir": "adapter"}) == (
        "s3://b/export/adapter"
    )
    assert resolve_adapter(target, {"lora": "merged", "adapter_dir": None}) is None
    assert (
        resolve_adapter(target.model_copy(update={"adapter": "none"}), {"lora": "adapter"}) is None
    )
    assert resolve_adapter(target.model_copy(update={"adapter": "/a"}), None) == "/a"


def test_select_split_and_limit():
    def select(records, split, limit):
        return select_split(records, EvalDataConfig(manifest="m", split=split, limit=limit))

    records = [{"id": f"r{i:02d}", "split": "test" if i % 3 else "val"} for i in range(30)]
    test = select(records, "test", None)
    assert [r["id"] for r in test] == sorted(r["id"] for r in records if r["split"] == "test")
    some = select(records, "test", 5)
    assert len(some) == 5 and [r["id"] for r in some] == sorted(r["id"] for r in some)
    assert some == select(list(reversed(records)), "test", 5)  # fixed subset
    assert some != test[:5]  # spread by hash, not the first ids
    assert len(select(records, "all", None)) == 30
    unlabelled = [{"id": "a", "split": None}, {"id": "b", "split": None}]
    assert len(select(unlabelled, "test", None)) == 2
    with pytest.raises(ManifestError, match=r"data.manifest m: no records in split 'test' "
                       r"\(data.split\)"):  # fmt: skip
        select([r for r in records if r["split"] == "val"], "test", None)


def test_unlabelled_manifest(tmp_path):
    rows = [{"id": "x1", "image_uri": "images/x1.png", "width": 10, "height": 8}]
    pq.write_table(pa.Table.from_pylist(rows), tmp_path / "manifest.parquet")
    records, labelled = read_eval_records(Storage(), str(tmp_path))
    assert not labelled
    assert records[0]["image_uri"] == f"{tmp_path}/images/x1.png"
    assert records[0]["reference_uri"] is None and "is_anomalous" not in records[0]

    pq.write_table(pa.Table.from_pylist([{"id": "x1", "width": 1}]), tmp_path / "bad.parquet")
    with pytest.raises(ManifestError, match="bad.parquet: missing columns image_uri, height"):
        read_eval_records(Storage(), str(tmp_path / "bad.parquet"))


def test_verdicts_and_predictions_table():
    row = {"id": "a", "source": "s", "category": "c", "split": "test", "width": 200,
           "height": 100, "grid_width": 112, "grid_height": 56,
           "completions": ["<think>r</think><answer>Yes. {'bbox_2d': [56, 28, 112, 56], "
                           "'label': 'dent'}</answer>", "<answer>No.</answer>"],
           "scores": [0.9, None], "finish_reasons": ["stop", "length"], "latency_ms": 12.0,
           "error": None}  # fmt: skip
    assert answer_scale_of(row) == (200 / 112, 100 / 56)
    first, second = verdicts_of(row)
    assert first.decision is True and first.boxes == [[100.0, 50.0, 200.0, 100.0]]
    assert first.score == 0.9 and first.format_ok and not second.format_ok  # no think block
    # the same row from a model that answers in cells of 28 grid pixels
    answer = "<think>r</think><answer>Yes. {'bbox_2d': [1, 0, 2, 1], 'label': 'dent'}</answer>"
    in_cells = {**row, "completions": [answer], "scores": [0.9]}
    [cells] = verdicts_of(in_cells, answer_unit=28)
    assert cells.boxes == [[50.0, 0.0, 100.0, 50.0]]
    failed = {**row, "completions": [], "scores": [], "finish_reasons": [], "error": "boom"}
    table = predictions_table([row, failed], [first, Verdict(decision=None)]).to_pylist()
    assert table[0]["completion"] == row["completions"][0] and table[0]["scores"] == [0.9, None]
    assert table[0]["boxes"] == [[100.0, 50.0, 200.0, 100.0]] and table[0]["labels"] == ["dent"]
    assert table[1]["error"] == "boom" and table[1]["completion"] is None
    assert table[1]["decision"] is None and table[1]["format_ok"] is None


def test_compare_table():
    part = {"n_images": 4, "auroc": 0.75, "det_accuracy": 0.5, "det_precision": None,
            "det_recall": 1.0, "det_f1": 0.5, "loc_accuracy": 0.25, "loc_precision": 0.5,
            "loc_recall": 0.5, "loc_f1": 0.5}  # fmt: skip
    metrics = {**part, "per_source": {"mvtec": part}, "unseen": part,
               "extra": {"samples_per_s": 2.5}}  # fmt: skip
    by_source = {**part, "det_accuracy": 0.75}
    lines = compare_table([("a", metrics), ("b", {**part, "per_source": {}}),
                           ("c", {**part, "source_mean": by_source})]).splitlines()  # fmt: skip
    assert lines[2] == "| a | mvtec | 4 | 50.0/25.0 | –/50.0 | 100.0/50.0 | 50.0/50.0 | 75.0 |  |"
    assert lines[3].startswith("| a | unseen categories | 4 |")
    assert lines[4].endswith("| 75.0 | 2.5 |")
    assert lines[4].startswith("| a | **mean over categories** |")
    assert lines[5].startswith("| b | **mean over categories** | 4 |")
    assert lines[6].startswith("| c | **mean over sources** | 4 | 75.0/25.0 |")
    assert lines[7].startswith("| c | **mean over categories** | 4 | 50.0/25.0 |")
    assert len(lines) == 8
