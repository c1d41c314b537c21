"""What ``mmrad detect`` inspects: the files under a folder or object-store prefix, each
one's category, and each category's normal reference image.

All of it runs in the driver before Ray starts, so an empty folder or a missing reference
fails in a second, naming the path, instead of after the engines have loaded.

- Files are listed recursively (:meth:`~mmrad.storage.Storage.list`) and sorted by path,
  so the order of the results never depends on the filesystem. Hidden files and folders
  (a name below the input starting with ``.``: ``.DS_Store``, ``.git/``) are skipped, and
  so are the output folder and the references when they lie inside the input. Local
  paths are compared normalized (:func:`~mmrad.storage.absolute`: ``in/./a`` is
  ``in/a``), as the listing spells them.
- Every other file is inspected, whatever its name: one that is no image becomes a row
  with an error (decoding says why). Keeping only known image extensions was rejected:
  a wrongly named image would vanish from the results without a word.
- The category is ``--category`` for every file, else the name of the file's parent
  folder (``bottle/001.png`` is a ``bottle``).
- References: ``--reference FILE`` serves every category; ``--reference DIR`` holds one
  normal image per category named after it (``refs/bottle.png``, any image extension).
  When the model's prompt shows a reference, every category with an image (by extension)
  needs one, or the job stops naming the category and what was looked for. A file with
  no image extension in a category without a reference is not sent to the model: it
  becomes an error row at once, so a stray ``notes.txt`` needs no reference of its own.
"""

from __future__ import annotations

import io
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path, PurePosixPath

from mmrad.storage import Storage, StorageError, absolute, is_remote, local_path


class DetectError(ValueError):
    """The input or the references cannot be inspected; the message names the path, the
    category or the flag at fault."""


@dataclass(frozen=True)
class InputFile:
    """One listed file: its URI (an absolute local path or object-store URI), its path below
    the input (``/``-separated; names its overlay) and its category."""

    uri: str
    relative: str
    category: str


@dataclass(frozen=True)
class Inspection:
    """What the job does with the listed files: ``queries`` go to the model with their
    category's reference (``references``: category -> URI, empty when the prompt shows
    none); ``refused`` are error rows made without the model (file, why)."""

    queries: list[InputFile]
    references: dict[str, str] = field(default_factory=dict)
    refused: list[tuple[InputFile, str]] = field(default_factory=list)


# -- listing ----------------------------------------------------------------------------


def image_extensions() -> frozenset[str]:
    """Every extension PIL reads (``.png``, ``.jpg``, ``.tif``, ...), lower case."""
    from PIL import Image

    Image.init()
    return frozenset(ext.lower() for ext in Image.registered_extensions())


def looks_like_image(uri: str) -> bool:
    return PurePosixPath(uri).suffix.lower() in image_extensions()


def is_hidden(relative: str) -> bool:
    return any(part.startswith(".") for part in relative.split("/"))


def is_under(uri: str, folder: str) -> bool:
    folder = folder.rstrip("/")
    return uri == folder or uri.startswith(folder + "/")


def list_input_files(
    storage: Storage,
    root: str,
    *,
    category: str | None = None,
    exclude: Iterable[str | None] = (),
) -> list[InputFile]:
    """The files to inspect under ``root`` (a folder, an object-store prefix, or one file),
    sorted by URI, hidden ones and those under ``exclude`` left out. Local paths are
    normalized first: the listed files are, and a file's path below ``root`` is cut by
    the length of ``root``'s spelling."""
    root = absolute(root).rstrip("/") or root
    uris, base = _listing(storage, root)
    excluded = [absolute(e) for e in exclude if e]
    files = []
    hidden = 0
    for uri in uris:
        relative = uri[len(base) :].lstrip("/")
        if is_hidden(relative):
            hidden += 1
        elif not any(is_under(uri, folder) for folder in excluded):
            files.append(InputFile(uri, relative, category or parent_name(uri)))
    if not files:
        skipped = f" ({hidden} hidden files skipped)" if hidden else ""
        raise DetectError(f"{root}: no files to inspect in this folder{skipped}")
    return files


def _listing(storage: Storage, root: str) -> tuple[list[str], str]:
    """``(file URIs, the base they are relative to)``: ``root`` itself when it is one
    file (relative to its folder), else every file below it."""
    if is_remote(root):
        found = storage.list(root)
        if found:
            return found, root
        if storage.exists(root):
            return [root], root.rsplit("/", 1)[0]
        raise DetectError(f"{root}: no objects under this prefix")
    path = local_path(root)
    if path.is_file():
        return [root], str(path.parent)
    if not path.is_dir():
        raise DetectError(f"{root}: no such folder or file")
    return storage.list(root), root


