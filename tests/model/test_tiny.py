"""The tiny Qwen2.5-VL model loads and runs in transformers, peft and vLLM alike."""

from __future__ import annotations

import gc
import hashlib
import json
import os
import time

import numpy as np
import pytest
import torch
from PIL import Image

from mmrad.model.tiny import MARKER, TINY_MODEL_DEFAULTS, build_tiny_model, tiny_main

LANGUAGE_LORA_TARGETS = (
    r"model\.language_model\.layers\.\d+\."
    r"(self_attn\.(q|k|v|o)_proj|mlp\.(gate|up|down)_proj)"
)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def model(tiny_dir):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(tiny_dir).eval()


@pytest.fixture(scope="module")
def processor(tiny_dir):
    from transformers import AutoProcessor

    return AutoProcessor.from_pretrained(tiny_dir)


def noise_image(width: int, height: int, seed: int = 0) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def two_image_chat(images: list[Image.Image]) -> list[dict]:
    content = [{"type": "image", "image": image} for image in images]
    content.append({"type": "text", "text": "Inspect the brick sample. Is there a scratch?"})
    return [{"role": "user", "content": content}]


def sha256(path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def test_forward_pass_with_two_images(model, processor):
    images = [noise_image(224, 224), noise_image(112, 168)]
    batch = processor.apply_chat_template(
        two_image_chat(images),
        tokenize=True,
        return_dict=True,
        add_generation_prompt=True,
        return_tensors="pt",
    )
    # transformers 5 builds M-RoPE positions only when it gets mm_token_type_ids (0 text,
    # 1 image, 2 video); without them it silently falls back to 1D positions.
    assert set(batch) >= {"input_ids", "attention_mask", "mm_token_type_ids", "pixel_values"}
    grid = batch["image_grid_thw"]
    assert grid.tolist() == [[1, 16, 16], [1, 12, 8]]  # (t, h, w) in 14-pixel patches
    image_token = model.config.image_token_id
    pads = batch["input_ids"][0] == image_token
    assert pads.sum().item() == (grid.prod(-1) // 4).sum().item()  # 2x2 patches per token
    assert torch.equal(pads, batch["mm_token_type_ids"][0] == 1)
    runs = torch.diff(pads.int(), prepend=torch.zeros(1, dtype=torch.int))
    assert (runs == 1).sum() == 2  # one run of image pads per image, in order
    assert batch["pixel_values"].shape == (grid.prod(-1).sum().item(), 3 * 2 * 14 * 14)

    with torch.no_grad():
        logits = model(**batch).logits
        flat = {k: v for k, v in batch.items() if k != "mm_token_type_ids"}
        logits_1d = model(**flat).logits
    assert logits.shape == (1, batch["input_ids"].shape[1], len(processor.tokenizer))
    assert torch.isfinite(logits).all()
    assert (logits - logits_1d).abs().max() > 1e-3  # the 3D positions do matter


def test_tokenizer_and_config_agree(tiny_dir, model, processor):
    tokenizer = processor.tokenizer
    config = model.config
    ids = tokenizer.convert_tokens_to_ids
    assert config.text_config.vocab_size == len(tokenizer)
    assert config.image_token_id == ids("<|image_pad|>")
    assert config.video_token_id == ids("<|video_pad|>")
    assert config.vision_start_token_id == ids("<|vision_start|>")
    assert config.vision_end_token_id == ids("<|vision_end|>")
    assert tokenizer.eos_token == "<|im_end|>" == tokenizer.decode(config.text_config.eos_token_id)
    assert tokenizer.pad_token == "<|endoftext|>"
    assert config.text_config.pad_token_id == tokenizer.pad_token_id
    head_dim = config.text_config.hidden_size // config.text_config.num_attention_heads
    assert sum(config.text_config.rope_parameters["mrope_section"]) == head_dim // 2

    box = "{'bbox_2d': [12, 34, 56, 78], 'label': 'scratch'}"
    answer = f"<think>Dark streak.</think><answer>Yes. {box}</answer>"
    assert tokenizer.decode(tokenizer(answer)["input_ids"]) == answer
    assert len(tokenizer(answer)["input_ids"]) < len(answer) / 2  # BPE merged the task's words
    text = processor.apply_chat_template(
        [
            {"role": "system", "content": "Be brief."},
            {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "Hi"}]},
            {"role": "assistant", "content": "No."},
        ],
        tokenize=False,
    )
    assert text == (
        "<|im_start|>system\nBe brief.<|im_end|>\n"
        "<|im_start|>user\n<|vision_start|><|image_pad|><|vision_end|>Hi<|im_end|>\n"
        "<|im_start|>assistant\nNo.<|im_end|>\n"
    )
    marker = json.loads((tiny_dir / MARKER).read_text())
    assert marker["args"] == TINY_MODEL_DEFAULTS


