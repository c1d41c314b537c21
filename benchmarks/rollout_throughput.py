"""Rollout throughput: the vLLM rollout pool against Hugging Face ``generate``, same run.

Builds a random-weight Qwen2.5-VL-shaped model of tens of millions of parameters (the
tiny model's recipe at a larger width and depth) in a temporary directory, then samples
G completions for each of the same K prompts (a reference and a query image each) on
both sides, at temperature 1 with a fixed length (vLLM ignores end-of-sequence, HF gets
``min_new_tokens``), so both generate exactly K * G * max_tokens tokens:

- vLLM: :class:`~mmrad.rl.pool.RolloutPool` with ``--workers`` actors on a local Ray.
- Hugging Face: ``model.generate`` on one left-padded batch of the K prompts with
  ``num_return_sequences=G`` and ``do_sample=True``, in this process.

Both sides use the same devices: ``--threads`` CPU threads (default: all cores, split
over the vLLM workers), or on a GPU machine one GPU each, in bfloat16 (vLLM's default
there), so ``--workers`` must be 1 there (HF's ``generate`` runs on one device; a
multi-GPU vLLM figure against it would measure GPUs, not the engine). Pass a larger
``--hidden-size``/``--layers`` on a GPU so that compute dominates.

Each side first warms up with one short call on a prompt of its own images (one per vLLM
worker), none of the timed prompts, so neither finds a timed prompt in a cache. The
timed figure is the wall time of the generating call (tokens / second); also printed:
tokens per CPU second of the generating processes (the vLLM actors and every process
below them, vLLM's engine core included; this process for HF), a figure that other load
on the machine disturbs less than wall time. Both are published
(``benchmarks/record.py``; goal for tokens/s: at least 5x) with the work each side
counted: ``tokens`` generated, ``prompts`` and ``samples`` (completions) returned.

What the ratio measures on CPUs: vLLM prefills each prompt (images included) once for
its G samples, while HF's ``num_return_sequences`` expands every prompt G times first;
decoding costs both sides about the same arithmetic. So the ratio of tokens per CPU
second tends to (G * prompt + completion) / (prompt + completion) tokens, and grows with
G and with prompt length. Wall-clock ratios on a machine shared with other work are
unreliable: HF's many small multi-threaded kernels lose more to CPU contention than
vLLM's fused ones. ``--threads 1`` gives the cleanest comparison there.

    scripts/loopback-netns .venv/bin/python benchmarks/rollout_throughput.py [--workers 1]
"""

from __future__ import annotations

import argparse
import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
import psutil
from record import Arm, compare, publish

from mmrad.config import EngineConfig, PixelBudget, RayConfig
from mmrad.engine import InspectionInput, Sampling, build_request
from mmrad.model.tiny import build_tiny_model
from mmrad.ray_env import init_ray
from mmrad.rl.pool import RolloutPool
from mmrad.rl.rollout import RolloutPrompt
from mmrad.task.prompt import PromptVariant

PIXELS = PixelBudget()
VARIANT = PromptVariant()


@dataclass(frozen=True)
class FixedLength(Sampling):
    """Sampling that never stops before ``max_tokens`` (end-of-sequence is ignored), so
    token counts match Hugging Face's ``min_new_tokens`` run."""

    def to_vllm(self) -> Any:
        params = super().to_vllm()
        params.ignore_eos = True
        return params


def inspections(count: int, size: int, seed: int = 0) -> list[InspectionInput]:
    rng = np.random.default_rng(seed)

    def image() -> np.ndarray:
        return rng.integers(0, 256, (size, size, 3), dtype=np.uint8)

    return [InspectionInput(image(), image(), "brick") for _ in range(count)]


