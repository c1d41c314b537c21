"""The evaluation report renders from a small set of records and predictions."""

import json

import numpy as np
import pytest
from PIL import Image

from mmrad.eval.report import headline_table, pick_examples, write_report
from mmrad.task.answer import Verdict

A, FAR = [20, 20, 60, 50], [150, 100, 190, 140]


def record(i, source, category, boxes=(), width=200, height=150):
    return {
        "id": f"{category}_{i:03d}",
        "source": source,
        "category": category,
        "split": "test",
        "image_uri": f"images/{category}_{i:03d}.png",
        "reference_uri": None,
        "width": width,
        "height": height,
        "is_anomalous": bool(boxes),
        "boxes": [list(b) for b in boxes],
        "labels": ["scratch"] * len(boxes),
        "defect_type": "scratch" if boxes else "good",
        "reasoning": None,
    }


def answer(decision, *boxes, score=None, reasoning="The surface looks uniform."):
    labels = ["scratch"] * len(boxes)
    return Verdict(decision, [list(map(float, b)) for b in boxes], labels, reasoning, True, score)


# bottle (mvtec, seen): all right; screw (mvtec, unseen): one false alarm;
# pcb1 (visa, unseen): one anomaly found, one missed
RECORDS = [
    record(1, "mvtec", "bottle", [A]),
    record(2, "mvtec", "bottle"),
    record(3, "mvtec", "screw"),
    record(4, "mvtec", "screw"),
    record(5, "visa", "pcb1", [A], width=400, height=300),
    record(6, "visa", "pcb1", [FAR], width=400, height=300),
    record(7, "visa", "pcb1", width=400, height=300),
]
LONG = "A thin bright line crosses the upper left of the cap, unlike the reference. " * 4
PREDICTIONS = [
    answer(True, A, score=0.9, reasoning=LONG),
    answer(False, score=0.2),
    answer(True, FAR, score=0.7, reasoning="Something odd near the thread."),
    answer(False, score=0.1),
    answer(True, A, score=0.8),
    answer(False, score=0.4, reasoning=None),
    answer(False, score=0.3),
]


