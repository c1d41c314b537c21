"""What ``mmrad detect`` inspects (fast, no Ray): listing, categories, references, and
the errors that stop the job before anything starts."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from mmrad.detect.inputs import (
    DetectError,
    InputFile,
    check_references,
    find_references,
    list_input_files,
    plan_inspection,
)
from mmrad.storage import Storage

STORAGE = Storage()


def image(path: Path, size=(40, 30), colour=120) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.fromarray(np.full((size[1], size[0], 3), colour, np.uint8)).save(path)
    return path


def text(path: Path, content: str = "not an image") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(content)
    return path


@pytest.fixture
def folder(tmp_path) -> Path:
    """``new/``: two category folders (one nested deeper), a stray text file, hidden
    files and a hidden folder, the output folder and a reference folder inside it."""
    root = tmp_path / "new"
    image(root / "bottle" / "b.png")
    image(root / "bottle" / "a.jpg")
    image(root / "line" / "screw" / "c.png")
    text(root / "notes.txt")
    text(root / "bottle" / "scan.tif", "truncated?")
    image(root / ".thumbs" / "x.png")
    text(root / "bottle" / ".DS_Store", "Bud1")
    image(root / "out" / "overlays" / "bottle" / "a.jpg.png")
    image(root / "refs" / "bottle.png")
    return root


def relatives(files: list[InputFile]) -> list[str]:
    return [f.relative for f in files]


def test_listing_is_recursive_sorted_and_skips_hidden_output_and_references(folder):
    files = list_input_files(STORAGE, str(folder),
                             exclude=[str(folder / "out"), str(folder / "refs"), None])  # fmt: skip
    assert relatives(files) == [
        "bottle/a.jpg", "bottle/b.png", "bottle/scan.tif", "line/screw/c.png", "notes.txt",
    ]  # fmt: skip
    assert [f.uri for f in files] == [str(folder / r) for r in relatives(files)]
    # category: the parent folder's name (the input's own name at its top level)
    assert [f.category for f in files] == ["bottle", "bottle", "bottle", "screw", "new"]


def test_odd_spellings_of_the_input_output_and_references_list_the_same(
    folder, tmp_path, monkeypatch
):
    """``x/./in``, ``//`` and relative paths: the relative names stay right and the output
    and references stay excluded (the listing is normalized, so they must be too)."""
    plain = list_input_files(STORAGE, str(folder),
                             exclude=[str(folder / "out"), str(folder / "refs")])  # fmt: skip
    odd = list_input_files(STORAGE, f"{tmp_path}/./new//",
                           exclude=[f"{folder}/./out/", f"{folder}//refs"])  # fmt: skip
    assert odd == plain and relatives(odd)[0] == "bottle/a.jpg"
    monkeypatch.chdir(tmp_path)
    relative = list_input_files(STORAGE, "new/./bottle/", exclude=["new/bottle//b.png"])
    assert [f.uri for f in relative] == [str(folder / "bottle" / n) for n in ("a.jpg", "scan.tif")]
    assert find_references(STORAGE, "new/./refs//", ["bottle"]) == {
        "bottle": str(folder / "refs" / "bottle.png")
    }


def test_one_category_for_every_file_and_a_single_file(folder):
    files = list_input_files(STORAGE, str(folder / "bottle"), category="vial")
    assert relatives(files) == ["a.jpg", "b.png", "scan.tif"]
    assert {f.category for f in files} == {"vial"}
    one = list_input_files(STORAGE, str(folder / "line" / "screw" / "c.png") + "/")
    assert [(f.relative, f.category) for f in one] == [("c.png", "screw")]


def test_an_empty_or_missing_input_is_named(tmp_path):
    image(tmp_path / "empty" / ".hidden.png")
    with pytest.raises(DetectError, match=r"empty: no files to inspect in this folder "
                       r"\(1 hidden files skipped\)"):  # fmt: skip
        list_input_files(STORAGE, str(tmp_path / "empty"))
    with pytest.raises(DetectError, match="nowhere: no such folder or file"):
        list_input_files(STORAGE, str(tmp_path / "nowhere"))


def test_references_from_one_file_or_a_folder_of_category_names(folder, tmp_path):
    refs = tmp_path / "refs"
    image(refs / "bottle.png")
    image(refs / "screw.jpg")
    image(refs / "nested" / "line.png")  # not directly in the folder: not a reference
    text(refs / "README.md")
    assert find_references(STORAGE, str(refs), ["bottle", "screw"]) == {
        "bottle": str(refs / "bottle.png"), "screw": str(refs / "screw.jpg"),
    }  # fmt: skip
    single = str(refs / "bottle.png")
    assert find_references(STORAGE, single, ["bottle", "screw"]) == {
        "bottle": single, "screw": single,
    }  # fmt: skip
    assert find_references(STORAGE, None, []) == {}  # no images, nothing needed


def test_a_missing_reference_names_the_category_and_where_it_was_looked_for(tmp_path):
    refs = tmp_path / "refs"
    image(refs / "bottle.png")
    with pytest.raises(DetectError) as err:
        find_references(STORAGE, str(refs), ["bottle", "screw"])
    message = str(err.value)
    assert "category 'screw'" in message and f"looked for {refs}/screw.<png|jpg|...>" in message
    assert "images there: bottle.png" in message
    with pytest.raises(DetectError, match=r"categories 'bottle', 'screw': the model's prompt "
                       r"shows a normal reference image .* no --reference was given"):  # fmt: skip
        find_references(STORAGE, None, ["bottle", "screw"])
    with pytest.raises(DetectError, match=r"--reference .*absent: no such file or folder"):
        find_references(STORAGE, str(tmp_path / "absent"), ["bottle"])
    image(refs / "bottle.jpg")
    with pytest.raises(DetectError, match=r"category 'bottle': 2 references .*bottle.jpg, "
                       r"bottle.png\); keep one"):  # fmt: skip
        find_references(STORAGE, str(refs), ["bottle"])


def test_plan_sends_images_with_their_reference_and_refuses_stray_files(folder):
    files = list_input_files(STORAGE, str(folder),
                             exclude=[str(folder / "out"), str(folder / "refs")])  # fmt: skip
    single = str(folder / "refs" / "bottle.png")
    plan = plan_inspection(STORAGE, files, single, needs_reference=True)
    # notes.txt is the only file of category "new" and has no image extension
    assert relatives(plan.queries) == [
        "bottle/a.jpg", "bottle/b.png", "bottle/scan.tif", "line/screw/c.png",
    ]  # fmt: skip
    assert plan.references == {"bottle": single, "screw": single}
    [(refused, why)] = plan.refused
    assert refused.relative == "notes.txt"
    assert why == (f"{folder}/notes.txt: not sent to the model: no image extension (.txt) "
                   "and no reference for category 'new'")  # fmt: skip

    no_reference = plan_inspection(STORAGE, files, None, needs_reference=False)
    assert no_reference.queries == files and not no_reference.references
    assert not no_reference.refused


def test_a_reference_that_is_no_image_fails_naming_its_categories(tmp_path):
    good = image(tmp_path / "bottle.png")
    broken = tmp_path / "screw.png"
    broken.write_bytes(good.read_bytes()[:60])  # a truncated PNG
    check_references(STORAGE, {"bottle": str(good)})
    with pytest.raises(DetectError, match=r"reference of screw, vial: .*screw.png is not a "
                       r"readable image"):  # fmt: skip
        check_references(STORAGE, {"bottle": str(good), "screw": str(broken),
                                   "vial": str(broken)})  # fmt: skip
    with pytest.raises(DetectError, match=r"reference of bottle: .*gone.png: no such file"):
        check_references(STORAGE, {"bottle": str(tmp_path / "gone.png")})


def test_listed_rows_get_their_images_own_size_while_decoding(tmp_path):
    """A listed file's size is unknown until it is decoded; a manifest's is kept."""
    import pyarrow as pa

    from mmrad.config import PixelBudget
    from mmrad.data.loading import decode_with_size, with_own_sizes

    grid, size = decode_with_size(image(tmp_path / "a.png", (400, 100)).read_bytes(),
                                  PixelBudget(max_pixels=12544))  # fmt: skip
    assert size == (400, 100) and grid.shape[1] > grid.shape[0]
    listed = pa.table({"id": ["a", "bad"], "width": [None, None], "height": [None, None]})
    filled = with_own_sizes(listed, [size, None])
    assert filled.select(["width", "height"]).to_pylist() == [
        {"width": 400, "height": 100}, {"width": None, "height": None},
    ]  # fmt: skip
    assert with_own_sizes(pa.table({"id": ["a"]}), [size]).column("height").to_pylist() == [100]
    manifest = pa.table({"id": ["a"], "width": [224], "height": [224]})
    assert with_own_sizes(manifest, [size]).equals(manifest)