def measure_vllm(
    model: str, items: list[InspectionInput], warm: list[InspectionInput], args: argparse.Namespace
) -> dict:
    cpus = os.cpu_count() or 1
    init_ray(RayConfig(num_cpus=cpus, state_dir=args.ray_dir))
    # Ray gives an actor OMP_NUM_THREADS = floor(num_cpus): the engines' torch threads.
    engine = EngineConfig(
        max_model_len=2048,
        kv_cache_bytes=512 * 2**20,
        max_num_seqs=max(len(items) * args.samples, 1),
    )
    pool = RolloutPool(
        model,
        engine,
        PIXELS,
        VARIANT,
        num_workers=args.workers,
        num_cpus=args.threads / args.workers,
        num_gpus=1.0 if args.gpu else 0.0,
    )
    try:
        prompts = [RolloutPrompt(f"p{i}", item) for i, item in enumerate(items)]
        sampling = FixedLength(n=args.samples, temperature=1.0, max_tokens=args.max_tokens, seed=0)
        warmup = [RolloutPrompt(f"w{i}", item) for i, item in enumerate(warm)]
        pool.generate(warmup, FixedLength(n=2, temperature=1.0, max_tokens=4))
        processes = engine_processes(pool)
        cpu = sum(cpu_seconds(p) for p in processes)
        start = time.perf_counter()
        groups = pool.generate(prompts, sampling)
        seconds = time.perf_counter() - start
        cpu = sum(cpu_seconds(p) for p in processes) - cpu
        stats = pool.stats()
    finally:
        pool.shutdown()
    work = {
        "tokens": sum(len(r.token_ids) for group in groups for r in group),
        "prompts": len(groups),
        "samples": sum(len(group) for group in groups),
    }
    return {
        "work": work,
        "seconds": seconds,
        "cpu_seconds": cpu,
        "engine": stats,
        "processes": len(processes),
    }


def engine_processes(pool: RolloutPool) -> list[psutil.Process]:
    """The workers and every process below them (vLLM's engine core runs in a child of
    its worker unless in-process), and the engine cores themselves."""
    found: dict[int, psutil.Process] = {}
    for pid in [*pool.worker_pids(), *pool.engine_pids()]:
        process = psutil.Process(pid)
        for each in [process, *process.children(recursive=True)]:
            found.setdefault(each.pid, each)
    return list(found.values())


def cpu_seconds(process: psutil.Process) -> float:
    """User + system CPU seconds of a process, all its threads (0 once it has ended)."""
    try:
        times = process.cpu_times()
    except psutil.NoSuchProcess:
        return 0.0
    return times.user + times.system


def measure_hf(
    model_dir: str,
    items: list[InspectionInput],
    warm: list[InspectionInput],
    args: argparse.Namespace,
) -> dict:
    import torch
    from transformers import AutoModelForImageTextToText, AutoProcessor

    torch.set_num_threads(args.threads)
    processor = AutoProcessor.from_pretrained(model_dir)
    processor.tokenizer.padding_side = "left"
    model = AutoModelForImageTextToText.from_pretrained(model_dir).eval()
    device = "cuda" if args.gpu else "cpu"
    if args.gpu:  # as vLLM runs it there
        model = model.to(device, dtype=torch.bfloat16)

    def generate(batch_items: list[InspectionInput], samples: int, max_tokens: int) -> dict:
        requests = [build_request(processor, item, VARIANT, PIXELS) for item in batch_items]
        images = [image for r in requests for image in r["multi_modal_data"]["image"]]
        batch = processor(
            text=[r["prompt"] for r in requests], images=images, padding=True, return_tensors="pt"
        ).to(device)
        with torch.no_grad():
            out = model.generate(
                **batch,
                do_sample=True,
                temperature=1.0,
                top_p=1.0,
                top_k=0,
                num_return_sequences=samples,
                max_new_tokens=max_tokens,
                min_new_tokens=max_tokens,
            )
        if args.gpu:
            torch.cuda.synchronize()
        # min_new_tokens = max_new_tokens: no sample ends early, so no padding follows
        generated = out[:, batch["input_ids"].shape[1] :]
        return {
            "tokens": int(generated.numel()),
            "prompts": len(batch_items),
            "samples": int(generated.shape[0]),
        }

    torch.manual_seed(0)
    generate(warm[:1], 2, 4)
    this = psutil.Process()
    cpu = cpu_seconds(this)
    start = time.perf_counter()
    work = generate(items, args.samples, args.max_tokens)
    seconds = time.perf_counter() - start
    return {"work": work, "seconds": seconds, "cpu_seconds": cpu_seconds(this) - cpu}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=1, help="vLLM rollout workers")
    parser.add_argument("--prompts", type=int, default=4, help="K prompts")
    parser.add_argument("--samples", type=int, default=8, help="G samples per prompt")
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--image-size", type=int, default=168)
    parser.add_argument("--hidden-size", type=int, default=512)
    parser.add_argument("--layers", type=int, default=10)
    parser.add_argument(
        "--threads",
        type=int,
        default=os.cpu_count() or 1,
        help="CPU threads of each side (split over the vLLM workers); 1 gives CPU-time "
        "figures that other load on the machine hardly disturbs",
    )
    args = parser.parse_args()
    import torch

    args.gpu = torch.cuda.is_available()  # then vLLM's one worker and HF each on a GPU
    if args.gpu and args.workers != 1:
        parser.error(
            "on a GPU machine both sides get one GPU: HF generates on one device, so "
            "--workers must be 1 (more would compare GPU counts, not engines)"
        )
    if args.threads < args.workers:
        parser.error("--threads must be at least --workers (one thread per engine)")

    work = tempfile.mkdtemp(prefix="mmrad-rollout-bench-")
    args.ray_dir = tempfile.mkdtemp(prefix="mrb-")  # short: Ray's socket paths live below
    try:
        run(work, args)
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(args.ray_dir, ignore_errors=True)


