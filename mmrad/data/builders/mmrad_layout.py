"""MMR-AD importer: the published benchmark layout.

Layout under ``config.input``::

    <source>/<category>/train_good/*                  normal training images
    <source>/<category>/test_good/*                   normal test images
    <source>/<category>/test/<type>/*                 anomalous images of one defect type
    <source>/<category>/ground_truth/<type>/<name>_mask.png     (optional)
    <source>/<category>/bbox_annos.json               boxes + labels per image (optional)
    <source>/<category>/text_annos.json               reasoning text per image (optional)
    <source>/<category>/reference.json                reference image per image (optional)

``train_good`` images are published training images, ``test_good`` and ``test`` images
published test images. Records get ``source`` = the ``<source>`` folder name; ids and
output paths are ``mmrad/<source>/<category>/<path in the category folder>``. Boxes come
from ``bbox_annos.json`` (clipped to the image), else from the ground-truth mask (one box
per 8-connected component, labelled with the defect type). The reference is the one
``reference.json`` names, else the category's first ``train_good`` image in sorted order
(the next one for that image itself).

The JSON files are not documented publicly. Everything this importer assumes about them
is in the marked section below; when a file does not fit, the build stops with an error
that names the file and shows what was found.
"""

from __future__ import annotations

import json
import math
import re
from collections import Counter, defaultdict
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmrad.data.builders.base import BuildLog, DataBuildError, Draft, builder, checked_image
from mmrad.data.builders.mvtec import (
    IMAGE_SUFFIXES,
    Normal,
    checked_normals,
    default_reference,
    image_files,
    input_folder,
    listing,
    make_draft,
    mask_boxes,
    output_path,
    query_size,
    subfolders,
)
from mmrad.data.schema import NORMAL_DEFECT_TYPE
from mmrad.task.geometry import Box, Size, clip_box, is_valid_box

SOURCE = "mmrad"  # prefix of ids and output paths; records' `source` is the <source> folder
TRAIN_FOLDER = "train_good"
NORMAL_FOLDERS = (TRAIN_FOLDER, "test_good")
TEST_FOLDER = "test"
GROUND_TRUTH_FOLDER = "ground_truth"


# ==== The MMR-AD annotation mapping: the one place to adapt to the JSON files ===========
BBOX_FILE = "bbox_annos.json"
TEXT_FILE = "text_annos.json"
REFERENCE_FILE = "reference.json"
# A list-shaped file names each entry's image in one of these fields.
IMAGE_FIELDS = ("image", "image_path", "img_path", "path", "file_name", "filename")
BOX_FIELDS = ("bbox", "bbox_2d", "box")  # one box: [x1, y1, x2, y2] in original pixels
BOXES_FIELDS = ("boxes", "bboxes")  # a list of boxes
LABEL_FIELDS = ("label", "type")
TEXT_FIELDS = ("reasoning", "think", "cot", "text", "answer")
REFERENCE_FIELDS = ("reference", "reference_path", "reference_image", "ref", "ref_image")
_THINK = re.compile(r"<think>(.*?)</think>", re.DOTALL)
_ANSWER = re.compile(r"<answer>.*?(</answer>|$)", re.DOTALL)


class AnnotationShapeError(ValueError):
    """A JSON file or entry has a structure this mapping does not know."""


def _annotation_key(path: str) -> str:
    """How an image is compared with JSON keys: a ``/`` path without ``./``, a leading ``/``
    or an image suffix. A key may carry more leading folders than the image's path in the
    category folder (``mvtec/bottle/test/crack/000.png``) or fewer (``000.png``, used when
    it names one image only): see :meth:`_AnnotationFile.lookup`."""
    parts = [p for p in path.strip().replace("\\", "/").split("/") if p not in ("", ".")]
    if parts and Path(parts[-1]).suffix.lower() in IMAGE_SUFFIXES:
        parts[-1] = Path(parts[-1]).stem
    return "/".join(parts)


def _annotation_entries(data: Any) -> dict[str, Any]:
    """Per-image entries of a JSON file: a dict keyed by image path or file name, a list of
    dicts that name their image in one of :data:`IMAGE_FIELDS` (several dicts of one image
    become a list), or either of those wrapped in a dict of one key."""
    if isinstance(data, dict):
        if not data:
            return {}
        if any(isinstance(k, str) and _looks_like_image(k) for k in data):
            return dict(data)
        if len(data) == 1 and isinstance(next(iter(data.values())), dict | list):
            return _annotation_entries(next(iter(data.values())))
    elif isinstance(data, list):
        if not data:
            return {}
        if all(isinstance(item, dict) and _image_field(item) for item in data):
            grouped: dict[str, list[Any]] = defaultdict(list)
            for item in data:
                grouped[item[_image_field(item)]].append(item)
            return {k: v[0] if len(v) == 1 else v for k, v in grouped.items()}
    raise AnnotationShapeError(
        "expected a dict keyed by image path or file name, or a list of dicts naming their "
        f"image in one of {', '.join(IMAGE_FIELDS)}; found {_describe(data)}"
    )


