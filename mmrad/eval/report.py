"""The evaluation report: ``metrics.json``, ``report.md`` and PNG figures.

``report.md`` leads with a table in the paper's ``det/loc`` style (accuracy, precision,
recall and F1 of detection / localisation per source data set, values in %) with the
mean over sources and the mean over categories as two labelled rows, then the other
readings of :mod:`mmrad.task.metrics` (localisation accuracy over anomalous images only,
box hit rate) with AP and best F1 of P(Yes); then seen and unseen categories apart
(general AD is about the unseen ones), then every category, each in both tables.
Figures: per-category bars, the ROC curve when every answer has a score, and a grid of
sample images (ground truth green, prediction red, the model's reasoning underneath).
Every file is written atomically, so a reader never sees half a report.
"""

from __future__ import annotations

import io
import json
import math
import os
import tempfile
import textwrap
from collections.abc import Callable, Mapping, Sequence
from pathlib import Path
from typing import Any

from matplotlib.figure import Figure
from matplotlib.patches import Rectangle

from mmrad.task.answer import Verdict
from mmrad.task.geometry import as_boxes
from mmrad.task.metrics import auroc, evaluate, image_outcome, roc_curve

PER_CATEGORY_PNG = "per_category.png"
ROC_PNG = "roc.png"
EXAMPLES_PNG = "examples.png"
GT_COLOUR, PRED_COLOUR = "limegreen", "red"
RIGHT_COLOUR, WRONG_COLOUR = "darkgreen", "firebrick"
MISSING = "–"
TABLE_COLUMNS = ("accuracy", "precision", "recall", "f1")
BAR_METRICS = ("det_accuracy", "det_f1", "loc_accuracy", "loc_f1")
REASONING_WIDTH, REASONING_LINES = 62, 8
EXAMPLES_LEGEND = "ground truth: green, prediction: red dashed; reasoning of the answer below each"
FILE_MODE = 0o644  # mkstemp creates files readable by their owner only
SOURCE_MEAN_LABEL = "**Mean over sources**"
CATEGORY_MEAN_LABEL = "**Mean over categories**"
INTRODUCTION = (
    f"Values in %, as detection/localisation (det/loc); {MISSING} = undefined (zero "
    "denominator). Rates are computed per category: a source's row is the mean over its "
    f"categories, {SOURCE_MEAN_LABEL} the mean of the source rows (every source weighted "
    "equally: the paper's average column, as far as known) and "
    f"{CATEGORY_MEAN_LABEL} the mean over all categories (the top-level keys of "
    "`metrics.json`). AUROC, AP and best F1 come from P(Yes) of the first answer token, "
    f"pooled over a row's images; in {SOURCE_MEAN_LABEL} they are the mean of the "
    "sources' values."
)
PARTS_NOTE = (
    "Rates are means over the categories of each part; AUROC, AP and best F1 are pooled "
    "over its images."
)
READINGS_NOTE = (
    "Loc accuracy all/anomalous: answers fully right (No on a normal image; Yes with "
    "every ground-truth box matched on an anomalous one) over all images, normal ones "
    "included, / over anomalous images only. Loc recall matched/hit: ground-truth boxes "
    "matched one-to-one / hit by any predicted box, at IoU >= 0.1. Fixed-box hit: the "
    "hit rate of the best single box drawn at the same place on every image, the "
    "localisation a model gets without looking (chance). AP: average precision "
    "of P(Yes). Best F1: detection F1 at the P(Yes) threshold best on these same images "
    "(an upper bound for one fixed threshold)."
)


