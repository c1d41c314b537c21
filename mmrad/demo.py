"""The local demo (`make demo`): synthetic data → tiny model → SFT on Ray Train → how often
greedy decoding through vLLM answers in the task format, before and after training.

Later stages (GRPO, evaluation, serving) join here as they land; see the README.
"""

from __future__ import annotations

from rich.console import Console
from rich.table import Table

from mmrad.cli import print_stats
from mmrad.config import DataJobConfig, EngineConfig, SFTJobConfig, load_config
from mmrad.data.build import build_dataset
from mmrad.data.manifest import read_manifest
from mmrad.data.stats import manifest_stats
from mmrad.eval.format_check import check_format
from mmrad.model.tiny import build_tiny_model
from mmrad.sft.job import run_sft
from mmrad.storage import Storage
from mmrad.train.metrics_log import read_metrics

console = Console()
ENGINE = EngineConfig(max_model_len=2048, kv_cache_bytes=256 * 2**20)


def print_loss(result) -> None:
    losses = [r["train/loss"] for r in read_metrics(Storage(), result.run_uri) if "train/loss" in r]
    console.print(
        f"run: {result.run_uri}\nexport: {result.export_uri}\n"
        f"training loss {losses[0]:.3f} -> {losses[-1]:.3f} over {result.steps} steps"
    )


def main() -> None:
    data = load_config(DataJobConfig, "configs/local/data.yaml")
    sft = load_config(SFTJobConfig, "configs/local/sft.yaml")
    storage = Storage.from_config(data.storage)

    console.rule("1. data")
    manifest = build_dataset(data.data, storage).manifest_uri
    print_stats(manifest_stats(read_manifest(storage, manifest)))

    console.rule("2. tiny model")
    console.print(f"built {build_tiny_model(sft.model.path)}")

    console.rule("3a. SFT with LoRA (Ray Train, FSDP2, 2 workers), a short run")
    lora = sft.model_copy(deep=True)
    lora.lora.enabled, lora.train.max_steps, lora.run.name = True, 20, f"{sft.run.name}-lora"
    lora.train.checkpoint_every = 20
    print_loss(run_sft(lora))

    console.rule("3b. SFT, full weights (Ray Train, FSDP2, 2 workers)")
    result = run_sft(sft)
    print_loss(result)

    console.rule("4. answer format through vLLM, held-out images")
    held_out = [r for r in read_manifest(storage, manifest) if r["split"] != "train"]
    checks = {
        name: check_format(path, held_out, storage, pixels=sft.model.pixels,
                           prompt=sft.prompt, engine=ENGINE, max_tokens=256)
        for name, path in (("before SFT", sft.model.path), ("after SFT", result.export_uri))
    }  # fmt: skip
    table = Table(title=f"greedy decoding of {len(held_out)} held-out images")
    for column in ("model", "format_ok", "decision right"):
        table.add_column(column)
    for name, check in checks.items():
        table.add_row(
            name, f"{check.format_ok_rate:.0%}", f"{check.decisions_right / check.samples:.0%}"
        )
    console.print(table)
    console.print("sample answer after SFT:", checks["after SFT"].examples[0][:300])


if __name__ == "__main__":
    main()