def _boxes_from_annotation(entry: Any) -> list[tuple[Any, str | None]]:
    """``(raw box, label or None)`` pairs of one image's entry in ``bbox_annos.json``: a list
    of ``{"bbox"|"bbox_2d"|"box": [x1, y1, x2, y2], "label"|"type": str}`` (or of bare
    4-number lists), one such dict, or a dict with a ``"boxes"`` list."""
    if entry is None:
        return []
    if isinstance(entry, dict):
        for name in BOXES_FIELDS:
            if name in entry:
                default = _label(entry)
                boxes = _boxes_from_annotation(entry[name])
                return [(box, label or default) for box, label in boxes]
        for name in BOX_FIELDS:
            if name in entry:
                return [(entry[name], _label(entry))]
        raise AnnotationShapeError(
            f"a box entry needs one of {', '.join(BOX_FIELDS + BOXES_FIELDS)}; "
            f"found {_describe(entry)}"
        )
    if isinstance(entry, list):
        if len(entry) == 4 and all(_is_number(v) for v in entry):
            return [(entry, None)]
        pairs: list[tuple[Any, str | None]] = []
        for item in entry:
            if isinstance(item, dict):
                pairs.extend(_boxes_from_annotation(item))
            elif isinstance(item, list | tuple):
                pairs.append((item, None))
            else:
                raise AnnotationShapeError(f"a box list holds {_describe(item)}")
        return pairs
    raise AnnotationShapeError(f"a box entry is {_describe(entry)}")


def _reasoning_from_annotation(entry: Any) -> str | None:
    """The reasoning text of one image's entry in ``text_annos.json``: a string, or a dict
    with one of :data:`TEXT_FIELDS` (a list: its first text). Inside ``<think>...</think>``
    only, when the text has such a block; ``<answer>`` blocks are dropped."""
    if entry is None:
        return None
    if isinstance(entry, str):
        found = _THINK.search(entry)
        text = found.group(1) if found else _ANSWER.sub("", entry)
        return text.strip() or None
    if isinstance(entry, list):
        for item in entry:
            text = _reasoning_from_annotation(item)
            if text:
                return text
        return None
    if isinstance(entry, dict):
        for name in TEXT_FIELDS:
            if name in entry:
                return _reasoning_from_annotation(entry[name])
    raise AnnotationShapeError(
        f"a text entry needs to be a string or hold one of {', '.join(TEXT_FIELDS)}; "
        f"found {_describe(entry)}"
    )


def _reference_from_annotation(entry: Any) -> str | None:
    """The reference image path (relative to the category folder) of one image's entry in
    ``reference.json``: a string, a list (its first), or a dict with one of
    :data:`REFERENCE_FIELDS`."""
    if entry is None:
        return None
    if isinstance(entry, str):
        return entry.strip() or None
    if isinstance(entry, list):
        for item in entry:
            path = _reference_from_annotation(item)
            if path:
                return path
        return None
    if isinstance(entry, dict):
        for name in REFERENCE_FIELDS:
            if name in entry:
                return _reference_from_annotation(entry[name])
    raise AnnotationShapeError(
        "a reference entry needs to be a path, a list of paths or hold one of "
        f"{', '.join(REFERENCE_FIELDS)}; found {_describe(entry)}"
    )


# ==== end of the annotation mapping ====================================================


def _looks_like_image(key: str) -> bool:
    return "/" in key or "\\" in key or Path(key).suffix.lower() in IMAGE_SUFFIXES


def _image_field(item: dict[str, Any]) -> str | None:
    return next((name for name in IMAGE_FIELDS if isinstance(item.get(name), str)), None)


def _label(entry: dict[str, Any]) -> str | None:
    for name in LABEL_FIELDS:
        value = entry.get(name)
        if isinstance(value, str | int) and not isinstance(value, bool) and str(value).strip():
            return str(value).strip()
    return None


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _truncate(text: str, limit: int = 200) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _describe(value: Any) -> str:
    """What a JSON value is, short enough for an error message."""
    if isinstance(value, dict):
        keys = ", ".join(repr(k) for k in list(value)[:5])
        sample = _truncate(repr(next(iter(value.values())))) if value else "-"
        return f"a dict of {len(value)} entries (first keys {keys}; first value {sample})"
    if isinstance(value, list):
        sample = _truncate(repr(value[0])) if value else "-"
        return f"a list of {len(value)} items (first item {sample})"
    return f"a {type(value).__name__} ({_truncate(repr(value))})"


def _suffixes(key: str) -> list[str]:
    parts = key.split("/")
    return ["/".join(parts[i:]) for i in range(len(parts))]


