"""A tiny, randomly initialised Qwen2.5-VL-shaped model for tests and the local demo.

Nothing can be downloaded here, yet every layer of mmrad (SFT with LoRA, GRPO rollouts on
vLLM, evaluation, serving) must run against a real Qwen2.5-VL checkpoint layout. So we
build one: the real architecture and processor classes at toy sizes (~1M parameters), a
byte-level BPE tokenizer trained on a built-in corpus of the task's wording, and Qwen's
special tokens and chat template. The result is an ordinary Hugging Face directory that
transformers, peft and vLLM load like the 7B model.
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path
from typing import Any

import torch
import transformers
from tokenizers import Regex, Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import (
    Qwen2_5_VLConfig,
    Qwen2_5_VLForConditionalGeneration,
    Qwen2_5_VLProcessor,
    Qwen2Tokenizer,
    Qwen2VLImageProcessor,
    Qwen2VLVideoProcessor,
)

TINY_MODEL_DEFAULTS: dict[str, Any] = {
    "seed": 0,
    "min_pixels": 56 * 56,
    "max_pixels": 224 * 224,
    "hidden_size": 128,
    "num_layers": 2,
}
FORMAT_VERSION = 1  # bump when the recipe below changes, so cached directories are rebuilt
MARKER = "tiny_model.json"
BPE_VOCAB_SIZE = 2048  # before the special tokens

# Qwen2.5-VL's special tokens, in Qwen's order (their ids follow the BPE vocabulary).
SPECIAL_TOKENS = [
    "<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|object_ref_start|>", "<|object_ref_end|>",
    "<|box_start|>", "<|box_end|>", "<|quad_start|>", "<|quad_end|>", "<|vision_start|>",
    "<|vision_end|>", "<|vision_pad|>", "<|image_pad|>", "<|video_pad|>",
]  # fmt: skip
# Qwen2's pre-tokenizer split. transformers 5 rebuilds Qwen2Tokenizer's pipeline from the
# vocabulary and merges alone, so training must use exactly this pipeline.
QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n]*"
    r"|\s*[\r\n]+|\s+(?!\S)|\s+"
)
# The official Qwen2-VL / Qwen2.5-VL chat template.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}"
    "{% for message in messages %}{% if loop.first and message['role'] != 'system' %}"
    "<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n{% endif %}"
    "<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}"
    "{{ message['content'] }}<|im_end|>\n{% else %}{% for content in message['content'] %}"
    "{% if content['type'] == 'image' or 'image' in content or 'image_url' in content %}"
    "{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>"
    "{% elif content['type'] == 'video' or 'video' in content %}"
    "{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>"
    "{% elif 'text' in content %}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n"
    "{% endif %}{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
CATEGORIES = (
    "brick grass gravel coins camera cell moon coffee tissue hubble bottle cable capsule "
    "carpet grid hazelnut leather metal nut pill screw tile toothbrush transistor wood zipper "
    "candle capsules cashew chewinggum fryum macaroni pcb pipe"
)
DEFECTS = "scratch hole stain crack missing color shift contamination cut bent fold"
SENTENCES = [
    "You are a helpful assistant. system user assistant",
    "The first image shows a normal, defect-free sample of an industrial product.",
    "The second image is the query image, a sample of the same product.",
    "Inspect the query image: does it show any anomaly or defect?",
    "First reason step by step inside <think> </think> tags, then give the final answer "
    "inside <answer> </answer> tags.",
    'If the query image is anomalous, answer "Yes." followed by one per anomaly, separated '
    'by commas, with coordinates in pixels of the query image. If it is normal, answer "No."',
    "I compare the query with the reference region by region. Texture, colour and "
    "structure match the reference everywhere; the sample is normal.",
    "In the upper left part there is a dark mark, which the reference does not have.",
    "So the sample is anomalous and these regions are the defect.",
]
WORDS = """
above across against along appearance area around background below between blob border
boundary bright broken brown bump burn center centre chip circle clean colour color
compared consistent contour corner corrosion crease damage dark deformation dent
density deviation different discoloration distorted dot edge elongated expected
faint fiber flaw foreign fragment glue gray green groove horizontal inclusion
irregular isolated label large lighter line location looks lower marks material
matches middle misaligned missing object orientation outline particle pattern piece
pixels position print probably product irregularity reflection region residue right
rough round rust scattered seems shape sharp shift small smooth smudge spot squeeze
streak stripe structure surface suspicious thin thread top uniform unusual vertical
visible white width height wrinkle yellow zone however because therefore otherwise
clearly likely appears contains observe notice evidence conclusion overall finally
"""


def _corpus() -> list[str]:
    """Training text: the task's wording, category and defect names, answers with boxes."""
    lines = [*SENTENCES, " ".join(WORDS.split()), " ".join(str(n) for n in range(1000))]
    defects = DEFECTS.split()
    for i, category in enumerate(CATEGORIES.split()):
        defect = defects[i % len(defects)]
        box = [(7 * i + 13 * k) % 224 for k in range(4)]
        answer = f"Yes. {{'bbox_2d': {box}, 'label': '{defect}'}}"
        lines += [
            f'a sample of the category "{category}", 224 pixels wide and 168 pixels high.',
            f"In {category} samples, the following anomaly types may occur: {defect}, crack.",
            f"<think>The {category} shows a {defect}.</think><answer>{answer}</answer>",
            f"<think>The {category} looks normal.</think><answer>No.</answer>",
        ]
    return lines * 4


