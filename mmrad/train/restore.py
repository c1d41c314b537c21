"""A reported checkpoint as a local folder that every rank of a node reads at once.

Ray's ``Checkpoint.as_directory()`` shares one download folder per node, but a rank that
arrives after another finished downloading downloads again into the same folder,
truncating files the first one is still reading (seen as DCP's "metadata is None; Ran out
of input" on a resume from S3). Here one rank per node downloads, every rank waits for
all downloads, reads, waits again, and the downloader removes the folder: one copy per
node (a 7B model's checkpoint with AdamW moments is ~100 GB) and no rewrite under a
reader.
"""

from __future__ import annotations

import contextlib
import hashlib
import shutil
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pyarrow.fs
import ray.train

from mmrad.train.distributed import barrier


def node_download_folder(checkpoint_path: str) -> Path:
    """The folder a node downloads ``checkpoint_path`` into (the same on every rank)."""
    digest = hashlib.sha256(checkpoint_path.encode()).hexdigest()[:16]
    return Path(tempfile.gettempdir()) / f"mmrad-restore-{digest}"


@contextlib.contextmanager
def checkpoint_folder(checkpoint: ray.train.Checkpoint, local_rank: int) -> Iterator[Path]:
    """Collective: ``checkpoint`` as a local folder on every rank (a checkpoint on local
    or shared disk is read where it is)."""
    if isinstance(checkpoint.filesystem, pyarrow.fs.LocalFileSystem):
        yield Path(checkpoint.path)
        return
    folder = node_download_folder(checkpoint.path)
    downloads = local_rank == 0
    if downloads:
        shutil.rmtree(folder, ignore_errors=True)  # a crashed restore's partial copy
        checkpoint.to_directory(str(folder))
    barrier()
    try:
        yield folder
    finally:
        barrier()
        if downloads:
            shutil.rmtree(folder, ignore_errors=True)
