"""The Serve deployment the tests in this folder talk to: Serve's own API, and the
evaluation and annotation jobs using it as an OpenAI-compatible target. It is
package-scoped (this folder has an ``__init__.py`` for that): one deployment for the
folder's tests, shut down after its last one."""

from __future__ import annotations

import io
import secrets
from dataclasses import dataclass
from pathlib import Path

import pytest


@dataclass(frozen=True)
class ServeEndpoint:
    """Where the package's Serve deployment answers: OpenAI clients use
    ``base_url + "/v1"``, ``model`` and ``api_key`` (sent as a bearer token)."""

    base_url: str
    model: str
    api_key: str
    adapters: tuple[str, ...] = ()
    app: str = "mmrad"


SERVE_TOKEN_ENV = "MMRAD_TEST_SERVE_TOKEN"
ADAPTER_SEEDS = {"line-a": 1, "line-b": 2, "line-c": 3}
"""Production lines' adapters of the package's app; line-b is read from S3."""
MAX_LOADED_ADAPTERS = 2


def random_adapter(base_dir: str, directory: Path, seed: int) -> Path:
    """A peft LoRA adapter over ``base_dir`` with random (non-zero) updates, so its greedy
    answers differ from the base model's."""
    import torch
    from transformers import AutoModelForImageTextToText

    from mmrad.config import LoraConfig
    from mmrad.model.lora import apply_lora

    torch.manual_seed(seed)
    model = apply_lora(AutoModelForImageTextToText.from_pretrained(base_dir), LoraConfig(r=8))
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "lora_B" in name:
                param.normal_(0.0, 0.5)
    model.save_pretrained(directory, save_embedding_layers=False)
    return directory


@pytest.fixture(scope="package")
def line_adapters(s3_server, sft_trained, tmp_path_factory) -> dict[str, str]:
    """``{name: folder}`` of three adapters over ``sft_trained``'s export (line-b on S3)."""
    from mmrad.model.loading import resolve_model_path
    from mmrad.storage import Storage
    from tests.conftest import TEST_BUCKET

    storage = Storage()
    base = resolve_model_path(sft_trained.export_uri, storage)
    root = tmp_path_factory.mktemp("adapters")
    adapters = {
        name: str(random_adapter(base, root / name, seed)) for name, seed in ADAPTER_SEEDS.items()
    }
    remote = f"s3://{TEST_BUCKET}/adapters/line-b"
    storage.upload_dir(adapters["line-b"], remote)
    return {**adapters, "line-b": remote}


@pytest.fixture(scope="package")
def serve_endpoint(ray_cluster, sft_trained, line_adapters):
    """The mmrad Serve application on the session's Ray, serving ``sft_trained``'s export
    and three production lines' adapters over it, with a bearer token and autoscaling
    between 1 and 2 replicas on short delays (so the autoscaling test shares it). Serve is
    shut down after the folder's last test: an idle replica's engine still polls, and
    would take CPU from the tests that follow."""
    from ray import serve

    from mmrad.serve.config import application, serve_config, validate_serve_config
    from mmrad.serve.deploy import deploy

    token = secrets.token_hex(16)
    args = {
        "model_dir": sft_trained.export_uri,
        "model_name": "mmrad-test",
        "auth_token_env": SERVE_TOKEN_ENV,
        "max_tokens": 256,
        "max_upload_bytes": 2 * 2**20,
        "max_pixels": 4_000_000,
        "engine": {"kv_cache_bytes": 96 * 2**20, "max_num_seqs": 16, "max_model_len": 4096},
        "adapters": line_adapters,
        "max_loaded_adapters": MAX_LOADED_ADAPTERS,
    }
    autoscaling = {"min_replicas": 1, "max_replicas": 2, "initial_replicas": 1,
                   "target_ongoing_requests": 2, "upscale_delay_s": 1.0,
                   "downscale_delay_s": 4.0, "look_back_period_s": 12.0}  # fmt: skip
    app = application(args, autoscaling=autoscaling, num_cpus=0.5, max_ongoing_requests=8,
                      env_vars={SERVE_TOKEN_ENV: token})  # fmt: skip
    urls = deploy(validate_serve_config(serve_config([app]), "serve_endpoint"), timeout_s=900)
    yield ServeEndpoint(base_url=urls["mmrad"], model=args["model_name"], api_key=token,
                        adapters=tuple(line_adapters))  # fmt: skip
    serve.shutdown()


@pytest.fixture(scope="package")
def inspection(synthetic_local, serve_endpoint, sft_trained):
    """An anomalous training record upscaled to 224 x 224 (its model grid stays the
    112 x 112 the model was trained on, so boxes come back scaled by 2), its reference,
    and the export's prompt variant and pixel budget."""
    from PIL import Image

    from mmrad.config import PixelBudget
    from mmrad.data.manifest import read_manifest
    from mmrad.model.export import read_export_info
    from mmrad.storage import Storage
    from mmrad.task.prompt import PromptVariant

    storage = Storage()
    records = [r for r in read_manifest(storage, synthetic_local) if r["split"] == "train"]
    record = next(r for r in records if r["is_anomalous"] and r["reference_uri"])
    image = Image.open(io.BytesIO(storage.read_bytes(record["image_uri"]))).convert("RGB")
    reference = Image.open(io.BytesIO(storage.read_bytes(record["reference_uri"]))).convert("RGB")
    info = read_export_info(sft_trained.export_uri, storage)
    return {
        "image": image.resize((224, 224)),
        "reference": reference,
        "category": record["category"],
        "variant": PromptVariant(**info["prompt"]),
        "pixels": PixelBudget(**info["pixels"]),
    }
