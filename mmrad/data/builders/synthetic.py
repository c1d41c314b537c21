"""Synthetic anomaly data on real images that ship with scikit-image.

Each category is one scikit-image picture (a texture such as brick or an object scene
such as coins). Queries are random crops of it; anomalous queries get procedurally drawn
defects whose exact masks give exact boxes and labels. Every query has a normal reference
crop of its category (``synthetic.reference: aligned``: its own crop before painting)
and a reasoning text that says what is seen and where, without coordinates.
Deterministic for a seed.
"""

from __future__ import annotations

import io
import random
import zlib
from collections.abc import Callable, Iterator

import numpy as np
from PIL import Image
from scipy import ndimage
from skimage import data as skdata
from skimage import draw

from mmrad.data.builders.base import BuildLog, Draft, builder
from mmrad.task.geometry import mask_to_boxes

SOURCE = "synthetic"
CATEGORY_IMAGES: dict[str, Callable[[], np.ndarray]] = {
    "brick": skdata.brick,
    "grass": skdata.grass,
    "gravel": skdata.gravel,
    "coins": skdata.coins,
    "camera": skdata.camera,
    "cell": skdata.cell,
    "moon": skdata.moon,
    "coffee": skdata.coffee,
    "tissue": skdata.immunohistochemistry,
    "hubble": skdata.hubble_deep_field,
    # more pictures that ship inside scikit-image: more training categories make what is
    # learnt carry over to unseen ones (docs/learning_study.md)
    "astronaut": skdata.astronaut,
    "cat": skdata.cat,
    "checkerboard": skdata.checkerboard,
    "clock": skdata.clock,
    "colorwheel": skdata.colorwheel,
    "logo": skdata.logo,
    "page": skdata.page,
    "retina": skdata.retina,
    "rocket": skdata.rocket,
    "text": skdata.text,
    "microaneurysms": skdata.microaneurysms,
    "phantom": skdata.shepp_logan_phantom,
}
DEFECT_TYPES = ("scratch", "hole", "stain", "crack", "missing", "color_shift")
TYPES_PER_CATEGORY = 4
REFERENCES_PER_CATEGORY = 2
PLACEMENT_TRIES = 30

Rng = np.random.Generator


def category_defect_types(category: str) -> list[str]:
    """The defect types a category can show (its 'domain knowledge'), stable per name."""
    picked = random.Random(f"types/{category}").sample(DEFECT_TYPES, TYPES_PER_CATEGORY)
    return sorted(picked)


def category_picture(category: str) -> np.ndarray:
    if category not in CATEGORY_IMAGES:
        known = ", ".join(sorted(CATEGORY_IMAGES))
        raise ValueError(f"synthetic category {category!r} unknown; known: {known}")
    picture = np.asarray(CATEGORY_IMAGES[category]())
    if picture.dtype == bool or picture.dtype.kind == "f":  # masks and [0, 1] floats
        picture = (picture.astype(np.float32) * 255).round()
    if picture.ndim == 2:
        picture = np.stack([picture] * 3, axis=-1)
    return np.ascontiguousarray(picture[..., :3].astype(np.uint8))


def random_crop(picture: np.ndarray, size: int, rng: Rng) -> np.ndarray:
    """A square crop of 60-95% of the picture's short side, flipped at random, resized to
    ``size`` and scaled to floats in [0, 1]."""
    height, width = picture.shape[:2]
    side = int(min(height, width) * rng.uniform(0.6, 0.95))
    top = int(rng.integers(0, height - side + 1))
    left = int(rng.integers(0, width - side + 1))
    crop = picture[top : top + side, left : left + side]
    if rng.random() < 0.5:
        crop = crop[:, ::-1]
    resized = Image.fromarray(crop).resize((size, size), Image.Resampling.BOX)
    return np.asarray(resized, dtype=np.float32) / 255.0


# -- defect painters: each draws one defect in place and returns its exact mask ----------


def _polyline_mask(size: int, points: np.ndarray, width: int) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    for (r0, c0), (r1, c1) in zip(points[:-1], points[1:], strict=True):
        rr, cc = draw.line(int(r0), int(c0), int(r1), int(c1))
        mask[rr, cc] = True
    if width > 1:
        mask = ndimage.binary_dilation(mask, iterations=width - 1)
    return mask


def _random_walk(size: int, rng: Rng, steps: int, step_len: float) -> np.ndarray:
    start = rng.uniform(0.15, 0.85, size=2) * size
    angle = rng.uniform(0, 2 * np.pi)
    points = [start]
    for _ in range(steps):
        angle += rng.normal(0, 0.5)
        points.append(points[-1] + step_len * np.array([np.sin(angle), np.cos(angle)]))
    return np.clip(np.array(points), 0, size - 1)


