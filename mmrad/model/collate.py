"""SFT batches for Qwen2.5-VL: rows from :mod:`mmrad.data.loading` → model inputs.

One sample is the prompt of :func:`mmrad.task.prompt.build_messages` (reference image
first when the variant uses one and the row has one) plus the assistant's answer from
:func:`mmrad.task.answer.format_answer`. The loss covers the answer and its closing
``<|im_end|>`` only.

Rows' images are already on the model grid, so the processor is told not to resize them;
otherwise the answer's boxes (model-grid pixels) would not match what the model sees.

The assistant span is found on the *unexpanded* token ids (one ``<|image_pad|>`` per
image): the prompt rendered with ``add_generation_prompt=True`` must tokenize to a prefix
of the whole conversation, and the processor's ids, with each image's run of pads
collapsed to one, must equal the whole conversation's. Any disagreement raises, naming
the sample, instead of training on a shifted mask.

A wrong number of image tokens is the error VLM fine-tuning most often hits (a resize
nobody expected, truncation through an image): :func:`check_image_tokens` compares, for
every image of every sample, its ``<|image_pad|>`` run with ``image_grid_thw``, and the
collator runs it on every batch it builds.
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from mmrad.task.answer import GENERIC_REASONING, format_answer, has_reasoning
from mmrad.task.geometry import as_boxes, defect_cells, to_answer_boxes
from mmrad.task.knowledge import Knowledge
from mmrad.task.prompt import IMAGE_PLACEHOLDER, PromptVariant, build_messages

log = logging.getLogger(__name__)

IGNORE_INDEX = -100
IMAGE_TOKEN = "<|image_pad|>"
VISION_START_TOKEN = "<|vision_start|>"
END_OF_TURN_TOKEN = "<|im_end|>"


class ImageTokenMismatch(ValueError):
    """A sample's image tokens do not match its image grid; names the sample and numbers."""


@dataclass(frozen=True)
class EncodedSample:
    input_ids: list[int]
    labels: list[int]
    mm_token_type_ids: list[int]
    pixel_values: torch.Tensor
    image_grid_thw: torch.Tensor
    patch_targets: torch.Tensor | None = None  # per merged vision token (patch_targets=True)


