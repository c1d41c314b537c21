"""Weight sync: learners to rollout engines through Ray's object store and over the weight
channel, full weights and LoRA, side by side in one run.

Builds a random-weight Qwen2.5-VL-shaped model of about 0.5 GB in float32 (the tiny
model's recipe at hidden size 1024, 13 layers: 125M parameters) in a temporary directory
and starts, on a local Ray:

- two learner ranks, Ray actors that hold the model sharded with FSDP2 (``fully_shard``
  per block, then the root) over a gloo process group, as the GRPO learners do: once
  without an adapter (``full``) and once with LoRA (r=64 on the language model's 7
  projections, ``lora``);
- a :class:`~mmrad.rl.pool.RolloutPool` of ``--workers`` vLLM engines (in-process engine
  cores; ``--child-process`` for vLLM's child-process layout, as on GPUs).

Before each sync the learners change their weights (every weight for ``full``, the
adapter only for ``lora``, a new version each time) and compute, with transformers on
the sharded model, the log-probs of a fixed completion after a fixed prompt (two
images). Each sync is then timed end to end, from the learners' FSDP2 shards to every
engine answering with the new weights:

- object store (``sync.transport: object_store``): both ranks gather (``full``:
  ``full_model_state``; ``lora``: ``gather_trainable`` of the adapter), rank 0 builds
  the :class:`~mmrad.rl.rollout.WeightUpdate` (peft's adapter state dict and config for
  LoRA) and returns it through the object store to this process (the coordinator's
  place), which hands it to :meth:`RolloutPool.sync` (one put, one read per engine;
  LoRA as adapter files loaded by vLLM);
- channel (``sync.transport: collective``): rank 0 announces the send plan,
  :meth:`RolloutPool.receive` has the engines receive, every rank streams the policy
  from its shards (:class:`~mmrad.rl.weight_sender.WeightSender`, gloo, buckets of
  ``--bucket-mb``; LoRA sent merged, ``W + scale * B @ A``) and
  :meth:`RolloutPool.finish_receive` waits;
- then the probe: every engine's log-probs of the fixed completion
  (``prompt_logprobs``), checked against the learners' (max abs difference < 1e-3 in
  float32) and against the engine's previous answer (it changed: the sync did happen).
  After a LoRA object-store sync this is the new adapter's first use, which on CPU costs
  more than the sync (vLLM's LoRA kernels); the probe is also run once more right after
  each arm, untimed, to show what a forward with the adapter costs by itself.

Each arm runs ``--repeats`` times (the median is reported), in rounds of LoRA object
store, LoRA channel, full object store, full channel; one version counter runs over
every sync. A LoRA adapter applies to the engines' base weights, which full and merged
syncs overwrite: each round after the first starts with an untimed full sync of the
model's own weights (the LoRA learners' base) through the object store.

Memory: the peak host memory of each process during an arm beyond what it held before
(Linux ``VmHWM`` after ``5 > /proc/<pid>/clear_refs`` resets it at the start of the arm,
minus ``VmRSS`` then; maximum over the repeats) for this process (the coordinator's
place), each learner rank and each engine worker (the rollout actor, and with
``--child-process`` its vLLM child processes). Every process runs with
``MALLOC_MMAP_THRESHOLD_=65536``, so large buffers go back to the system when freed and
RSS follows live memory. Objects in Ray's object store count in the processes that
write or map them.

Printed: seconds (end to end; the sync alone; the probe), GB/s (payload / end-to-end
seconds; GB = 1e9 bytes), the probe's differences, the ratios channel / object store
(end to end, and of the sync alone), the memory table, the goals as pass/fail lines (on
CPU: the channel no slower than the object store, end-to-end channel seconds / object
store seconds <= 1; during a channel arm no process above model size + one bucket), and
an extrapolation to Qwen2.5-VL-7B at the measured GB/s (CPU and gloo here: GPUs with NCCL
will differ; the GPU goals, 7B full within 2 s and LoRA within 1 s, are to measure on a
GPU with scripts/gpu_check.sh). The actors' (vLLM's) logs are not printed unless
``--worker-logs``. ``--small`` runs the tiny test model (LoRA r=8), for the test. Runs in
about 5 minutes on 2 cores (``--small --repeats 1``: about a minute).

    scripts/loopback-netns .venv/bin/python benchmarks/weight_sync.py [--json PATH]
"""

from __future__ import annotations

import argparse
import ctypes
import json
import os
import shutil
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
from record import Arm, compare, publish

