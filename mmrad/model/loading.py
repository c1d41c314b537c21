"""Where a model comes from (hub id, local directory, object-store directory: ``s3://``,
``gs://``, ``abfs://``, ``hdfs://``) and loading it.

Every actor resolves a model on its own node: a driver hands actors the URI (a
:class:`ModelSource`), never a path of its own disk. An object-store model directory is
downloaded once per node into that node's cache folder (:func:`node_cache_dir`), under
``<sha of URI>``:
every worker of the node takes the same file lock, the first one downloads into a temporary
directory and renames it into place with a completion marker, the others wait and reuse
it. A download cut short (a killed worker) leaves no marker and is never used. The marker
keeps a fingerprint of the objects (keys and each store's version of them:
:meth:`~mmrad.storage.Storage.versions`, size and ETag on S3, size, modification time and
the service's tag on GCS and Azure), so a directory re-exported to the same URI is
downloaded again instead of silently serving stale weights.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mmrad.config import PixelBudget, StorageConfig
from mmrad.model.hf import ATTN_IMPLEMENTATION, load_model  # noqa: F401  (their home for callers)
from mmrad.storage import Storage, StorageError, is_remote, local_path

COMPLETE_MARKER = ".mmrad-download.json"
EXPORT_IN_PROGRESS = ".mmrad-export-in-progress"
"""Present in an object-store export while it is being (re)written; downloads refuse it."""
_HUB_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


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
        if _marker_fingerprint(target) == fingerprint:
            return target
        tmp = Path(tempfile.mkdtemp(prefix=f".{key}.", dir=cache_dir))
        try:
            for relative in objects:
                destination = tmp / relative
                destination.parent.mkdir(parents=True, exist_ok=True)
                _download_file(storage, f"{uri}/{relative}", destination)
            marker = {"uri": uri, "fingerprint": fingerprint, "files": sorted(objects)}
            (tmp / COMPLETE_MARKER).write_text(json.dumps(marker, indent=2))
            if target.exists():  # stale or half-finished: swap it out, then drop it
                old = Path(tempfile.mkdtemp(prefix=f".{key}.old.", dir=cache_dir))
                os.replace(target, old / key)
                shutil.rmtree(old, ignore_errors=True)
            os.replace(tmp, target)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    return target


def _list_objects(uri: str, storage: Storage, required: str) -> dict[str, list[Any]]:
    """``{relative key: the store's version of it}`` of every object below ``uri``."""
    found = {item[len(uri) + 1 :]: version for item, version in storage.versions(uri).items()}
    if EXPORT_IN_PROGRESS in found:
        raise StorageError(f"{uri}: an export is being written there; try again when it is done")
    if required not in found:
        raise FileNotFoundError(f"{uri}: no {required} there (found {len(found)} objects)")
    return found


def _download_file(storage: Storage, uri: str, destination: Path) -> None:
    """One object into the download folder, streamed (a 4 GB shard is never held in memory)."""
    storage.download_file(uri, destination)


def _marker_fingerprint(directory: Path) -> str | None:
    try:
        return json.loads((directory / COMPLETE_MARKER).read_text())["fingerprint"]
    except (OSError, ValueError, KeyError):
        return None


def pixel_size(pixels: PixelBudget) -> dict[str, int]:
    """The pixel budget as transformers 5 image processors take it (``min_pixels`` and
    ``max_pixels`` keyword arguments are deprecated there)."""
    return {"shortest_edge": pixels.min_pixels, "longest_edge": pixels.max_pixels}


def load_processor(path: str, pixels: PixelBudget):
    """The model's processor with its resize budget replaced by ``pixels``."""
    from transformers import AutoProcessor

    processor = AutoProcessor.from_pretrained(path, size=pixel_size(pixels))
    image_processor = processor.image_processor
    factor = image_processor.patch_size * image_processor.merge_size
    if factor != pixels.factor:
        raise ValueError(
            f"model {path}: images are cut into {factor}-pixel cells, "
            f"but the pixel budget says factor {pixels.factor}"
        )
    return processor
