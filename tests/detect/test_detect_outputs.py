"""What ``mmrad detect`` writes (fast, no Ray): detection rows from prediction rows,
overlays, the Parquet and CSV tables, the contact sheet, the config, and the command's
errors before Ray starts."""

from __future__ import annotations

import csv
import io
import json
import re
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from PIL import Image
from typer.testing import CliRunner

from mmrad.config import ConfigError, PixelBudget, load_config
from mmrad.detect.config import DetectJobConfig, target_overrides
from mmrad.detect.overlays import overlay_name, overlay_png
from mmrad.detect.results import (
    DETECTION_SCHEMA,
    FinishSpec,
    detection_fields,
    error_fields,
    finish_batch,
)
from mmrad.detect.sheet import contact_sheet, sort_for_sheet
from mmrad.detect.tables import csv_text, detections_table, parquet_bytes
from mmrad.engine.requests import query_grid
from mmrad.engine.sampling import Completion
from mmrad.serve.detect import detection as serve_detection
from mmrad.serve.overlay import BOX_COLOUR
from mmrad.storage import Storage
from mmrad.task.answer import format_answer

ANSWER = format_answer(True, [[14, 28, 42, 56]], ["scratch"], "A thin line, upper left.")


def prediction(uri: str, *, completion=ANSWER, score=0.8, error=None, size=(400, 300)):
    """A row as the evaluation core's predictors give it: 400 x 300 px on a 112 x 84 grid."""
    return {
        "id": uri, "image_uri": uri, "category": "bottle", "relative": Path(uri).name,
        "width": size[0], "height": size[1], "grid_width": 112, "grid_height": 84,
        "completions": [] if error else [completion], "scores": [] if error else [score],
        "error": error, "bad_image": bool(error),
    }  # fmt: skip


def detection(path: str, score, *, anomalous=True, error=None, labels=("scratch",)):
    fields = error_fields(path, "bottle", error)
    if not error:
        fields.update(anomalous=anomalous, score=score, boxes=[[1.0, 2.0, 3.0, 4.0]],
                      labels=list(labels), width=10, height=10,
                      overlay=overlay_name(Path(path).name))  # fmt: skip
    return {**fields, "relative": Path(path).name}


# -- detection rows ---------------------------------------------------------------------


def test_boxes_come_back_in_the_images_own_pixels_and_threshold_decides():
    row = prediction("/in/a.png", score=0.3)
    fields = detection_fields(row, reasoning=True, threshold=None)
    scale = 400 / 112, 300 / 84
    assert fields["boxes"] == [[14 * scale[0], 28 * scale[1], 42 * scale[0], 56 * scale[1]]]
    assert fields["labels"] == ["scratch"] and fields["reasoning"] == "A thin line, upper left."
    assert (fields["anomalous"], fields["score"], fields["error"]) == (True, 0.3, None)
    assert (fields["width"], fields["height"], fields["completion"]) == (400, 300, ANSWER)
    # a threshold on P(Yes) overrides the answer's own Yes, as /v1/detect does
    assert detection_fields(row, reasoning=True, threshold=0.5)["anomalous"] is False
    assert detection_fields(row, reasoning=True, threshold=0.3)["anomalous"] is True
    garbled = detection_fields(prediction("/in/b.png", completion="hm", score=None),
                               reasoning=True, threshold=0.5)  # fmt: skip
    assert garbled["anomalous"] is None and garbled["boxes"] == [] and not garbled["error"]


def test_a_model_that_answers_in_cells_gets_its_boxes_in_the_images_pixels():
    in_cells = format_answer(True, [[0, 1, 2, 2]], ["scratch"], "A thin line.")
    fields = detection_fields(prediction("/in/a.png", completion=in_cells), reasoning=True,
                              threshold=None, answer_unit=28)  # fmt: skip
    # cells of 28 grid pixels; the 112 x 84 grid is 400 x 300 px
    assert fields["boxes"] == [pytest.approx([0.0, 100.0, 200.0, 200.0])]


