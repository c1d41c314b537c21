"""GRPO's prompts: records of one split, decoded onto the model grid by Ray Data, in an
order that a checkpoint can resume exactly.

Every epoch visits the records in the permutation :func:`mmrad.data.loading.epoch_order`
fixes for ``(seed, epoch)``; the stream's :class:`DataPosition` is the next position to
draw. Dynamic sampling draws a varying number of prompts per step, so the position (not
the step) is what a checkpoint keeps: a resumed run starts its Ray Data pipeline there
and draws exactly the prompts an uninterrupted run would have drawn next. Rows whose
image cannot be read are skipped (counted and logged) but still consume their position;
more distinct bad images than ``data.max_bad_fraction`` of the records allows stop the
stream (:class:`~mmrad.data.loading.BadImageBudget`), so it never loops over bad ones.
"""

from __future__ import annotations

import logging
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from mmrad.data.loading import (
    RECORD_COLUMNS,
    DecodeSpec,
    SkipLog,
    decode_batch,
    ordered_data_context,
    ordered_rows,
)
from mmrad.engine.requests import InspectionInput
from mmrad.task.knowledge import CategoryKnowledge, Knowledge

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class DataPosition:
    """The next prompt to draw: position ``index`` of epoch ``epoch``'s order."""

    epoch: int = 0
    index: int = 0

    def to_dict(self) -> dict[str, int]:
        return {"epoch": self.epoch, "index": self.index}

    @classmethod
    def from_dict(cls, data: Mapping[str, int]) -> DataPosition:
        return cls(int(data["epoch"]), int(data["index"]))


@dataclass(frozen=True)
class PromptItem:
    """One decoded prompt: its manifest record (original pixels), the query (and the
    reference) on the model grid, and the category's domain knowledge."""

    prompt_id: str
    record: dict[str, Any]
    image: np.ndarray
    reference: np.ndarray | None
    knowledge: CategoryKnowledge | None = None

    @property
    def size(self) -> tuple[int, int]:
        """The query's original ``(width, height)``: where rewards compare boxes."""
        return int(self.record["width"]), int(self.record["height"])

    @property
    def grid(self) -> tuple[int, int]:
        """The query's model grid ``(width, height)``: where answers put boxes."""
        return int(self.image.shape[1]), int(self.image.shape[0])

    def inputs(self, hint: str | None = None) -> InspectionInput:
        return InspectionInput(
            self.image,
            self.reference,
            self.record.get("category"),
            self.knowledge,
            hint=hint,
        )


def prompt_id(record_id: str, epoch: int) -> str:
    """Unique within a run: a record is drawn at most once per epoch."""
    return f"{record_id}@{epoch}"


def item_from_row(row: Mapping[str, Any], epoch: int, knowledge: Knowledge):
    record = {key: _plain(row[key]) for key in RECORD_COLUMNS}
    reference = row.get("reference")
    has_reference = reference is not None and np.size(reference) > 0
    return PromptItem(
        prompt_id=prompt_id(str(row["id"]), epoch),
        record=record,
        image=np.ascontiguousarray(row["image"]),
        reference=np.ascontiguousarray(reference) if has_reference else None,
        knowledge=knowledge.get(record["category"] or ""),
    )


def _plain(value: Any) -> Any:
    """Arrow/numpy values as plain Python (boxes as lists of float lists)."""
    if isinstance(value, np.ndarray):
        return [_plain(v) for v in value]
    if isinstance(value, np.generic):
        return value.item()
    if isinstance(value, list | tuple):
        return [_plain(v) for v in value]
    return value


class PromptStream:
    """Draws decoded prompts from ``records`` in the resumable order, epoch after epoch.

    One Ray Data pipeline per epoch (from the current position on), read lazily: the
    decode tasks run ahead of the consumer with Ray Data's own back-pressure, at
    ``decode_cpus`` each so they fit beside engines and learners on a small machine, at
    most ``decode_tasks`` at once (uncapped, Ray Data would start as many tasks as the
    CPUs allow, each in a new worker process, before the first batch arrives).
    """

    def __init__(
        self,
        records: Sequence[Mapping[str, Any]],
        spec: DecodeSpec,
        *,
        seed: int,
        knowledge: Knowledge | None = None,
        decode_cpus: float = 0.25,
        decode_tasks: int = 2,
        batch_size: int = 8,
        position: DataPosition = DataPosition(),  # noqa: B008 (frozen)
        resources: Mapping[str, float] | None = None,
    ):
        if not records:
            raise ValueError("no records to prompt from (is the split empty?)")
        self.records = list(records)
        self.spec = spec
        self.seed = seed
        self.knowledge = dict(knowledge or {})
        self.decode_cpus = decode_cpus
        self.decode_tasks = decode_tasks
        self.batch_size = batch_size
        self.resources = dict(resources or {})  # custom ones of each decode task
        self.skips = SkipLog(spec.bad_image_budget(len(self.records)))  # ids are unique
        self._position = position
        self._rows: Iterator[dict[str, Any]] | None = None

    @property
    def position(self) -> DataPosition:
        return self._position

    def seek(self, position: DataPosition) -> None:
        """Continue from ``position`` (a checkpoint's); drops rows decoded ahead."""
        self.close()
        self._position = position

    def close(self) -> None:
        """End the current epoch's pipeline now, while this process is connected to Ray.
        One left to the garbage collector as the actor exits shuts down after Ray has,
        and its call into Ray then starts a Ray instance of its own in the dying process
        (Ray's auto-init), whose agents outlive it."""
        rows, self._rows = self._rows, None
        close = getattr(rows, "close", None)
        if close is not None:
            close()

    def take(self, count: int) -> list[PromptItem]:
        """The next ``count`` usable prompts (bad images skipped, their positions used)."""
        items: list[PromptItem] = []
        while len(items) < count:
            if self._rows is None:
                self._rows = self._epoch_rows(self._position)
            row = next(self._rows, None)
            if row is None:  # epoch done: the next one has its own order
                self._position = DataPosition(self._position.epoch + 1, 0)
                self._rows = None
                continue
            epoch = self._position.epoch
            self._position = DataPosition(epoch, int(row["position"]) + 1)
            if next(iter(self.skips.usable_rows([row])), None) is not None:
                items.append(item_from_row(row, epoch, self.knowledge))
        return items

    def _epoch_rows(self, position: DataPosition) -> Iterator[dict[str, Any]]:
        rows = ordered_rows(
            self.records, seed=self.seed, epoch=position.epoch, start=position.index
        )
        if not rows:
            return iter(())
        return iter(self._dataset(rows).iter_rows())

    def _dataset(self, rows: list[dict[str, Any]]):
        import ray.data

        ordered_data_context().enable_progress_bars = False
        blocks = max(1, len(rows) // self.batch_size)
        return ray.data.from_items(rows, override_num_blocks=blocks).map_batches(
            decode_batch,
            fn_kwargs={"spec": self.spec},
            batch_size=self.batch_size,
            batch_format="pyarrow",
            num_cpus=self.decode_cpus,
            resources=self.resources,
            compute=ray.data.TaskPoolStrategy(size=self.decode_tasks),
        )
