"""How often a model answers in the task format: greedy decoding through vLLM of
held-out samples, parsed with :func:`mmrad.task.answer.parse_answer`.

The SFT job's smoke check (before training vs after) and the local demo use it; the full
benchmark evaluation lives in the evaluation job.
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from PIL import Image

from mmrad.config import EngineConfig, PixelBudget, PromptConfig
from mmrad.storage import Storage
from mmrad.task.answer import parse_answer
from mmrad.task.prompt import PromptVariant


@dataclass(frozen=True)
class FormatCheck:
    samples: int
    format_ok: int
    decisions_right: int
    examples: tuple[str, ...]

    @property
    def format_ok_rate(self) -> float:
        return self.format_ok / self.samples if self.samples else 0.0


def load_inputs(storage: Storage, records: Sequence[dict[str, Any]]) -> list:
    from mmrad.engine.requests import InspectionInput

    def image(uri: str | None) -> Image.Image | None:
        return Image.open(io.BytesIO(storage.read_bytes(uri))).convert("RGB") if uri else None

    return [
        InspectionInput(image(r["image_uri"]), image(r["reference_uri"]), r["category"])
        for r in records
    ]


def check_format(
    model_dir: str,
    records: Sequence[dict[str, Any]],
    storage: Storage,
    *,
    pixels: PixelBudget,
    prompt: PromptConfig,
    engine: EngineConfig | None = None,
    max_tokens: int = 384,
) -> FormatCheck:
    from mmrad.engine.engine import Engine
    from mmrad.engine.sampling import Sampling

    variant = PromptVariant(**prompt.variant_dict())
    items = load_inputs(storage, records)
    with Engine(model_dir, engine or EngineConfig(), pixels, variant) as llm:
        outputs = llm.generate(items, Sampling(temperature=0.0, max_tokens=max_tokens))
    texts = [completions[0].text for completions in outputs]
    verdicts = [parse_answer(text, require_think=prompt.reasoning) for text in texts]
    right = sum(
        v.decision == bool(r["is_anomalous"]) for v, r in zip(verdicts, records, strict=True)
    )
    return FormatCheck(
        samples=len(records),
        format_ok=sum(v.format_ok for v in verdicts),
        decisions_right=right,
        examples=tuple(texts[:3]),
    )
