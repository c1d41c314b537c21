"""The pipeline configs of ``configs/cluster/ablations/``: each plans offline as ``mmrad
pipeline`` does before it starts anything (every stage's job config resolved and
validated; no Ray, no object store), and differs from the reproduction
(``configs/cluster/pipeline.yaml``) in the setting it ablates and nowhere else."""

from __future__ import annotations

import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest

from mmrad.config import PipelineConfig, load_config, read_yaml
from mmrad.pipeline import plan
from mmrad.storage import join

REPO = Path(__file__).resolve().parents[1]
ABLATIONS = "configs/cluster/ablations"
BASE = "configs/cluster/pipeline.yaml"
ABSENT = "<absent>"
SFT_EXPORT, GRPO_EXPORT = "<run>/sft/export", "<run>/grpo/export"

# file -> (stages it drops, {stage: {dotted key: its value there}} where it differs)
EXPECTED: dict[str, tuple[set[str], dict[str, dict[str, Any]]]] = {
    "grpo_plain.yaml": (set(), {}),  # the reproduction's algorithm, pinned
    "grpo_dapo.yaml": (set(), {"grpo": {
        "algorithm.clip_high": 0.28, "algorithm.aggregation": "token-mean",
        "algorithm.tis_cap": 2.0, "algorithm.dynamic_sampling": True,
        "algorithm.contrastive_sampling": False}}),
    "reward_legacy.yaml": (set(), {"grpo": {"rewards.preset": "legacy"}}),
    # the base model's evaluation is prompted as SFT trains (mmrad.pipeline.base_prompt)
    "no_reference.yaml": (set(), {"sft": {"prompt.use_reference": False},
                                  "eval_base": {"prompt.use_reference": False}}),
    "no_domain_knowledge.yaml": (set(), {"sft": {"prompt.domain_knowledge": False},
                                         "eval_base": {"prompt.domain_knowledge": False}}),
    "no_reasoning.yaml": (set(), {"sft": {"prompt.reasoning": False},
                                  "eval_base": {"prompt.reasoning": False}}),
    "rl_without_sft.yaml": ({"sft", "eval_sft"}, {"grpo": {
        "model.path": "Qwen/Qwen2.5-VL-7B-Instruct", "prompt.use_reference": True,
        "prompt.domain_knowledge": True, "prompt.reasoning": True,
        "prompt.knowledge_file": "s3://my-mmrad-bucket/datasets/mmr-ad/domain_knowledge.json"}}),
    "sft_only.yaml": ({"grpo", "eval_sft"}, {
        "eval": {"target.path": SFT_EXPORT},
        "serve": {"serve_config.applications.0.args.model_dir": SFT_EXPORT}}),
}  # fmt: skip


@pytest.fixture(autouse=True)
def _at_the_repo(monkeypatch):
    monkeypatch.chdir(REPO)  # stage configs name files relative to the repository


def flat(value: Any, prefix: str = "") -> dict[str, Any]:
    """Leaves by dotted key; list items by their index."""
    if isinstance(value, Mapping) and value:
        items = value.items()
    elif isinstance(value, list) and value:
        items = enumerate(value)
    else:
        return {prefix[:-1]: value}
    leaves: dict[str, Any] = {}
    for key, item in items:
        leaves.update(flat(item, f"{prefix}{key}."))
    return leaves


def normalised(value: Any, run_uri: str) -> Any:
    """The run's folder as ``<run>``, a stage folder without its hash (``sft-1a2b…`` is
    ``sft``): what differs between two runs of the same stages."""
    if not isinstance(value, str):
        return value
    value = value.replace(run_uri, "<run>")
    return re.sub(r"/([a-z_]+)-[0-9a-f]{10}(?=/|$)", r"/\1", value)


def planned(path: str) -> dict[str, dict[str, Any]]:
    """Each planned stage's resolved job config, flat and normalised."""
    config = load_config(PipelineConfig, path)
    run_uri = join(config.run.storage_path, config.run.name)
    return {
        stage.name: {key: normalised(value, run_uri)
                     for key, value in flat(stage.job.model_dump(mode="json")).items()}
        for stage in plan(config, run_uri)
    }  # fmt: skip


def changes(base: Mapping[str, Any], other: Mapping[str, Any]) -> dict[str, Any]:
    keys = set(base) | set(other)
    return {k: other.get(k, ABSENT) for k in keys if base.get(k, ABSENT) != other.get(k, ABSENT)}


def test_every_ablation_file_is_checked_here():
    assert sorted(path.name for path in (REPO / ABLATIONS).glob("*.yaml")) == sorted(EXPECTED)


@pytest.mark.parametrize("name", list(EXPECTED))
def test_an_ablation_changes_its_setting_and_nothing_else(name):
    base, ablation = planned(BASE), planned(f"{ABLATIONS}/{name}")
    dropped, expected = EXPECTED[name]
    assert set(base) - set(ablation) == dropped
    assert set(ablation) <= set(base)
    found = {stage: changes(base[stage], ablation[stage]) for stage in ablation}
    assert {stage: diff for stage, diff in found.items() if diff} == expected


@pytest.mark.parametrize("name", EXPECTED)
def test_an_ablation_extends_the_reproduction_and_says_how_to_run_it(name):
    path = REPO / ABLATIONS / name
    text = path.read_text()
    assert text.startswith("# "), "a header comment says what the file ablates"
    assert f"--config {ABLATIONS}/{name}" in text
    assert "extends: ../pipeline.yaml" in text


def test_every_ablation_runs_under_its_own_name():
    names = [read_yaml(REPO / ABLATIONS / name)["run"]["name"] for name in EXPECTED]
    assert len(set(names)) == len(names)
    assert read_yaml(REPO / BASE)["run"]["name"] not in names


def test_rl_without_sft_prompts_the_base_model_as_the_reproduction_trains_sft():
    """The base model has no mmrad.json: GRPO is given the prompt SFT would have trained."""
    keys = ("prompt.use_reference", "prompt.domain_knowledge", "prompt.reasoning")
    sft = planned(BASE)["sft"]
    grpo = planned(f"{ABLATIONS}/rl_without_sft.yaml")["grpo"]
    assert {key: grpo[key] for key in keys} == {key: sft[key] for key in keys}


def test_the_reproduction_is_the_papers_plain_grpo():
    grpo = planned(BASE)["grpo"]
    assert {key: grpo[key] for key in (
        "algorithm.clip_low", "algorithm.clip_high", "algorithm.aggregation",
        "algorithm.tis_cap", "algorithm.contrastive_sampling", "rewards.preset")} == {
        "algorithm.clip_low": 0.2, "algorithm.clip_high": 0.2,
        "algorithm.aggregation": "seq-mean-token-mean", "algorithm.tis_cap": None,
        "algorithm.contrastive_sampling": True, "rewards.preset": "paper"}  # fmt: skip