class SFTCollator:
    """Callable on a list of rows; returns ``input_ids, attention_mask, labels,
    pixel_values, image_grid_thw, mm_token_type_ids`` (tensors, right-padded) and
    ``sample_ids`` (a list of str, to pop before the forward pass).

    ``knowledge`` maps a category to its domain knowledge (the domain-knowledge
    variant). ``max_length`` truncates answers from the right; a prompt that does not fit
    raises (:class:`ImageTokenMismatch` when image tokens would be cut).
    """

    def __init__(
        self,
        processor,
        variant: PromptVariant,
        knowledge: Knowledge | None = None,
        max_length: int | None = None,
        patch_targets: bool = False,
    ):
        self.processor = processor
        self.variant = variant
        self.patch_targets = patch_targets
        self.knowledge = dict(knowledge or {})
        self.max_length = max_length
        tokenizer = processor.tokenizer
        self.tokenizer = tokenizer
        self.image_token_id = tokenizer.convert_tokens_to_ids(IMAGE_TOKEN)
        self.vision_start_id = tokenizer.convert_tokens_to_ids(VISION_START_TOKEN)
        self.end_of_turn_id = tokenizer.convert_tokens_to_ids(END_OF_TURN_TOKEN)
        self.pad_id = (
            tokenizer.pad_token_id if tokenizer.pad_token_id is not None else self.end_of_turn_id
        )
        image_processor = processor.image_processor
        self.patch_size = image_processor.patch_size
        self.merge_size = image_processor.merge_size
        self.factor = self.patch_size * self.merge_size

    # -- public ----------------------------------------------------------------------------

    def __call__(self, rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
        if not rows:
            raise ValueError("cannot collate an empty list of rows")
        return self.batch([self.encode(row) for row in rows], [str(row["id"]) for row in rows])

    def batch(self, samples: Sequence[EncodedSample], sample_ids: Sequence[str]) -> dict[str, Any]:
        """Encoded samples (see :meth:`encode`) as one right-padded batch."""
        batch = self._pad(list(samples))
        batch["sample_ids"] = list(sample_ids)
        self.check_image_tokens(batch)
        return batch

    def target(self, row: Mapping[str, Any]) -> str:
        """The assistant's answer for a row (boxes in the variant's units on the model grid)."""
        size = (int(row["width"]), int(row["height"]))
        grid = (int(row["grid_width"]), int(row["grid_height"]))
        unit = self.variant.answer_unit(self.factor)
        boxes = to_answer_boxes(as_boxes(row["boxes"]), size, grid, unit)
        labels = [str(label) for label in (row["labels"] if row["labels"] is not None else [])]
        anomalous = bool(row["is_anomalous"])
        reasoning = None
        if self.variant.reasoning:
            reasoning = row.get("reasoning")
            if not has_reasoning(reasoning):  # allowed by data.require_reasoning=false
                reasoning = GENERIC_REASONING[anomalous]
        return format_answer(anomalous, boxes, labels, reasoning)

    def check_image_tokens(self, batch: Mapping[str, Any]) -> None:
        check_image_tokens(
            batch,
            image_token_id=self.image_token_id,
            vision_start_id=self.vision_start_id,
            merge_size=self.merge_size,
        )

    def encode(self, row: Mapping[str, Any]) -> EncodedSample:
        """One row → unpadded ids, labels and its images' pixels."""
        sample_id = str(row["id"])
        if row.get("error"):
            raise ValueError(f"sample {sample_id}: row has an image error: {row['error']}")
        images = self._images(row)
        messages = build_messages(
            category=row.get("category"),
            grid_size=(int(row["grid_width"]), int(row["grid_height"])),
            variant=self.variant,
            knowledge=self.knowledge.get(row.get("category") or ""),
            reference_image=IMAGE_PLACEHOLDER if len(images) == 2 else None,
            cell=self.factor,
        )
        answer = self.target(row)
        prompt_text = self.processor.apply_chat_template(
            messages, tokenize=False, add_generation_prompt=True
        )
        conversation = [*messages, {"role": "assistant", "content": answer}]
        full_text = self.processor.apply_chat_template(conversation, tokenize=False)
        encoded = self.processor(
            text=[full_text], images=images, do_resize=False, return_tensors="pt"
        )
        self._check_grid(sample_id, images, encoded["image_grid_thw"])
        input_ids = encoded["input_ids"][0].tolist()
        answer_start, answer_end = self._answer_span(sample_id, prompt_text, full_text, input_ids)
        labels = [IGNORE_INDEX] * len(input_ids)
        labels[answer_start:answer_end] = input_ids[answer_start:answer_end]
        mm_types = encoded["mm_token_type_ids"][0].tolist()
        sample = EncodedSample(
            input_ids, labels, mm_types, encoded["pixel_values"], encoded["image_grid_thw"],
            self.cell_targets(row, images) if self.patch_targets else None,
        )  # fmt: skip
        return self._truncate(sample_id, sample, answer_start)

    def cell_targets(self, row: Mapping[str, Any], images: Sequence[np.ndarray]) -> torch.Tensor:
        """Per merged vision token of ``images`` (``[reference,] query``), in order: 1
        where a defect box overlaps the query's cell; a reference's cells are all 0."""
        size = (int(row["width"]), int(row["height"]))
        grid = (int(row["grid_width"]), int(row["grid_height"]))
        query = defect_cells(as_boxes(row["boxes"]), size, grid, self.factor).ravel()
        references = [np.zeros(self._tokens_for(*image.shape[:2]), np.float32)
                      for image in images[:-1]]  # fmt: skip
        return torch.from_numpy(np.concatenate([*references, query]))

    # -- steps -----------------------------------------------------------------------------

    def _images(self, row: Mapping[str, Any]) -> list[np.ndarray]:
        """``[reference,] query`` as HxWx3 uint8 arrays on the model grid."""
        sample_id = str(row["id"])
        query = self._image(sample_id, "image", row["image"])
        grid_h, grid_w = int(row["grid_height"]), int(row["grid_width"])
        if query.shape[:2] != (grid_h, grid_w):
            raise ImageTokenMismatch(
                f"sample {sample_id}: the row's grid {grid_w}x{grid_h} means "
                f"{self._tokens_for(grid_h, grid_w)} image tokens, but its image is "
                f"{query.shape[1]}x{query.shape[0]} ({self._tokens_for(*query.shape[:2])} tokens)"
            )
        reference = row.get("reference")
        if self.variant.use_reference and reference is not None and np.size(reference):
            return [self._image(sample_id, "reference", reference), query]
        return [query]

    def _image(self, sample_id: str, name: str, value: Any) -> np.ndarray:
        image = np.asarray(value)
        if image.ndim != 3 or image.shape[2] != 3 or image.dtype != np.uint8:
            raise ValueError(
                f"sample {sample_id}: {name} must be an HxWx3 uint8 array, "
                f"got shape {image.shape} {image.dtype}"
            )
        height, width = image.shape[:2]
        if height % self.factor or width % self.factor or not height or not width:
            raise ValueError(
                f"sample {sample_id}: {name} is {width}x{height}, not on the model grid "
                f"(sides multiples of {self.factor}); rows must come from mmrad.data.loading"
            )
        return np.ascontiguousarray(image)

    def _tokens_for(self, height: int, width: int) -> int:
        return (height // self.patch_size) * (width // self.patch_size) // self.merge_size**2

    def _check_grid(self, sample_id: str, images: list[np.ndarray], grid_thw: torch.Tensor) -> None:
        """The processor kept every image's size (it must not resize them again)."""
        for index, image in enumerate(images):
            seen = tuple(int(v) * self.patch_size for v in grid_thw[index, 1:])
            if seen != image.shape[:2]:
                raise ImageTokenMismatch(
                    f"sample {sample_id}: image {index} is {image.shape[1]}x{image.shape[0]} "
                    f"but the processor made a {seen[1]}x{seen[0]} grid of it"
                )

    def _answer_span(
        self, sample_id: str, prompt_text: str, full_text: str, input_ids: list[int]
    ) -> tuple[int, int]:
        """``[start, end)`` of the answer and its ``<|im_end|>`` in ``input_ids``."""
        encode = self.tokenizer
        prompt = encode(prompt_text, add_special_tokens=False)["input_ids"]
        full = encode(full_text, add_special_tokens=False)["input_ids"]
        if full[: len(prompt)] != prompt:
            raise ValueError(
                f"sample {sample_id}: the prompt's tokens are not a prefix of the whole "
                "conversation's; the chat template or tokenizer merges across the turn"
            )
        if _collapse_runs(input_ids, self.image_token_id) != full:
            raise ValueError(
                f"sample {sample_id}: the processor's tokens differ from the tokenizer's "
                "beyond the expanded image tokens"
            )
        tail = full[len(prompt) :]
        if self.end_of_turn_id not in tail:
            raise ValueError(f"sample {sample_id}: the assistant turn has no {END_OF_TURN_TOKEN}")
        start = len(input_ids) - len(tail)
        return start, start + tail.index(self.end_of_turn_id) + 1

    def _truncate(self, sample_id: str, sample: EncodedSample, answer_start: int) -> EncodedSample:
        limit = self.max_length
        if limit is None or len(sample.input_ids) <= limit:
            return sample
        pads = [i for i, t in enumerate(sample.input_ids) if t == self.image_token_id]
        kept = sum(1 for i in pads if i < limit)
        if kept < len(pads):
            raise ImageTokenMismatch(
                f"sample {sample_id}: max_length {limit} would keep {kept} of its "
                f"{len(pads)} image tokens"
            )
        if limit <= answer_start:
            raise ValueError(
                f"sample {sample_id}: its prompt has {answer_start} tokens, "
                f"max_length {limit} leaves no room for the answer"
            )
        log.warning(
            "sample %s: answer truncated to max_length %d (from %d tokens)",
            sample_id,
            limit,
            len(sample.input_ids),
        )
        return EncodedSample(
            sample.input_ids[:limit],
            sample.labels[:limit],
            sample.mm_token_type_ids[:limit],
            sample.pixel_values,
            sample.image_grid_thw,
            sample.patch_targets,
        )

    def _pad(self, samples: list[EncodedSample]) -> dict[str, Any]:
        """Right padding: pads take no attention, no loss and are text tokens (type 0)."""
        length = max(len(s.input_ids) for s in samples)
        shape = (len(samples), length)
        input_ids = torch.full(shape, self.pad_id, dtype=torch.long)
        attention_mask = torch.zeros(shape, dtype=torch.long)
        labels = torch.full(shape, IGNORE_INDEX, dtype=torch.long)
        mm_token_type_ids = torch.zeros(shape, dtype=torch.long)
        for i, sample in enumerate(samples):
            n = len(sample.input_ids)
            input_ids[i, :n] = torch.tensor(sample.input_ids)
            attention_mask[i, :n] = 1
            labels[i, :n] = torch.tensor(sample.labels)
            mm_token_type_ids[i, :n] = torch.tensor(sample.mm_token_type_ids)
        return {
            "input_ids": input_ids,
            "attention_mask": attention_mask,
            "labels": labels,
            "pixel_values": torch.cat([s.pixel_values for s in samples]),
            "image_grid_thw": torch.cat([s.image_grid_thw for s in samples]),
            "mm_token_type_ids": mm_token_type_ids,
        } | self._patch_targets(samples)

    def _patch_targets(self, samples: list[EncodedSample]) -> dict[str, torch.Tensor]:
        if not self.patch_targets:
            return {}
        return {"patch_targets": torch.cat([s.patch_targets for s in samples])}


def _collapse_runs(ids: Sequence[int], token: int) -> list[int]:
    """``ids`` with every run of ``token`` shortened to one."""
    return [t for i, t in enumerate(ids) if t != token or i == 0 or ids[i - 1] != token]


def check_image_tokens(
    batch: Mapping[str, Any],
    *,
    image_token_id: int,
    vision_start_id: int,
    merge_size: int = 2,
) -> None:
    """Every image's run of ``<|image_pad|>`` has ``prod(grid_thw) // merge_size**2``
    tokens. Images are found by their ``<|vision_start|>``, in order, and paired with
    the rows of ``image_grid_thw``. Raises :class:`ImageTokenMismatch` naming the sample
    (``batch["sample_ids"]``, else its index) and both numbers."""
    input_ids = batch["input_ids"]
    mask = batch.get("attention_mask")
    grids = batch["image_grid_thw"]
    expected = (grids.prod(-1) // merge_size**2).tolist() if len(grids) else []
    names = [str(s) for s in batch.get("sample_ids") or range(len(input_ids))]
    image = 0
    for row, name in enumerate(names):
        ids = input_ids[row] if mask is None else input_ids[row][mask[row].bool()]
        ids = ids.tolist()
        starts = [i for i, t in enumerate(ids) if t == vision_start_id]
        total_pads = sum(1 for t in ids if t == image_token_id)
        counted = 0
        for number, start in enumerate(starts):
            run = 0
            while start + 1 + run < len(ids) and ids[start + 1 + run] == image_token_id:
                run += 1
            counted += run
            if image >= len(expected):
                raise ImageTokenMismatch(
                    f"sample {name}: image {number} has {run} image tokens but the batch "
                    f"has only {len(expected)} image grids"
                )
            if run != expected[image]:
                raise ImageTokenMismatch(
                    f"sample {name}: image {number} has {run} image tokens, its grid "
                    f"{grids[image].tolist()} needs {expected[image]}"
                )
            image += 1
        if counted != total_pads:
            raise ImageTokenMismatch(
                f"sample {name}: {total_pads} image tokens in all, but only {counted} "
                "follow a <|vision_start|>"
            )
    if image != len(expected):
        raise ImageTokenMismatch(
            f"samples {names}: {image} images in the text but {len(expected)} image grids"
        )
    types = batch.get("mm_token_type_ids")
    if types is not None and not torch.equal(types == 1, input_ids == image_token_id):
        raise ImageTokenMismatch(f"samples {names}: mm_token_type_ids do not mark the image tokens")