@dataclass
class _AnnotationFile:
    """One JSON file of a category, with its keys indexed for :meth:`lookup`."""

    path: Path
    entries: dict[str, tuple[str, Any]]  # annotation key -> (key as written, entry)
    by_name: dict[str, list[str]] = field(default_factory=dict)

    @classmethod
    def load(cls, path: Path) -> _AnnotationFile | None:
        if not path.is_file():
            return None
        try:
            data = json.loads(path.read_text(encoding="utf-8-sig"))
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
            raise DataBuildError(f"{path}: not a readable JSON file ({err})") from None
        try:
            raw = _annotation_entries(data)
        except AnnotationShapeError as err:
            raise _shape_error(path, None, err) from None
        entries = {_annotation_key(str(k)): (str(k), v) for k, v in raw.items()}
        by_name: dict[str, list[str]] = defaultdict(list)
        for key in entries:
            by_name[key.rsplit("/", 1)[-1]].append(key)
        return cls(path, entries, dict(by_name))

    def lookup(self, relative: str, suffix_counts: Counter[str]) -> str | None:
        """The key of the entry of the image at ``relative`` (in the category folder): the
        same path, else the one key that ends with it, else the longest key it ends with
        that names no other image of the category (``suffix_counts``)."""
        target = _annotation_key(relative)
        if target in self.entries:
            return target
        candidates = self.by_name.get(target.rsplit("/", 1)[-1], [])
        longer = [k for k in candidates if k.endswith("/" + target)]
        if len(longer) == 1:
            return longer[0]
        shorter = [k for k in candidates if target.endswith("/" + k) and suffix_counts[k] == 1]
        return max(shorter, key=len) if shorter else None

    def entry(self, key: str | None) -> tuple[str, Any]:
        return self.entries[key] if key is not None else ("", None)


def _shape_error(path: Path, key: str | None, err: Exception) -> DataBuildError:
    where = f"{path}" if key is None else f"{path}: entry {key!r}"
    return DataBuildError(
        f"{where}: unknown structure: {err}. Adapt the annotation mapping at the top of "
        "mmrad/data/builders/mmrad_layout.py"
    )


def _is_category(folder: Path) -> bool:
    return any((folder / name).is_dir() for name in (*NORMAL_FOLDERS, TEST_FOLDER))


def _checked_box(raw: Any, size: Size) -> tuple[Box | None, str]:
    """The box clipped to the image, or ``(None, reason)``."""
    if not (isinstance(raw, list | tuple) and len(raw) == 4 and all(map(_is_number, raw))):
        return None, f"box {_truncate(repr(raw))} is not [x1, y1, x2, y2] numbers"
    if not all(math.isfinite(v) for v in raw):
        return None, f"box {list(raw)} has a non-finite coordinate"
    box = clip_box([float(v) for v in raw], size)
    if not is_valid_box(box, size):
        return None, f"box {list(raw)} is empty inside the {size[0]}x{size[1]} image"
    return box, ""


def _reference_file(value: str, bases: Sequence[Path]) -> Path | None:
    """The file a reference path names: tried under each base folder, then with leading
    folders dropped one at a time (for paths written from another root)."""
    parts = [p for p in value.strip().replace("\\", "/").split("/") if p not in ("", ".")]
    if not parts or ".." in parts:
        return None
    for start in range(len(parts)):
        for base in bases:
            candidate = base.joinpath(*parts[start:])
            if candidate.is_file():
                return candidate
    return None


def _mask_file(category_dir: Path, defect: str, image: Path) -> Path:
    folder = category_dir / GROUND_TRUTH_FOLDER / defect
    names = [f"{image.stem}_mask.png", f"{image.stem}.png"]
    names += [f"{image.stem}_mask{image.suffix}", image.name]
    return next((folder / n for n in names if (folder / n).is_file()), folder / names[0])


@builder(SOURCE)
def build_mmrad(config: Any, build_log: BuildLog) -> Iterator[Draft]:
    """Records of every ``<source>/<category>`` under ``config.input``."""
    root = input_folder(config, SOURCE)
    categories = [
        (source_dir, category_dir)
        for source_dir in subfolders(root)
        for category_dir in subfolders(source_dir)
        if _is_category(category_dir)
    ]
    if not categories:
        hint = ""
        if any(_is_category(d) for d in subfolders(root)):
            hint = " (its subfolders look like categories: pass the folder above it)"
        raise DataBuildError(
            f"{root}: no MMR-AD category folder (<source>/<category>/ holding "
            f"{', '.join(NORMAL_FOLDERS)} or {TEST_FOLDER}/) found{hint}; "
            f"the folder holds: {listing(root)}"
        )
    for source_dir, category_dir in categories:
        yield from _mmrad_category(root, source_dir, category_dir, build_log)


