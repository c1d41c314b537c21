"""Ray Data loading: manifest → image bytes → decoded → resized to the model grid.

Order is the contract for resuming: every epoch visits the records in a permutation
fixed by ``(seed, epoch)``; position ``p`` of that order belongs to rank
``p % world_size``. A resumed run passes the number of positions already consumed and
gets exactly the rest. Ray Data's ``streaming_split`` hands blocks to whichever consumer
asks first, so instead each rank gets its own dataset, built from its positions with
``preserve_order`` on.

Corrupt or missing images follow a policy: ``fail`` stops with the id and URI; ``skip``
keeps the row with ``error`` set (so positions stay exact) and :class:`SkipLog` drops,
counts and logs it where the rows are consumed, up to the :class:`BadImageBudget` of
``data.max_bad_fraction``.
"""

from __future__ import annotations

import functools
import io
import itertools
import logging
import math
import random
import threading
from collections.abc import Iterable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, Literal

import numpy as np
import pyarrow as pa
from PIL import Image, UnidentifiedImageError

from mmrad.config import DEFAULT_MAX_BAD_FRACTION, DataLoadConfig, PixelBudget
from mmrad.storage import Storage, StorageUnavailable
from mmrad.task.geometry import Size, model_grid

log = logging.getLogger(__name__)

REFERENCE_CACHE_SIZE = 64
SHOWN_BAD_IMAGES = 5
EMPTY_IMAGE = np.zeros((0, 0, 3), dtype=np.uint8)
RECORD_COLUMNS = (
    "id", "source", "category", "split", "image_uri", "reference_uri", "width", "height",
    "is_anomalous", "boxes", "labels", "defect_type", "reasoning",
)  # fmt: skip


class BadImageError(RuntimeError):
    """An image could not be read or decoded under the ``fail`` policy."""


class TooManyBadImages(BadImageError):
    """Under the ``skip`` policy, more images were bad than ``data.max_bad_fraction``
    allows."""


@dataclass(frozen=True)
class BadImageBudget:
    """How many distinct bad images a set of ``total`` records may skip:
    ``floor(max_fraction * total)``; one more raises :class:`TooManyBadImages`.

    ``total`` is the whole set's size, known before the first row is read (the manifest's
    records of the split), so the first bad row is judged like the last and no minimum of
    rows seen is needed. Small sets are held to it too: at 1% a set of 99 records
    tolerates no bad image. Ids are counted once, so a stream that goes over its records
    epoch after epoch meets the same bad images again without spending more of the
    budget. A set whose every record is bad fails even at ``max_fraction`` 1: nothing is
    left to use, and a stream would loop over it forever."""

    max_fraction: float
    total: int
    manifest: str = ""
    what: str = "records"

    @property
    def allowed(self) -> int:
        # Rounded first: 0.29 * 100 is 28.999999999999996 in floating point.
        return math.floor(round(self.max_fraction * self.total, 9))

    def exceeded(self, skipped: int) -> bool:
        return skipped > self.allowed or 0 < self.total <= skipped

    def check(self, skipped: Mapping[str, str]) -> None:
        """Raise :class:`TooManyBadImages` if the ``skipped`` ids (id -> error) are over
        the budget."""
        if self.exceeded(len(skipped)):
            raise TooManyBadImages(self.message(skipped))

    def message(self, skipped: Mapping[str, str]) -> str:
        count = len(skipped)
        source = f" of {self.manifest}" if self.manifest else ""
        limit = f"data.max_bad_fraction={self.max_fraction:g} allows {self.allowed}"
        if count >= self.total:
            limit += " and none is left to use"
        first = "; ".join(
            f"{sample_id!r}: {error}"
            for sample_id, error in itertools.islice(skipped.items(), SHOWN_BAD_IMAGES)
        )
        return (
            f"{count} of {self.total} {self.what}{source} have a bad image "
            f"({count / max(self.total, 1):.1%}); {limit}. First skipped: {first}"
        )