def test_serve_reads_a_cell_answer_into_the_querys_pixels():
    in_cells = format_answer(True, [[3, 0, 4, 3]], ["scratch"], "Right edge.")
    grid = query_grid((400, 300), PixelBudget(max_pixels=112 * 84))
    assert grid.grid == (112, 84)
    found = serve_detection(Completion(in_cells, (1,), score=0.9), grid, reasoning=True,
                            threshold=None, answer_unit=28)  # fmt: skip
    assert found.anomalous and found.verdict.boxes == [pytest.approx([300.0, 0.0, 400.0, 300.0])]


def test_an_error_row_has_no_verdict():
    fields = detection_fields(prediction("/in/a.png", error="/in/a.png: not an image"),
                              reasoning=True, threshold=0.5)  # fmt: skip
    assert fields == {**error_fields("/in/a.png", "bottle", "/in/a.png: not an image")}
    assert fields["anomalous"] is None and fields["score"] is None and fields["boxes"] is None


def test_finish_batch_draws_overlays_and_names_a_vanished_file(tmp_path):
    picture = tmp_path / "a.png"
    Image.fromarray(np.full((300, 400, 3), 200, np.uint8)).save(picture)
    rows = [prediction(str(picture)), prediction(str(tmp_path / "gone.png")),
            prediction(str(tmp_path / "bad.png"), error="bad.png: truncated")]  # fmt: skip
    batch = pa.Table.from_pylist(rows)
    out = finish_batch(batch, FinishSpec(Storage(), True, None, 200)).to_pylist()
    drawn = Image.open(io.BytesIO(out[0]["overlay_png"]))
    assert drawn.format == "PNG" and drawn.size == (200, 150)  # max_side 200
    assert out[0]["error"] is None and out[0]["anomalous"] is True
    assert out[1]["overlay_png"] is None and out[1]["bad_image"]
    assert "gone.png: drawing the overlay failed" in out[1]["error"]
    assert out[2]["overlay_png"] is None and out[2]["error"] == "bad.png: truncated"


def test_overlay_is_scaled_down_with_its_boxes():
    buffer = io.BytesIO()
    Image.fromarray(np.full((1000, 2000, 3), 255, np.uint8)).save(buffer, "PNG")
    small = np.asarray(Image.open(io.BytesIO(
        overlay_png(buffer.getvalue(), [[400.0, 200.0, 800.0, 600.0]], [""], 500))))  # fmt: skip
    assert small.shape == (250, 500, 3)
    red = np.all(small == BOX_COLOUR, axis=2)
    ys, xs = np.nonzero(red)
    assert (xs.min(), ys.min(), xs.max(), ys.max()) == (100, 50, 199, 149)  # box / 4
    full = overlay_png(buffer.getvalue(), [], [], None)
    assert Image.open(io.BytesIO(full)).size == (2000, 1000)
    assert overlay_name("bottle/a b.jpg") == "overlays/bottle/a b.jpg.png"


def test_long_names_get_overlay_names_the_disk_takes_unique_and_stable(tmp_path):
    """80 CJK characters are 240 bytes: with ``.png`` and the atomic write's temp name
    the file name would pass NAME_MAX (255) and the write fail."""
    long = "検" * 80 + ".png"
    name = overlay_name(f"{'線' * 90}/{long}")
    folder, file = name.split("/")[1:]
    assert folder.startswith("線" * 50 + "~") and file.startswith("検" * 50 + "~")
    assert file.endswith(".png") and all(len(part.encode()) <= 171 for part in (folder, file))
    assert overlay_name(f"{'線' * 90}/{long}") == name  # a rerun names the same overlay
    assert overlay_name("検" * 80 + "x.png") != overlay_name(long)  # same prefix, other file
    assert overlay_name("b/" + "a" * 150) == f"overlays/b/{'a' * 150}.png"  # short: as it is
    Storage().write_bytes(str(tmp_path / name), b"png")
    assert (tmp_path / name).read_bytes() == b"png"


# -- tables -----------------------------------------------------------------------------


