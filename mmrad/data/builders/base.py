"""What every data set builder yields, and the checks they share."""

from __future__ import annotations

import io
import logging
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from PIL import Image

log = logging.getLogger(__name__)

PublishedSplit = Literal["train", "test"]


class DataBuildError(ValueError):
    """The raw data set is not what its builder expects; the message names the file."""


@dataclass
class Draft:
    """A record before its split is assigned, with the image files it brings.

    ``record`` holds every manifest field but ``split``; its ``image_uri`` and
    ``reference_uri`` are paths relative to the output folder, each a key of ``files``
    (or of an earlier draft's ``files``: shared reference images are written once).
    """

    record: dict[str, Any]
    files: dict[str, Callable[[], bytes]] = field(default_factory=dict)
    published_split: PublishedSplit | None = None
    """The data set's own split of the image; None when the source has none (synthetic)."""


@dataclass
class BuildLog:
    """Counts what a build skipped and why; with policy ``fail`` the first problem raises."""

    policy: Literal["skip", "fail"] = "skip"
    skipped: dict[str, str] = field(default_factory=dict)

    def bad(self, path: str | Path, reason: str) -> None:
        if self.policy == "fail":
            raise DataBuildError(f"{path}: {reason}")
        log.warning("skipping %s: %s", path, reason)
        self.skipped[str(path)] = reason


Builder = Callable[[Any, BuildLog], Iterator[Draft]]
BUILDERS: dict[str, Builder] = {}


def builder(name: str) -> Callable[[Builder], Builder]:
    def register(fn: Builder) -> Builder:
        BUILDERS[name] = fn
        return fn

    return register


def image_size(data: bytes) -> tuple[int, int]:
    """``(width, height)`` after decoding every pixel, so truncated files are caught here."""
    with Image.open(io.BytesIO(data)) as image:
        image.load()
        return image.size


def checked_image(path: Path, build_log: BuildLog) -> tuple[bytes, tuple[int, int]] | None:
    """Bytes and size of an image file, or ``None`` (logged) when it is missing or corrupt."""
    try:
        data = path.read_bytes()
    except OSError as err:
        build_log.bad(path, f"cannot read ({err.strerror or err})")
        return None
    try:
        return data, image_size(data)
    except Exception as err:
        build_log.bad(path, f"not a readable image ({err})")
        return None


def file_loader(path: Path) -> Callable[[], bytes]:
    return path.read_bytes
