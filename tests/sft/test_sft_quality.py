"""After SFT, greedy decoding of the export through vLLM answers in the task format."""

from pathlib import Path

import pytest

from mmrad.config import EngineConfig, PixelBudget, PromptConfig
from mmrad.data.manifest import read_manifest
from mmrad.eval.format_check import check_format
from mmrad.model.export import read_export_info
from mmrad.storage import Storage
from mmrad.train.metrics_log import read_metrics

pytestmark = pytest.mark.e2e

ENGINE = EngineConfig(max_model_len=2048, kv_cache_bytes=256 * 2**20)
PIXELS = PixelBudget(max_pixels=12544)


def held_out(manifest: str) -> list[dict]:
    return [r for r in read_manifest(Storage(), manifest) if r["split"] != "train"]


def test_full_weights_fsdp2_loss_falls_clearly(sft_trained):
    losses = [r["train/loss"] for r in read_metrics(Storage(), sft_trained.run_uri)
              if "train/loss" in r]  # fmt: skip
    assert losses[-1] < 0.25 * losses[0]
    assert sft_trained.best_val_loss is not None and sft_trained.best_val_loss < 1.5
    assert read_export_info(sft_trained.export_uri, Storage())["lora"] == "none"
    assert (Path(sft_trained.export_uri) / "model.safetensors").exists()


def test_format_ok_after_sft_and_not_before(sft_trained, tiny_model, synthetic_local):
    records = held_out(synthetic_local)
    assert len(records) >= 50
    info = read_export_info(sft_trained.export_uri, Storage())
    prompt = PromptConfig(**info["prompt"])
    before = check_format(tiny_model, records, Storage(), pixels=PIXELS, prompt=prompt,
                          engine=ENGINE, max_tokens=128)  # fmt: skip
    after = check_format(sft_trained.export_uri, records, Storage(), pixels=PIXELS,
                         prompt=prompt, engine=ENGINE)  # fmt: skip
    print(f"format_ok before SFT {before.format_ok_rate:.0%}, after {after.format_ok_rate:.0%}")
    assert before.format_ok_rate <= 0.10
    assert after.format_ok_rate >= 0.80
