"""Model paths, loading and exports that transformers, peft and vLLM read without mmrad."""

from __future__ import annotations

import json
import threading
import uuid

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from mmrad.config import LoraConfig, PixelBudget, PromptConfig
from mmrad.model import loading
from mmrad.model.export import (
    EXPORT_INFO,
    ExportError,
    export_model,
    export_state_dict,
    read_export_info,
)
from mmrad.model.loading import (
    cached_model_dir,
    load_model,
    load_processor,
    resolve_model_path,
)
from mmrad.model.lora import apply_lora
from mmrad.model.tiny import build_tiny_model
from mmrad.storage import Storage

LORA = LoraConfig(r=4, alpha=8, dropout=0.0)
PROMPT = PromptConfig(use_reference=False, reasoning=True)
PIXELS = PixelBudget(min_pixels=28 * 28, max_pixels=112 * 112)
STORAGE = Storage()


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    return build_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def processor(tiny_dir):
    return load_processor(str(tiny_dir), PIXELS)


@pytest.fixture(scope="module")
def lora_model(tiny_dir):
    """A LoRA model whose adapters are not the identity (B starts at zero)."""
    model = apply_lora(load_model(str(tiny_dir), "float32"), LORA).eval()
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.05)
    return model


@pytest.fixture(scope="module")
def batch(processor):
    image = np.random.default_rng(0).integers(0, 256, (112, 84, 3), dtype=np.uint8)
    content = [{"type": "image", "image": image}, {"type": "text", "text": "Any defect?"}]
    return processor.apply_chat_template(
        [{"role": "user", "content": content}],
        tokenize=True,
        return_dict=True,
        add_generation_prompt=True,
        return_tensors="pt",
    )


def logits(model, batch) -> torch.Tensor:
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def reference_logits(lora_model, batch):
    return logits(lora_model, batch)


def reload(path):
    from transformers import AutoModelForImageTextToText

    return AutoModelForImageTextToText.from_pretrained(path).eval()


# -- paths and loading ----------------------------------------------------------------------


def test_resolve_local_dirs_and_hub_ids(tmp_path, monkeypatch):
    (tmp_path / "models" / "m").mkdir(parents=True)
    (tmp_path / "weights.bin").write_bytes(b"")
    monkeypatch.chdir(tmp_path)
    cache = str(tmp_path / "cache")
    assert resolve_model_path("models/m", STORAGE, cache) == str(tmp_path / "models" / "m")
    assert resolve_model_path(str(tmp_path / "models/m"), STORAGE, cache).endswith("models/m")
    hub_id = "Qwen/Qwen2.5-VL-7B-Instruct"
    assert resolve_model_path(hub_id, STORAGE, cache) == hub_id
    with pytest.raises(FileNotFoundError, match="models/missing: no such directory"):
        resolve_model_path("models/missing", STORAGE, cache)  # "models" exists: a path
    with pytest.raises(NotADirectoryError, match="weights.bin"):
        resolve_model_path("weights.bin", STORAGE, cache)


def test_processor_takes_the_pixel_budget(tiny_dir, processor, batch):
    size = processor.image_processor.size
    assert (size.shortest_edge, size.longest_edge) == (28 * 28, 112 * 112)
    big = np.zeros((224, 224, 3), dtype=np.uint8)
    assert processor.image_processor(big)["image_grid_thw"].tolist() == [[1, 8, 8]]
    assert batch["image_grid_thw"].tolist() == [[1, 8, 6]]
    with pytest.raises(ValueError, match="28-pixel cells.*factor 32"):
        load_processor(str(tiny_dir), PixelBudget(factor=32))


def test_load_model_dtype_and_attention(tiny_dir):
    model = load_model(str(tiny_dir), "bfloat16")
    assert next(model.parameters()).dtype == torch.bfloat16
    assert model.config._attn_implementation == "sdpa"


# -- exports --------------------------------------------------------------------------------