def test_csv_text_that_a_spreadsheet_would_run_gets_a_quote_and_parquet_keeps_it():
    """Folder names (categories) and model answers are not to be trusted."""
    formula = '=HYPERLINK("http://x")'
    row = detection("/in/=cmd/a.png", 0.9, labels=("=1+1",))
    row.update(category=formula, reasoning="+1", completion="-2", overlay="@SUM(A1)")
    other = detection("/in/b.png", None, error="\tb.png: bad")
    other.update(category="\rx", reasoning="one\rtwo")  # a CR inside a cell splits no row
    table = detections_table([row, other])
    parsed = list(csv.DictReader(io.StringIO(csv_text(table))))
    cells = [parsed[0][k] for k in ("category", "reasoning", "completion", "overlay")]
    assert cells == ["'" + formula, "'+1", "'-2", "'@SUM(A1)"]
    assert (parsed[1]["error"], parsed[1]["category"]) == ("'\tb.png: bad", "'\rx")
    assert parsed[1]["reasoning"] == "one\rtwo" and len(parsed) == 2
    assert parsed[0]["path"] == "/in/=cmd/a.png" and parsed[0]["labels"] == '["=1+1"]'
    assert parsed[0]["score"] == "0.9"
    again = pq.read_table(io.BytesIO(parquet_bytes(table))).to_pylist()
    assert (again[0]["category"], again[1]["error"]) == (formula, "\tb.png: bad")


def test_parquet_and_csv_hold_the_same_rows():
    rows = [detection("/in/a.png", 0.9), detection("/in/b.png", None, anomalous=None, labels=()),
            detection("/in/c.txt", None, error="/in/c.txt: not an image, \"quoted\"")]  # fmt: skip
    table = detections_table(rows)
    assert table.schema == DETECTION_SCHEMA
    again = pq.read_table(io.BytesIO(parquet_bytes(table)))
    assert again.equals(table)
    assert again.column_names == ["path", "category", "anomalous", "score", "boxes", "labels",
                                  "reasoning", "error", "width", "height", "completion",
                                  "overlay"]  # fmt: skip
    parsed = list(csv.DictReader(io.StringIO(csv_text(table))))
    assert [r["path"] for r in parsed] == ["/in/a.png", "/in/b.png", "/in/c.txt"]
    assert parsed[0]["anomalous"] == "true" and parsed[0]["score"] == "0.9"
    assert json.loads(parsed[0]["boxes"]) == [[1.0, 2.0, 3.0, 4.0]]
    assert json.loads(parsed[0]["labels"]) == ["scratch"]
    assert parsed[1]["anomalous"] == "" and parsed[1]["labels"] == "[]"
    assert parsed[2]["error"] == '/in/c.txt: not an image, "quoted"'
    assert parsed[2]["boxes"] == "" and parsed[2]["score"] == ""


# -- the contact sheet --------------------------------------------------------------------


def test_sheet_sorts_by_score_and_escapes_everything():
    rows = [
        detection("/in/low.png", 0.1, anomalous=False),
        detection("/in/<script>alert(1)</script>.png", 0.95, labels=("<b>crack</b>",)),
        detection("/in/none.png", None, anomalous=None),
        detection("/in/tie b.png", 0.5),
        detection("/in/tie a#1.png", 0.5),
        detection("/in/x.txt", None, error="x.txt: <not> an image & more"),
    ]
    order = [r["path"] for r in sort_for_sheet(rows)]
    assert order == ["/in/<script>alert(1)</script>.png", "/in/tie a#1.png", "/in/tie b.png",
                     "/in/low.png", "/in/none.png", "/in/x.txt"]  # fmt: skip
    page = contact_sheet(rows, title="mmrad detect: <in>", details={"model": "m&m"})
    assert re.findall(r'data-path="([^"]*)"', page) == [
        "/in/&lt;script&gt;alert(1)&lt;/script&gt;.png", "/in/tie a#1.png", "/in/tie b.png",
        "/in/low.png", "/in/none.png", "/in/x.txt",
    ]  # fmt: skip
    assert "<script>" not in page and "<b>crack" not in page and "<not>" not in page
    assert "&lt;b&gt;crack&lt;/b&gt;" in page and "x.txt: &lt;not&gt; an image &amp; more" in page
    assert "mmrad detect: &lt;in&gt;" in page and "model: m&amp;m" in page
    assert 'href="overlays/tie%20a%231.png.png"' in page  # links quoted, relative
    assert "6 files: 3 anomalous, 1 normal, 1 without an answer, 1 failed" in page
    assert not re.search(r'(src|href)="(/|[a-z]+:)', page)  # nothing absolute or remote