def _train_tokenizer() -> Qwen2Tokenizer:
    """Byte-level BPE with Qwen2's normaliser and pre-tokenizer, wrapped like Qwen's."""
    bpe = Tokenizer(models.BPE())
    bpe.normalizer = normalizers.NFC()
    bpe.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Split(Regex(QWEN2_SPLIT), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ]
    )
    bpe.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=BPE_VOCAB_SIZE,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    bpe.train_from_iterator(_corpus(), trainer=trainer)
    trained = json.loads(bpe.to_str())["model"]
    vocab = trained["vocab"]
    vocab.update({token: len(vocab) + i for i, token in enumerate(SPECIAL_TOKENS)})
    return Qwen2Tokenizer(
        vocab=vocab,
        merges=[tuple(merge) for merge in trained["merges"]],
        unk_token=None,
        eos_token="<|im_end|>",
        pad_token="<|endoftext|>",
        extra_special_tokens=[
            t for t in SPECIAL_TOKENS if t not in ("<|im_end|>", "<|endoftext|>")
        ],
        model_max_length=32768,
        chat_template=CHAT_TEMPLATE,
    )


def _config(tokenizer: Qwen2Tokenizer, hidden_size: int, num_layers: int) -> Qwen2_5_VLConfig:
    """Qwen2.5-VL's layout at toy sizes: 4 query / 2 key-value heads, M-RoPE split like
    Qwen's [16, 24, 24] (temporal, height, width) over ``head_dim / 2`` frequencies."""
    ids = {t: tokenizer.convert_tokens_to_ids(t) for t in SPECIAL_TOKENS}
    half = hidden_size // 4 // 2  # rotary frequencies per head
    temporal, height = half // 4, (half - half // 4 + 1) // 2
    mrope_section = [temporal, height, half - temporal - height]
    text = {
        "vocab_size": len(tokenizer),
        "hidden_size": hidden_size,
        "intermediate_size": 2 * hidden_size,
        "num_hidden_layers": num_layers,
        "num_attention_heads": 4,
        "num_key_value_heads": 2,
        "max_position_embeddings": 32768,
        "rms_norm_eps": 1e-6,
        "rope_parameters": {
            "rope_type": "default",
            "rope_theta": 1e6,
            "mrope_section": mrope_section,
        },
        "bos_token_id": ids["<|endoftext|>"],
        "eos_token_id": ids["<|im_end|>"],
        "pad_token_id": ids["<|endoftext|>"],
    }
    vision = {
        "depth": 2,
        "hidden_size": 64,
        "intermediate_size": 128,
        "num_heads": 2,
        "out_hidden_size": hidden_size,
        "patch_size": 14,
        "spatial_merge_size": 2,
        "temporal_patch_size": 2,
        "window_size": 112,
        "fullatt_block_indexes": [1],  # block 0 windowed, block 1 full, as in Qwen2.5-VL
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


def _processor(tokenizer: Qwen2Tokenizer, min_pixels: int, max_pixels: int) -> Qwen2_5_VLProcessor:
    """Qwen2.5-VL's processor; the pixel budget sets the model grid (sides multiples of 28).

    The video processor is saved too: AutoProcessor and vLLM both build one for Qwen2.5-VL.
    """
    grid = {"patch_size": 14, "temporal_patch_size": 2, "merge_size": 2}
    image_processor = Qwen2VLImageProcessor(
        min_pixels=min_pixels,
        max_pixels=max_pixels,
        image_mean=[0.48145466, 0.4578275, 0.40821073],
        image_std=[0.26862954, 0.26130258, 0.27577711],
        **grid,
    )
    video_processor = Qwen2VLVideoProcessor(
        min_pixels=min_pixels, max_pixels=max_pixels, cap_pixels_per_frame=True, **grid
    )
    return Qwen2_5_VLProcessor(
        image_processor=image_processor,
        tokenizer=tokenizer,
        video_processor=video_processor,
        chat_template=CHAT_TEMPLATE,
    )


def _cache_key(args: dict[str, Any]) -> str:
    recipe = {"format": FORMAT_VERSION, "transformers": transformers.__version__, **args}
    return hashlib.sha256(json.dumps(recipe, sort_keys=True).encode()).hexdigest()


def _write(directory: Path, args: dict[str, Any]) -> None:
    tokenizer = _train_tokenizer()
    config = _config(tokenizer, args["hidden_size"], args["num_layers"])
    torch.manual_seed(args["seed"])
    model = Qwen2_5_VLForConditionalGeneration(config).eval()
    # Only the ids: vLLM applies a generation config's sampling defaults (temperature,
    # repetition penalty), which would break greedy agreement with transformers.
    model.generation_config = transformers.GenerationConfig(
        bos_token_id=config.text_config.bos_token_id,
        eos_token_id=[config.text_config.eos_token_id, config.text_config.pad_token_id],
        pad_token_id=config.text_config.pad_token_id,
    )
    model.save_pretrained(directory)
    _processor(tokenizer, args["min_pixels"], args["max_pixels"]).save_pretrained(directory)


def build_tiny_model(
    out_dir: str | Path,
    seed: int = 0,
    *,
    min_pixels: int = 56 * 56,
    max_pixels: int = 224 * 224,
    hidden_size: int = 128,
    num_layers: int = 2,
) -> Path:
    """Write the tiny model to ``out_dir`` (model, tokenizer, processor) and return it.

    The same arguments give byte-identical files. A directory already holding a model
    built with the same arguments (``tiny_model.json``) is returned as is; otherwise it is
    built in a temporary directory beside ``out_dir`` and renamed into place, so readers
    never see a half-written model. ``hidden_size`` is split over 4 heads; vLLM's CPU
    attention wants a head size of 32, 64, 80, 96, 112, 128, ...
    """
    if hidden_size % 16:
        raise ValueError(f"hidden_size must be a multiple of 16, got {hidden_size}")
    out = Path(out_dir)
    if out.exists() and _built_key(out) is None and any(out.iterdir()):
        raise FileExistsError(f"{out} exists and holds no tiny model ({MARKER}); not replacing it")
    args = {"seed": seed, "min_pixels": min_pixels, "max_pixels": max_pixels}
    args |= {"hidden_size": hidden_size, "num_layers": num_layers}
    key = _cache_key(args)
    if _built_key(out) == key:
        return out
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{out.name}.", dir=out.parent))
    try:
        _write(tmp, args)
        tmp.chmod(0o755)  # mkdtemp's 0700 would hide the model from other users' workers
        for file in tmp.iterdir():
            file.chmod(0o644)
        (tmp / MARKER).write_text(json.dumps({"args": args, "key": key}, indent=2) + "\n")
        if out.exists():  # stale or different: swap it out, then drop it
            old = Path(tempfile.mkdtemp(prefix=f".{out.name}.old.", dir=out.parent))
            os.replace(out, old / out.name)
            shutil.rmtree(old)
        os.replace(tmp, out)
    except OSError:
        if _built_key(out) != key:  # not a concurrent builder that won the race
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out


def _built_key(directory: Path) -> str | None:
    try:
        return json.loads((directory / MARKER).read_text())["key"]
    except (OSError, ValueError, KeyError):
        return None


def tiny_main(out: str, seed: int = 0) -> None:
    """CLI hook (``mmrad model tiny``): build the tiny model and say where it is."""
    path = build_tiny_model(out, seed)
    params = json.loads((path / MARKER).read_text())["args"]
    print(f"tiny Qwen2.5-VL model in {path} ({params})")