from mmrad.config import EngineConfig, PixelBudget
from mmrad.model.tiny import TINY_MODEL_DEFAULTS, build_tiny_model
from mmrad.rl.rollout import RolloutPrompt, WeightUpdate
from mmrad.task.prompt import PromptVariant

GB = 1e9
MB = 1e6
LOOPBACK = "127.0.0.1"
PIXELS = PixelBudget()
VARIANT = PromptVariant()
TOLERANCE = 1e-3  # max abs log-prob difference, engines vs learners (float32 on CPU)
NOISE = 0.01  # std of each version's change of the trained weights
PROBE_TEXT = "<think>The brick looks normal.</think><answer>No.</answer><|im_end|>"
MALLOC_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
M_MMAP_THRESHOLD = -3  # glibc mallopt parameter
MIN_CHILD_RSS = 20 * 2**20  # engine child processes below this are helpers, not engines
MODES = ("full", "lora")
TRANSPORTS = ("object_store", "channel")
# One round, in order: LoRA first (a LoRA object-store sync needs the model's own base).
ARMS = [
    ("lora", "object_store"),
    ("lora", "channel"),
    ("full", "object_store"),
    ("full", "channel"),
]
# Qwen2.5-VL-7B (benchmarks/learner_memory.py counts them): full sync in bf16, LoRA r=64
# on the 7 projections of its 28 layers as fp32 adapter files, or merged into the weights.
QWEN7B = {
    "parameters": 8.3e9,
    "full_bytes": 16.6e9,
    "lora_parameters": 161e6,
    "adapter_bytes": 0.65e9,
}
GPU_GOALS_S = {"full": 2.0, "lora": 1.0}


# --- the learners -----------------------------------------------------------------------


class Learner:
    """One learner rank (a Ray actor): the model sharded with FSDP2 over a gloo group of
    all ranks, once without and once with a LoRA adapter, and its weight-channel sender."""

    def __init__(self, rank: int, world: int, port: int, model_path: str, bucket_bytes: int):
        from datetime import timedelta

        import torch.distributed as dist

        from mmrad.rl.weight_sender import WeightSender

        dist.init_process_group(
            "gloo",
            init_method=f"tcp://{LOOPBACK}:{port}",
            rank=rank,
            world_size=world,
            timeout=timedelta(minutes=10),
        )
        self.rank = rank
        self.model_path = model_path
        self.models: dict[str, Any] = {}
        self.sender = WeightSender(rank, "gloo", LOOPBACK, bucket_bytes)

    def pid(self) -> int:
        return os.getpid()

    def build(self, mode: str, lora_r: int, lora_alpha: int) -> dict[str, int]:
        """Collective: load the model on rank 0 (``meta`` elsewhere), add the adapter for
        ``lora`` (trained weights in float32), shard it over the ranks."""
        import torch

        from mmrad.config import FSDPConfig, LoraConfig
        from mmrad.model.lora import apply_lora
        from mmrad.train.building import keep_trained_in_float32, load_on_rank0
        from mmrad.train.sharding import shard_model

        model = load_on_rank0(self.model_path, "float32", self.rank)
        if mode == "lora":
            torch.manual_seed(0)  # the adapter's init (rank 0's is broadcast)
            model = apply_lora(model, LoraConfig(r=lora_r, alpha=lora_alpha, dropout=0.0))
            keep_trained_in_float32(model)
        else:
            model.requires_grad_(True)
        model = shard_model(model, FSDPConfig(), on_gpu=False, device=torch.device("cpu"))
        model.eval()
        self.models[mode] = model
        params = list(model.parameters())
        return {
            "parameters": sum(p.numel() for p in params),
            "trainable": sum(p.numel() for p in params if p.requires_grad),
        }

    def step(
        self, mode: str, version: int, inputs: dict[str, Any], completion: list[int]
    ) -> list[float] | None:
        """Collective: a new version of the trained weights (each rank changes its own
        shards: every weight for ``full``, the adapter for ``lora``), then the model's
        log-probs of ``completion`` in the collated ``inputs``, on rank 0, by the learner's
        own code (``mmrad.rl.inputs.completion_logprobs``)."""
        import torch

        from mmrad.rl.inputs import completion_logprobs

        model = self.models[mode]
        generator = torch.Generator().manual_seed(version * 1009 + self.rank)
        with torch.no_grad():
            for name, param in model.named_parameters():
                if param.requires_grad:
                    if not hasattr(param, "to_local"):
                        raise RuntimeError(f"{name} is not sharded (an unsharded FSDP2 unit)")
                    local = param.to_local()
                    local.add_(torch.randn(local.shape, generator=generator), alpha=NOISE)
            logp = completion_logprobs(model, inputs, 1.0).logp[0, : len(completion)]
        reshard(model)
        return logp.tolist() if self.rank == 0 else None

    def gather(self, mode: str, version: int) -> WeightUpdate | None:
        """Collective, the object store transport: the learner's gather
        (``GRPOLearner.gather_state``) and, on rank 0, its ``WeightUpdate``."""
        from mmrad.rl.learner import gather_trainable
        from mmrad.train.checkpoint import full_model_state

        model = self.models[mode]
        if mode == "full":
            state = full_model_state(model, on_gpu=False)
            return WeightUpdate(version, "full", state) if self.rank == 0 else None
        state = gather_trainable(model, keep=True)
        if self.rank != 0:
            return None
        from peft import get_peft_model_state_dict

        tensors = get_peft_model_state_dict(model, state_dict=state)
        config = model.peft_config["default"].to_dict()
        config["base_model_name_or_path"] = self.model_path
        return WeightUpdate(version, "lora", tensors, config)

    def announce(self, mode: str, version: int):
        """Rank 0, the channel transport: the send plan of ``version``."""
        import torch

        return self.sender.announce(self.models[mode], torch.float32, version)

    def send(self, mode: str, update, spec) -> None:
        """Collective, the channel transport: stream the policy (rank 0 broadcasts)."""
        import torch

        self.sender.send(self.models[mode], torch.float32, update, spec)

    def close(self) -> None:
        import torch.distributed as dist

        self.sender.close()
        dist.destroy_process_group()