def _ellipse_mask(size: int, rng: Rng, low: float, high: float) -> np.ndarray:
    mask = np.zeros((size, size), dtype=bool)
    r_radius, c_radius = rng.uniform(low, high, size=2) * size
    centre = rng.uniform(0.15, 0.85, size=2) * size
    rr, cc = draw.ellipse(
        centre[0], centre[1], r_radius, c_radius, shape=mask.shape, rotation=rng.uniform(0, np.pi)
    )
    mask[rr, cc] = True
    return mask


def paint_scratch(image: np.ndarray, rng: Rng) -> np.ndarray:
    size = image.shape[0]
    mask = _polyline_mask(size, _random_walk(size, rng, 3, size * 0.08), int(rng.integers(1, 3)))
    image[mask] = 0.95 if rng.random() < 0.5 else 0.05
    return mask


def paint_crack(image: np.ndarray, rng: Rng) -> np.ndarray:
    size = image.shape[0]
    trunk = _random_walk(size, rng, 6, size * 0.05)
    mask = _polyline_mask(size, trunk, 2)
    fork = trunk[len(trunk) // 2]
    branch = np.clip(fork + np.cumsum(rng.normal(0, size * 0.04, (3, 2)), axis=0), 0, size - 1)
    mask |= _polyline_mask(size, np.vstack([fork, branch]), 1)
    image[mask] = image[mask] * 0.2
    return mask


def paint_hole(image: np.ndarray, rng: Rng) -> np.ndarray:
    mask = _ellipse_mask(image.shape[0], rng, 0.03, 0.07)
    image[mask] = 0.02
    return mask


def paint_stain(image: np.ndarray, rng: Rng) -> np.ndarray:
    mask = _ellipse_mask(image.shape[0], rng, 0.05, 0.12)
    tint = np.array([0.45, 0.3, 0.1], dtype=np.float32)
    image[mask] = 0.45 * image[mask] + 0.55 * tint
    return mask


def paint_missing(image: np.ndarray, rng: Rng) -> np.ndarray:
    size = image.shape[0]
    mask = np.zeros((size, size), dtype=bool)
    height, width = (rng.uniform(0.08, 0.2, size=2) * size).astype(int)
    top, left = rng.integers(0, size - max(height, width), size=2)
    mask[top : top + height, left : left + width] = True
    image[mask] = np.float32(rng.choice([0.0, 0.5, 1.0]))
    return mask


def paint_color_shift(image: np.ndarray, rng: Rng) -> np.ndarray:
    mask = _ellipse_mask(image.shape[0], rng, 0.06, 0.14)
    gain = np.array([1.6, 0.7, 0.5], dtype=np.float32)[rng.permutation(3)]
    image[mask] = np.clip(image[mask] * gain + 0.1, 0, 1)
    return mask


PAINTERS: dict[str, Callable[[np.ndarray, Rng], np.ndarray]] = {
    "scratch": paint_scratch,
    "crack": paint_crack,
    "hole": paint_hole,
    "stain": paint_stain,
    "missing": paint_missing,
    "color_shift": paint_color_shift,
}
DESCRIPTIONS = {
    "scratch": "a thin line of abrupt contrast",
    "crack": "a dark jagged line with a branch",
    "hole": "a small, very dark round spot",
    "stain": "a brownish blotch that changes the colour of the surface",
    "missing": "a flat patch where the pattern is cut out",
    "color_shift": "a region whose colour is clearly shifted",
}


def paint_scaled(image: np.ndarray, kind: str, scale: float, rng: Rng) -> np.ndarray:
    """Paint one defect ``scale`` times the builder's size (relative to the image) and
    return its mask, or an empty mask when the defect did not fit.

    The builder's painters size defects as fractions of the canvas, so the defect is
    painted on a canvas ``scale`` times larger (the image reflected around it) and kept
    only when it lies wholly inside the image, whose pixels alone it then depends on.
    """
    if scale == 1.0:
        return PAINTERS[kind](image, rng)
    size = image.shape[0]
    pad = max(0, round(size * (scale - 1) / 2))
    canvas = np.pad(image, ((pad, pad), (pad, pad), (0, 0)), mode="reflect")
    mask = PAINTERS[kind](canvas, rng)
    inner = mask[pad : pad + size, pad : pad + size]
    if inner.sum() != mask.sum():
        return np.zeros((size, size), dtype=bool)
    image[...] = canvas[pad : pad + size, pad : pad + size]
    return inner


def paint_defects(
    image: np.ndarray, defect_types: list[str], count: int, rng: Rng, scale: float = 1.0
) -> list[tuple[str, np.ndarray]]:
    """Paint up to ``count`` non-touching defects, ``scale`` times the painters' size;
    returns ``(type, mask)`` per defect."""
    painted: list[tuple[str, np.ndarray]] = []
    occupied = np.zeros(image.shape[:2], dtype=bool)
    for _ in range(count):
        kind = str(rng.choice(defect_types))
        for _ in range(PLACEMENT_TRIES):
            trial = image.copy()
            mask = paint_scaled(trial, kind, scale, rng)
            grown = ndimage.binary_dilation(mask, iterations=3)
            if mask.any() and not (grown & occupied).any():
                image[...] = trial
                occupied |= grown
                painted.append((kind, mask))
                break
    return painted


# -- reasoning text ----------------------------------------------------------------------


def region_name(box: list[float], size: int) -> str:
    cx, cy = (box[0] + box[2]) / 2 / size, (box[1] + box[3]) / 2 / size
    vertical = "upper" if cy < 1 / 3 else "lower" if cy > 2 / 3 else "middle"
    horizontal = "left" if cx < 1 / 3 else "right" if cx > 2 / 3 else "centre"
    if (vertical, horizontal) == ("middle", "centre"):
        return "centre"
    return f"{vertical} {horizontal}"


def reasoning_text(category: str, defects: list[tuple[str, list[float]]], size: int) -> str:
    intro = (
        f"The reference shows a normal {category} sample. "
        "I compare the query with it region by region."
    )
    if not defects:
        return (
            f"{intro} Texture, colour and structure match the reference everywhere; there is "
            "no scratch, hole, stain, crack, missing region or colour change. "
            "The sample is normal."
        )
    findings = " ".join(
        f"In the {region_name(box, size)} part there is {DESCRIPTIONS[kind]}, which the "
        f"reference does not have: a {kind.replace('_', ' ')}."
        for kind, box in defects
    )
    plural = "these regions are" if len(defects) > 1 else "this region is"
    return f"{intro} {findings} So the sample is anomalous and {plural} the defect."


# -- the builder -------------------------------------------------------------------------


def png_bytes(image: np.ndarray) -> bytes:
    buffer = io.BytesIO()
    pixels = (np.clip(image, 0, 1) * 255).round().astype(np.uint8)
    Image.fromarray(pixels).save(buffer, "PNG", compress_level=1)
    return buffer.getvalue()


def _frozen(data: bytes) -> Callable[[], bytes]:
    return lambda: data


def category_drafts(category: str, config, rng: Rng) -> Iterator[Draft]:
    options = config.synthetic
    size = options.image_size
    picture = category_picture(category)
    defect_types = category_defect_types(category)
    references = [
        (f"images/{category}/reference_{k}.png", png_bytes(random_crop(picture, size, rng)))
        for k in range(REFERENCES_PER_CATEGORY)
    ]
    n_anomalous = round(options.images_per_category * options.anomaly_ratio)
    for index in range(options.images_per_category):
        image = random_crop(picture, size, rng)
        clean = image.copy()
        anomalous = index < n_anomalous
        painted = []
        if anomalous:
            count = int(rng.integers(1, options.max_defects + 1))
            painted = paint_defects(image, defect_types, count, rng, options.defect_scale)
            anomalous = bool(painted)
        boxes, labels = [], []
        for kind, mask in painted:
            for box in mask_to_boxes(mask):
                boxes.append(box)
                labels.append(kind)
        image_uri = f"images/{category}/{index:04d}.png"
        if options.reference == "aligned":
            reference_uri = f"images/{category}/{index:04d}_reference.png"
            reference_png = png_bytes(clean)
        else:
            reference_uri, reference_png = references[index % REFERENCES_PER_CATEGORY]
        record = {
            "id": f"{SOURCE}/{category}/{index:04d}",
            "source": SOURCE,
            "category": category,
            "image_uri": image_uri,
            "reference_uri": reference_uri,
            "width": size,
            "height": size,
            "is_anomalous": anomalous,
            "boxes": boxes,
            "labels": labels,
            "defect_type": labels[0] if labels else "good",
            "reasoning": reasoning_text(category, list(zip(labels, boxes, strict=True)), size),
        }
        files = {image_uri: _frozen(png_bytes(image)), reference_uri: _frozen(reference_png)}
        yield Draft(record, files)


@builder(SOURCE)
def build_synthetic(config, build_log: BuildLog) -> Iterator[Draft]:
    for category in config.synthetic.categories:
        category_picture(category)  # fail on an unknown name before writing anything
    for category in config.synthetic.categories:
        rng = np.random.default_rng([config.seed, zlib.crc32(category.encode())])
        yield from category_drafts(category, config, rng)