def test_build_is_deterministic_and_cached(tmp_path, tiny_dir):
    again = build_tiny_model(tmp_path / "again", seed=0)
    other = build_tiny_model(tmp_path / "other", seed=1)
    weights = "model.safetensors"
    assert sha256(again / weights) == sha256(tiny_dir / weights)
    assert sha256(other / weights) != sha256(tiny_dir / weights)
    assert (again / "tokenizer.json").read_bytes() == (other / "tokenizer.json").read_bytes()

    stamp = (again / weights).stat().st_mtime_ns
    assert build_tiny_model(again, seed=0) == again
    assert (again / weights).stat().st_mtime_ns == stamp  # cached: not rebuilt
    build_tiny_model(again, seed=1)  # other arguments: rebuilt in place
    assert sha256(again / weights) == sha256(other / weights)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["again", "other"]  # no leftovers

    unrelated = tmp_path / "data"
    unrelated.mkdir()
    (unrelated / "keep.txt").write_text("precious")
    with pytest.raises(FileExistsError, match="holds no tiny model"):
        build_tiny_model(unrelated)
    assert (unrelated / "keep.txt").read_text() == "precious"


def test_cli_hook_reports_the_cached_model(tiny_dir, capsys):
    tiny_main(str(tiny_dir), seed=0)
    assert str(tiny_dir) in capsys.readouterr().out


def test_parameter_count(model, tiny_dir):
    count = sum(p.numel() for p in model.parameters())
    assert 500_000 <= count <= 2_000_000
    assert (tiny_dir / "model.safetensors").stat().st_size < 4 * count + 100_000  # float32


def test_lora_on_language_model_trains(tiny_dir, processor):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForImageTextToText

    base = AutoModelForImageTextToText.from_pretrained(tiny_dir)
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=LANGUAGE_LORA_TARGETS)
    peft_model = get_peft_model(base, lora)
    adapted = {n for n, p in peft_model.named_parameters() if p.requires_grad}
    assert len(adapted) == 2 * 7 * base.config.text_config.num_hidden_layers  # A and B
    assert all(".language_model." in n and "lora_" in n for n in adapted)

    batch = processor.apply_chat_template(
        two_image_chat([noise_image(112, 112)]),
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )
    loss = peft_model(**batch, labels=batch["input_ids"]).loss
    loss.backward()
    grads = [p.grad for n, p in peft_model.named_parameters() if "lora_A" in n]
    assert grads and all(g is not None and torch.isfinite(g).all() for g in grads)


@pytest.fixture
def restored_environ():
    """vLLM sets process-wide variables; undo them for the tests that follow."""
    saved = dict(os.environ)
    yield
    os.environ.clear()
    os.environ.update(saved)


@pytest.mark.integration
def test_vllm_greedy_matches_transformers(tiny_dir, model, processor, restored_environ):
    # 224x224 is already on the 28-pixel grid; 250x170 is resized by both sides' processor.
    images = [noise_image(224, 224, seed=1), noise_image(250, 170, seed=2)]
    prompt = processor.apply_chat_template(
        two_image_chat(images), tokenize=False, add_generation_prompt=True
    )
    batch = processor(text=[prompt], images=images, return_tensors="pt")
    with torch.no_grad():
        reference = model.generate(
            **batch,
            max_new_tokens=16,
            do_sample=False,
            output_scores=True,
            return_dict_in_generate=True,
        )
    prompt_len = batch["input_ids"].shape[1]
    hf_tokens = reference.sequences[0, prompt_len:].tolist()
    hf_logprobs = [
        torch.log_softmax(s[0].float(), -1)[t].item()
        for s, t in zip(reference.scores, hf_tokens, strict=True)
    ]

    os.environ["VLLM_ENABLE_V1_MULTIPROCESSING"] = "0"
    from vllm import LLM, SamplingParams

    start = time.perf_counter()
    llm = LLM(
        model=str(tiny_dir),
        distributed_executor_backend="uni",
        enforce_eager=True,
        dtype="float32",
        max_model_len=2048,
        kv_cache_memory_bytes=256 * 2**20,
        limit_mm_per_prompt={"image": 2},
        seed=0,
    )
    loaded = time.perf_counter()
    request = {"prompt": prompt, "multi_modal_data": {"image": images}}
    (output,) = llm.generate([request], SamplingParams(temperature=0, max_tokens=16, logprobs=0))
    print(f"vLLM load {loaded - start:.1f}s, generate {time.perf_counter() - loaded:.1f}s")
    completion = output.outputs[0]
    steps = zip(completion.logprobs, completion.token_ids, strict=True)
    vllm_logprobs = [step[token].logprob for step, token in steps]
    del llm
    gc.collect()

    assert output.prompt_token_ids == batch["input_ids"][0].tolist()  # same resize, same pads
    assert list(completion.token_ids) == hf_tokens
    # Greedy tokens alone are a weak check on random weights: with 1D instead of M-RoPE
    # positions transformers picks the same tokens here, but log-probs move by ~4e-3.
    # vLLM and transformers agree to ~5e-7.
    np.testing.assert_allclose(vllm_logprobs, hf_logprobs, atol=1e-4)