def reshard(model) -> None:
    """Every FSDP2 unit back to its shards. FSDP2 keeps the root unit's weights gathered
    after a forward (for the backward that training runs next); after a no-grad forward
    they would stay gathered, and a change made to the shards would not reach them."""
    from torch.distributed.fsdp import FSDPModule

    for module in model.modules():
        if isinstance(module, FSDPModule):
            module.reshard()


def start_learners(model_path: str, world: int, bucket_bytes: int) -> list[Any]:
    import ray

    from mmrad.engine.channel import free_port

    port = free_port(LOOPBACK)
    actor = ray.remote(Learner).options(num_cpus=0.5, runtime_env={"env_vars": MALLOC_ENV})
    learners = [actor.remote(rank, world, port, model_path, bucket_bytes) for rank in range(world)]
    ray.get([learner.pid.remote() for learner in learners])
    return learners


# --- memory -----------------------------------------------------------------------------


def status_bytes(pid: int) -> dict[str, int]:
    """``VmRSS``, ``VmHWM`` and ``RssShmem`` (shared memory, such as the pages of Ray's
    object store that the process touched) of a process, in bytes."""
    fields = {}
    with open(f"/proc/{pid}/status") as handle:
        for line in handle:
            key, _, value = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssShmem"):
                fields[key] = int(value.split()[0]) * 1024
    return fields


def malloc_threshold(pid: int) -> str | None:
    """The process's ``MALLOC_MMAP_THRESHOLD_`` as it started."""
    try:
        with open(f"/proc/{pid}/environ", "rb") as handle:
            entries = handle.read().split(b"\0")
    except OSError:
        return None
    for entry in entries:
        key, _, value = entry.partition(b"=")
        if key == b"MALLOC_MMAP_THRESHOLD_":
            return value.decode()
    return None


class PeakMemory:
    """Peak RSS of a set of processes (label → pid) over a stretch: :meth:`start` resets
    each one's high-water mark to its RSS (``clear_refs``), :meth:`stop` reads it."""

    def __init__(self, processes: dict[str, int]):
        self.processes = processes
        self._before: dict[str, int] = {}

    def start(self) -> None:
        for label, pid in self.processes.items():
            with open(f"/proc/{pid}/clear_refs", "w") as handle:
                handle.write("5")
            self._before[label] = status_bytes(pid)["VmHWM"]  # the RSS at the reset

    def stop(self) -> dict[str, dict[str, int]]:
        """Per process: RSS at the start, peak, their difference, and the shared memory
        in its RSS at the end."""
        result = {}
        for label, pid in self.processes.items():
            now = status_bytes(pid)
            before = self._before[label]
            result[label] = {
                "before": before,
                "peak": now["VmHWM"],
                # Linux's RSS counters lag by a few pages per thread: never below 0
                "transient": max(0, now["VmHWM"] - before),
                "shmem_after": now["RssShmem"],
            }
        return result