def write_report(
    out_dir: Path,
    predictions: Sequence[Verdict],
    records: Sequence[Mapping[str, Any]],
    *,
    seen_categories: set[str] | None = None,
    load_image: Callable[[Mapping[str, Any]], Any] | None = None,
    title: str = "mmrad evaluation",
    extra: Mapping[str, Any] | None = None,
    max_examples: int = 12,
) -> dict:
    """Evaluate and write the report into ``out_dir``; returns what ``metrics.json`` holds.

    ``seen_categories`` names the categories trained on, as ``category`` or
    ``"source/category"``; with it the metrics gain ``seen`` and ``unseen`` parts.
    ``load_image(record)`` returns a PIL image for the examples figure (none without it).
    ``extra`` (e.g. throughput) is stored under ``"extra"``.
    """
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    metrics = evaluate(predictions, records)
    is_seen = None
    if seen_categories is not None:
        is_seen = [_is_seen(record, seen_categories) for record in records]
        for part, wanted in (("seen", True), ("unseen", False)):
            chosen = [i for i, seen in enumerate(is_seen) if seen is wanted]
            metrics[part] = evaluate([predictions[i] for i in chosen], [records[i] for i in chosen])
    if extra:
        metrics["extra"] = dict(extra)

    figures = {}
    if metrics["per_category"]:
        unseen = _unseen_keys(records, is_seen)
        figures[PER_CATEGORY_PNG] = per_category_figure(metrics, unseen)
    if metrics["auroc"] is not None:
        figures[ROC_PNG] = roc_figure(predictions, records)
    if load_image is not None and records:
        figures[EXAMPLES_PNG] = examples_figure(predictions, records, load_image, max_examples)
    for name, figure in figures.items():
        _write_atomic(out_dir / name, png_bytes(figure))
    _write_atomic(out_dir / "metrics.json", json.dumps(metrics, indent=2).encode())
    markdown = render_markdown(metrics, title=title, figures=list(figures))
    _write_atomic(out_dir / "report.md", markdown.encode())
    return metrics


# ----------------------------------------------------------------------------- markdown


def headline_table(metrics: Mapping[str, Any]) -> str:
    """Markdown table in the det/loc style: one row per source data set, then the mean
    over sources (when the metrics have it) and the mean over categories."""
    return det_loc_table("Source", summary_rows(metrics))