def parent_name(uri: str) -> str:
    """The name of the folder holding ``uri`` (a bucket's name at its top)."""
    parts = uri.rstrip("/").split("/")
    return parts[-2] if len(parts) >= 2 else ""


# -- references -------------------------------------------------------------------------


def plan_inspection(
    storage: Storage,
    files: Sequence[InputFile],
    reference: str | None,
    *,
    needs_reference: bool,
) -> Inspection:
    """Which files go to the model with which reference, and which are refused at once.
    Raises :class:`DetectError` when a category with images has no reference that the
    prompt needs."""
    if not needs_reference:
        return Inspection(queries=list(files))
    categories = sorted({f.category for f in files if looks_like_image(f.uri)})
    references = find_references(storage, reference, categories)
    queries: list[InputFile] = []
    refused: list[tuple[InputFile, str]] = []
    for file in files:
        if file.category in references:
            queries.append(file)
            continue
        suffix = PurePosixPath(file.uri).suffix or "none"
        why = (f"{file.uri}: not sent to the model: no image extension ({suffix}) and no "
               f"reference for category {file.category!r}")  # fmt: skip
        refused.append((file, why))
    used = {c: references[c] for c in categories}
    return Inspection(queries=queries, references=used, refused=refused)


def find_references(
    storage: Storage, reference: str | None, categories: Sequence[str]
) -> dict[str, str]:
    """Each category's reference URI. ``reference`` is one image (for all of them) or a
    folder of ``<category>.<image extension>`` files; a local one is normalized, as the
    listing of its folder is."""
    if not categories:
        return {}
    if reference is None:
        raise DetectError(
            f"categories {', '.join(map(repr, categories))}: the model's prompt shows a normal "
            "reference image (prompt.use_reference) and no --reference was given; give "
            "--reference FILE (one normal image for every category) or --reference DIR "
            "(DIR/<category>.png for each), or prompt.use_reference=false"
        )
    reference = absolute(reference)
    children = _folder_images(storage, reference)
    if children is None:
        return dict.fromkeys(categories, reference)
    found: dict[str, str] = {}
    for category in categories:
        matches = [uri for uri in children if PurePosixPath(uri).stem == category]
        if not matches:
            shown = ", ".join(sorted(PurePosixPath(uri).name for uri in children)[:5]) or "none"
            raise DetectError(
                f"category {category!r}: no reference image in --reference {reference} "
                f"(looked for {reference.rstrip('/')}/{category}.<png|jpg|...>; images "
                f"there: {shown})"
            )
        if len(matches) > 1:
            names = ", ".join(PurePosixPath(uri).name for uri in matches)
            raise DetectError(f"category {category!r}: {len(matches)} references in "
                              f"{reference} ({names}); keep one")  # fmt: skip
        found[category] = matches[0]
    return found


def _folder_images(storage: Storage, reference: str) -> list[str] | None:
    """The images directly inside the reference folder, or ``None`` when ``reference``
    is one file."""
    if is_remote(reference):
        if storage.exists(reference):
            return None
        listed = storage.list(reference)
        if not listed:
            raise DetectError(f"--reference {reference}: no such object or prefix")
    else:
        path = local_path(reference)
        if path.is_file():
            return None
        if not path.is_dir():
            raise DetectError(f"--reference {reference}: no such file or folder")
        listed = storage.list(reference)
    base = reference.rstrip("/")
    direct = [uri for uri in listed if "/" not in uri[len(base) + 1 :]]
    return [uri for uri in direct if looks_like_image(uri) and not is_hidden(Path(uri).name)]


def check_references(storage: Storage, references: dict[str, str]) -> None:
    """Decode every reference once, here: a bad one would otherwise turn each image of
    its category into an error row, after the engines have loaded."""
    from PIL import Image

    for uri in sorted(set(references.values())):
        categories = ", ".join(sorted(c for c, r in references.items() if r == uri))
        try:
            with Image.open(io.BytesIO(storage.read_bytes(uri))) as image:
                image.convert("RGB")
        except StorageError as err:
            raise DetectError(f"reference of {categories}: {err}") from None
        except Exception as err:
            raise DetectError(f"reference of {categories}: {uri} is not a readable image "
                              f"({type(err).__name__}: {err})") from None  # fmt: skip
