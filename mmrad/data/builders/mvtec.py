"""MVTec AD importer, and the folder-layout helpers the VisA and MMR-AD importers share.

Layout under ``config.input`` (the official archive, extracted)::

    <category>/train/good/*.png                 normal training images
    <category>/test/good/*.png                  normal test images
    <category>/test/<defect>/*.png              anomalous images of one defect type
    <category>/ground_truth/<defect>/<name>_mask.png

Every image becomes one record with its published split: ``train/`` images are
training images, ``test/`` images test images (``data.split.mode`` decides what becomes of
them). Boxes are one per 8-connected mask component, labelled with the
defect type. The reference image of a category is its first training image in sorted
order (the next one for that image itself).
"""

from __future__ import annotations

import posixpath
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import numpy as np
from PIL import Image

from mmrad.data.builders.base import (
    BuildLog,
    DataBuildError,
    Draft,
    PublishedSplit,
    builder,
    checked_image,
    file_loader,
)
from mmrad.data.schema import NORMAL_DEFECT_TYPE
from mmrad.task.geometry import Box, Size, mask_to_boxes

SOURCE = "mvtec"
IMAGE_SUFFIXES = frozenset({".png", ".jpg", ".jpeg", ".bmp", ".tif", ".tiff", ".webp"})


# -- shared by the folder-layout importers (mvtec, visa, mmrad) ----------------------------


@dataclass(frozen=True)
class Normal:
    """A readable normal image that can serve as a reference: output path and input file."""

    relative: str
    path: Path


def input_folder(config: Any, source: str) -> Path:
    """``config.input`` as a folder, or a :class:`DataBuildError` that says what is wrong."""
    if not config.input:
        raise DataBuildError(f"source {source!r} needs `input` (the raw data set's folder)")
    root = Path(config.input).expanduser()
    if not root.is_dir():
        state = "is not a folder" if root.exists() else "does not exist"
        raise DataBuildError(f"{root}: the {source} input folder {state}")
    return root


def listing(folder: Path, limit: int = 10) -> str:
    """The first entries of ``folder`` for error messages (folders end with ``/``)."""
    try:
        entries = sorted(folder.iterdir())
    except OSError as err:
        return f"<cannot list: {err.strerror or err}>"
    if not entries:
        return "nothing (empty folder)"
    names = [e.name + ("/" if e.is_dir() else "") for e in entries[:limit]]
    more = f", ... ({len(entries) - limit} more)" if len(entries) > limit else ""
    return ", ".join(names) + more


def subfolders(folder: Path) -> list[Path]:
    if not folder.is_dir():
        return []
    return sorted(p for p in folder.iterdir() if p.is_dir() and not p.name.startswith("."))


def image_files(folder: Path) -> list[Path]:
    """Image files directly in ``folder`` (any case of a known suffix), sorted; [] if absent."""
    if not folder.is_dir():
        return []
    return sorted(
        p
        for p in folder.iterdir()
        if p.is_file() and not p.name.startswith(".") and p.suffix.lower() in IMAGE_SUFFIXES
    )


def output_path(prefix: str, root: Path, path: Path) -> str:
    """Where ``path`` (under ``root``) goes under the output folder: ``prefix/<relative>``."""
    return f"{prefix}/{path.relative_to(root).as_posix()}"


def record_id(relative: str) -> str:
    """The id of an image: its output path without the file extension."""
    return posixpath.splitext(relative)[0]


def safe_relative(text: str) -> PurePosixPath | None:
    """A relative path from a data file (``\\`` accepted), or None if it leaves its folder."""
    path = PurePosixPath(text.strip().replace("\\", "/"))
    if not text.strip() or path.is_absolute() or ".." in path.parts:
        return None
    return path


def read_mask(path: Path) -> np.ndarray:
    """A boolean defect mask: any non-zero colour channel (alpha ignored) is a defect."""
    with Image.open(path) as image:
        image.load()
        if image.mode == "P":
            image = image.convert("RGB")
        pixels = np.asarray(image)
        if image.mode in ("LA", "PA"):
            pixels = pixels[..., :1]
        elif image.mode == "RGBA":
            pixels = pixels[..., :3]
    if pixels.ndim == 3:
        return (pixels != 0).any(axis=-1)
    return pixels != 0


def mask_boxes(
    mask_path: Path | None, image_path: Path, size: Size, build_log: BuildLog
) -> list[Box] | None:
    """Boxes of an anomalous image's mask, or None (logged) when the mask is missing,
    unreadable, of another size than the image, or has no defect pixel."""
    if mask_path is None or not mask_path.is_file():
        build_log.bad(mask_path or image_path, f"no mask for anomalous image {image_path}")
        return None
    try:
        mask = read_mask(mask_path)
    except Exception as err:
        build_log.bad(mask_path, f"not a readable mask ({err})")
        return None
    height, width = mask.shape[:2]
    if (width, height) != tuple(size):
        build_log.bad(
            mask_path,
            f"mask is {width}x{height} but its image {image_path} is {size[0]}x{size[1]}",
        )
        return None
    boxes = mask_to_boxes(mask)
    if not boxes:
        build_log.bad(mask_path, f"mask has no defect pixel, but {image_path} is anomalous")
        return None
    return boxes


