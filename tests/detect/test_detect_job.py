"""``mmrad detect`` end to end, once (integration): the command line over an ``s3://``
prefix of good and defective synthetic images, a truncated PNG, a text file named like a
JPEG, a stray ``notes.txt`` and a hidden file, with references from a local folder, on
the session's Ray, S3 server and the SFT'd tiny model's export (shared with evaluation's
tests) in a real vLLM engine. Listing a local folder is covered by the fast tests."""

from __future__ import annotations

import csv
import io
import re
import time

import numpy as np
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from mmrad.data.builders.synthetic import (
    category_defect_types,
    category_picture,
    paint_defects,
    random_crop,
)
from mmrad.storage import Storage, join
from mmrad.task.answer import parse_answer
from mmrad.task.geometry import grid_scale, model_grid
from tests.conftest import TEST_BUCKET

pytestmark = pytest.mark.integration

PREFIX = f"s3://{TEST_BUCKET}/detect/in"
MAX_PIXELS = 12544  # the SFT'd export's pixel budget (tests/sft/helpers.py)
OVERLAY_SIDE = 150
SMALL = ["ray.num_cpus=2", "sampling.max_tokens=128", "engine.max_model_len=2048",
         "engine.kv_cache_bytes=134217728", "engine.max_num_seqs=16",
         "predictors.cpus_per_actor=0.5", "predictors.batch_size=4",
         f"overlay.max_side={OVERLAY_SIDE}"]  # fmt: skip


def picture(category: str, size: tuple[int, int], seed: int, defects: int = 0) -> Image.Image:
    """A crop of the category's picture, ``size = (width, height)``, with defects drawn
    as the synthetic builder draws them."""
    rng = np.random.default_rng(seed)
    square = random_crop(category_picture(category), max(size), rng)
    if defects:
        paint_defects(square, category_defect_types(category), defects, rng)
    pixels = (np.clip(square, 0, 1) * 255).round().astype(np.uint8)
    return Image.fromarray(pixels[: size[1], : size[0]])


def encoded(image: Image.Image, kind: str = "PNG") -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, kind)
    return buffer.getvalue()


INPUTS = {  # path below the prefix: (bytes, size or None for a bad file)
    "brick/good.png": (lambda: encoded(picture("brick", (160, 120), 1)), (160, 120)),
    "brick/defect.png": (lambda: encoded(picture("brick", (200, 140), 2, 2)), (200, 140)),
    "brick/truncated.png": (lambda: encoded(picture("brick", (160, 120), 3))[:400], None),
    "brick/.hidden.png": (lambda: encoded(picture("brick", (64, 64), 4)), None),
    "grass/good.jpg": (lambda: encoded(picture("grass", (120, 150), 5), "JPEG"), (120, 150)),
    "grass/defect.png": (lambda: encoded(picture("grass", (150, 150), 6, 1)), (150, 150)),
    "grass/fake.jpg": (lambda: b"these are notes, not a JPEG\n", None),
    "notes.txt": (lambda: b"what the camera saw today\n", None),
}
IMAGES = {path: size for path, (_, size) in INPUTS.items() if size}
BAD = ("brick/truncated.png", "grass/fake.jpg", "notes.txt")


@pytest.fixture(scope="module")
def detect_run(sft_trained, s3_server, tmp_path_factory):
    """One run of the command; returns ``(output folder, CLI result, seconds)``."""
    from mmrad.cli import app

    storage = Storage()
    for relative, (make, _) in INPUTS.items():
        storage.write_bytes(join(PREFIX, relative), make())
    root = tmp_path_factory.mktemp("detect")
    refs = root / "refs"
    refs.mkdir()
    picture("brick", (160, 160), 10).save(refs / "brick.png")
    picture("grass", (160, 160), 11).save(refs / "grass.png")
    out = root / "out"
    args = ["detect", PREFIX, "--config", "configs/local/detect.yaml",
            "--model", sft_trained.export_uri, "--out", str(out), "--reference", str(refs),
            *SMALL]  # fmt: skip
    start = time.perf_counter()
    result = CliRunner().invoke(app, args)
    return out, result, time.perf_counter() - start


def test_one_row_per_file_errors_on_the_bad_ones_boxes_in_own_pixels(detect_run):
    out, result, seconds = detect_run
    assert result.exit_code == 0, f"{result.output}\n{result.exception!r}"
    print(f"detect run: {seconds:.1f} s")
    assert sorted(p.name for p in out.rglob("*.parquet")) == ["detections.parquet"]
    assert sorted(p.name for p in out.rglob("*.csv")) == ["detections.csv"]
    rows = pq.read_table(out / "detections.parquet").to_pylist()
    paths = [join(PREFIX, relative) for relative in sorted(set(INPUTS) - {"brick/.hidden.png"})]
    assert [row["path"] for row in rows] == paths  # sorted, hidden file left out
    with (out / "detections.csv").open() as handle:
        assert [row["path"] for row in csv.DictReader(handle)] == paths

    by_path = {row["path"][len(PREFIX) + 1 :]: row for row in rows}
    for relative in BAD:
        row = by_path[relative]
        assert row["error"] and relative in row["error"], row
        assert row["anomalous"] is None and row["score"] is None and row["overlay"] is None
    assert "not an image" in by_path["grass/fake.jpg"]["error"]
    assert "no reference for category 'in'" in by_path["notes.txt"]["error"]
    assert {r for r, row in by_path.items() if row["error"]} == set(BAD)

    scored = 0
    for relative, size in IMAGES.items():
        row = by_path[relative]
        assert row["category"] == relative.split("/")[0]
        assert (row["width"], row["height"]) == size and row["completion"]
        grid = model_grid(size, max_pixels=MAX_PIXELS)
        expected = parse_answer(row["completion"], scale=grid_scale(size, grid), size=size)
        assert row["boxes"] == pytest.approx([list(map(float, b)) for b in expected.boxes])
        assert all(0 <= x1 < x2 <= size[0] and 0 <= y1 < y2 <= size[1]
                   for x1, y1, x2, y2 in row["boxes"])  # fmt: skip
        assert len(row["labels"]) == len(row["boxes"])
        assert row["anomalous"] == expected.decision  # no threshold: the answer's Yes/No
        scored += row["score"] is not None
        overlay = Image.open(out / row["overlay"])
        factor = min(1.0, OVERLAY_SIDE / max(size))
        assert overlay.format == "PNG"
        assert overlay.size == (round(size[0] * factor), round(size[1] * factor))
    assert scored >= 2, "the SFT'd model should answer with a score most of the time"
    assert {"config.yaml", "run_info.json"} <= {p.name for p in out.iterdir()}
    assert not (out / "FAILED").exists()
    assert "files: 7" in result.output and "errors: 3" in result.output


def test_the_contact_sheet_lists_every_file_by_score(detect_run):
    out, result, _ = detect_run
    assert result.exit_code == 0
    rows = pq.read_table(out / "detections.parquet").to_pylist()
    page = (out / "index.html").read_text()
    cards = re.findall(r'data-path="([^"]*)" data-score="([^"]*)"', page)
    assert sorted(path for path, _ in cards) == sorted(row["path"] for row in rows)
    scores = [float(score) for _, score in cards if score]
    assert scores == sorted(scores, reverse=True) and len(scores) == sum(
        row["score"] is not None for row in rows
    )
    assert all(not score for _, score in cards[len(scores) :])  # unscored ones last
    for row in rows:
        if row["overlay"]:
            assert f'src="{row["overlay"]}"' in page
            assert (out / row["overlay"]).is_file()
    assert page.count('class="error"') == 3
