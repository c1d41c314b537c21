"""The annotation report: why samples were accepted or rejected, with pictures.

``report.md`` leads with the acceptance per category and reason (the numbers of
``acceptance.json``), then what each reason means, then two figures: the outcome of every
sample per category (``acceptance.png``) and a page of accepted and rejected examples
(``examples.png``) showing what the teacher saw (the query on the model grid with the
ground truth in red) with the teacher's own boxes dashed and its reasoning underneath.
Every file is written atomically through :class:`~mmrad.storage.Storage` (local or S3).
"""

from __future__ import annotations

import io
import math
import textwrap
from collections.abc import Mapping, Sequence
from typing import Any

from matplotlib.figure import Figure
from matplotlib.patches import Rectangle
from PIL import Image

from mmrad.annotate.job import ImageJudgement
from mmrad.config import PixelBudget
from mmrad.eval.consistency import ACCEPTED, OUTCOMES, REASON_MEANING, REASONS, Judgement
from mmrad.eval.hints import draw_boxes, record_grid_boxes
from mmrad.eval.report import MISSING, png_bytes, wrap_reasoning
from mmrad.storage import Storage, join
from mmrad.task.answer import parse_answer

ACCEPTANCE_PNG = "acceptance.png"
EXAMPLES_PNG = "examples.png"
REPORT_MD = "report.md"
OUTCOME_COLOURS = {
    ACCEPTED: "forestgreen",
    "error": "dimgrey",
    "bad_format": "orange",
    "wrong_decision": "firebrick",
    "missed_box": "royalblue",
    "extra_box": "mediumpurple",
    "leaked_hint": "goldenrod",
}
TEACHER_BOX_COLOUR = "cyan"
EXAMPLES_LEGEND = (
    "what the teacher saw: ground truth outlined in red on the query; the teacher's boxes "
    "cyan dashed; its reasoning (or raw output) below"
)
RAW_WIDTH = 70  # characters per line of a raw completion in the figure


def write_annotate_report(
    storage: Storage,
    run_uri: str,
    images: Sequence[ImageJudgement],
    summary: Mapping[str, Any],
    *,
    pixels: PixelBudget,
    max_examples: int = 12,
) -> str:
    """Write ``report.md`` and its figures under ``run_uri``; returns the report's URI."""
    figures = {}
    if summary["per_category"]:
        figures[ACCEPTANCE_PNG] = acceptance_figure(summary)
    chosen = pick_examples(images, max_examples)
    if chosen:
        figures[EXAMPLES_PNG] = examples_figure(chosen, storage, pixels)
    for name, figure in figures.items():
        storage.write_bytes(join(run_uri, name), png_bytes(figure))
    target = join(run_uri, REPORT_MD)
    storage.write_text(target, render_markdown(summary, list(figures)))
    return target


# -- markdown ------------------------------------------------------------------------------


def render_markdown(summary: Mapping[str, Any], figures: Sequence[str]) -> str:
    manifest = summary.get("manifest", {})
    lines = [
        "# Chain-of-thought annotation",
        f"A teacher answered each image {summary.get('n', '?')} times, shown the ground truth "
        "(red boxes on the query and a text hint). A sample is accepted only when its answer "
        "is in the task format, its decision is right, every ground-truth box is matched at "
        f"IoU >= {summary.get('iou_threshold', '?')}, no box is extra, and its reasoning does "
        "not give the hint away; otherwise it is rejected for the first reason that applies. "
        "The best accepted sample of an image becomes its reasoning.",
        f"**{summary['images_accepted']} of {summary['images']} images annotated "
        f"({_pct(summary['image_acceptance'])} %); {summary['accepted']} of "
        f"{summary['samples']} samples accepted ({_pct(summary['sample_acceptance'])} %).**",
    ]
    if manifest:
        lines.append(
            f"New manifest `{manifest['uri']}`: {manifest['records']} records "
            f"({manifest['annotated']} annotated, {manifest['kept_without_reasoning']} kept "
            f"without reasoning, {manifest['dropped']} dropped, {manifest['untouched']} not "
            "sent to the teacher)."
        )
    lines += ["## Acceptance per category", acceptance_table(summary)]
    lines += ["## Rejection reasons", reasons_table(summary)]
    if figures:
        lines += ["## Figures", "\n\n".join(f"![{name.split('.')[0]}]({name})" for name in figures)]
    return "\n\n".join(lines) + "\n"


def acceptance_table(summary: Mapping[str, Any]) -> str:
    """One row per category and the overall row: images (annotated), samples (accepted)
    and each reason's count of rejected samples."""
    header = ["Source/category", "Images", "Annotated %", "Samples", "Accepted %", *REASONS]
    rows = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    entries = [*summary["per_category"].items(), ("**Overall**", summary)]
    for name, counts in entries:
        cells = [
            name,
            str(counts["images"]),
            _pct(counts["image_acceptance"]),
            str(counts["samples"]),
            _pct(counts["sample_acceptance"]),
            *(str(counts["rejected"][reason]) for reason in REASONS),
        ]
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def reasons_table(summary: Mapping[str, Any]) -> str:
    samples = summary["samples"]
    rows = ["| Reason | Samples | Share % | Meaning |", "|---|---|---|---|"]
    for reason in REASONS:
        count = summary["rejected"][reason]
        share = _pct(count / samples if samples else None)
        rows.append(f"| {reason} | {count} | {share} | {REASON_MEANING[reason]} |")
    return "\n".join(rows)