def run(work: str, args: argparse.Namespace) -> None:
    model = str(
        build_tiny_model(f"{work}/model", hidden_size=args.hidden_size, num_layers=args.layers)
    )
    from safetensors import safe_open

    with safe_open(f"{model}/model.safetensors", "pt") as weights:
        params = sum(np.prod(weights.get_slice(k).get_shape()) for k in weights.keys())  # noqa: SIM118
    items = inspections(args.prompts, args.image_size)
    warm = inspections(args.workers, args.image_size, seed=1)  # no timed prompt among them
    print(
        f"model: Qwen2.5-VL-shaped, random weights, {params / 1e6:.1f}M parameters "
        f"(hidden {args.hidden_size}, {args.layers} layers); {args.prompts} prompts x "
        f"{args.samples} samples x {args.max_tokens} tokens, two {args.image_size} px images "
        f"each; {args.threads} thread(s) per side"
    )
    vllm = measure_vllm(model, items, warm, args)
    hf = measure_hf(model, items, warm, args)
    vllm_label = f"vLLM pool, {args.workers} worker(s)"
    for label, r in ((vllm_label, vllm), ("HF generate, batched", hf)):
        tokens = r["work"]["tokens"]
        print(
            f"{label:26s} {tokens} tokens in {r['seconds']:6.2f} s = "
            f"{tokens / r['seconds']:7.1f} tokens/s; {r['cpu_seconds']:6.1f} CPU s = "
            f"{tokens / r['cpu_seconds']:6.1f} tokens per CPU second"
        )
    print(f"    (vLLM CPU seconds: {vllm['processes']} process(es), workers and engine cores)")
    for key, value in vllm["engine"].items():
        if key.endswith("tokens_per_s") and key != "rollout/tokens_per_s":
            print(f"    {key}: {value:.1f} (inside the engine)")
    notes = {
        "workers": args.workers,
        "threads": args.threads,
        "gpu": args.gpu,
        "hidden_size": args.hidden_size,
        "layers": args.layers,
        "max_tokens": args.max_tokens,
    }
    for name, unit, figure, goal in (
        ("rollout_throughput", "tokens/s", "seconds", ">= 5x"),
        ("rollout_throughput_cpu", "tokens per CPU second", "cpu_seconds", None),
    ):
        candidate, baseline = (
            Arm(label, r["work"]["tokens"] / r[figure], r["work"])
            for label, r in ((vllm_label, vllm), ("HF generate, batched", hf))
        )
        publish(
            compare(
                name,
                unit,
                candidate,
                baseline,
                same=("tokens", "prompts", "samples"),
                goal=goal,
                notes=notes,
            )
        )


if __name__ == "__main__":
    main()