def engine_processes(pool) -> dict[str, int]:
    """Each engine worker's actor process, and its vLLM child processes (engine core,
    workers) where the engine runs in some."""
    import psutil

    pids = pool.worker_pids()
    found = {}
    for name, pid in zip(pool.worker_names, pids, strict=True):
        found[f"engine {name}"] = pid
        for child in psutil.Process(pid).children(recursive=True):
            try:
                if child.memory_info().rss >= MIN_CHILD_RSS:
                    found[f"engine {name} {child.name()}"] = child.pid
            except psutil.Error:
                continue
    return found


def use_mmap_threshold() -> None:
    """This process: large allocations as their own mappings (as the variable makes it
    for the processes that start with it)."""
    try:
        libc = ctypes.CDLL("libc.so.6")
        libc.mallopt(M_MMAP_THRESHOLD, int(MALLOC_ENV["MALLOC_MMAP_THRESHOLD_"]))
    except (OSError, AttributeError):
        pass


# --- the probe --------------------------------------------------------------------------


def probe_inputs(model_path: str, image_size: int) -> tuple[RolloutPrompt, list[int], dict]:
    """A fixed prompt (two noise images), a fixed completion's token ids, and the
    learners' batch of the two, collated as the GRPO learner collates its probe."""
    from mmrad.model.loading import load_processor
    from mmrad.rl.inputs import RolloutCollator
    from mmrad.rl.prompts import PromptItem

    rng = np.random.default_rng(0)
    images = [rng.integers(0, 256, (image_size, image_size, 3), dtype=np.uint8) for _ in "ab"]
    record = {"category": "brick", "width": image_size, "height": image_size}
    item = PromptItem("probe", record, images[1], images[0])
    collate = RolloutCollator(load_processor(model_path, PIXELS), VARIANT, PIXELS)
    completion = list(collate.processor.tokenizer(PROBE_TEXT).input_ids)
    inputs = collate([collate.encode_prompt(item)], [(0, completion)])
    return RolloutPrompt("probe", item.inputs()), completion, inputs


def engine_logprobs(pool, prompt: RolloutPrompt, completion: list[int]) -> list[list[float]]:
    """Every engine's log-probs of the completion (one list per engine)."""
    answers = pool._on_each_worker(
        lambda w, fresh: w.actor.prompt_logprobs.remote([prompt], [completion])
    )
    return [answer[0] for answer in answers]


def max_abs_diff(engines: list[list[float]], reference: list[float]) -> float:
    return max(abs(a - b) for engine in engines for a, b in zip(engine, reference, strict=True))


# --- one sync ---------------------------------------------------------------------------


def object_store_sync(learners: list[Any], pool, mode: str, version: int) -> int:
    """Learners gather, rank 0's update goes through the object store to this process,
    the pool syncs it; returns the payload's bytes."""
    import ray

    refs = [learner.gather.remote(mode, version) for learner in learners]
    update = ray.get(refs[0])
    ray.get(refs[1:])
    payload = sum(t.numel() * t.element_size() for t in update.tensors.values())
    pool.sync(update)
    return payload


def channel_sync(learners: list[Any], pool, mode: str, version: int) -> int:
    """Rank 0 announces, the engines receive, every rank sends; returns the bytes sent."""
    import ray

    update = ray.get(learners[0].announce.remote(mode, version))
    spec = pool.receive(update)
    sends = [learners[0].send.remote(mode, update, spec)]
    sends += [learner.send.remote(mode, None, None) for learner in learners[1:]]
    ray.get(sends)
    pool.finish_receive()
    return update.send_plan.nbytes


def reset_engines(pool, model_path: str, version: int) -> None:
    """Untimed: the model's own weights (the LoRA learners' base) to every engine."""
    from safetensors.torch import load_file

    tensors = load_file(f"{model_path}/model.safetensors")
    pool.sync(WeightUpdate(version, "full", tensors))


# --- the run ----------------------------------------------------------------------------


def start_ray(state_dir: str, worker_logs: bool) -> None:
    """A local Ray as :func:`mmrad.ray_env.init_ray` starts one (its state and token under
    ``state_dir``, no dashboard), printing the actors' logs (vLLM's) only when asked."""
    import ray

    from mmrad.ray_env import ray_environment

    env = ray_environment(Path(state_dir))
    os.environ.update(env)
    Path(env["RAY_TMPDIR"]).mkdir(parents=True, exist_ok=True)
    ray.init(
        num_cpus=4,
        _node_ip_address=LOOPBACK,
        include_dashboard=False,
        _temp_dir=env["RAY_TMPDIR"],
        log_to_driver=worker_logs,
    )