@dataclass(frozen=True)
class DecodeSpec:
    """What a decode task needs, and the bad-image policy of the rows' consumers; small
    and picklable so Ray can ship it."""

    storage: Storage
    pixels: PixelBudget
    on_bad_image: Literal["skip", "fail"] = "skip"
    fetch_threads: int = 8
    max_bad_fraction: float = DEFAULT_MAX_BAD_FRACTION
    manifest: str = ""
    count_reads: bool = False
    """Add ``images_fetched`` and ``images_decoded``: per row, the images its decoding
    read from storage and decoded (its query, and its reference unless this worker's
    reference cache held it); for benchmarks that count the work done."""

    @classmethod
    def from_config(cls, storage: Storage, config: DataLoadConfig) -> DecodeSpec:
        return cls(
            storage, config.pixels, config.on_bad_image, config.fetch_threads,
            config.max_bad_fraction, config.manifest,
        )  # fmt: skip

    def bad_image_budget(self, total: int, what: str = "records") -> BadImageBudget:
        return BadImageBudget(self.max_bad_fraction, total, self.manifest, what)


def epoch_order(records: Sequence[Mapping[str, Any]], seed: int, epoch: int) -> list[int]:
    """Indices of ``records`` in this epoch's order: sorted by id, then shuffled by seed."""
    order = sorted(range(len(records)), key=lambda i: records[i]["id"])
    random.Random(f"{seed}/{epoch}").shuffle(order)
    return order


def rank_positions(total: int, rank: int, world_size: int, start: int = 0) -> range:
    """Positions of an epoch that rank ``rank`` consumes, from global position ``start``."""
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} outside world size {world_size}")
    first = start + (rank - start) % world_size
    return range(first, total, world_size)


def ordered_rows(
    records: Sequence[Mapping[str, Any]],
    *,
    seed: int,
    epoch: int = 0,
    rank: int = 0,
    world_size: int = 1,
    start: int = 0,
) -> list[dict[str, Any]]:
    """This rank's records for the epoch from ``start`` on, each tagged with its position."""
    order = epoch_order(records, seed, epoch)
    rows = []
    for position in rank_positions(len(order), rank, world_size, start):
        record = records[order[position]]
        rows.append({**{k: record[k] for k in RECORD_COLUMNS}, "position": position})
    return rows


# -- decoding --------------------------------------------------------------------------


def decode_to_grid(data: bytes, pixels: PixelBudget) -> np.ndarray:
    """Decode every pixel (catching truncated files) and resize to the model grid."""
    return decode_with_size(data, pixels)[0]


def decode_with_size(data: bytes, pixels: PixelBudget) -> tuple[np.ndarray, Size]:
    """:func:`decode_to_grid`, and the image's own ``(width, height)`` before resizing."""
    with Image.open(io.BytesIO(data)) as image:
        image = image.convert("RGB")
        size = image.size
        grid = model_grid(size, pixels.min_pixels, pixels.max_pixels, pixels.factor)
        if grid != size:
            image = image.resize(grid, Image.Resampling.BICUBIC)
        return np.asarray(image, dtype=np.uint8), size


def _fetch_and_decode(spec: DecodeSpec, uri: str | None) -> tuple[np.ndarray, str]:
    """The image on the model grid, or why it is bad: missing, denied or undecodable (a
    permanent fault of the data). An outage that outlasted the retries is no bad image:
    it raises :class:`~mmrad.storage.StorageUnavailable` and fails the job."""
    image, _, error = _fetch_and_measure(spec, uri)
    return image, error


class _Reads(threading.local):
    """Images this thread fetched from storage and decoded, so far (``spec.count_reads``)."""

    fetched = 0
    decoded = 0


_reads = _Reads()


def _counting_reads(fetch, spec: DecodeSpec, uri: str | None) -> tuple[Any, tuple[int, int]]:
    """``fetch(spec, uri)`` and the images it fetched and decoded: none when the
    reference cache answered."""
    fetched, decoded = _reads.fetched, _reads.decoded
    result = fetch(spec, uri)
    return result, (_reads.fetched - fetched, _reads.decoded - decoded)


