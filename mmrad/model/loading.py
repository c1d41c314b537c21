"""Where a model comes from (hub id, local directory, object-store directory: ``s3://``,
``gs://``, ``abfs://``, ``hdfs://``) and loading it.

Every actor resolves a model on its own node: a driver hands actors the URI (a
:class:`ModelSource`), never a path of its own disk. An object-store model directory is
downloaded once per node into that node's cache folder (:func:`node_cache_dir`), under
``<sha of URI>``:
every worker of the node takes the same file lock, the first one downloads into a temporary
directory and renames it into place with a completion marker, the others wait and reuse
it. A download cut short (a killed worker) leaves no marker and is never used. The marker
(written last, atomically) records each file's size on disk and the store's version of its
object (:meth:`~mmrad.storage.Storage.versions`: size and ETag on S3, size, modification
time and the service's tag on GCS and Azure). Each reuse compares it with the remote
listing and the files on disk: a file cut short, grown or missing, or an object rewritten
(a directory re-exported to the same URI), refreshes the copy (the files still verified
are kept as hard links, the others downloaded again) instead of silently serving stale
or broken weights. Keys that would land outside the cache folder (``..``, ``.`` or empty
segments, a leading ``/``) are refused before anything is written
(:func:`~mmrad.storage.local_target`).
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import logging
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmrad.config import PixelBudget, StorageConfig
from mmrad.model.hf import ATTN_IMPLEMENTATION, load_model  # noqa: F401  (their home for callers)
from mmrad.storage import (
    Storage,
    StorageError,
    atomic_write_local,
    is_remote,
    local_path,
    local_target,
)

COMPLETE_MARKER = ".mmrad-download.json"
EXPORT_IN_PROGRESS = ".mmrad-export-in-progress"
"""Present in an object-store export while it is being (re)written; downloads refuse it."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")
log = logging.getLogger(__name__)


NODE_CACHE_ENV = "MMRAD_NODE_CACHE"
"""Set on a node (its Ray start command, a container's environment) to put its model
downloads on a disk of its choosing."""


@dataclass(frozen=True)
class ModelSource:
    """A model as a driver hands it to actors: a hub id, a folder every node has, or an
    object-store URI, resolved by :meth:`local` on the node that loads it."""

    path: str
    storage: StorageConfig = field(default_factory=StorageConfig)
    cache_dir: str | None = None

    def local(self) -> str:
        return resolve_model_path(self.path, Storage.from_config(self.storage), self.cache_dir)


def node_cache_dir(configured: str | None = None) -> Path:
    """This node's folder for model downloads: ``configured`` (an absolute folder every
    node has), else ``$MMRAD_NODE_CACHE``, else ``mmrad-models`` in this node's Ray temp
    dir (the system temp dir outside Ray)."""
    chosen = configured or os.environ.get(NODE_CACHE_ENV)
    if chosen:
        return Path(chosen).expanduser()
    return node_temp_dir() / "mmrad-models"


def node_temp_dir() -> Path:
    import ray

    node = getattr(ray._private.worker, "_global_node", None)
    if ray.is_initialized() and node is not None:
        return Path(node.get_temp_dir_path())
    return Path(tempfile.gettempdir())


class ModelPathMissing(FileNotFoundError):
    """A local model directory is not on this node: restarting the worker cannot help."""


def resolve_model_path(path: str, storage: Storage, cache_dir: str | None = None) -> str:
    """A path ``from_pretrained`` can open: hub ids as they are, local directories as
    absolute paths (they must exist), object-store directories downloaded to this node's
    cache (:func:`node_cache_dir` of ``cache_dir``)."""
    if is_remote(path):
        return str(download_to_node_cache(path, storage, cache_dir))
    local = local_path(path).expanduser()
    if local.is_dir():
        return str(local.absolute())
    if looks_like_hub_id(path):
        return path
    if local.exists():
        raise NotADirectoryError(f"model path {path}: not a directory")
    raise ModelPathMissing(f"model path {path}: no such directory")


def check_model_dir(path: str) -> None:
    """Fail fast, on the driver, when ``path`` names a local model directory that is not
    there (what :func:`resolve_model_path` would find on a worker, much later); hub ids
    and object-store URIs are checked where they are opened."""
    from mmrad.model.export import ExportError

    if is_remote(path) or looks_like_hub_id(path):
        return
    local = local_path(path).expanduser()
    if not local.is_dir():
        state = "not a directory" if local.exists() else "no such directory"
        raise ExportError(f"model path {path}: {state}")


def looks_like_hub_id(path: str) -> bool:
    """``org/name`` whose first part is not a local folder (``runs/tiny`` is a path)."""
    return bool(_HUB_ID.match(path)) and not Path(path.split("/", 1)[0]).exists()


def cached_model_dir(uri: str, cache_dir: str | None = None) -> Path:
    """Where :func:`resolve_model_path` keeps the download of ``uri`` on this node."""
    return node_cache_dir(cache_dir) / _cache_key(uri)


def _cache_key(uri: str) -> str:
    return hashlib.sha256(uri.rstrip("/").encode()).hexdigest()[:32]


