"""Learning study: can a Qwen2.5-VL-shaped model from random weights learn anomaly
detection and localisation on held-out scikit-image pictures in minutes on a CPU?

Plain PyTorch, no Ray, no pipeline. Samples are drawn in memory with the synthetic
builder's pictures and defect painters (mmrad.data.builders.synthetic); the model is
transformers' Qwen2_5_VLForConditionalGeneration at a chosen size with the tiny model's
BPE tokenizer and chat template (mmrad.model.tiny). The objective is the language-model
loss on the no-reasoning answer of mmrad.task.answer.format_answer, e.g.
``<answer>Yes. {'bbox_2d': [12, 40, 30, 61], 'label': 'hole'}</answer>``.

Every ``--eval-every`` steps the model is evaluated on held-out categories (never seen in
training, not even as references) and on fresh images of the training categories:

- P(Yes): softmax over the "Yes"/"No" logits after ``<answer>``; AUROC and accuracy at 0.5;
- greedy decoding of the whole answer, parsed by mmrad.task.answer.parse_answer:
  detection accuracy, and localisation accuracy over anomalous images (answer "Yes" with
  a box of IoU >= 0.1 with the true box).

Prints the curve as it goes and writes it, with the settings, to ``--out`` (JSON).

The best setting found (about 0.8M parameters, 112 px, aligned reference, defects twice
the builder's size, 8000 training images of 20 pictures, an auxiliary loss on the vision
tower, 12 minutes on one thread; docs/learning_study.md has every run)::

    OMP_NUM_THREADS=1 .venv/bin/python scripts/learning_study.py --model s --image-size 112 \\
        --reference aligned --defect-scale 2 --train-images 8000 --minutes 12 \\
        --extra-train-categories all --patch-loss 1 --eval-every 400 \\
        --out /tmp/study/p1_many.json
"""

from __future__ import annotations

import argparse
import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2Tokenizer

from mmrad.data.builders.synthetic import (
    CATEGORY_IMAGES,
    PAINTERS,
    category_defect_types,
    category_picture,
    paint_scaled,
    random_crop,
)
from mmrad.model.tiny import SPECIAL_TOKENS, build_tiny_model
from mmrad.task.answer import format_answer, parse_answer
from mmrad.task.geometry import answer_scale, iou, to_answer_boxes
from mmrad.task.prompt import PromptVariant, build_messages

# name: (LM hidden, LM layers, vision hidden, vision depth); parameters are printed.
PRESETS = {
    "s": (128, 2, 64, 2),  # the tiny model's shape, ~0.8M parameters
    "m": (256, 4, 128, 4),
    "l": (384, 6, 192, 6),
}
PATCH, MERGE, TEMPORAL = 14, 2, 2
CELL = PATCH * MERGE  # pixels per side of one merged token
MEAN = np.array([0.48145466, 0.4578275, 0.40821073], dtype=np.float32)
STD = np.array([0.26862954, 0.26130258, 0.27577711], dtype=np.float32)
SHORT_PROMPT = "Is the second image anomalous? Answer with the box of the defect."
IOU_HIT = 0.1
EXTRA_PICTURES = (
    "astronaut", "cat", "checkerboard", "clock", "colorwheel", "logo", "page", "retina",
    "rocket", "text", "microaneurysms", "phantom",
)  # fmt: skip


# -- model -------------------------------------------------------------------------------


