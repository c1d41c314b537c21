"""Prediction rows → detection rows: the verdict in the image's own pixels, the decision,
and the overlay PNG.

:func:`finish_batch` is a Ray Data task after the evaluation core's predictors
(:func:`mmrad.eval.inference.predict`): it parses each image's answer as evaluation does
(:func:`~mmrad.eval.inference.verdicts_of`), decides as Serve's ``/v1/detect`` does
(:func:`~mmrad.serve.detect.decide`: the answer's Yes/No, or ``score >= threshold`` when a
threshold is given), and draws the overlay where the image is (it reads the image again:
the decoded copy was on the model grid and is gone after prediction). The overlay travels
back as bytes and the driver writes it, since the output folder may be the driver's own
disk. Drawing in the driver was rejected: decoding and PNG encoding are the heavy part
and belong on the worker nodes.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import pyarrow as pa

from mmrad.storage import Storage, StorageUnavailable

DETECTION_SCHEMA = pa.schema(
    [
        ("path", pa.string()),
        ("category", pa.string()),
        ("anomalous", pa.bool_()),
        ("score", pa.float64()),
        ("boxes", pa.list_(pa.list_(pa.float64(), 4))),
        ("labels", pa.list_(pa.string())),
        ("reasoning", pa.string()),
        ("error", pa.string()),
        ("width", pa.int64()),
        ("height", pa.int64()),
        ("completion", pa.string()),
        ("overlay", pa.string()),
    ]
)
"""``detections.parquet``: one row per file. ``boxes`` ``[x1, y1, x2, y2]`` in the
image's own pixels (x2, y2 exclusive); ``anomalous``/``score`` null on error rows and
``score`` null without log-probs; ``width``/``height`` the image's own size;
``completion`` the model's whole answer; ``overlay`` the PNG's path in the output folder."""

FINISHED_SCHEMA = pa.schema([*DETECTION_SCHEMA, ("relative", pa.string()),
                             ("bad_image", pa.bool_()), ("overlay_png", pa.binary())])  # fmt: skip
"""What :func:`finish_batch` hands the driver: the detection columns, the file's path
below the input, whether an error is the file's fault, and the overlay's bytes."""


@dataclass(frozen=True)
class FinishSpec:
    """What :func:`finish_batch` needs; small and picklable."""

    storage: Storage
    reasoning: bool
    threshold: float | None
    overlay_max_side: int | None
    answer_unit: int = 1  # model-grid pixels per box coordinate


def detection_fields(
    row: Mapping[str, Any], *, reasoning: bool, threshold: float | None, answer_unit: int = 1
) -> dict[str, Any]:
    """A prediction row's detection columns (all but ``overlay``). The first completion
    is the answer; an error row keeps its error and has no verdict."""
    from mmrad.eval.inference import verdicts_of
    from mmrad.serve.detect import decide

    fields = error_fields(row["image_uri"], row.get("category"), row.get("error") or None)
    if fields["error"]:
        return fields
    verdicts = verdicts_of(row, require_think=reasoning, answer_unit=answer_unit)
    fields["width"], fields["height"] = int(row["width"]), int(row["height"])
    if not verdicts:
        return fields
    verdict = verdicts[0]
    fields.update(
        anomalous=decide(verdict.decision, verdict.score, threshold),
        score=verdict.score,
        boxes=[[float(v) for v in box] for box in verdict.boxes],
        labels=list(verdict.labels),
        reasoning=verdict.reasoning,
        completion=(row.get("completions") or [None])[0],
    )
    return fields


def error_fields(path: str, category: str | None, error: str | None) -> dict[str, Any]:
    """A row with nothing known but the file, its category and (maybe) its error."""
    return {
        "path": path, "category": category, "anomalous": None, "score": None,
        "boxes": None if error else [], "labels": None if error else [], "reasoning": None,
        "error": error, "width": None, "height": None, "completion": None, "overlay": None,
    }  # fmt: skip


def finish_batch(batch: pa.Table, spec: FinishSpec) -> pa.Table:
    """Ray Data ``map_batches`` function over prediction rows: detection columns plus
    the overlay's bytes (:data:`FINISHED_SCHEMA`). A file that cannot be read again for
    its overlay gets that error on its row."""
    from mmrad.detect.overlays import overlay_png

    out = []
    for row in batch.drop_columns(
        [c for c in ("image", "reference") if c in batch.column_names]
    ).to_pylist():
        fields = detection_fields(row, reasoning=spec.reasoning, threshold=spec.threshold,
                                  answer_unit=spec.answer_unit)  # fmt: skip
        bad_image, picture = bool(row.get("bad_image")), None
        if not fields["error"]:
            try:
                data = spec.storage.read_bytes(row["image_uri"])
                picture = overlay_png(data, fields["boxes"], fields["labels"],
                                      spec.overlay_max_side)  # fmt: skip
            except StorageUnavailable:
                raise  # an outage fails the job, as it does while decoding
            except Exception as err:  # the file changed or vanished since it was decoded
                bad_image = True
                fields = error_fields(row["image_uri"], row.get("category"),
                                      f"{row['image_uri']}: drawing the overlay failed: "
                                      f"{type(err).__name__}: {err}")  # fmt: skip
        out.append({**fields, "relative": row["relative"], "bad_image": bad_image,
                    "overlay_png": picture})  # fmt: skip
    return pa.Table.from_pylist(out, schema=FINISHED_SCHEMA)