def load_image(rec):
    """A grey gradient with a dark patch on each ground-truth box, at half size."""
    width, height = rec["width"], rec["height"]
    pixels = np.tile(np.linspace(90, 200, width, dtype=np.uint8), (height, 1))
    for x1, y1, x2, y2 in rec["boxes"]:
        pixels[int(y1) : int(y2), int(x1) : int(x2)] = 30
    return Image.fromarray(pixels).convert("RGB").resize((width // 2, height // 2))


@pytest.fixture(scope="module")
def report_dir(tmp_path_factory):
    out = tmp_path_factory.mktemp("report")
    write_report(
        out,
        PREDICTIONS,
        RECORDS,
        seen_categories={"mvtec/bottle"},
        load_image=load_image,
        title="Tiny evaluation",
        extra={"samples_per_s": 12.5},
        max_examples=5,
    )
    return out


def test_writes_every_file_and_no_temporary_ones(report_dir):
    names = sorted(p.name for p in report_dir.iterdir())
    assert names == ["examples.png", "metrics.json", "per_category.png", "report.md", "roc.png"]
    for name in ("examples.png", "per_category.png", "roc.png"):
        with Image.open(report_dir / name) as image:
            assert image.format == "PNG" and min(image.size) > 200


def test_metrics_json(report_dir):
    metrics = json.loads((report_dir / "metrics.json").read_text())
    assert metrics["n_images"] == 7
    assert metrics["per_category"]["mvtec/screw"]["det_accuracy"] == 0.5
    assert metrics["per_category"]["mvtec/screw"]["det_recall"] is None  # JSON null
    assert metrics["seen"]["n_images"] == 2 and metrics["seen"]["det_accuracy"] == 1.0
    assert metrics["unseen"]["n_images"] == 5
    assert list(metrics["unseen"]["per_category"]) == ["mvtec/screw", "visa/pcb1"]
    assert metrics["extra"] == {"samples_per_s": 12.5}
    # positives 0.9, 0.8, 0.4 against negatives 0.2, 0.7, 0.1, 0.3: 11 of 12 pairs won
    assert metrics["auroc"] == pytest.approx(11 / 12)
    # by score: .9+ .8+ .7- .4+: precision 1, 1, 3/4 at recall 1/3, 2/3, 1
    assert metrics["average_precision"] == pytest.approx(11 / 12)
    assert metrics["best_f1"] == pytest.approx(6 / 7)  # at 0.4: tp 3, fp 1
    # mvtec (bottle, screw) 0.75 and visa (pcb1) 2/3; categories 1, 0.5 and 2/3
    assert metrics["source_mean"]["det_accuracy"] == pytest.approx(17 / 24)
    assert metrics["det_accuracy"] == pytest.approx(13 / 18)
    assert metrics["source_mean"]["auroc"] == 1.0  # each source ranks perfectly
    assert metrics["source_mean"]["n_images"] == 7
    pcb1 = metrics["per_category"]["visa/pcb1"]
    assert pcb1["loc_accuracy_anomalous"] == 0.5 and pcb1["box_hit_rate"] == 0.5
    assert metrics["per_category"]["mvtec/screw"]["loc_accuracy_anomalous"] is None


def test_report_markdown(report_dir):
    text = (report_dir / "report.md").read_text()
    assert text.startswith("# Tiny evaluation\n")
    # pcb1: det 2/3 right, precision 1/1, recall 1/2; loc: r5 right, r7 right, r6 missed
    assert "| visa | 3 | 66.7/66.7 | 100.0/100.0 | 50.0/50.0 | 66.7/66.7 | 100.0 |" in text
    assert "| Seen | 2 | 100.0/100.0 | 100.0/100.0 | 100.0/100.0 | 100.0/100.0 | 100.0 |" in text
    # screw is all normal: recall undefined
    assert "| mvtec/screw | 2 | 50.0/50.0 | 0.0/0.0 | –/– | –/– | – |" in text
    # the two means differ: mvtec's two categories weigh twice in the category mean
    assert (
        "| **Mean over sources** | 7 | 70.8/70.8 | 75.0/75.0 | 75.0/75.0 | 83.3/83.3 | 100.0 |"
        in text
    )
    assert (
        "| **Mean over categories** | 7 | 72.2/72.2 | 66.7/66.7 | 75.0/75.0 | 83.3/83.3 | 91.7 |"
        in text
    )
    # the other readings: loc accuracy all/anomalous, loc recall matched/hit, the hits of
    # the best fixed box (pcb1: A and FAR apart, one at a time; bottle: its one box), AP,
    # best F1
    assert (
        "| Source | Anomalous | Loc accuracy all/anomalous | Loc recall matched/hit "
        "| Fixed-box hit | AP | Best F1 |" in text
    )
    assert "| visa | 2 | 66.7/50.0 | 50.0/50.0 | 50.0 | 100.0 | 100.0 |" in text
    assert "| **Mean over sources** | 3 | 70.8/75.0 | 75.0/75.0 | 75.0 | 100.0 | 100.0 |" in text
    assert "| **Mean over categories** | 3 | 72.2/75.0 | 75.0/75.0 | 75.0 | 91.7 | 85.7 |" in text
    assert "| mvtec/screw | 0 | 50.0/– | –/– | – | – | – |" in text
    # unseen pools screw and pcb1: .8+ .7- .4+ .3- .1-; AP 1/2 + 1/2 * 2/3, best F1 at .4
    assert "| Unseen | 2 | 58.3/50.0 | 50.0/50.0 | 50.0 | 83.3 | 80.0 |" in text
    assert "| samples_per_s | 12.5 |" in text
    for figure in ("per_category.png", "roc.png", "examples.png"):
        assert f"]({figure})" in text


def test_without_scores_images_or_seen_split(tmp_path):
    unscored = [
        Verdict(v.decision, v.boxes, v.labels, v.reasoning, v.format_ok) for v in PREDICTIONS
    ]
    metrics = write_report(tmp_path, unscored, RECORDS)
    assert sorted(p.name for p in tmp_path.iterdir()) == [
        "metrics.json",
        "per_category.png",
        "report.md",
    ]
    assert "seen" not in metrics and metrics["auroc"] is None
    text = (tmp_path / "report.md").read_text()
    assert "Seen and unseen" not in text and "roc.png" not in text


def test_rewrite_replaces_files(tmp_path):
    write_report(tmp_path, PREDICTIONS, RECORDS, title="first")
    write_report(tmp_path, PREDICTIONS, RECORDS, title="second")
    assert (tmp_path / "report.md").read_text().startswith("# second\n")
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_headline_table():
    metrics = {
        "per_source": {
            "mvtec": {
                **dict.fromkeys(("det_accuracy", "det_precision", "det_recall", "det_f1"), 0.5),
                **dict.fromkeys(("loc_accuracy", "loc_precision", "loc_recall", "loc_f1"), None),
                "auroc": 0.875,
                "n_images": 4,
            }
        },
        "det_accuracy": 1.0,
        "det_precision": 0.25,
        "det_recall": 1 / 3,
        "det_f1": 0.4,
        "loc_accuracy": 0.0,
        "loc_precision": 0.0,
        "loc_recall": 0.0,
        "loc_f1": 0.0,
        "auroc": None,
        "n_images": 4,
    }
    assert headline_table(metrics) == (
        "| Source | Images | Accuracy det/loc | Precision det/loc | Recall det/loc "
        "| F1 det/loc | AUROC |\n"
        "|---|---|---|---|---|---|---|\n"
        "| mvtec | 4 | 50.0/– | 50.0/– | 50.0/– | 50.0/– | 87.5 |\n"
        "| **Mean over categories** | 4 | 100.0/0.0 | 25.0/0.0 | 33.3/0.0 | 40.0/0.0 | – |"
    )
    # a metrics.json with the mean over sources gains its row before the category mean
    with_source_mean = {**metrics, "source_mean": metrics["per_source"]["mvtec"]}
    assert headline_table(with_source_mean).splitlines()[3:] == [
        "| **Mean over sources** | 4 | 50.0/– | 50.0/– | 50.0/– | 50.0/– | 87.5 |",
        "| **Mean over categories** | 4 | 100.0/0.0 | 25.0/0.0 | 33.3/0.0 | 40.0/0.0 | – |",
    ]


def test_pick_examples_round_robin_wrong_first():
    # categories in record order; within pcb1 the missed r6 (index 5) comes first
    assert pick_examples(PREDICTIONS, RECORDS, 5) == [0, 2, 5, 1, 3]
    assert pick_examples(PREDICTIONS, RECORDS, 0) == []
    assert sorted(pick_examples(PREDICTIONS, RECORDS, 100)) == list(range(7))