def make_config(
    tokenizer: Qwen2Tokenizer, hidden: int, layers: int, vis_hidden: int, vis_depth: int
) -> Qwen2_5_VLConfig:
    """As mmrad.model.tiny._config, with the LM and vision sizes as knobs."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    half = hidden // 4 // 2
    temporal, height = half // 4, (half - half // 4 + 1) // 2
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden,
        "intermediate_size": 2 * hidden,
        "num_hidden_layers": layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1e6,
            "mrope_section": [temporal, height, half - temporal - height],
        },
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision = {
        "depth": vis_depth,
        "hidden_size": vis_hidden,
        "intermediate_size": 2 * vis_hidden,
        "num_heads": max(2, vis_hidden // 32),
        "out_hidden_size": hidden,
        "patch_size": PATCH,
        "spatial_merge_size": MERGE,
        "temporal_patch_size": TEMPORAL,
        "window_size": 112,
        "fullatt_block_indexes": list(range(1, vis_depth, 2)),  # windowed, full, ...
    }
    return Qwen2_5_VLConfig(
        text_config=text,
        vision_config=vision,
        image_token_id=ids["<|image_pad|>"],
        video_token_id=ids["<|video_pad|>"],
        vision_start_token_id=ids["<|vision_start|>"],
        vision_end_token_id=ids["<|vision_end|>"],
        tie_word_embeddings=False,
        dtype="float32",
    )


def patchify(image: np.ndarray) -> torch.Tensor:
    """HxWx3 uint8 → Qwen2-VL pixel_values rows (as Qwen2VLImageProcessor, no resize)."""
    x = (image.astype(np.float32) / 255.0 - MEAN) / STD
    x = np.repeat(x.transpose(2, 0, 1)[None], TEMPORAL, axis=0)  # (T, C, H, W)
    gh, gw = image.shape[0] // PATCH, image.shape[1] // PATCH
    x = x.reshape(1, TEMPORAL, 3, gh // MERGE, MERGE, PATCH, gw // MERGE, MERGE, PATCH)
    x = x.transpose(0, 3, 6, 4, 7, 2, 1, 5, 8)
    return torch.from_numpy(np.ascontiguousarray(x).reshape(gh * gw, -1))


# -- data --------------------------------------------------------------------------------


@dataclass
class Sample:
    reference: np.ndarray | None  # HxWx3 uint8
    query: np.ndarray
    anomalous: bool
    boxes: list[list[float]]
    labels: list[str]


class Generator:
    """Draws (reference, query) samples of some categories; half anomalous."""

    def __init__(self, categories, args, seed):
        self.categories = list(categories)
        self.args = args
        self.rng = np.random.default_rng(seed)
        self.pictures = {c: category_picture(c) for c in self.categories}
        size = args.image_size
        self.references = {  # the builder's fixed normal references per category
            c: [random_crop(self.pictures[c], size, self.rng) for _ in range(2)]
            for c in self.categories
        }

    def draw(self, anomalous: bool, category: str | None = None) -> Sample:
        args, rng = self.args, self.rng
        category = category or str(rng.choice(self.categories))
        image = random_crop(self.pictures[category], args.image_size, rng)
        clean = image.copy()
        boxes, labels = [], []
        if anomalous:
            kinds = category_defect_types(category) if args.types == "category" else list(PAINTERS)
            kind = str(rng.choice(kinds))
            for _ in range(100):
                trial = image.copy()
                mask = paint_scaled(trial, kind, args.defect_scale, rng)
                if not mask.any():
                    continue
                rows, cols = np.nonzero(mask)
                box = [float(cols.min()), float(rows.min()), cols.max() + 1.0, rows.max() + 1.0]
                if min(box[2] - box[0], box[3] - box[1]) >= args.min_defect_px:
                    image, boxes, labels = trial, [box], [kind]
                    break
        if args.reference == "aligned":
            reference = clean
        elif args.reference == "crop":
            reference = self.references[category][int(rng.integers(2))]
        else:
            reference = None
        to_u8 = lambda a: (np.clip(a, 0, 1) * 255).round().astype(np.uint8)  # noqa: E731
        return Sample(
            None if reference is None else to_u8(reference),
            to_u8(image),
            bool(boxes),
            boxes,
            labels,
        )

    def batch(self, n: int) -> list[Sample]:
        return [self.draw(anomalous=bool(self.rng.random() < 0.5)) for _ in range(n)]

    def balanced(self, per_category: int) -> list[Sample]:
        return [
            self.draw(anomalous=i % 2 == 0, category=c)
            for c in self.categories
            for i in range(per_category)
        ]


class Encoder:
    """Samples → model inputs; the prompt is the same for every sample of a run."""

    def __init__(self, tokenizer: Qwen2Tokenizer, args):
        self.tok = tokenizer
        self.image_id = tokenizer.convert_tokens_to_ids("<|image_pad|>")
        self.pad_id = tokenizer.convert_tokens_to_ids("<|endoftext|>")
        self.eos_id = tokenizer.convert_tokens_to_ids("<|im_end|>")
        n_images = 1 if args.reference == "none" else 2
        size = args.image_size
        if args.prompt == "full":
            placeholder = "<image>" if n_images == 2 else None
            messages = build_messages(
                category=None,
                grid_size=(size, size),
                variant=PromptVariant(reasoning=False),
                reference_image=placeholder,
            )
        else:
            content = [{"type": "image"}] * n_images + [{"type": "text", "text": SHORT_PROMPT}]
            messages = [{"role": "user", "content": content}]
        text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        per_image = (size // PATCH) ** 2 // MERGE**2
        ids = []
        for t in tokenizer(text, add_special_tokens=False)["input_ids"]:
            ids += [t] * (per_image if t == self.image_id else 1)
        self.prompt = ids
        self.grid = torch.tensor([[1, size // PATCH, size // PATCH]] * n_images)
        yes = tokenizer("<answer>Yes.", add_special_tokens=False)["input_ids"]
        no = tokenizer("<answer>No.", add_special_tokens=False)["input_ids"]
        k = next(i for i, (a, b) in enumerate(zip(yes, no, strict=False)) if a != b)
        self.answer_prefix, self.yes_id, self.no_id = yes[:k], yes[k], no[k]
        self.decision_at = len(self.prompt) + k  # the Yes/No token's index
        self.digit_ids = torch.tensor(tokenizer.convert_tokens_to_ids(list("0123456789")))
        self.image_size = size
        self.unit = 1 if args.box_units == "pixel" else CELL  # grid pixels per coordinate

    def answer(self, s: Sample) -> str:
        boxes = [self.written_box(b) for b in s.boxes]
        return format_answer(s.anomalous, boxes, s.labels, None)

    def written_box(self, box: list[float]) -> list[int]:
        """A box as the answer writes it: pixels, or the cells it overlaps (``cell``
        units: the cells the vision tower's merged tokens cover)."""
        side = (self.image_size, self.image_size)
        [written] = to_answer_boxes([box], side, side, self.unit)
        return written

    def read_boxes(self, text: str) -> tuple[bool, list[list[float]]]:
        """The decision and boxes (in pixels) of a generated answer."""
        side = (self.image_size, self.image_size)
        scale = answer_scale(side, side, self.unit)
        verdict = parse_answer(text, scale=scale, size=side, require_think=False)
        return bool(verdict.decision), verdict.boxes

    def images(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        pixels = [
            patchify(img) for s in samples for img in (s.reference, s.query) if img is not None
        ]
        return {
            "pixel_values": torch.cat(pixels),
            "image_grid_thw": self.grid.repeat(len(samples), 1),
        }

    def _prompt_batch(self, n: int, extra: list[int] = ()) -> dict[str, torch.Tensor]:
        ids = torch.tensor([self.prompt + list(extra)] * n)
        return {
            "input_ids": ids,
            "attention_mask": torch.ones_like(ids),
            "mm_token_type_ids": (ids == self.image_id).long(),
        }

    def train_batch(self, samples: list[Sample]) -> dict[str, torch.Tensor]:
        answers = [
            self.tok(self.answer(s), add_special_tokens=False)["input_ids"] + [self.eos_id]
            for s in samples
        ]
        length = len(self.prompt) + max(len(a) for a in answers)
        ids = torch.full((len(samples), length), self.pad_id)
        labels = torch.full((len(samples), length), -100)
        mask = torch.zeros((len(samples), length), dtype=torch.long)
        for i, a in enumerate(answers):
            row = self.prompt + a
            ids[i, : len(row)] = torch.tensor(row)
            labels[i, len(self.prompt) : len(row)] = torch.tensor(a)
            mask[i, : len(row)] = 1
        return {
            "input_ids": ids,
            "attention_mask": mask,
            "mm_token_type_ids": (ids == self.image_id).long(),
            "labels": labels,
            **self.images(samples),
        }


def lm_loss(
    model,
    batch: dict[str, torch.Tensor],
    enc: Encoder,
    decision_weight: float,
    box_weight: float = 1.0,
) -> torch.Tensor:
    """Mean token cross-entropy over the answer, plus ``decision_weight - 1`` times the
    cross-entropy of the Yes/No token (at index ``enc.decision_at`` of the sequence) and
    ``box_weight - 1`` times the mean cross-entropy of the answer's digit tokens (the
    box coordinates)."""
    labels = batch.pop("labels")
    logits = model(**batch).logits[:, :-1]
    targets = labels[:, 1:]
    ce = torch.nn.functional.cross_entropy(
        logits.transpose(1, 2), targets, ignore_index=-100, reduction="none"
    )
    loss = ce.sum() / (targets != -100).sum()
    if decision_weight != 1.0:
        loss = loss + (decision_weight - 1.0) * ce[:, enc.decision_at - 1].mean()
    digits = torch.isin(targets, enc.digit_ids)
    if box_weight != 1.0 and digits.any():
        loss = loss + (box_weight - 1.0) * ce[digits].mean()
    return loss


class PatchHead(torch.nn.Module):
    """The auxiliary objective of ``--patch-loss``: a linear head on the vision tower's
    merged tokens (captured by a forward hook) that says which cells hold the defect."""

    def __init__(self, model, args):
        super().__init__()
        self.linear = torch.nn.Linear(model.config.text_config.hidden_size, 1)
        self.cells = args.image_size // (PATCH * MERGE)
        self.tokens: torch.Tensor | None = None
        model.model.visual.register_forward_hook(self._capture)

    def _capture(self, module, inputs, output) -> None:
        self.tokens = output.pooler_output

    def targets(self, samples: list[Sample]) -> torch.Tensor:
        """Per image, in the order of :meth:`Encoder.images`: 1 for each cell (row-major,
        PATCH * MERGE pixels square) that a defect box overlaps; references are all 0."""
        side = PATCH * MERGE
        grids = []
        for s in samples:
            if s.reference is not None:
                grids.append(torch.zeros(self.cells, self.cells))
            grid = torch.zeros(self.cells, self.cells)
            for x0, y0, x1, y1 in s.boxes:
                rows = slice(int(y0 // side), math.ceil(y1 / side))
                grid[rows, int(x0 // side) : math.ceil(x1 / side)] = 1.0
            grids.append(grid)
        return torch.stack(grids).flatten()

    def loss(self, samples: list[Sample]) -> torch.Tensor:
        logits = self.linear(self.tokens).squeeze(-1)
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, self.targets(samples))


# -- evaluation --------------------------------------------------------------------------


def auroc(scores: list[float], truth: list[bool]) -> float:
    pos = [s for s, t in zip(scores, truth, strict=True) if t]
    neg = [s for s, t in zip(scores, truth, strict=True) if not t]
    if not pos or not neg:
        return float("nan")
    wins = sum((p > n) + 0.5 * (p == n) for p in pos for n in neg)
    return wins / (len(pos) * len(neg))


@torch.no_grad()
def evaluate(model, enc: Encoder, samples: list[Sample], args) -> dict[str, float]:
    model.eval()
    scores, decisions, hits, ious = [], [], [], []
    for start in range(0, len(samples), args.eval_batch):
        chunk = samples[start : start + args.eval_batch]
        images = enc.images(chunk)
        batch = {**enc._prompt_batch(len(chunk), enc.answer_prefix), **images}
        logits = model(**batch).logits[:, -1, [enc.yes_id, enc.no_id]]
        scores += torch.softmax(logits, -1)[:, 0].tolist()
        out = model.generate(
            **enc._prompt_batch(len(chunk)),
            **images,
            max_new_tokens=args.max_new_tokens,
            do_sample=False,
            eos_token_id=enc.eos_id,
            pad_token_id=enc.pad_id,
        )
        texts = enc.tok.batch_decode(out[:, len(enc.prompt) :], skip_special_tokens=True)
        for s, text in zip(chunk, texts, strict=True):
            decision, boxes = enc.read_boxes(text)
            decisions.append(decision)
            if s.anomalous:
                best = max((iou(p, g) for p in boxes for g in s.boxes), default=0.0)
                ious.append(best if decision else 0.0)
                hits.append(decision and best >= IOU_HIT)
    model.train()
    truth = [s.anomalous for s in samples]
    n = len(samples)
    return {
        "det_acc": sum(d == t for d, t in zip(decisions, truth, strict=True)) / n,
        "det_acc_p": sum((p > 0.5) == t for p, t in zip(scores, truth, strict=True)) / n,
        "auroc": auroc(scores, truth),
        "loc_acc": sum(hits) / max(1, len(hits)),
        "mean_iou": sum(ious) / max(1, len(ious)),
        "yes_rate": sum(decisions) / n,
    }


# -- main --------------------------------------------------------------------------------


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--model", choices=sorted(PRESETS), default="s")
    p.add_argument("--hidden", type=int, help="override the preset's LM hidden size")
    p.add_argument("--layers", type=int, help="override the preset's LM layers")
    p.add_argument("--vis-hidden", type=int, help="override the preset's vision hidden size")
    p.add_argument("--vis-depth", type=int, help="override the preset's vision depth")
    p.add_argument("--image-size", type=int, default=112, help="side, a multiple of 28")
    p.add_argument(
        "--train-categories", default="brick,grass,gravel,camera,moon,coffee,tissue,hubble"
    )
    p.add_argument("--test-categories", default="coins,cell")
    p.add_argument(
        "--val-categories",
        default="",
        help="training pictures to hold out as a validation split instead (a, b, ...): "
        "evaluated like the test categories, to pick a seed or a step without the test",
    )
    p.add_argument(
        "--extra-train-categories",
        default="",
        help="more skimage.data pictures to train on ('all': every one of "
        + ",".join(EXTRA_PICTURES)
        + ")",
    )
    p.add_argument(
        "--train-images", type=int, default=0, help="fixed training pool; 0 = fresh each step"
    )
    p.add_argument("--reference", choices=["crop", "aligned", "none"], default="crop",
                   help="crop: one of 2 normal crops per category, as the builder; "
                   "aligned: the query's own crop before painting; none: query only")  # fmt: skip
    p.add_argument("--defect-scale", type=float, default=1.0, help="x the builder's sizes")
    p.add_argument("--min-defect-px", type=int, default=0, help="redraw smaller defects")
    p.add_argument("--types", choices=["category", "all"], default="category")
    p.add_argument("--prompt", choices=["short", "full"], default="short")
    p.add_argument("--steps", type=int, default=100_000)
    p.add_argument("--minutes", type=float, default=10.0, help="training time limit")
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument(
        "--decision-weight", type=float, default=1.0, help="loss weight of the Yes/No token"
    )
    p.add_argument(
        "--box-weight", type=float, default=1.0, help="loss weight of the box's digit tokens"
    )
    p.add_argument("--warmup", type=int, default=50)
    p.add_argument("--eval-every", type=int, default=100)
    p.add_argument("--eval-per-category", type=int, default=48)
    p.add_argument("--eval-batch", type=int, default=48)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument(
        "--patch-loss",
        type=float,
        default=0.0,
        help="weight of an auxiliary loss on the vision tower: each merged token of both\n"
        "images predicts whether its cell holds the defect (a linear head, BCE)",
    )
    p.add_argument(
        "--box-units",
        choices=["pixel", "cell"],
        default="pixel",
        help="how answers write boxes: pixels, or the 28 px cells of the vision tower's\n"
        "merged tokens (0-4 on 112 px), mapped back to pixels when parsed",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--tokenizer-dir", default="/tmp/study/tokenizer")
    p.add_argument("--out", default="/tmp/study/result.json")
    return p.parse_args(argv)


def main(argv=None) -> None:
    args = parse_args(argv)
    torch.set_num_threads(args.threads)
    torch.manual_seed(args.seed)
    train_cats = args.train_categories.split(",")
    extra = args.extra_train_categories
    train_cats += list(EXTRA_PICTURES) if extra == "all" else [c for c in extra.split(",") if c]
    test_cats = args.test_categories.split(",")
    val_cats = [c for c in args.val_categories.split(",") if c]
    assert set(val_cats) <= set(train_cats), "validation categories come from the training ones"
    train_cats = [c for c in train_cats if c not in val_cats]
    assert not set(train_cats) & set(test_cats), "held-out categories overlap training"
    assert set(test_cats) <= set(CATEGORY_IMAGES), sorted(CATEGORY_IMAGES)

    tokenizer = Qwen2Tokenizer.from_pretrained(build_tiny_model(args.tokenizer_dir))
    hidden, layers, vis_hidden, vis_depth = PRESETS[args.model]
    config = make_config(
        tokenizer,
        args.hidden or hidden,
        args.layers or layers,
        args.vis_hidden or vis_hidden,
        args.vis_depth or vis_depth,
    )
    model = Qwen2_5_VLForConditionalGeneration(config)
    model.train()
    n_params = sum(p.numel() for p in model.parameters())
    enc = Encoder(tokenizer, args)

    train_gen = Generator(train_cats, args, seed=[args.seed, 1])
    t0 = time.time()
    pool = train_gen.batch(args.train_images) if args.train_images else None
    pool_s = time.time() - t0
    held_out = Generator(test_cats, args, seed=[args.seed, 2]).balanced(args.eval_per_category)
    seen = Generator(train_cats, args, seed=[args.seed, 3]).balanced(
        max(2, args.eval_per_category * len(test_cats) // len(train_cats))
    )
    val = Generator(val_cats, args, seed=[args.seed, 5]).balanced(args.eval_per_category)
    sizes = [min(b[2] - b[0], b[3] - b[1]) for s in held_out for b in s.boxes]
    print(
        f"params {n_params / 1e6:.2f}M, prompt {len(enc.prompt)} tokens, "
        f"held-out {len(held_out)} / seen {len(seen)} eval images, "
        f"defect short side median {np.median(sizes):.0f}px, pool drawn in {pool_s:.0f}s",
        flush=True,
    )

    head = PatchHead(model, args) if args.patch_loss else None
    params = [*model.parameters(), *(head.parameters() if head else [])]
    optimizer = torch.optim.AdamW(params, lr=args.lr, weight_decay=0.01)
    budget = args.minutes * 60

    def lr_at(step: int) -> float:
        """Linear warmup, then cosine to 10% over the step or time budget, whichever
        runs out first."""
        if step < args.warmup:
            return args.lr * (step + 1) / args.warmup
        progress = min(1.0, max(step / args.steps, train_time / budget))
        return args.lr * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))

    rng = np.random.default_rng([args.seed, 4])
    curve, losses, train_time, step = [], [], 0.0, 0

    def record() -> None:
        t0 = time.time()
        ho, se = evaluate(model, enc, held_out, args), evaluate(model, enc, seen, args)
        va = evaluate(model, enc, val, args) if val else None
        point = {
            "step": step,
            "train_s": round(train_time, 1),
            "images": step * args.batch,
            "loss": round(float(np.mean(losses[-args.eval_every :])), 4) if losses else None,
            "held_out": {k: round(v, 4) for k, v in ho.items()},
            "seen": {k: round(v, 4) for k, v in se.items()},
            **({"val": {k: round(v, 4) for k, v in va.items()}} if va else {}),
            "eval_s": round(time.time() - t0, 1),
        }
        curve.append(point)
        print(
            f"step {step:5d} train {train_time:6.0f}s loss {point['loss']} | held-out "
            f"det {ho['det_acc']:.2f} (P {ho['det_acc_p']:.2f}) auroc {ho['auroc']:.2f} "
            f"loc {ho['loc_acc']:.2f} iou {ho['mean_iou']:.2f} yes {ho['yes_rate']:.2f} | "
            f"seen det {se['det_acc']:.2f} auroc {se['auroc']:.2f} loc {se['loc_acc']:.2f} "
            + (f"| val det {va['det_acc']:.2f} auroc {va['auroc']:.2f} " if va else "")
            + f"| eval {point['eval_s']}s",
            flush=True,
        )

    record()
    while step < args.steps and train_time < budget:
        t0 = time.time()
        if pool is None:
            samples = train_gen.batch(args.batch)
        else:
            samples = [pool[i] for i in rng.choice(len(pool), args.batch, replace=False)]
        batch = enc.train_batch(samples)
        loss = lm_loss(model, batch, enc, args.decision_weight, args.box_weight)
        if head:
            loss = loss + args.patch_loss * head.loss(samples)
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        for group in optimizer.param_groups:
            group["lr"] = lr_at(step)
        optimizer.step()
        losses.append(loss.item())
        step += 1
        train_time += time.time() - t0
        if step % args.eval_every == 0:
            record()
    if not curve or curve[-1]["step"] != step:
        record()

    result = {
        "args": vars(args),
        "params": n_params,
        "prompt_tokens": len(enc.prompt),
        "steps_per_s": step / max(train_time, 1e-9),
        "pool_s": round(pool_s, 1),
        "final": curve[-1],
        "best_held_out_auroc": max(p["held_out"]["auroc"] for p in curve),
        **({"best_by_val": max(curve, key=lambda p: p["val"]["auroc"])} if val else {}),
        "curve": curve,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {args.out}", flush=True)


if __name__ == "__main__":
    main()