def _fetch_and_measure(spec: DecodeSpec, uri: str | None) -> tuple[np.ndarray, Size | None, str]:
    """:func:`_fetch_and_decode` with the image's own size (``None`` when it is bad)."""
    if not uri:
        return EMPTY_IMAGE, None, ""
    try:
        _reads.fetched += 1
        image, size = decode_with_size(spec.storage.read_bytes(uri), spec.pixels)
        _reads.decoded += 1
        return image, size, ""
    except StorageUnavailable:
        raise
    except UnidentifiedImageError:  # PIL's own text names an anonymous in-memory buffer
        return EMPTY_IMAGE, None, f"{uri}: not an image (no image format recognised)"
    except Exception as err:
        return EMPTY_IMAGE, None, f"{uri}: {err}"


@functools.lru_cache(maxsize=REFERENCE_CACHE_SIZE)
def _cached_reference(storage: Storage, pixels: tuple[int, int, int], uri: str):
    min_pixels, max_pixels, factor = pixels
    budget = PixelBudget(min_pixels=min_pixels, max_pixels=max_pixels, factor=factor)
    return _fetch_and_decode(DecodeSpec(storage, budget), uri)


def _fetch_reference(spec: DecodeSpec, uri: str | None) -> tuple[np.ndarray, str]:
    """References are shared by every query of a category: decode each once per worker."""
    if not uri:
        return EMPTY_IMAGE, ""
    pixels = (spec.pixels.min_pixels, spec.pixels.max_pixels, spec.pixels.factor)
    image, error = _cached_reference(spec.storage, pixels, uri)
    if error:
        _cached_reference.cache_clear()  # do not keep a transient failure
    return image, error


def decode_batch(batch: pa.Table, spec: DecodeSpec) -> pa.Table:
    """Ray Data ``map_batches`` function: fetch a batch's images concurrently (object
    storage is latency-bound), decode them, resize them to the model grid and add the grid
    size. Batches are Arrow tables so the record's list columns (boxes, labels) keep their
    types; images travel as Ray's (ragged) tensor columns."""
    ids = batch.column("id").to_pylist()
    with ThreadPoolExecutor(spec.fetch_threads) as pool:
        counted_images = list(
            pool.map(lambda u: _counting_reads(_fetch_and_measure, spec, u),
                     batch["image_uri"].to_pylist())
        )  # fmt: skip
        counted_references = list(
            pool.map(lambda u: _counting_reads(_fetch_reference, spec, u),
                     batch["reference_uri"].to_pylist())
        )  # fmt: skip
    images = [image for image, _ in counted_images]
    references = [reference for reference, _ in counted_references]
    errors = []
    for rid, (_, _, image_error), (_, reference_error) in zip(ids, images, references,
                                                             strict=True):  # fmt: skip
        error = image_error or reference_error
        if error and spec.on_bad_image == "fail":
            raise BadImageError(f"id {rid!r}: {error}")
        errors.append(error)
    columns = {
        "image": tensor_column([image for image, _, _ in images]),
        "reference": tensor_column([image for image, _ in references]),
        "grid_width": pa.array([image.shape[1] for image, _, _ in images], pa.int32()),
        "grid_height": pa.array([image.shape[0] for image, _, _ in images], pa.int32()),
        "error": pa.array(errors, pa.string()),
    }
    if spec.count_reads:
        reads = [(query[0] + reference[0], query[1] + reference[1]) for (_, query), (_, reference)
                 in zip(counted_images, counted_references, strict=True)]  # fmt: skip
        columns["images_fetched"] = pa.array([f for f, _ in reads], pa.int32())
        columns["images_decoded"] = pa.array([d for _, d in reads], pa.int32())
    for name, column in columns.items():
        batch = batch.append_column(name, column)
    return with_own_sizes(batch, [size for _, size, _ in images])


def tensor_column(arrays: Sequence[np.ndarray]):
    """Images as Ray's tensor column: fixed-shape when they share one, else variable-shaped.
    Images of different sizes are handed over as an object array, which Ray takes as it is;
    a list makes Ray try to stack it first and log the failure with a traceback."""
    from ray.data.extensions import ArrowTensorArray

    if len({array.shape for array in arrays}) <= 1:
        return ArrowTensorArray.from_numpy(list(arrays))
    ragged = np.empty(len(arrays), dtype=object)
    for index, array in enumerate(arrays):
        ragged[index] = array
    return ArrowTensorArray.from_numpy(ragged)


