"""SFT collation: prompts, loss masks and image tokens on the tiny Qwen2.5-VL model."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from mmrad.config import LoraConfig, PixelBudget
from mmrad.model.collate import (
    IGNORE_INDEX,
    ImageTokenMismatch,
    SFTCollator,
    check_image_tokens,
)
from mmrad.model.loading import load_model, load_processor
from mmrad.model.lora import apply_lora, trainable_summary
from mmrad.model.tiny import build_tiny_model
from mmrad.task.answer import GENERIC_REASONING, format_answer
from mmrad.task.knowledge import CategoryKnowledge
from mmrad.task.prompt import PromptVariant

NO_IMAGE = np.zeros((0, 0, 3), dtype=np.uint8)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return load_processor(str(tiny_dir), PixelBudget())


@pytest.fixture(scope="module")
def collator(processor):
    knowledge = {"brick": CategoryKnowledge(("scratch",))}
    return SFTCollator(processor, PromptVariant(domain_knowledge=True), knowledge)


def pixels(width: int, height: int, seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def make_rows() -> list[dict]:
    """As Ray Data yields them: numpy images on the model grid, numpy boxes and labels."""
    base = {"source": "synthetic", "split": "train", "error": "", "position": 0}
    return [
        {  # 448x448 original → 224x224 grid; reference; two boxes; no reasoning text
            **base, "id": "brick-0", "category": "brick", "width": 448, "height": 448,
            "is_anomalous": True, "defect_type": "scratch", "reasoning": None,
            "boxes": np.array([np.array([10.0, 20.0, 100.0, 120.0]),
                               np.array([200.0, 200.0, 300.0, 262.0])], dtype=object),
            "labels": np.array(["scratch", "hole"]),
            "image": pixels(224, 224, 1), "reference": pixels(224, 224, 2),
            "grid_width": 224, "grid_height": 224,
        },
        {  # 112 wide, 168 high; no reference; normal with reasoning
            **base, "id": "grass-1", "category": "grass", "width": 112, "height": 168,
            "is_anomalous": False, "defect_type": "good", "reasoning": "Uniform blades.",
            "boxes": np.zeros((0,), dtype=object), "labels": np.array([], dtype=str),
            "image": pixels(112, 168, 3), "reference": NO_IMAGE,
            "grid_width": 112, "grid_height": 168,
        },
        {  # 168 wide, 112 high, square reference; normal with blank reasoning
            **base, "id": "coins-2", "category": "coins", "width": 168, "height": 112,
            "is_anomalous": False, "defect_type": "good", "reasoning": " \n",
            "boxes": [], "labels": [],
            "image": pixels(168, 112, 4), "reference": pixels(224, 224, 5),
            "grid_width": 168, "grid_height": 112,
        },
    ]  # fmt: skip


@pytest.fixture(scope="module")
def batch(collator):
    return collator(make_rows())


def answer_text(processor, labels: torch.Tensor) -> str:
    return processor.tokenizer.decode(labels[labels != IGNORE_INDEX])


def test_labels_cover_exactly_the_answer(processor, batch):
    box_text = (
        "{'bbox_2d': [5, 10, 50, 60], 'label': 'scratch'}, "
        "{'bbox_2d': [100, 100, 150, 131], 'label': 'hole'}"
    )
    expected = [
        f"<think>{GENERIC_REASONING[True]}</think><answer>Yes. {box_text}</answer>",
        format_answer(False, [], [], "Uniform blades."),
        format_answer(False, [], [], GENERIC_REASONING[False]),
    ]
    assert batch["sample_ids"] == ["brick-0", "grass-1", "coins-2"]
    newline = processor.tokenizer.convert_tokens_to_ids("Ċ")
    for i, answer in enumerate(expected):
        labels, ids, mask = batch["labels"][i], batch["input_ids"][i], batch["attention_mask"][i]
        assert answer_text(processor, labels) == answer + "<|im_end|>"
        span = (labels != IGNORE_INDEX).nonzero().flatten()
        assert torch.equal(span, torch.arange(span[0], span[-1] + 1))  # one contiguous span
        assert torch.equal(labels[span], ids[span])
        length = int(mask.sum())
        assert torch.equal(mask[:length], torch.ones(length, dtype=mask.dtype))  # right padding
        assert int(span[-1]) == length - 2 and ids[length - 1] == newline  # "\n" not learned
        before = processor.tokenizer.decode(ids[: span[0]])
        assert before.endswith("<|im_start|>assistant\n")
    assert "may occur: scratch" in processor.tokenizer.decode(batch["input_ids"][0])
    assert (batch["labels"][batch["attention_mask"] == 0] == IGNORE_INDEX).all()


def test_images_keep_their_grid_and_tokens_match(collator, batch):
    # [reference, query] of row 0, query of row 1, [reference, query] of row 2; (h, w)
    sizes = [(224, 224), (224, 224), (168, 112), (224, 224), (112, 168)]
    grid = batch["image_grid_thw"]
    assert grid[:, 0].tolist() == [1] * 5
    assert (grid[:, 1:] * 14).tolist() == [list(size) for size in sizes]
    assert batch["pixel_values"].shape == (int(grid.prod(-1).sum()), 3 * 2 * 14 * 14)
    image_tokens = batch["input_ids"] == collator.image_token_id
    assert image_tokens.sum(-1).tolist() == [64 + 64, 24, 64 + 24]
    assert torch.equal(batch["mm_token_type_ids"] == 1, image_tokens)
    collator.check_image_tokens(batch)


def test_forward_and_backward_train_only_lora(tiny_dir, batch):
    model = apply_lora(load_model(str(tiny_dir), "float32"), LoraConfig(r=4, alpha=8))
    inputs = {k: v for k, v in batch.items() if k != "sample_ids"}
    loss = model(**inputs).loss
    assert torch.isfinite(loss)
    loss.backward()
    with_grad = {n for n, p in model.named_parameters() if p.grad is not None}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert with_grad == trainable
    assert all("lora_" in n and ".language_model." in n for n in trainable)
    assert len(trainable) == 2 * 7 * 2  # A and B, 7 projections, 2 layers
    summary = trainable_summary(model)
    assert 0 < summary["trainable"] < 0.05 * summary["total"]


def test_full_fine_tuning_trains_everything(tiny_dir):
    model = load_model(str(tiny_dir), "float32")
    for param in model.parameters():
        param.requires_grad_(False)
    assert apply_lora(model, LoraConfig(enabled=False)) is model
    summary = trainable_summary(model)
    assert summary["trainable"] == summary["total"] and summary["fraction"] == 1.0


def test_variants_change_prompt_and_target(processor):
    rows = make_rows()
    plain = SFTCollator(processor, PromptVariant(use_reference=False, reasoning=False))
    batch = plain(rows)
    assert batch["image_grid_thw"].shape[0] == 3  # queries only
    assert answer_text(processor, batch["labels"][1]) == "<answer>No.</answer><|im_end|>"
    prompt = processor.tokenizer.decode(batch["input_ids"][0])
    assert "first image" not in prompt and "may occur" not in prompt


def test_the_cell_variant_asks_for_and_trains_on_cells(processor):
    rows = make_rows()
    cells = SFTCollator(processor, PromptVariant(reasoning=False, box_units="cells"))
    # 448 px on a 224 grid: [10, 20, 100, 120] is grid [5, 10, 50, 60], cells [0, 0, 2, 3]
    assert cells.target(rows[0]) == (
        "<answer>Yes. {'bbox_2d': [0, 0, 2, 3], 'label': 'scratch'}, "
        "{'bbox_2d': [3, 3, 6, 5], 'label': 'hole'}</answer>"
    )
    batch = cells(rows[:1])
    assert answer_text(processor, batch["labels"][0]) == cells.target(rows[0]) + "<|im_end|>"
    assert "8 cells wide and 8 cells high" in processor.tokenizer.decode(batch["input_ids"][0])


def test_tampered_row_grid_names_the_sample(collator):
    rows = make_rows()
    rows[1]["grid_width"] = 140
    with pytest.raises(ImageTokenMismatch, match=r"grass-1.*140x168.*30 image tokens.*24"):
        collator(rows)


def test_tampered_batch_grid_names_the_sample(collator, batch):
    tampered = dict(batch, image_grid_thw=batch["image_grid_thw"].clone())
    tampered["image_grid_thw"][2] = torch.tensor([1, 12, 12])
    with pytest.raises(ImageTokenMismatch, match=r"grass-1: image 0 has 24 image tokens.*36"):
        check_image_tokens(tampered, image_token_id=collator.image_token_id,
                           vision_start_id=collator.vision_start_id)  # fmt: skip


def test_truncation(processor):
    row = make_rows()[0]
    whole = SFTCollator(processor, PromptVariant())([row])
    full = whole["input_ids"].shape[1]
    cut_images = SFTCollator(processor, PromptVariant(), max_length=100)
    with pytest.raises(ImageTokenMismatch, match=r"brick-0: max_length 100 would keep \d+ of"):
        cut_images([row])
    prompt_length = int((whole["labels"][0] != IGNORE_INDEX).nonzero()[0])
    with pytest.raises(ValueError, match="leaves no room for the answer"):
        SFTCollator(processor, PromptVariant(), max_length=prompt_length)([row])
    cut_answer = SFTCollator(processor, PromptVariant(), max_length=full - 10)([row])
    assert cut_answer["input_ids"].shape[1] == full - 10
    assert int((cut_answer["labels"] != IGNORE_INDEX).sum()) > 0


def test_bad_rows_name_the_sample(collator):
    rows = make_rows()
    rows[0]["error"] = "s3://b/x.png: no such object"
    with pytest.raises(ValueError, match="brick-0.*no such object"):
        collator(rows)
    rows = make_rows()
    rows[2]["image"] = pixels(170, 112, 0)
    rows[2]["grid_width"] = 170
    with pytest.raises(ValueError, match="coins-2: image is 170x112, not on the model grid"):
        collator(rows)