def test_merged_export_reloads_with_the_same_logits(
    tiny_dir, processor, lora_model, batch, reference_logits, tmp_path
):
    from transformers import AutoProcessor

    base_logits = logits(reload(tiny_dir), batch)
    assert (base_logits - reference_logits).abs().max() > 1e-3  # the adapters do matter
    out = export_model(lora_model, processor, str(tmp_path / "export/"), STORAGE,
                       merge_lora=True, prompt=PROMPT, pixels=PIXELS, extra={"step": 7},
                       base_model="s3://models/tiny")  # fmt: skip
    assert out == str(tmp_path / "export")
    files = {p.name for p in (tmp_path / "export").iterdir()}
    assert files >= {"config.json", "model.safetensors", "generation_config.json",
                     "tokenizer.json", "tokenizer_config.json", "processor_config.json",
                     "chat_template.jinja", EXPORT_INFO}  # fmt: skip
    assert "adapter" not in files
    assert not any("lora" in key for key in load_file(tmp_path / "export/model.safetensors"))
    torch.testing.assert_close(logits(reload(out), batch), reference_logits, atol=1e-5, rtol=0)
    assert AutoProcessor.from_pretrained(out).image_processor.size.longest_edge == 112 * 112

    info = read_export_info(out, STORAGE)
    assert info["prompt"] == {"use_reference": False, "domain_knowledge": False,
                              "reasoning": True, "box_units": "pixels",
                              "wording": "full"}  # fmt: skip
    assert info["pixels"] == {"min_pixels": 784, "max_pixels": 12544, "factor": 28}
    assert info["model_grid"] == "qwen2.5-vl smart_resize factor 28"
    assert info["base_model"] == "s3://models/tiny"
    assert (info["lora"], info["adapter_dir"], info["extra"]) == ("merged", None, {"step": 7})
    # the training model is untouched: still LoRA, same outputs
    assert any("lora_A" in name for name, _ in lora_model.named_parameters())
    torch.testing.assert_close(logits(lora_model, batch), reference_logits, atol=0, rtol=0)


def test_adapter_export_loads_with_peft(
    tiny_dir, processor, lora_model, batch, reference_logits, tmp_path
):
    from peft import PeftModel

    out = tmp_path / "export"
    export_model(lora_model, processor, str(out), STORAGE, merge_lora=False,
                 prompt=PROMPT, pixels=PIXELS, base_model="models/tiny")  # fmt: skip
    base = load_file(tiny_dir / "model.safetensors")
    exported = load_file(out / "model.safetensors")
    assert exported.keys() == base.keys()
    assert all(torch.equal(exported[key], base[key]) for key in base)  # base, not merged
    adapter_config = json.loads((out / "adapter/adapter_config.json").read_text())
    assert adapter_config["base_model_name_or_path"] == "models/tiny"
    assert (out / "adapter/adapter_model.safetensors").exists()
    peft_model = PeftModel.from_pretrained(reload(out), out / "adapter").eval()
    torch.testing.assert_close(logits(peft_model, batch), reference_logits, atol=1e-5, rtol=0)
    info = read_export_info(str(out), STORAGE)
    assert (info["lora"], info["adapter_dir"]) == ("adapter", "adapter")

    # exporting again over it replaces the whole directory (no stale adapter/)
    export_model(lora_model, processor, str(out), STORAGE, merge_lora=True,
                 prompt=PROMPT, pixels=PIXELS)  # fmt: skip
    assert not (out / "adapter").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["export"]  # no leftovers