def with_own_sizes(batch: pa.Table, sizes: Sequence[Size | None]) -> pa.Table:
    """Rows that do not know their image's size (``width``/``height`` missing or null:
    images listed from a folder by ``mmrad detect``, not a manifest's records) get the
    size decoding found, ``None`` where the image is bad. Known sizes stay as they are.

    Measured while decoding, where the bytes are read anyway; reading every header in
    the driver first was rejected: a second read of each object, one after another."""
    for axis, name in enumerate(("width", "height")):
        known = batch.column(name).to_pylist() if name in batch.column_names else None
        if known is not None and None not in known:
            continue
        known = known or [None] * len(sizes)
        values = [value if value is not None else (size[axis] if size else None)
                  for value, size in zip(known, sizes, strict=True)]  # fmt: skip
        column = pa.array(values, pa.int64())
        if name in batch.column_names:
            batch = batch.set_column(batch.column_names.index(name), name, column)
        else:
            batch = batch.append_column(name, column)
    return batch


def ordered_data_context():
    """Ray Data's context for mmrad's datasets: rows keep their order, and a decode error
    reaches the consumer as itself (a :class:`BadImageError` that ends the job at once,
    :mod:`mmrad.train.fail_fast`), not wrapped as Ray Data's ``UserCodeException``."""
    import ray.data

    from mmrad.data import idle_wait

    idle_wait.install()
    context = ray.data.DataContext.get_current()
    context.execution_options.preserve_order = True
    context.raise_original_map_exception = True
    return context


def build_dataset(
    rows: list[dict[str, Any]],
    spec: DecodeSpec,
    batch_size: int = 16,
    resources: Mapping[str, float] | None = None,
):
    """A Ray Dataset over ``rows`` (from :func:`ordered_rows`) that keeps their order;
    its decode tasks ask for custom ``resources`` too (:mod:`mmrad.placement`)."""
    import ray.data

    ordered_data_context()
    dataset = ray.data.from_items(rows, override_num_blocks=max(1, len(rows) // batch_size))
    # Tasks, not an actor pool: worker processes (and their cached clients and
    # references) are reused across datasets, while actors would start cold each time.
    return dataset.map_batches(
        decode_batch, fn_kwargs={"spec": spec}, batch_size=batch_size, batch_format="pyarrow",
        resources=dict(resources or {}),
    )  # fmt: skip


def rank_datasets(
    records: Sequence[Mapping[str, Any]],
    spec: DecodeSpec,
    *,
    world_size: int,
    seed: int,
    epoch: int = 0,
    start: int = 0,
    batch_size: int = 16,
    resources: Mapping[str, float] | None = None,
) -> list:
    """One ordered dataset per rank; pass them to Ray Train as ``{"train_<rank>": ds}``
    with ``DataConfig(datasets_to_split=[])`` so each worker reads only its own."""
    return [
        build_dataset(
            ordered_rows(
                records, seed=seed, epoch=epoch, rank=rank, world_size=world_size, start=start
            ),
            spec,
            batch_size,
            resources,
        )
        for rank in range(world_size)
    ]


@dataclass
class SkipLog:
    """Drops rows with a bad image, logging each id, and keeps every distinct skipped id
    with its first error; with a ``budget``, raises :class:`TooManyBadImages` as soon as
    the skipped ids exceed it."""

    budget: BadImageBudget | None = None
    skipped: dict[str, str] = field(default_factory=dict)

    def usable_rows(self, rows: Iterable[Mapping[str, Any]]) -> Iterator[Mapping[str, Any]]:
        for row in rows:
            if row["error"]:
                log.warning("skipping id %s: %s", row["id"], row["error"])
                self.add({str(row["id"]): str(row["error"])})
                continue
            yield row

    def add(self, skipped: Mapping[str, str]) -> None:
        """Count skipped ids (id -> error), e.g. other ranks', then check the budget."""
        for sample_id, error in skipped.items():
            self.skipped.setdefault(sample_id, error)
        if self.budget is not None:
            self.budget.check(self.skipped)