def download_to_node_cache(
    uri: str, storage: Storage, cache_dir: str | None = None, *, required: str = "config.json"
) -> Path:
    """The object-store folder ``uri`` (which must hold ``required``: a model's
    ``config.json``, an adapter's ``adapter_config.json``) in this node's cache,
    downloaded once per node under the file lock (see the module)."""
    return _download_cached(uri.rstrip("/"), storage, node_cache_dir(cache_dir), required)


def _download_cached(uri: str, storage: Storage, cache_dir: Path, required: str) -> Path:
    cache_dir.mkdir(parents=True, exist_ok=True)
    key = _cache_key(uri)
    target = cache_dir / key
    objects = _list_objects(uri, storage, required)
    fingerprint = hashlib.sha256(json.dumps(objects, sort_keys=True).encode()).hexdigest()
    with open(cache_dir / f"{key}.lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes, or the process dies
        cached = _verified_files(target, objects)
        if cached == set(objects):
            return target
        if target.exists():
            log.warning(
                "%s: the node cache %s is stale or incomplete (%d of %d files verified); "
                "refreshing it", uri, target, len(cached), len(objects),
            )  # fmt: skip
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir))
        try:
            files = {}
            for relative, version in objects.items():
                destination = local_target(uri, f"{uri}/{relative}", tmp)
                destination.parent.mkdir(parents=True, exist_ok=True)
                if relative in cached:  # verified: kept (a hard link), not downloaded again
                    _link_or_copy(target / relative, destination)
                else:
                    _download_file(storage, f"{uri}/{relative}", destination)
                files[relative] = _checked_entry(uri, relative, version, destination)
            marker = {"uri": uri, "fingerprint": fingerprint, "files": files}
            atomic_write_local(tmp / COMPLETE_MARKER, json.dumps(marker, indent=2).encode())
            if target.exists():  # stale or half-finished: swap it out, then drop it
                old = Path(tempfile.mkdtemp(prefix=f".{key}.old.", dir=cache_dir))
                os.replace(target, old / key)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _list_objects(uri: str, storage: Storage, required: str) -> dict[str, list[Any]]:
    """``{relative key: the store's version of it}`` of every object below ``uri``. Every
    key is checked to be a path inside the cache folder first
    (:func:`~mmrad.storage.local_target`: no ``..``, ``.`` or empty segment, no leading
    ``/``): one that is not refuses the download before anything is written."""
    found = {}
    for item, version in storage.versions(uri).items():
        local_target(uri, item, ".")  # raises UnsafeKey naming the key and ``uri``
        found[item[len(uri) + 1 :]] = version
    if EXPORT_IN_PROGRESS in found:
        raise StorageError(f"{uri}: an export is being written there; try again when it is done")
    if required not in found:
        raise FileNotFoundError(f"{uri}: no {required} there (found {len(found)} objects)")
    return found


def _download_file(storage: Storage, uri: str, destination: Path) -> None:
    """One object into the download folder, streamed (a 4 GB shard is never held in memory)."""
    storage.download_file(uri, destination)


def _checked_entry(uri: str, relative: str, version: list[Any], path: Path) -> dict[str, Any]:
    """The marker's entry of one cached file: its size on disk and the store's version
    (S3: ``[size, ETag]``) as listed. A file whose size is not the listed one (the object
    rewritten while it was read, a download cut short) is refused, naming the object."""
    size = path.stat().st_size
    listed = version[0] if version else None
    if isinstance(listed, int) and size != listed:
        raise StorageError(
            f"{uri}/{relative}: downloaded {size} bytes, the listing said {listed} "
            "(rewritten while it was downloaded?); try again"
        )
    return {"size": size, "version": version}


def _verified_files(directory: Path, objects: dict[str, list[Any]]) -> set[str]:
    """The files of the cached copy in ``directory`` that can be used as they are: its
    completion marker records them with the version the store lists now (S3: size and
    ETag) and the file on disk has the recorded size. A copy whose set is not every
    object's is refreshed: a file missing, cut short or grown, or rewritten remotely."""
    try:
        recorded = json.loads((directory / COMPLETE_MARKER).read_text())["files"]
    except (OSError, ValueError, KeyError, TypeError):
        return set()
    if not isinstance(recorded, dict):  # a marker of an older mmrad: a list of names
        return set()
    verified = set()
    for relative, version in objects.items():
        entry = recorded.get(relative)
        if not isinstance(entry, dict) or entry.get("version") != version:
            continue
        try:
            if (directory / relative).stat().st_size == entry.get("size"):
                verified.add(relative)
        except OSError:
            continue
    return verified


def _link_or_copy(source: Path, destination: Path) -> None:
    try:
        os.link(source, destination)
    except OSError:
        shutil.copy2(source, destination)


def load_processor(path: str, pixels: PixelBudget):
    """The model's processor with its resize budget replaced by ``pixels``."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path, size=pixels.processor_size())
    image_processor = processor.image_processor
    factor = image_processor.patch_size * image_processor.merge_size
    if factor != pixels.factor:
        raise ValueError(
            f"model {path}: images are cut into {factor}-pixel cells, "
            f"but the pixel budget says factor {pixels.factor}"
        )
    return processor