def _pct(value: float | None) -> str:
    return MISSING if value is None else f"{100 * value:.1f}"


# -- figures -------------------------------------------------------------------------------


def acceptance_figure(summary: Mapping[str, Any]) -> Figure:
    """Stacked horizontal bars: each category's samples by outcome."""
    keys = list(summary["per_category"])
    figure = Figure(figsize=(8, 0.5 * len(keys) + 1.6), layout="constrained")
    ax = figure.subplots()
    left = [0] * len(keys)
    for outcome in OUTCOMES:
        values = [_outcome_count(summary["per_category"][k], outcome) for k in keys]
        if not any(values):
            continue
        ax.barh(keys, values, left=left, color=OUTCOME_COLOURS[outcome], label=outcome)
        left = [a + b for a, b in zip(left, values, strict=True)]
    ax.invert_yaxis()
    ax.set_xlabel("samples")
    ax.set_title("Outcome of every teacher sample")
    figure.legend(loc="outside lower center", ncols=4, fontsize="small")
    return figure


def _outcome_count(counts: Mapping[str, Any], outcome: str) -> int:
    return counts["accepted"] if outcome == ACCEPTED else counts["rejected"][outcome]


def pick_examples(
    images: Sequence[ImageJudgement], limit: int
) -> list[tuple[ImageJudgement, Judgement]]:
    """Up to ``limit`` (image, sample) pairs, round-robin over the outcomes so that every
    one that occurred shows: an accepted image's kept sample, a rejected sample with each
    reason (one per image and reason), in record order."""
    queues: dict[str, list[tuple[ImageJudgement, Judgement]]] = {o: [] for o in OUTCOMES}
    for image in images:
        if image.best is not None:
            queues[ACCEPTED].append((image, image.best))
        seen: set[str] = set()
        for judgement in image.judgements:
            if not judgement.accepted and judgement.outcome not in seen:
                seen.add(judgement.outcome)
                queues[judgement.outcome].append((image, judgement))
    chosen: list[tuple[ImageJudgement, Judgement]] = []
    while len(chosen) < limit and any(queues.values()):
        for queue in queues.values():
            if queue and len(chosen) < limit:
                chosen.append(queue.pop(0))
    return chosen


def examples_figure(
    chosen: Sequence[tuple[ImageJudgement, Judgement]], storage: Storage, pixels: PixelBudget
) -> Figure:
    columns = min(4, max(1, len(chosen)))
    rows = max(1, math.ceil(len(chosen) / columns))
    figure = Figure(figsize=(3.8 * columns, 4.6 * rows + 0.4), layout="constrained")
    figure.suptitle(EXAMPLES_LEGEND, fontsize=9)
    grid = figure.add_gridspec(2 * rows, columns, height_ratios=[3, 1.4] * rows)
    for n, (image, judgement) in enumerate(chosen):
        row, column = divmod(n, columns)
        image_ax = figure.add_subplot(grid[2 * row, column])
        text_ax = figure.add_subplot(grid[2 * row + 1, column])
        _draw_example(image_ax, text_ax, image, judgement, storage, pixels)
    return figure


def teacher_view(record: Mapping[str, Any], storage: Storage, pixels: PixelBudget) -> Image.Image:
    """The query as the teacher saw it: on the model grid, ground truth outlined in red."""
    from mmrad.engine.requests import to_grid_image

    with Image.open(io.BytesIO(storage.read_bytes(record["image_uri"]))) as opened:
        grid_image = to_grid_image(opened.convert("RGB"), pixels)
    return draw_boxes(grid_image, record_grid_boxes(record, grid_image.size))


def _draw_example(image_ax, text_ax, image, judgement, storage, pixels) -> None:
    record = image.record
    outcome = judgement.outcome
    try:
        view = teacher_view(record, storage, pixels)
    except Exception as err:  # a report must not fail on one unreadable image
        view = None
        image_ax.text(0.5, 0.5, f"image unreadable:\n{err}", ha="center", fontsize=6)
    if view is not None:
        image_ax.imshow(view)
        verdict = parse_answer(judgement.completion, size=view.size)
        for x1, y1, x2, y2 in verdict.boxes:
            image_ax.add_patch(
                Rectangle((x1, y1), x2 - x1, y2 - y1, fill=False, linestyle="--",
                          edgecolor=TEACHER_BOX_COLOUR, linewidth=1.5)
            )  # fmt: skip
    truth = "anomalous" if record["is_anomalous"] else "normal"
    detail = f" ({judgement.detail})" if judgement.detail else ""
    heading = f"{record['category']} {record['id']} | {truth}"
    image_ax.set_title(
        f"{heading}\nsample {judgement.sample}: {outcome}{detail}",
        fontsize=7.5,
        color=OUTCOME_COLOURS[outcome],
    )
    image_ax.axis("off")
    text_ax.axis("off")
    text_ax.text(0, 1, _example_text(judgement), va="top", ha="left", fontsize=6, wrap=False)


def _example_text(judgement: Judgement) -> str:
    """The reasoning when there is one, else the raw completion (what went wrong shows)."""
    if judgement.reasoning:
        return wrap_reasoning(judgement.reasoning)
    if judgement.completion:
        lines = textwrap.wrap(" ".join(judgement.completion.split()), RAW_WIDTH)[:8]
        return "raw output: " + "\n".join(lines) if lines else "(empty output)"
    return judgement.detail or "(no output)"