def model_size(model_path: str) -> tuple[int, int]:
    """Parameters and float32 bytes of the saved model."""
    from safetensors import safe_open

    with safe_open(f"{model_path}/model.safetensors", "pt") as weights:
        count = sum(int(np.prod(weights.get_slice(k).get_shape())) for k in weights.keys())  # noqa: SIM118
    return count, 4 * count


def run(args: argparse.Namespace, work: str, ray_dir: str) -> dict[str, Any]:
    import ray

    from mmrad.rl.pool import RolloutPool

    model_path = str(
        build_tiny_model(f"{work}/model", hidden_size=args.hidden_size, num_layers=args.layers)
    )
    parameters, model_bytes = model_size(model_path)
    bucket_bytes = args.bucket_mb * 2**20
    print(
        f"model: Qwen2.5-VL-shaped, random weights, {parameters / 1e6:.1f}M parameters "
        f"(hidden {args.hidden_size}, {args.layers} layers), {model_bytes / GB:.3f} GB in "
        f"float32; 2 FSDP2 learner ranks (gloo), {args.workers} vLLM engine(s) "
        f"({'child-process' if args.child_process else 'in-process'} engine cores); LoRA "
        f"r={args.lora_rank}; channel buckets {args.bucket_mb} MiB; {args.repeats} repeat(s)"
    )
    start_ray(ray_dir, args.worker_logs)
    learners = start_learners(model_path, 2, bucket_bytes)
    built = {}
    for mode in MODES:
        sizes = ray.get(
            [learner.build.remote(mode, args.lora_rank, 2 * args.lora_rank) for learner in learners]
        )
        built[mode] = sizes[0]
    engine = EngineConfig(
        max_model_len=1024,
        kv_cache_bytes=64 * 2**20,
        max_num_seqs=4,
        enable_lora=True,
        max_lora_rank=args.lora_rank,
        multiprocess=args.child_process,
    )
    pool = RolloutPool(model_path, engine, PIXELS, VARIANT, num_workers=args.workers, num_cpus=1.0)
    try:
        return measure(args, learners, pool, model_path, model_bytes, parameters, built)
    finally:
        pool.shutdown()
        ray.get([learner.close.remote() for learner in learners])
        for learner in learners:
            ray.kill(learner)


def measure(
    args: argparse.Namespace,
    learners: list[Any],
    pool,
    model_path: str,
    model_bytes: int,
    parameters: int,
    built: dict[str, dict[str, int]],
) -> dict[str, Any]:
    import ray

    learner_pids = ray.get([learner.pid.remote() for learner in learners])
    processes = {"coordinator (this process)": os.getpid()}
    processes |= {f"learner rank {rank}": pid for rank, pid in enumerate(learner_pids)}
    processes |= engine_processes(pool)
    memory = PeakMemory(processes)
    prompt, completion, inputs = probe_inputs(model_path, args.image_size)
    initial = engine_logprobs(pool, prompt, completion)
    previous = initial
    version = 0
    runs: dict[str, list[dict[str, Any]]] = {f"{m}/{t}": [] for m, t in ARMS}
    for repeat in range(args.repeats):
        if repeat > 0:
            version += 1
            reset_engines(pool, model_path, version)
            previous = initial
        for mode, transport in ARMS:
            version += 1
            reference = ray.get(
                [learner.step.remote(mode, version, inputs, completion) for learner in learners]
            )[0]
            memory.start()
            start = time.perf_counter()
            sync = object_store_sync if transport == "object_store" else channel_sync
            payload = sync(learners, pool, mode, version)
            synced = time.perf_counter()
            engines = engine_logprobs(pool, prompt, completion)
            end = time.perf_counter()
            peaks = memory.stop()
            again = time.perf_counter()  # untimed: the probe once more, the adapter in use
            engine_logprobs(pool, prompt, completion)
            again = time.perf_counter() - again
            if pool.worker_versions() != [version] * args.workers:
                raise RuntimeError(f"engines do not all hold v{version}: {pool.worker_versions()}")
            runs[f"{mode}/{transport}"].append({
                "version": version,
                "payload_bytes": payload,
                "seconds": end - start,
                "sync_seconds": synced - start,
                "probe_seconds": end - synced,
                "probe_again_seconds": again,
                "probe_max_abs_diff": max_abs_diff(engines, reference),
                "probe_max_abs_change": max_abs_diff(engines, previous[0]),
                "memory": peaks,
            })  # fmt: skip
            previous = engines
            print(
                f"  v{version:<3} {mode:4s} {transport:12s} {end - start:7.2f} s "
                f"(probe {end - synced:.2f} s), probe max |diff| "
                f"{runs[f'{mode}/{transport}'][-1]['probe_max_abs_diff']:.1e}",
                flush=True,
            )
    return summarize(args, runs, processes, model_bytes, parameters, built)


