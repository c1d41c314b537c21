"""One inspection → one vLLM prompt: chat-template text plus images on the model grid.

Images are resized here, to exactly the grid :func:`~mmrad.task.geometry.model_grid`
gives for the pixel budget, so vLLM's processor (same rule, same budget) leaves them as
they are, and the prompt states that grid's size, so the model's boxes are in it.
:func:`grid_of` tells callers how to map those boxes back to the original image.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import numpy as np
from PIL import Image

from mmrad.config import PixelBudget
from mmrad.task.geometry import Size, grid_scale, model_grid
from mmrad.task.prompt import IMAGE_PLACEHOLDER, PromptVariant, build_messages

ImageLike = Image.Image | np.ndarray
RESAMPLE = Image.Resampling.BICUBIC  # as the data layer resizes (mmrad.data.loading)


@dataclass(frozen=True)
class InspectionInput:
    """What the model is asked about: a query image, optionally a normal reference.

    Images are PIL images or ``H x W x 3`` uint8 arrays, on the model grid or not.
    ``defect_types`` are the category's known anomaly types (domain-knowledge prompts).
    """

    image: ImageLike
    reference: ImageLike | None = None
    category: str | None = None
    defect_types: tuple[str, ...] = ()


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
    size = image_size(item.image)
    grid = grid_for(size, pixels)
    return QueryGrid(size=size, grid=grid, scale=grid_scale(size, grid))


def to_grid_image(image: ImageLike, pixels: PixelBudget) -> Image.Image:
    """An RGB PIL image resized to its model grid (unchanged when already on it)."""
    pil = as_pil(image)
    grid = grid_for(pil.size, pixels)
    return pil if pil.size == grid else pil.resize(grid, RESAMPLE)


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
        defect_types=item.defect_types,
        query_image=IMAGE_PLACEHOLDER,
        reference_image=IMAGE_PLACEHOLDER if uses_reference(item, variant) else None,
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