def _category_images(category_dir: Path) -> list[tuple[str, Path, str]]:
    """``(path in the category folder, file, defect type)``, sorted by path."""
    images = [
        (f"{folder}/{p.name}", p, NORMAL_DEFECT_TYPE)
        for folder in NORMAL_FOLDERS
        for p in image_files(category_dir / folder)
    ]
    for type_dir in subfolders(category_dir / TEST_FOLDER):
        images += [
            (f"{TEST_FOLDER}/{type_dir.name}/{p.name}", p, type_dir.name)
            for p in image_files(type_dir)
        ]
    return sorted(images)


def _mmrad_category(
    root: Path, source_dir: Path, category_dir: Path, build_log: BuildLog
) -> Iterator[Draft]:
    source, category = source_dir.name, category_dir.name
    images = _category_images(category_dir)
    suffix_counts = Counter(s for rel, _, _ in images for s in _suffixes(_annotation_key(rel)))
    files = {
        name: _AnnotationFile.load(category_dir / name)
        for name in (BBOX_FILE, TEXT_FILE, REFERENCE_FILE)
    }
    keys: dict[str, dict[str, str | None]] = {}
    for name, table in files.items():
        if table is None:
            continue
        keys[name] = {rel: table.lookup(rel, suffix_counts) for rel, _, _ in images}
        if table.entries and images and not any(keys[name].values()):
            first = ", ".join(repr(raw) for raw, _ in list(table.entries.values())[:3])
            raise DataBuildError(
                f"{table.path}: none of its {len(table.entries)} keys (first: {first}) names "
                f"an image under {category_dir} (e.g. {images[0][0]!r}). Adapt "
                "_annotation_key in mmrad/data/builders/mmrad_layout.py"
            )

    train = [
        (p, output_path(SOURCE, root, p))
        for rel, p, _ in images
        if rel.startswith(TRAIN_FOLDER + "/")
    ]
    normals, sizes = checked_normals([p for p, _ in train], [r for _, r in train], build_log)
    known: dict[Path, Normal | None] = {n.path: n for n in normals}
    bases = (category_dir, category_dir / TRAIN_FOLDER, source_dir, root)

    def annotation(name: str, rel: str) -> tuple[_AnnotationFile | None, str, Any]:
        table = files[name]
        if table is None:
            return None, "", None
        raw_key, entry = table.entry(keys[name][rel])
        return table, raw_key, entry

    for rel, path, defect in images:
        relative = output_path(SOURCE, root, path)
        train_normal = rel.startswith(TRAIN_FOLDER + "/")
        size = query_size(sizes, relative, path, build_log, checked_before=train_normal)
        if size is None:
            continue
        anomalous = defect != NORMAL_DEFECT_TYPE

        table, raw_key, entry = annotation(BBOX_FILE, rel)
        try:
            pairs = _boxes_from_annotation(entry)
        except AnnotationShapeError as err:
            raise _shape_error(table.path, raw_key, err) from None
        boxes: list[Box] = []
        labels: list[str] = []
        reason = ""
        for raw, label in pairs:
            box, reason = _checked_box(raw, size)
            if box is None:
                break
            boxes.append(box)
            labels.append(label or defect)
        if len(boxes) < len(pairs) or (pairs and not anomalous):
            if not reason:
                reason = f"normal image {rel} has {len(pairs)} boxes"
            build_log.bad(f"{table.path}[{raw_key}]", reason)
            continue
        if anomalous and not boxes:
            found = mask_boxes(_mask_file(category_dir, defect, path), path, size, build_log)
            if found is None:
                continue
            boxes, labels = found, [defect] * len(found)

        table, raw_key, entry = annotation(TEXT_FILE, rel)
        try:
            reasoning = _reasoning_from_annotation(entry)
        except AnnotationShapeError as err:
            raise _shape_error(table.path, raw_key, err) from None

        reference = default_reference(normals, relative)
        table, raw_key, entry = annotation(REFERENCE_FILE, rel)
        try:
            named = _reference_from_annotation(entry)
        except AnnotationShapeError as err:
            raise _shape_error(table.path, raw_key, err) from None
        if named is not None:
            ref_path = _reference_file(named, bases)
            if ref_path is None:
                build_log.bad(f"{table.path}[{raw_key}]", f"reference {named!r} not found")
            else:
                if ref_path not in known:
                    ok = checked_image(ref_path, build_log) is not None
                    known[ref_path] = (
                        Normal(output_path(SOURCE, root, ref_path), ref_path) if ok else None
                    )
                reference = known[ref_path] or reference

        yield make_draft(
            source=source,
            category=category,
            relative=relative,
            path=path,
            size=size,
            boxes=boxes,
            labels=labels,
            defect_type=defect,
            reference=reference,
            published_split="train" if train_normal else "test",
            reasoning=reasoning,
        )