def summarize(
    args: argparse.Namespace,
    runs: dict[str, list[dict[str, Any]]],
    processes: dict[str, int],
    model_bytes: int,
    parameters: int,
    built: dict[str, dict[str, int]],
) -> dict[str, Any]:
    arms = {}
    for key, repeats in runs.items():
        median = {
            field: statistics.median(r[field] for r in repeats)
            for field in ("seconds", "sync_seconds", "probe_seconds", "probe_again_seconds")
        }
        payload = repeats[-1]["payload_bytes"]
        arms[key] = {
            "mode": key.split("/")[0],
            "transport": key.split("/")[1],
            "payload_bytes": payload,
            **median,
            "gb_per_s": payload / GB / median["seconds"],
            "sync_gb_per_s": payload / GB / median["sync_seconds"],
            "probe_max_abs_diff": max(r["probe_max_abs_diff"] for r in repeats),
            "probe_min_abs_change": min(r["probe_max_abs_change"] for r in repeats),
            "memory": {
                label: {
                    "before_bytes": max(r["memory"][label]["before"] for r in repeats),
                    "peak_bytes": max(r["memory"][label]["peak"] for r in repeats),
                    "transient_bytes": max(r["memory"][label]["transient"] for r in repeats),
                    "shmem_after_bytes": max(r["memory"][label]["shmem_after"] for r in repeats),
                }
                for label in processes
            },
            "repeats": repeats,
        }
    bucket_bytes = args.bucket_mb * 2**20
    ratios = {
        f"{mode}{part}_channel_over_object_store": (
            arms[f"{mode}/channel"][field] / arms[f"{mode}/object_store"][field]
        )
        for mode in MODES
        for part, field in (("", "seconds"), ("_sync", "sync_seconds"))
    }
    memory_limit = model_bytes + bucket_bytes
    channel_peaks = {
        mode: max(
            arms[f"{mode}/channel"]["memory"].items(), key=lambda item: item[1]["transient_bytes"]
        )
        for mode in MODES
    }
    goals = {
        "probe_max_abs_diff_below_tolerance": all(
            a["probe_max_abs_diff"] < TOLERANCE for a in arms.values()
        ),
        **{
            f"{mode}_channel_no_slower": ratios[f"{mode}_channel_over_object_store"] <= 1.0
            for mode in MODES
        },
        **{
            f"{mode}_channel_memory_under_model_plus_bucket": (
                channel_peaks[mode][1]["transient_bytes"] < memory_limit
            )
            for mode in MODES
        },
    }
    extrapolation = {}
    for key, arm in arms.items():
        target = QWEN7B["adapter_bytes"] if key == "lora/object_store" else QWEN7B["full_bytes"]
        extrapolation[key] = {
            "bytes": target,
            "seconds": target / GB / arm["gb_per_s"],
            "sync_seconds": target / GB / arm["sync_gb_per_s"],
        }
    return {
        "model": {
            "parameters": parameters,
            "bytes_float32": model_bytes,
            "hidden_size": args.hidden_size,
            "layers": args.layers,
            "lora_rank": args.lora_rank,
            "lora_alpha": 2 * args.lora_rank,
            "learner_parameters": built,
        },
        "settings": {
            "workers": args.workers,
            "learner_ranks": 2,
            "child_process": args.child_process,
            "bucket_bytes": bucket_bytes,
            "repeats": args.repeats,
            "image_size": args.image_size,
            "tolerance": TOLERANCE,
        },
        "processes": {
            label: {
                "pid": pid,
                "malloc_mmap_threshold": (
                    f"{MALLOC_ENV['MALLOC_MMAP_THRESHOLD_']} (mallopt)"
                    if pid == os.getpid()
                    else malloc_threshold(pid)
                ),
            }
            for label, pid in processes.items()
        },
        "arms": arms,
        "ratios": ratios,
        "memory_limit_bytes": memory_limit,
        "channel_peak_process": {mode: channel_peaks[mode][0] for mode in MODES},
        "goals": goals,
        "qwen7b": {**QWEN7B, "gpu_goals_seconds": GPU_GOALS_S, "extrapolation": extrapolation},
    }


# --- the report -------------------------------------------------------------------------


def label_of(key: str) -> str:
    mode, transport = key.split("/")
    if mode == "lora":
        what = "adapter files" if transport == "object_store" else "merged"
        return f"LoRA, {transport.replace('_', ' ')} ({what})"
    return f"full, {transport.replace('_', ' ')}"