def test_export_state_dict_as_fsdp_gathers_it(
    tiny_dir, lora_model, batch, reference_logits, tmp_path
):
    common = {"lora": LORA, "prompt": PROMPT, "pixels": PIXELS}
    state = {k: v.clone() for k, v in lora_model.state_dict().items()}
    merged = export_state_dict(state, str(tiny_dir), str(tmp_path / "merged"), STORAGE,
                               merge_lora=True, extra={"step": 1}, **common)  # fmt: skip
    torch.testing.assert_close(logits(reload(merged), batch), reference_logits, atol=1e-5, rtol=0)
    info = read_export_info(merged, STORAGE)
    assert (info["lora"], info["base_model"]) == ("merged", str(tiny_dir))

    # LoRA weights alone, with the names torch.compile gives them, and a bfloat16 export
    only_lora = {f"_orig_mod.{k}": v for k, v in state.items() if "lora_" in k}
    adapter = export_state_dict(only_lora, str(tiny_dir), str(tmp_path / "adapter"), STORAGE,
                                merge_lora=False, dtype="bfloat16", **common)  # fmt: skip
    assert read_export_info(adapter, STORAGE)["dtype"] == "bfloat16"
    assert load_file(tmp_path / "adapter/model.safetensors")["lm_head.weight"].dtype == (
        torch.bfloat16
    )

    with pytest.raises(ValueError, match="keys the model does not"):
        export_state_dict({**state, "extra.weight": torch.zeros(1)}, str(tiny_dir),
                          str(tmp_path / "bad"), STORAGE, merge_lora=True, **common)  # fmt: skip
    lacking = {k: v for k, v in state.items() if "lora_B" not in k}
    with pytest.raises(ValueError, match="lacks 14 trainable parameters"):
        export_state_dict(lacking, str(tiny_dir), str(tmp_path / "bad"), STORAGE,
                          merge_lora=True, **common)  # fmt: skip
    assert not (tmp_path / "bad").exists()


def test_export_info_and_overwrite_errors(processor, lora_model, tmp_path):
    with pytest.raises(ExportError, match=f"not an mmrad export \\(no {EXPORT_INFO}\\)"):
        read_export_info(str(tmp_path), STORAGE)
    precious = tmp_path / "data"
    precious.mkdir()
    (precious / "keep.txt").write_text("precious")
    with pytest.raises(ExportError, match="holds no mmrad export"):
        export_model(lora_model, processor, str(precious), STORAGE, merge_lora=True,
                     prompt=PROMPT, pixels=PIXELS)  # fmt: skip
    assert [p.name for p in precious.iterdir()] == ["keep.txt"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]  # staging cleaned up


# -- s3:// ----------------------------------------------------------------------------------


@pytest.mark.integration
def test_s3_export_downloads_once_per_node(
    s3_server, processor, lora_model, batch, reference_logits, tmp_path, monkeypatch
):
    from peft import PeftModel

    uri = f"s3://mmrad-test/exports/{uuid.uuid4().hex}"
    export_model(lora_model, processor, uri, STORAGE, merge_lora=False,
                 prompt=PROMPT, pixels=PIXELS)  # fmt: skip
    assert read_export_info(uri, STORAGE)["lora"] == "adapter"
    assert not STORAGE.exists(f"{uri}/.mmrad-export-in-progress")

    downloads = []
    real_download = loading._download_file
    monkeypatch.setattr(
        loading, "_download_file", lambda *a: downloads.append(a[1]) or real_download(*a)
    )
    cache = tmp_path / "cache"
    found = concurrently(3, lambda: resolve_model_path(uri, STORAGE, cache))
    local = cached_model_dir(uri, cache)
    assert found == [str(local)] * 3
    assert len(downloads) == len(set(downloads)) == len(STORAGE.list(uri))  # once each
    assert (local / "adapter/adapter_config.json").exists()
    peft_model = PeftModel.from_pretrained(reload(local), local / "adapter").eval()
    torch.testing.assert_close(logits(peft_model, batch), reference_logits, atol=1e-5, rtol=0)

    # re-exported to the same URI (merged, no adapter): downloaded again, stale files gone
    export_model(lora_model, processor, uri, STORAGE, merge_lora=True,
                 prompt=PROMPT, pixels=PIXELS)  # fmt: skip
    assert not any("/adapter/" in item for item in STORAGE.list(uri))
    assert resolve_model_path(uri, STORAGE, cache) == str(local)
    assert not (local / "adapter").exists()
    torch.testing.assert_close(logits(reload(local), batch), reference_logits, atol=1e-5, rtol=0)

    # a download cut short (no completion marker) is never used
    (local / ".mmrad-download.json").unlink()
    (local / "model.safetensors").write_bytes(b"truncated")
    assert resolve_model_path(uri, STORAGE, cache) == str(local)
    assert (local / "model.safetensors").stat().st_size > 1000