# -- the config and the command ---------------------------------------------------------


def test_config_refuses_what_detect_cannot_use():
    assert load_config(DetectJobConfig, None, ["input=x"]).threshold is None
    with pytest.raises(ConfigError, match="key 'input': Field required"):
        load_config(DetectJobConfig, None, [])
    with pytest.raises(ConfigError, match="sampling.n: detect keeps one answer per image"):
        load_config(DetectJobConfig, None, ["input=x", "sampling.n=2"])
    with pytest.raises(ConfigError, match="threshold needs the score"):
        load_config(DetectJobConfig, None, ["input=x", "threshold=0.5", "sampling.logprobs=null"])


def test_target_flags_replace_the_files_target_and_overrides_apply_on_top():
    endpoint = target_overrides(None, "http://127.0.0.1:8000/v1", None)
    job = load_config(DetectJobConfig, "configs/local/detect.yaml",
                      [*endpoint, "target.api_key_env=null"])  # fmt: skip
    assert (job.target.kind, job.target.url, job.target.model) == (
        "endpoint", "http://127.0.0.1:8000/v1", "mmrad")  # fmt: skip
    assert job.target.api_key_env is None
    model = load_config(DetectJobConfig, None, ["input=x", *target_overrides("e", None, None)])
    assert (model.target.kind, model.target.path) == ("model", "e")
    with pytest.raises(ConfigError, match="give one of them"):
        target_overrides("e", "http://x/v1", None)
    with pytest.raises(ConfigError, match="give --endpoint"):
        target_overrides("e", None, "name")


def fake_export(folder: Path, use_reference: bool) -> Path:
    """An export's contract without weights: ``mmrad.json`` is all the driver reads
    before Ray starts."""
    folder.mkdir(parents=True)
    info = {"prompt": {"use_reference": use_reference, "domain_knowledge": False,
                       "reasoning": True}, "pixels": {"max_pixels": 12544}}  # fmt: skip
    (folder / "mmrad.json").write_text(json.dumps(info))
    return folder


def test_the_command_stops_before_ray_when_a_reference_is_missing(tmp_path, monkeypatch):
    """Through the CLI's flags: the folder's categories need references and the folder of
    references lacks one; the error names it, and no Ray, engine or output is started."""
    import ray

    from mmrad.cli import app

    Image.new("RGB", (32, 32)).save(tmp_path / "ref-bottle.png")
    for name in ("bottle/a.png", "screw/b.png"):
        (tmp_path / "in" / name).parent.mkdir(parents=True, exist_ok=True)
        Image.new("RGB", (32, 32)).save(tmp_path / "in" / name)
    (tmp_path / "refs").mkdir()
    (tmp_path / "refs" / "bottle.png").write_bytes((tmp_path / "ref-bottle.png").read_bytes())
    export = fake_export(tmp_path / "export", use_reference=True)
    ray_was_up = ray.is_initialized()
    common = [str(tmp_path / "in"), "--out", str(tmp_path / "out")]
    result = CliRunner().invoke(app, ["detect", *common, "--model", str(export),
                                      "--reference", str(tmp_path / "refs")])  # fmt: skip
    assert result.exit_code == 1 and result.output.startswith("error: "), result.output
    assert "category 'screw': no reference image in --reference" in result.output
    assert f"looked for {tmp_path}/refs/screw.<png|jpg|...>" in result.output
    result = CliRunner().invoke(app, ["detect", *common, "--model", str(export)])
    assert result.exit_code == 1 and "categories 'bottle', 'screw'" in result.output
    monkeypatch.delenv("MMRAD_TEST_UNSET_KEY", raising=False)
    result = CliRunner().invoke(app, ["detect", *common, "--endpoint", "http://127.0.0.1:9/v1",
                                      "target.api_key_env=MMRAD_TEST_UNSET_KEY"])  # fmt: skip
    assert result.exit_code == 1 and "MMRAD_TEST_UNSET_KEY is not set" in result.output
    result = CliRunner().invoke(app, ["detect", *common, "--model-name", "m"])
    assert result.exit_code == 2 and "give --endpoint" in result.output
    assert ray.is_initialized() == ray_was_up and not (tmp_path / "out").exists()