def checked_normals(
    paths: Sequence[Path], relative: Sequence[str], build_log: BuildLog
) -> tuple[list[Normal], dict[str, Size]]:
    """The readable ones among normal images (sorted by output path) and their sizes."""
    normals, sizes = [], {}
    for path, rel in sorted(zip(paths, relative, strict=True), key=lambda pr: pr[1]):
        checked = checked_image(path, build_log)
        if checked is not None:
            normals.append(Normal(rel, path))
            sizes[rel] = checked[1]
    return normals, sizes


def query_size(
    sizes: dict[str, Size], relative: str, path: Path, build_log: BuildLog, checked_before: bool
) -> Size | None:
    """A query image's size: from the normals already checked, else by decoding it now.
    ``checked_before``: the image was among the checked normals, so missing from ``sizes``
    means unreadable (and already logged)."""
    if relative in sizes:
        return sizes[relative]
    if checked_before:
        return None
    checked = checked_image(path, build_log)
    return checked[1] if checked else None


def default_reference(normals: Sequence[Normal], relative: str) -> Normal | None:
    """The first normal image that is not the query itself, or None."""
    for normal in normals[:2]:
        if normal.relative != relative:
            return normal
    return None


def make_draft(
    *,
    source: str,
    category: str,
    relative: str,
    path: Path,
    size: Size,
    boxes: list[Box],
    labels: list[str],
    defect_type: str,
    reference: Normal | None,
    published_split: PublishedSplit | None,
    reasoning: str | None = None,
) -> Draft:
    files = {relative: file_loader(path)}
    if reference is not None:
        files[reference.relative] = file_loader(reference.path)
    record = {
        "id": record_id(relative),
        "source": source,
        "category": category,
        "image_uri": relative,
        "reference_uri": reference.relative if reference is not None else None,
        "width": int(size[0]),
        "height": int(size[1]),
        "is_anomalous": bool(boxes),
        "boxes": [[float(v) for v in box] for box in boxes],
        "labels": list(labels),
        "defect_type": defect_type if boxes else NORMAL_DEFECT_TYPE,
        "reasoning": reasoning,
    }
    return Draft(record, files, published_split)


# -- MVTec AD -------------------------------------------------------------------------------


def mvtec_categories(root: Path) -> list[Path]:
    return [d for d in subfolders(root) if (d / "train").is_dir() or (d / "test").is_dir()]


@builder(SOURCE)
def build_mvtec(config: Any, build_log: BuildLog) -> Iterator[Draft]:
    """Records of every MVTec AD category under ``config.input``."""
    root = input_folder(config, SOURCE)
    categories = mvtec_categories(root)
    if not categories:
        raise DataBuildError(
            f"{root}: no MVTec AD category folder (one holding train/ or test/) found; "
            f"the folder holds: {listing(root)}"
        )
    for category_dir in categories:
        yield from _mvtec_category(root, category_dir, build_log)


def _mvtec_category(root: Path, category_dir: Path, build_log: BuildLog) -> Iterator[Draft]:
    category = category_dir.name
    train = image_files(category_dir / "train" / NORMAL_DEFECT_TYPE)
    train_rel = [output_path(SOURCE, root, p) for p in train]
    normals, sizes = checked_normals(train, train_rel, build_log)
    for normal in normals:
        yield make_draft(
            source=SOURCE,
            category=category,
            relative=normal.relative,
            path=normal.path,
            size=sizes[normal.relative],
            boxes=[],
            labels=[],
            defect_type=NORMAL_DEFECT_TYPE,
            reference=default_reference(normals, normal.relative),
            published_split="train",
        )
    for defect_dir in subfolders(category_dir / "test"):
        defect = defect_dir.name
        for path in image_files(defect_dir):
            checked = checked_image(path, build_log)
            if checked is None:
                continue
            size = checked[1]
            boxes: list[Box] = []
            if defect != NORMAL_DEFECT_TYPE:
                mask = category_dir / "ground_truth" / defect / f"{path.stem}_mask.png"
                found = mask_boxes(mask, path, size, build_log)
                if found is None:
                    continue
                boxes = found
            relative = output_path(SOURCE, root, path)
            yield make_draft(
                source=SOURCE,
                category=category,
                relative=relative,
                path=path,
                size=size,
                boxes=boxes,
                labels=[defect] * len(boxes),
                defect_type=defect,
                reference=default_reference(normals, relative),
                published_split="test",
            )