def concurrently(count: int, call) -> list:
    """``call()`` on ``count`` threads at once; their results."""
    found: list = []
    workers = [threading.Thread(target=lambda: found.append(call())) for _ in range(count)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    return found


@pytest.mark.integration
def test_an_s3_adapter_is_downloaded_once_per_node_too(
    s3_server, processor, lora_model, tmp_path, monkeypatch
):
    """Evaluation's separate adapters go through the node cache's lock and marker."""
    from mmrad.eval.config import ModelTarget
    from mmrad.eval.inference import local_adapter_dir

    uri = f"s3://mmrad-test/exports/{uuid.uuid4().hex}"
    export_model(lora_model, processor, uri, STORAGE, merge_lora=False,
                 prompt=PROMPT, pixels=PIXELS)  # fmt: skip
    downloads = []
    real_download = loading._download_file
    monkeypatch.setattr(
        loading, "_download_file", lambda *a: downloads.append(a[1]) or real_download(*a)
    )
    target = ModelTarget(path="s3://mmrad-test/some/base", adapter=f"{uri}/adapter",
                         cache_dir=str(tmp_path / "cache"))  # fmt: skip
    found = concurrently(3, lambda: local_adapter_dir(target, "unused", STORAGE))
    local = cached_model_dir(f"{uri}/adapter", target.cache_dir)
    assert found == [str(local)] * 3
    assert len(downloads) == len(set(downloads)) == len(STORAGE.list(f"{uri}/adapter"))
    assert (local / loading.COMPLETE_MARKER).exists()
    assert (local / "adapter_config.json").exists()
    with pytest.raises(FileNotFoundError, match=f"{uri}: no adapter_config.json"):
        loading.download_to_node_cache(uri, STORAGE, target.cache_dir,
                                       required="adapter_config.json")  # fmt: skip


@pytest.mark.integration
def test_s3_errors(s3_server, processor, lora_model, tmp_path):
    prefix = f"s3://mmrad-test/other/{uuid.uuid4().hex}"
    STORAGE.write_text(f"{prefix}/notes.txt", "not a model")
    with pytest.raises(FileNotFoundError, match=f"{prefix}: no config.json"):
        resolve_model_path(prefix, STORAGE, str(tmp_path / "cache"))
    with pytest.raises(ExportError, match="holds objects but no mmrad export"):
        export_model(lora_model, processor, prefix, STORAGE, merge_lora=True,
                     prompt=PROMPT, pixels=PIXELS)  # fmt: skip
    assert STORAGE.list(prefix) == [f"{prefix}/notes.txt"]


def test_a_node_cache_is_the_configured_folder_else_the_nodes_own(tmp_path, monkeypatch):
    """Each node picks its own folder; a config names one only as an absolute folder."""
    monkeypatch.delenv(loading.NODE_CACHE_ENV, raising=False)
    assert loading.node_cache_dir() == loading.node_temp_dir() / "mmrad-models"
    monkeypatch.setenv(loading.NODE_CACHE_ENV, str(tmp_path / "nvme"))
    assert loading.node_cache_dir() == tmp_path / "nvme"
    assert loading.node_cache_dir(str(tmp_path / "configured")) == tmp_path / "configured"
    assert cached_model_dir("s3://b/m").parent == tmp_path / "nvme"