def test_a_rerun_removes_overlays_of_files_that_are_gone(tmp_path):
    from mmrad.detect.job import remove_stale_overlays

    for name in ("a.png.png", "old/b.png.png"):
        (tmp_path / "overlays" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "overlays" / name).write_bytes(b"png")
    remove_stale_overlays(Storage(), str(tmp_path), {"overlays/a.png.png", None})
    assert [p.name for p in (tmp_path / "overlays").rglob("*.png")] == ["a.png.png"]


@pytest.mark.parametrize("spelling", ["{}/./out", "{}//out/", "{}/x/../out"])
def test_an_odd_spelling_of_the_output_keeps_the_overlays_just_written(tmp_path, spelling):
    from mmrad.detect.job import remove_stale_overlays

    for name in ("a.png.png", "sub/b.png.png", "gone.png.png"):
        (tmp_path / "out" / "overlays" / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / "out" / "overlays" / name).write_bytes(b"png")
    current = {"overlays/a.png.png", "overlays/sub/b.png.png"}
    remove_stale_overlays(Storage(), spelling.format(tmp_path), current)
    found = (tmp_path / "out" / "overlays").rglob("*.png")
    assert sorted(p.relative_to(tmp_path / "out").as_posix() for p in found) == sorted(current)


def finished(path: str) -> dict:
    """A row as :func:`~mmrad.detect.results.finish_batch` hands it to the driver."""
    return {**detection(path, 0.9), "overlay": None, "bad_image": False, "overlay_png": b"png"}


def test_an_overlay_that_cannot_be_written_is_its_rows_error(tmp_path):
    from mmrad.detect.job import write_overlays

    (tmp_path / "overlays").mkdir()
    (tmp_path / "overlays" / "blocked").write_text("a file where a folder is needed")
    rows = [finished("/in/a.png"), {**finished("/in/x.png"), "relative": "blocked/x.png"}]
    kept = write_overlays(Storage(), str(tmp_path), iter(rows))
    assert [row["path"] for row in kept] == ["/in/a.png", "/in/x.png"]
    assert kept[0]["overlay"] == "overlays/a.png.png" and not kept[0]["error"]
    assert (tmp_path / "overlays" / "a.png.png").read_bytes() == b"png"
    failed = kept[1]
    assert failed["error"].startswith("/in/x.png: overlay not written: ")
    assert failed["anomalous"] is None and failed["overlay"] is None
    assert not failed["bad_image"] and "overlay_png" not in failed  # counts in the budget


def test_an_outage_while_writing_overlays_fails_the_job(tmp_path):
    from mmrad.detect.job import write_overlays
    from mmrad.storage import StorageUnavailable

    class Outage(Storage):
        def write_bytes(self, uri: str, data: bytes) -> None:
            raise StorageUnavailable(f"{uri}: object storage unreachable")

    with pytest.raises(StorageUnavailable):
        write_overlays(Outage(), str(tmp_path), iter([finished("/in/a.png")]))


def test_too_many_failed_predictions_withhold_the_detections(tmp_path):
    """Evaluation's error budget, with detect's files: an earlier run's tables and sheet
    go, FAILED says why; unreadable files are the data's fault and do not count."""
    from mmrad.detect.job import RESULT_FILES
    from mmrad.eval.budget import EvalFailed, enforce_error_budget

    for name in RESULT_FILES:
        (tmp_path / name).write_text("an earlier run's")
    bad_files = [{"error": "x.txt: not an image", "bad_image": True}] * 3
    enforce_error_budget(Storage(), str(tmp_path), [*bad_files, {"error": None}], 0.0,
                         stale=RESULT_FILES, withheld="detections")  # fmt: skip
    assert all((tmp_path / name).exists() for name in RESULT_FILES)
    failed = [{"error": "generation failed: EngineDead", "bad_image": False}, {"error": None}]
    with pytest.raises(EvalFailed, match=r"1 of 2 predictions failed .* no detections written"):
        enforce_error_budget(Storage(), str(tmp_path), failed, 0.02, stale=RESULT_FILES,
                             withheld="detections")  # fmt: skip
    assert not any((tmp_path / name).exists() for name in RESULT_FILES)
    assert json.loads((tmp_path / "FAILED").read_text())["errors"] == 1
