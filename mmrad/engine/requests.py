"""One inspection → one vLLM prompt: chat-template text plus images on the model grid.

Images are resized here, to exactly the grid :func:`~mmrad.task.geometry.model_grid`
gives for the pixel budget, so vLLM's processor (same rule, same budget) leaves them as
they are, and the prompt states that grid's size, so the model's boxes are in it.
:func:`grid_of` tells callers how to map those boxes back to the original image.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from mmrad.config import PixelBudget
from mmrad.task.geometry import Size, grid_scale, model_grid
from mmrad.task.knowledge import CategoryKnowledge
from mmrad.task.prompt import IMAGE_PLACEHOLDER, PromptVariant, build_messages

ImageLike = Image.Image | np.ndarray
RESAMPLE = Image.Resampling.BICUBIC  # as the data layer resizes (mmrad.data.loading)


@dataclass(frozen=True)
class InspectionInput:
    """What the model is asked about: a query image, optionally a normal reference.

    Images are PIL images or ``H x W x 3`` uint8 arrays, on the model grid or not.
    ``knowledge`` is the category's domain knowledge (domain-knowledge prompts).
    ``hint`` is appended to the prompt text (the annotation job's ground-truth hint for a
    teacher, :mod:`mmrad.eval.hints`); ``None`` for every ordinary inspection.
    """

    image: ImageLike
    reference: ImageLike | None = None
    category: str | None = None
    knowledge: CategoryKnowledge | None = None
    hint: str | None = None


@dataclass(frozen=True)
class QueryGrid:
    """The query image's original ``size`` and model ``grid`` (both ``(width, height)``),
    and the ``scale`` that takes grid coordinates back to original pixels: pass
    ``parse_answer(text, scale=g.scale, size=g.size)``."""

    size: Size
    grid: Size
    scale: tuple[float, float]


def image_size(image: ImageLike) -> Size:
    """``(width, height)`` of a PIL image or an ``H x W x C`` array."""
    if isinstance(image, Image.Image):
        return image.size
    return int(image.shape[1]), int(image.shape[0])


def grid_for(size: Size, pixels: PixelBudget) -> Size:
    return model_grid(size, pixels.min_pixels, pixels.max_pixels, pixels.factor)


def grid_of(item: InspectionInput, pixels: PixelBudget) -> QueryGrid:
    """Where the query lands on the model grid under ``pixels``."""
    return query_grid(image_size(item.image), pixels)


def query_grid(size: Size, pixels: PixelBudget) -> QueryGrid:
    """Where a query image of ``size`` lands on the model grid under ``pixels``."""
    grid = grid_for(size, pixels)
    return QueryGrid(size=size, grid=grid, scale=grid_scale(size, grid))


def on_grid(size: Size, pixels: PixelBudget) -> bool:
    """Whether an image of ``size`` is already on its model grid (needs no resizing)."""
    return grid_for(size, pixels) == size


def to_grid_image(image: ImageLike, pixels: PixelBudget) -> Image.Image:
    """An RGB PIL image resized to its model grid (unchanged when already on it)."""
    pil = as_pil(image)
    return pil if on_grid(pil.size, pixels) else pil.resize(grid_for(pil.size, pixels), RESAMPLE)


def as_pil(image: ImageLike) -> Image.Image:
    """RGB PIL image from a PIL image or an ``H x W x 3`` (or ``H x W``) uint8 array."""
    if isinstance(image, Image.Image):
        return image if image.mode == "RGB" else image.convert("RGB")
    array = np.asarray(image)
    if array.dtype != np.uint8 or not (
        array.ndim == 2 or (array.ndim == 3 and array.shape[2] == 3)
    ):
        raise ValueError(
            f"an image array must be H x W x 3 uint8, got shape {array.shape} {array.dtype}"
        )
    return Image.fromarray(array).convert("RGB")


def uses_reference(item: InspectionInput, variant: PromptVariant) -> bool:
    return variant.use_reference and item.reference is not None


def build_messages_for(
    item: InspectionInput, variant: PromptVariant, pixels: PixelBudget
) -> list[dict[str, Any]]:
    """The chat messages of :func:`build_request`, with image placeholders."""
    return build_messages(
        category=item.category,
        grid_size=grid_of(item, pixels).grid,
        variant=variant,
        knowledge=item.knowledge,
        query_image=IMAGE_PLACEHOLDER,
        reference_image=IMAGE_PLACEHOLDER if uses_reference(item, variant) else None,
        hint=item.hint,
        cell=pixels.factor,
    )


def build_request(
    tokenizer_or_processor: Any,
    item: InspectionInput,
    variant: PromptVariant,
    pixels: PixelBudget,
) -> dict[str, Any]:
    """A vLLM prompt: ``{"prompt": text, "multi_modal_data": {"image": [...]}}``.

    The text is the processor's (or tokenizer's) chat template with the generation
    prompt; the images are ``[reference, query]`` (reference only when the variant uses
    one and the item has one), each resized to its own model grid.
    """
    messages = build_messages_for(item, variant, pixels)
    prompt = tokenizer_or_processor.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=True
    )
    images = [to_grid_image(item.image, pixels)]
    if uses_reference(item, variant):
        images.insert(0, to_grid_image(item.reference, pixels))
    return {"prompt": prompt, "multi_modal_data": {"image": images}}


def chat_request(
    tokenizer_or_processor: Any,
    messages: Sequence[Mapping[str, Any]],
    images: Sequence[ImageLike],
    pixels: PixelBudget,
) -> dict[str, Any]:
    """A vLLM prompt from chat messages whose image parts are placeholders
    (``{"type": "image"}``), with ``images`` the images in the order they appear.

    For callers that bring their own messages (the OpenAI-compatible endpoint); images
    are resized to their model grid as in :func:`build_request` (ones already on it, as
    the evaluation client sends them, are left as they are).
    """
    prompt = tokenizer_or_processor.apply_chat_template(
        list(messages), tokenize=False, add_generation_prompt=True
    )
    if not images:
        return {"prompt": prompt}
    return {
        "prompt": prompt,
        "multi_modal_data": {"image": [to_grid_image(i, pixels) for i in images]},
    }


Prompt = InspectionInput | Mapping[str, Any]
"""An inspection, or a ready vLLM prompt dict (``prompt`` or ``prompt_token_ids``, and
optionally ``multi_modal_data``)."""


class ModelPrompts:
    """Prompts for the model at ``model_path``, with its HF processor (whose chat
    template they use) loaded on first use. Shared by the engines in this package."""

    def __init__(self, model_path: str):
        self.model_path = str(model_path)
        self._processor: Any = None

    @property
    def processor(self) -> Any:
        if self._processor is None:
            from transformers import AutoProcessor

            self._processor = AutoProcessor.from_pretrained(self.model_path)
        return self._processor

    def request(self, item: Prompt, variant: PromptVariant, pixels: PixelBudget) -> dict[str, Any]:
        """The vLLM prompt dict of an inspection (a prompt dict is passed through)."""
        if isinstance(item, InspectionInput):
            return build_request(self.processor, item, variant, pixels)
        if isinstance(item, Mapping):
            return dict(item)
        raise TypeError(f"expected an InspectionInput or a prompt dict, got {type(item)}")