def publish_entries(results: dict[str, Any]) -> None:
    """One entry per mode: the channel against the object store, end to end. Both arms
    bring the same engines to the same weights (the probe checks each); the LoRA arms
    send different payloads by design (adapter files vs merged weights)."""
    settings = results["settings"]
    for mode in MODES:
        arms = {}
        for transport in TRANSPORTS:
            arm = results["arms"][f"{mode}/{transport}"]
            work = {
                "syncs": settings["repeats"],
                "engines_checked": settings["workers"],
                "payload_bytes": arm["payload_bytes"],
            }
            arms[transport] = Arm(label_of(f"{mode}/{transport}"), arm["seconds"], work)
        publish(
            compare(
                f"weight_sync_{mode}",
                f"seconds per sync end to end, {mode} ({results['model']['parameters'] / 1e6:.0f}M"
                " parameters)",
                arms["channel"],
                arms["object_store"],
                same=("syncs", "engines_checked"),
                goal="<= 1x",
            )
        )


def verdict(ok: bool) -> str:
    return "PASS" if ok else "FAIL"


def report(results: dict[str, Any]) -> None:
    arms, goals = results["arms"], results["goals"]
    repeats = results["settings"]["repeats"]
    print(
        f"\nEnd to end, from the learners' shards to every engine answering the probe "
        f"(median of {repeats}):"
    )
    header = (
        f"{'arm':<36}{'payload MB':>11}{'seconds':>9}{'sync s':>8}{'probe s':>8}"
        f"{'GB/s':>9}{'max|diff|':>11}{'change':>9}"
    )
    print(header)
    for key in (f"{m}/{t}" for m in MODES for t in TRANSPORTS):
        a = arms[key]
        print(
            f"{label_of(key):<36}{a['payload_bytes'] / MB:>11.1f}{a['seconds']:>9.2f}"
            f"{a['sync_seconds']:>8.2f}{a['probe_seconds']:>8.2f}{a['gb_per_s']:>9.4f}"
            f"{a['probe_max_abs_diff']:>11.1e}{a['probe_min_abs_change']:>9.3f}"
        )
    print(
        "(sync s: until every engine holds the version; probe s: every engine's log-probs of "
        "the probe, after it (LoRA: the adapter's first use); GB/s: payload / end-to-end "
        "seconds; max|diff|: engines' log-probs vs the learners', worst repeat; change: vs "
        "the engines' previous answer, smallest repeat)"
    )
    print(
        "probe once more right after (untimed; LoRA with its adapter already in use): "
        + ", ".join(
            f"{label_of(k)} {arms[k]['probe_again_seconds']:.2f} s"
            for k in (f"{m}/{t}" for m in MODES for t in TRANSPORTS)
        )
    )
    for mode in MODES:
        ratio = results["ratios"][f"{mode}_channel_over_object_store"]
        sync = results["ratios"][f"{mode}_sync_channel_over_object_store"]
        print(
            f"ratio channel / object store, {mode}: {ratio:.2f}x seconds end to end, "
            f"{sync:.2f}x the sync alone"
        )

    print(
        "\nPeak host memory above what the process held before the arm, MB "
        "(VmHWM at the end - VmRSS at the start; worst repeat):"
    )
    labels = list(results["processes"])
    keys = [f"{m}/{t}" for m in MODES for t in TRANSPORTS]
    names = {"full/object_store": "full/OS", "full/channel": "full/ch",
             "lora/object_store": "LoRA/OS", "lora/channel": "LoRA/ch"}  # fmt: skip
    print(f"{'process':<40}{'RSS MB':>9}" + "".join(f"{names[k]:>10}" for k in keys))
    for label in labels:
        rss = arms[keys[0]]["memory"][label]["before_bytes"] / MB
        cells = "".join(f"{arms[k]['memory'][label]['transient_bytes'] / MB:>10.0f}" for k in keys)
        print(f"{label:<40}{rss:>9.0f}{cells}")
    shmem = {
        label: max(arms[k]["memory"][label]["shmem_after_bytes"] for k in keys) for label in labels
    }
    print(
        "(RSS MB: at the start of the full object-store arm. What stays in RSS after the "
        "object-store arms is mostly pages of Ray's object store (shared memory) that the "
        "process wrote or read, at most: "
        + ", ".join(f"{label} {value / MB:.0f}" for label, value in shmem.items())
        + " MB)"
    )

    limit = results["memory_limit_bytes"]
    model = results["model"]["bytes_float32"]
    bucket = results["settings"]["bucket_bytes"]
    print("\nGoals (CPU, this run):")
    worst = max(a["probe_max_abs_diff"] for a in arms.values())
    print(
        f"  probe: engines match the learners, max |diff| {worst:.1e} < {TOLERANCE:g}: "
        f"{verdict(goals['probe_max_abs_diff_below_tolerance'])}"
    )
    for mode in MODES:
        ratio = results["ratios"][f"{mode}_channel_over_object_store"]
        print(
            f"  {mode}: channel no slower than the object store (channel / object store "
            f"{ratio:.2f} <= 1): {verdict(goals[f'{mode}_channel_no_slower'])}"
        )
    for mode in MODES:
        label = results["channel_peak_process"][mode]
        peak = arms[f"{mode}/channel"]["memory"][label]["transient_bytes"]
        print(
            f"  {mode}: channel arm, every process under model size + one bucket "
            f"({model / MB:.0f} + {bucket / MB:.0f} = {limit / MB:.0f} MB; highest "
            f"{peak / MB:.0f} MB, {label}): "
            f"{verdict(goals[f'{mode}_channel_memory_under_model_plus_bucket'])}"
        )

    q = results["qwen7b"]
    print(
        f"\nQwen2.5-VL-7B ({q['parameters'] / 1e9:.1f}B parameters), EXTRAPOLATED from this "
        "run's CPU/gloo GB/s (end to end; sync alone in brackets), not measured:"
    )
    for key in keys:
        e, a = q["extrapolation"][key], arms[key]
        print(
            f"  {label_of(key):<36} {e['bytes'] / GB:6.2f} GB at {a['gb_per_s']:.4f} GB/s "
            f"= {e['seconds']:8.1f} s ({e['sync_seconds']:.1f} s)"
        )
    print(
        f"  (full: {q['full_bytes'] / GB:.1f} GB in bf16; LoRA r=64 on the 7 projections: "
        f"{q['lora_parameters'] / 1e6:.0f}M parameters, {q['adapter_bytes'] / GB:.2f} GB as "
        f"fp32 adapter files, or merged: the full {q['full_bytes'] / GB:.1f} GB over the channel)"
    )
    print(
        f"GPU goals: 7B full sync within {GPU_GOALS_S['full']:.0f} s, LoRA within "
        f"{GPU_GOALS_S['lora']:.0f} s: to measure on a GPU (scripts/gpu_check.sh)"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--workers", type=int, default=2, help="vLLM rollout engines")
    parser.add_argument("--repeats", type=int, default=3, help="syncs per arm (median)")
    parser.add_argument("--hidden-size", type=int, default=1024)
    parser.add_argument("--layers", type=int, default=13)
    parser.add_argument("--lora-rank", type=int, default=None, help="default 64 (8 with --small)")
    parser.add_argument(
        "--bucket-mb", type=int, default=256, help="channel bucket, MiB (sync.bucket_mb)"
    )
    parser.add_argument("--image-size", type=int, default=112, help="probe images, pixels")
    parser.add_argument(
        "--child-process",
        action="store_true",
        help="engine cores in a child process of each rollout actor (vLLM's GPU layout)",
    )
    parser.add_argument(
        "--small", action="store_true", help="the tiny test model (hidden 128, 2 layers), LoRA r=8"
    )
    parser.add_argument(
        "--worker-logs", action="store_true", help="print the actors' (vLLM's) logs too"
    )
    parser.add_argument("--json", type=Path, help="also write the results here")
    args = parser.parse_args()
    if args.small:
        args.hidden_size = TINY_MODEL_DEFAULTS["hidden_size"]
        args.layers = TINY_MODEL_DEFAULTS["num_layers"]
    if args.lora_rank is None:
        args.lora_rank = 8 if args.small else 64
    if args.repeats < 1 or args.workers < 1:
        parser.error("--repeats and --workers must be at least 1")

    started = time.perf_counter()
    use_mmap_threshold()
    os.environ.update(MALLOC_ENV)  # Ray's processes start with it (they inherit this one's)
    work = tempfile.mkdtemp(prefix="mmrad-weight-sync-")
    ray_dir = tempfile.mkdtemp(prefix="mws-")  # short: Ray's socket paths live below
    try:
        results = run(args, work, ray_dir)
    finally:
        import ray

        ray.shutdown()
        shutil.rmtree(work, ignore_errors=True)
        shutil.rmtree(ray_dir, ignore_errors=True)
    results["seconds"] = time.perf_counter() - started
    report(results)
    publish_entries(results)
    print(f"\n{results['seconds']:.0f} s")
    if args.json:
        args.json.write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