def summary_rows(metrics: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """``(label, metrics)`` of each source, the mean over sources and the mean over
    categories (the top level). A ``metrics.json`` written before ``source_mean``
    existed has no such row."""
    rows = list(metrics["per_source"].items())
    if "source_mean" in metrics:
        rows.append((SOURCE_MEAN_LABEL, metrics["source_mean"]))
    rows.append((CATEGORY_MEAN_LABEL, metrics))
    return rows


def render_markdown(metrics: Mapping[str, Any], *, title: str, figures: Sequence[str]) -> str:
    sections = [f"# {title}", INTRODUCTION, headline_table(metrics)]
    sections += ["## Other readings and score metrics", READINGS_NOTE]
    sections.append(readings_table("Source", summary_rows(metrics)))
    if "seen" in metrics:
        rows = [("Seen", metrics["seen"]), ("Unseen", metrics["unseen"]), ("All", metrics)]
        sections += ["## Seen and unseen categories", PARTS_NOTE]
        sections += [det_loc_table("Categories", rows), readings_table("Categories", rows)]
    rows = list(metrics["per_category"].items())
    sections += ["## Per category", det_loc_table("Source/category", rows)]
    sections.append(readings_table("Source/category", rows))
    if metrics.get("extra"):
        lines = ["| Key | Value |", "|---|---|"]
        lines += [f"| {key} | {value} |" for key, value in metrics["extra"].items()]
        sections += ["## Run", "\n".join(lines)]
    if figures:
        sections += ["## Figures", "\n\n".join(f"![{Path(f).stem}]({f})" for f in figures)]
    return "\n\n".join(sections) + "\n"


def det_loc_table(first_column: str, rows: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """Accuracy, precision, recall and F1 as det/loc pairs, and AUROC."""
    header = [first_column, "Images", *(f"{c.capitalize()} det/loc" for c in TABLE_COLUMNS)]
    header.append("AUROC")
    return _table(header, [_det_loc_cells(name, m) for name, m in rows])


def readings_table(first_column: str, rows: Sequence[tuple[str, Mapping[str, Any]]]) -> str:
    """The second readings of localisation accuracy and recall, AP and best F1."""
    header = [first_column, "Anomalous", "Loc accuracy all/anomalous",
              "Loc recall matched/hit", "Fixed-box hit", "AP", "Best F1"]  # fmt: skip
    return _table(header, [_readings_cells(name, m) for name, m in rows])


def _det_loc_cells(name: str, m: Mapping[str, Any]) -> list[str]:
    cells = [name, str(m["n_images"])]
    cells += [_pair(m[f"det_{c}"], m[f"loc_{c}"]) for c in TABLE_COLUMNS]
    return [*cells, _pct(m["auroc"])]


def _readings_cells(name: str, m: Mapping[str, Any]) -> list[str]:
    return [
        name,
        str(m["n_anomalous"]),
        _pair(m["loc_accuracy"], m["loc_accuracy_anomalous"]),
        _pair(m["loc_recall"], m["box_hit_rate"]),
        _pct(m.get("fixed_box_hit_rate")),  # none in a metrics.json from before it
        _pct(m["average_precision"]),
        _pct(m["best_f1"]),
    ]


def _table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = [markdown_row(header), "|" + "---|" * len(header)]
    return "\n".join(lines + [markdown_row(cells) for cells in rows])


def markdown_row(cells: Sequence[str]) -> str:
    return "| " + " | ".join(cells) + " |"


def _pair(first: float | None, second: float | None) -> str:
    return f"{_pct(first)}/{_pct(second)}"


def _pct(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.1f}"


# ------------------------------------------------------------------------------ figures


def per_category_figure(metrics: Mapping[str, Any], unseen: set[str]) -> Figure:
    """Horizontal bars of detection and localisation accuracy and F1 per category;
    unseen categories in a panel of their own."""
    keys = list(metrics["per_category"])
    if unseen:
        panels = [
            ("Seen categories", [k for k in keys if k not in unseen]),
            ("Unseen categories", [k for k in keys if k in unseen]),
        ]
        panels = [(name, chosen) for name, chosen in panels if chosen]
    else:
        panels = [("Categories", keys)]
    heights = [max(1.5, 0.7 * len(chosen) + 0.8) for _, chosen in panels]
    figure = Figure(figsize=(8, sum(heights) + 0.8), layout="constrained")
    axes = figure.subplots(len(panels), 1, squeeze=False, height_ratios=heights)[:, 0]
    bar = 0.8 / len(BAR_METRICS)
    for ax, (name, chosen) in zip(axes, panels, strict=True):
        for j, key in enumerate(BAR_METRICS):
            values = [metrics["per_category"][c][key] for c in chosen]
            offsets = [i - 0.4 + bar * (j + 0.5) for i in range(len(chosen))]
            label = key.replace("_", " ")
            bars = ax.barh(offsets, [_nan_if_none(v) for v in values], height=bar, label=label)
            for offset, value, patch in zip(offsets, values, bars, strict=True):
                x = 0.0 if value is None else value
                text = "n/a" if value is None else f"{value:.2f}"
                colour = patch.get_facecolor()
                ax.text(x + 0.01, offset, text, va="center", fontsize=6, color=colour)
        ax.set_yticks(range(len(chosen)), chosen)
        ax.invert_yaxis()
        ax.set_xlim(0, 1.08)
        ax.set_title(name)
        ax.grid(axis="x", alpha=0.3)
    axes[-1].set_xlabel("score (n/a: undefined, zero denominator)")
    handles, labels = axes[0].get_legend_handles_labels()
    figure.legend(handles, labels, loc="outside upper center", ncols=len(BAR_METRICS))
    return figure


def roc_figure(predictions: Sequence[Verdict], records: Sequence[Mapping[str, Any]]) -> Figure:
    """ROC of P(Yes), pooled over all images and per source (sources with both classes)."""
    figure = Figure(figsize=(5.5, 5), layout="constrained")
    ax = figure.subplots()
    sources = list(dict.fromkeys(str(r["source"]) for r in records))
    curves = [("all", list(range(len(records))))]
    if len(sources) > 1:
        curves += [(s, [i for i, r in enumerate(records) if r["source"] == s]) for s in sources]
    for name, indices in curves:
        scores = [predictions[i].score for i in indices]
        labels = [bool(records[i]["is_anomalous"]) for i in indices]
        area = auroc(scores, labels)
        if area is None:
            continue
        fpr, tpr = roc_curve(scores, labels)
        ax.plot(fpr, tpr, label=f"{name} (AUROC {100 * area:.1f})", lw=2 if name == "all" else 1)
    ax.plot([0, 1], [0, 1], ls="--", c="grey", lw=0.8)
    ax.set(xlabel="false positive rate", ylabel="true positive rate", xlim=(0, 1), ylim=(0, 1))
    ax.set_title("ROC of P(Yes)")
    ax.legend(loc="lower right", fontsize="small")
    return figure


def examples_figure(
    predictions: Sequence[Verdict],
    records: Sequence[Mapping[str, Any]],
    load_image: Callable[[Mapping[str, Any]], Any],
    max_examples: int,
) -> Figure:
    """A grid of sample images with boxes, the verdict and the reasoning under each."""
    chosen = pick_examples(predictions, records, max_examples)
    columns = min(4, max(1, len(chosen)))
    rows = max(1, math.ceil(len(chosen) / columns))
    figure = Figure(figsize=(3.6 * columns, 4.4 * rows + 0.4), layout="constrained")
    figure.suptitle(EXAMPLES_LEGEND, fontsize=9)
    grid = figure.add_gridspec(2 * rows, columns, height_ratios=[3, 1.2] * rows)
    for n, index in enumerate(chosen):
        row, column = divmod(n, columns)
        image_ax = figure.add_subplot(grid[2 * row, column])
        text_ax = figure.add_subplot(grid[2 * row + 1, column])
        _draw_example(image_ax, text_ax, predictions[index], records[index], load_image)
    return figure


def pick_examples(
    predictions: Sequence[Verdict], records: Sequence[Mapping[str, Any]], limit: int
) -> list[int]:
    """Up to ``limit`` indices, taken round-robin over categories so that all show;
    within a category wrong answers first (what one wants to look at), in record order."""
    right = [image_outcome(v, r).fully_right for v, r in zip(predictions, records, strict=True)]
    keys = [f"{r['source']}/{r['category']}" for r in records]
    queues: dict[str, list[int]] = {key: [] for key in keys}
    for i in sorted(range(len(records)), key=lambda i: right[i]):  # stable: record order
        queues[keys[i]].append(i)
    chosen: list[int] = []
    while len(chosen) < limit and any(queues.values()):
        for queue in queues.values():
            if queue and len(chosen) < limit:
                chosen.append(queue.pop(0))
    return chosen


def _draw_example(image_ax, text_ax, verdict: Verdict, record: Mapping[str, Any], load_image):
    image = load_image(record)
    # the loaded image may be resized (e.g. to the model grid): boxes follow it
    sx, sy = image.width / record["width"], image.height / record["height"]
    image_ax.imshow(image)
    for boxes, colour, style in (
        (as_boxes(record["boxes"]), GT_COLOUR, "-"),
        (as_boxes(verdict.boxes), PRED_COLOUR, "--"),
    ):
        for x1, y1, x2, y2 in boxes:
            image_ax.add_patch(
                Rectangle(
                    (x1 * sx, y1 * sy),
                    (x2 - x1) * sx,
                    (y2 - y1) * sy,
                    fill=False,
                    edgecolor=colour,
                    linestyle=style,
                    linewidth=1.8,
                )
            )
    right = image_outcome(verdict, record).fully_right
    truth = "anomalous" if record["is_anomalous"] else "normal"
    answer = {True: "Yes", False: "No", None: "no answer"}[verdict.decision]
    image_ax.set_title(
        f"{record['id']}\n{truth} | answer: {answer} | {'right' if right else 'wrong'}",
        fontsize=8,
        color=RIGHT_COLOUR if right else WRONG_COLOUR,
    )
    image_ax.axis("off")
    text_ax.axis("off")
    text_ax.text(
        0, 1, wrap_reasoning(verdict.reasoning), va="top", ha="left", fontsize=6.5, wrap=False
    )


def wrap_reasoning(reasoning: str | None) -> str:
    """Reasoning text for a figure panel: wrapped, cut to ``REASONING_LINES`` lines."""
    if not reasoning:
        return "(no reasoning)"
    lines = textwrap.wrap(" ".join(reasoning.split()), REASONING_WIDTH)
    if len(lines) > REASONING_LINES:
        lines = lines[: REASONING_LINES - 1] + [lines[REASONING_LINES - 1] + " …"]
    return "\n".join(lines)


# -------------------------------------------------------------------------------- helpers


def _is_seen(record: Mapping[str, Any], seen_categories: set[str]) -> bool:
    category = str(record["category"])
    return category in seen_categories or f"{record['source']}/{category}" in seen_categories


def _unseen_keys(records: Sequence[Mapping[str, Any]], is_seen: Sequence[bool] | None) -> set[str]:
    if is_seen is None:
        return set()
    return {
        f"{r['source']}/{r['category']}"
        for r, seen in zip(records, is_seen, strict=True)
        if not seen
    }


def _nan_if_none(value: float | None) -> float:
    return math.nan if value is None else value


def png_bytes(figure: Figure) -> bytes:
    """A matplotlib figure as PNG bytes (for storage writes, local or ``s3://``)."""
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png", dpi=110)
    return buffer.getvalue()


def _write_atomic(path: Path, data: bytes) -> None:
    """Write to a temporary file beside ``path``, then rename it over ``path``."""
    handle, temporary = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(data)
        os.chmod(temporary, FILE_MODE)
        os.replace(temporary, path)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
