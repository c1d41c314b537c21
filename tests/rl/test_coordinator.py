"""The GRPO loop's pure logic: rewards on parsed completions, dynamic and contrastive
sampling, advantages and learner shards, metrics, the config's cross-field rules, and
the learner's log-prob and loss-weighting helpers. No Ray, no engine."""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from mmrad.config import ConfigError, load_config, validate_config
from mmrad.rl.batch import (
    Group,
    RewardSpec,
    adversarial_hint,
    build_batch,
    choose_probe,
    fill_batch,
    ground_truth_answer,
    needs_more,
    repair_group,
    sample_rows,
    scored_sample,
    trainable_prefix,
    verdict_of,
)
from mmrad.rl.config import GRPOJobConfig, SyncSection
from mmrad.rl.inputs import padded
from mmrad.rl.learner import aggregation_units, split_evenly
from mmrad.rl.making import reward_spec
from mmrad.rl.metrics import (
    advantage_metrics,
    critical_sync,
    hidden_share,
    markdown_table,
    rollout_metrics,
    step_overhead,
)
from mmrad.rl.prompts import DataPosition, PromptItem, prompt_id
from mmrad.storage import Storage
from mmrad.task.prompt import PromptVariant
from tests.conftest import TEST_BUCKET

SPEC = RewardSpec({"format": 0.5, "detection": 1.0, "localization": 1.0})


def item(anomalous: bool, name: str = "a", reasoning: str | None = "looked closely") -> PromptItem:
    """A 200 x 100 query on a 112 x 56 model grid."""
    record = {
        "id": name, "source": "synthetic", "category": "brick", "width": 200, "height": 100,
        "is_anomalous": anomalous, "boxes": [[20.0, 10.0, 60.0, 50.0]] if anomalous else [],
        "labels": ["scratch"] if anomalous else [], "reasoning": reasoning,
    }  # fmt: skip
    return PromptItem(prompt_id(name, 0), record, np.zeros((56, 112, 3), np.uint8), None)


def sample(prompt: PromptItem, text: str, version: int = 0, logprobs=(-0.5,)):
    return scored_sample(
        prompt, SPEC, text=text, token_ids=(1, 2), logprobs=logprobs, version=version
    )


YES_BOX = "<think>t</think><answer>Yes. {'bbox_2d': [11, 6, 34, 28], 'label': 'scratch'}</answer>"
NO = "<think>t</think><answer>No.</answer>"
BROKEN = "<think>t"


def group(prompt: PromptItem, *texts: str) -> Group:
    return Group(prompt, tuple(sample(prompt, t) for t in texts))


# -- rewards ---------------------------------------------------------------------------


def test_rewards_read_boxes_on_the_model_grid():
    anomalous = item(True)
    # Grid box [11, 6, 34, 28] is [19.6, 10.7, 60.7, 50] in original pixels: IoU > 0.5.
    right = sample(anomalous, YES_BOX)
    assert right.components == {"format": 1.0, "detection": 1.0, "localization": 1.0,
                                "label": 1.0, "missed_boxes": 0.0}  # fmt: skip
    assert right.reward == pytest.approx(2.5) and right.decision_right
    wrong = sample(anomalous, NO)
    assert wrong.reward == pytest.approx(0.5) and not wrong.decision_right
    assert sample(anomalous, BROKEN).reward == 0.0


def test_ground_truth_answer_is_a_full_score_positive():
    anomalous = item(True)
    text = ground_truth_answer(anomalous, reasoning=True, fallback_reasoning="generic")
    assert text.startswith("<think>looked closely</think><answer>Yes. ")
    assert "[11, 6, 34, 28]" in text  # to_model_grid of [20, 10, 60, 50] (200x100 → 112x56)
    assert sample(anomalous, text).reward == pytest.approx(2.5)
    no_reasoning = item(False, reasoning=None)
    assert ground_truth_answer(no_reasoning, True, "generic") == (
        "<think>generic</think><answer>No.</answer>"
    )
    assert ground_truth_answer(no_reasoning, False, "generic") == "<answer>No.</answer>"
    assert '"No."' in adversarial_hint(item(True)) and '"Yes."' in adversarial_hint(item(False))


def test_cell_answers_are_written_and_read_in_cells_of_the_model_grid():
    """Cells of 28 grid pixels: [20, 10, 60, 50] on 200 x 100 is [11.2, 5.6, 33.6, 28]
    on the 112 x 56 grid, which overlaps cell columns 0-1 and row 0."""
    anomalous, cells = item(True), dataclasses.replace(SPEC, answer_unit=28)
    text = ground_truth_answer(anomalous, False, "generic", answer_unit=28)
    assert text == "<answer>Yes. {'bbox_2d': [0, 0, 2, 1], 'label': 'scratch'}</answer>"
    verdict = verdict_of(text, anomalous, require_think=False, answer_unit=28)
    assert verdict.boxes == [[0.0, 0.0, pytest.approx(100.0), pytest.approx(50.0)]]
    think = "<think>t</think>" + text
    as_cells = scored_sample(anomalous, cells, text=think, token_ids=(1,), logprobs=None,
                             version=0)  # fmt: skip
    assert as_cells.components["missed_boxes"] == 0.0  # IoU 0.32 with the record's box
    # the same answer read as pixels is a box of a few pixels: it misses
    assert sample(anomalous, think).components["missed_boxes"] == 1.0


def test_a_runs_rewards_read_boxes_in_its_variants_units_on_its_grid():
    job = load_config(
        GRPOJobConfig,
        "configs/local/grpo.yaml",
        ["model.pixels.factor=32", "data.pixels.factor=32"],
    )
    assert reward_spec(job, PromptVariant()).answer_unit == 1
    cells = reward_spec(job, PromptVariant(reasoning=False, box_units="cells"))
    assert (cells.answer_unit, cells.require_think) == (32, False)


def test_sampled_vision_tokens_end_the_trainable_prefix():
    prompt = item(True)
    kept = scored_sample(prompt, SPEC, text=YES_BOX, token_ids=(5, 6, 99, 7), version=0,
                         logprobs=(-0.1, -0.2, -0.3, -0.4), forbidden=frozenset({99}))  # fmt: skip
    assert kept.token_ids == (5, 6) and kept.sampling_logprobs == (-0.1, -0.2)
    assert kept.reward == pytest.approx(2.5)  # the whole text is still judged
    assert trainable_prefix((99, 1), None, frozenset({99})) == ((), None)
    assert trainable_prefix((1, 2), (-1.0, -2.0), frozenset()) == ((1, 2), (-1.0, -2.0))


# -- contrastive and dynamic sampling -------------------------------------------------------


def test_contrastive_repair_adds_a_positive_to_failing_groups():
    prompt = item(True)
    failing = group(prompt, BROKEN, BROKEN, BROKEN, BROKEN)
    positive = sample(prompt, ground_truth_answer(prompt, True, "g"), logprobs=None)
    repaired, kind = repair_group(failing, positive, [])
    assert kind == "positive" and repaired.has_variance
    assert [s.replaced for s in repaired.samples] == ["", "", "", "positive"]
    assert repaired.samples[-1].sampling_logprobs is None
    assert len(repaired.samples) == 4  # the group size stays G


def test_contrastive_repair_adds_the_first_lower_negative_to_perfect_groups():
    prompt = item(True)
    perfect = group(prompt, YES_BOX, YES_BOX, YES_BOX)
    positive = sample(prompt, YES_BOX, logprobs=None)
    not_lower = sample(prompt, YES_BOX, logprobs=None)
    lower = sample(prompt, NO, logprobs=None)
    repaired, kind = repair_group(perfect, positive, [not_lower, lower])
    assert kind == "negative" and repaired.samples[-1].text == NO
    assert repaired.samples[-1].replaced == "negative"
    unchanged, none = repair_group(perfect, positive, [not_lower])
    assert none == "" and unchanged is perfect
    varied = group(prompt, YES_BOX, NO)
    assert repair_group(varied, positive, [lower]) == (varied, "")


def test_dynamic_sampling_keeps_useful_groups_in_draw_order():
    a, b, c, d = (item(True, n) for n in "abcd")
    flat_a = group(a, NO, NO)
    useful_b = group(b, NO, YES_BOX)
    flat_c = group(c, YES_BOX, YES_BOX)
    useful_d = group(d, YES_BOX, BROKEN)
    groups = [flat_a, useful_b, flat_c, useful_d]
    assert needs_more(groups, 3, dynamic=True) == 1
    assert needs_more(groups, 3, dynamic=False) == 0
    kept, left = fill_batch(groups, 2, dynamic=True)
    assert kept == [useful_b, useful_d] and left == [flat_a, flat_c]
    kept, left = fill_batch(groups, 3, dynamic=True)  # tries ran out: fill with flat ones
    assert kept == [flat_a, useful_b, useful_d] and left == [flat_c]
    kept, _ = fill_batch(groups, 2, dynamic=False)
    assert kept == [flat_a, useful_b]


# -- batch and shards ---------------------------------------------------------------------


def test_batch_advantages_and_contiguous_shards():
    a, b = item(True, "a"), item(False, "b")
    groups = [group(a, YES_BOX, NO, NO, BROKEN), group(b, NO, NO, NO, NO)]
    batch = build_batch(4, groups, group_size=4, scale="std")
    rewards = [2.5, 0.5, 0.5, 0.0]
    mean = sum(rewards) / 4
    std = math.sqrt(sum((r - mean) ** 2 for r in rewards) / 3)
    assert batch.advantages[:4] == pytest.approx([(r - mean) / (std + 1e-6) for r in rewards])
    assert batch.advantages[4:] == [0.0] * 4
    batch.metrics, batch.drawn = {"x": 1.0}, ["a@0", "c@0", "b@0"]
    first, second = batch.shard(0, 2), batch.shard(1, 2)
    assert [p.prompt_id for p in first.prompts] == ["a@0"]
    assert [p.prompt_id for p in second.prompts] == ["b@0"]
    assert [s.advantage for s in first.samples + second.samples] == batch.advantages
    assert first.metrics == {"x": 1.0} and second.metrics == {}
    assert first.drawn == ["a@0", "c@0", "b@0"] and first.used == ["a@0", "b@0"]
    with pytest.raises(ValueError, match="do not split"):
        batch.shard(0, 3)
    with pytest.raises(ValueError, match="expected 3"):
        build_batch(0, groups, group_size=3, scale="std")


def test_probe_and_sample_table_skip_nothing_they_should_not():
    a = item(True)
    written = dataclasses.replace(sample(a, NO), token_ids=(7,), replaced="positive")
    assert choose_probe([Group(a, (written, sample(a, NO)))]).token_ids == (1, 2)
    assert choose_probe([Group(a, (written,))]) is None
    rows = sample_rows(3, [group(a, YES_BOX, NO)], [0.7, -0.7], limit=1)
    assert len(rows) == 1 and rows[0]["reward/localization"] == 1.0
    assert rows[0]["step"] == 3 and rows[0]["advantage"] == 0.7
    table = markdown_table(rows)
    assert table.splitlines()[0].startswith("| prompt_id | category |")
    assert "\\|" not in table.splitlines()[0]


# -- metrics -----------------------------------------------------------------------------


def test_rollout_metrics_name_what_they_measure():
    a, b = item(True, "a"), item(False, "b")
    metrics = rollout_metrics([group(a, YES_BOX, NO), group(b, NO, NO)], group_size=2)
    assert metrics["reward/total/mean"] == pytest.approx((2.5 + 0.5 + 1.5 + 1.5) / 4)
    assert metrics["reward/format/mean"] == 1.0 and metrics["reward/format/std"] == 0.0
    assert metrics["rollout/det_accuracy"] == 0.75
    assert metrics["groups/zero_variance_share"] == 0.5
    assert metrics["rollout/incomplete_groups"] == 0.0
    assert metrics["completions/max_length"] == 2.0
    assert advantage_metrics([1.0, -1.0]) == {
        "advantages/mean": 0.0, "advantages/std": 1.0, "advantages/max": 1.0,
        "advantages/min": -1.0,
    }  # fmt: skip
    assert hidden_share(10.0, 2.5) == 0.75
    assert hidden_share(10.0, 20.0) == 0.0 and hidden_share(0.0, 1.0) == 0.0


def test_step_overhead_counts_only_the_sync_the_learners_wait_through():
    # over the channel the engines receive while the previous step sent (0.5 s): only
    # their 0.2 s past it is waited for; through the object store all 0.7 s is
    assert critical_sync(0.3, 0.7, previous_gather=0.5, channel=True) == pytest.approx(0.5)
    assert critical_sync(0.3, 0.4, previous_gather=0.5, channel=True) == pytest.approx(0.3)
    assert critical_sync(0.3, 0.7, previous_gather=0.5, channel=False) == pytest.approx(1.0)
    step = {"time/step": 10.0, "time/generation": 5.0, "time/learner": 4.0,
            "time/sync_critical": 0.5, "time/sync": 0.9, "time/between_steps": 0.2}  # fmt: skip
    assert step_overhead(step) == pytest.approx(0.3)


def test_data_position_round_trips():
    position = DataPosition(2, 7)
    assert DataPosition.from_dict(position.to_dict()) == position


# -- learner helpers ----------------------------------------------------------------------


def test_padded_sampling_logprobs_mask_missing_rows():
    values, mask = padded([(-1.0, -2.0), None, (-3.0,)], 2)
    assert values.tolist() == [[-1.0, -2.0], [0.0, 0.0], [-3.0, 0.0]]
    assert mask.tolist() == [[True, True], [False, False], [True, False]]


def test_a_micro_batch_weighs_what_its_loss_averages_over():
    mask = torch.tensor([[1, 1, 0], [1, 0, 0], [0, 0, 0]])
    assert aggregation_units(mask, "token-mean") == 3.0
    assert aggregation_units(mask, "seq-mean-token-mean") == 2.0  # sequences with tokens
    assert aggregation_units(mask, "seq-mean-token-sum-norm") == 2.0
    assert split_evenly(list(range(6)), 3) == [[0, 1], [2, 3], [4, 5]]


# -- config ------------------------------------------------------------------------------


def test_config_cross_field_rules():
    job = load_config(GRPOJobConfig, "configs/local/grpo.yaml")
    assert job.lora.enabled and job.engine.enable_lora and job.batch_samples == 16
    full = load_config(GRPOJobConfig, "configs/local/grpo.yaml", ["sync.weights=full"])
    assert not full.lora.enabled
    with pytest.raises(ConfigError, match="contradicts sync.weights='full'"):
        load_config(
            GRPOJobConfig, "configs/local/grpo.yaml", ["sync.weights=full", "lora.enabled=true"]
        )
    with pytest.raises(ConfigError, match="split evenly"):
        uneven = ["rollout.prompts_per_step=3", "algorithm.mini_batches=4"]
        load_config(GRPOJobConfig, "configs/local/grpo.yaml", uneven)
    with pytest.raises(ConfigError, match="unknown component"):
        load_config(GRPOJobConfig, "configs/local/grpo.yaml", ["rewards.weights.speed=1"])
    with pytest.raises(ConfigError, match="unknown parameter"):
        load_config(GRPOJobConfig, "configs/local/grpo.yaml",
                    ["rewards.params.localization.tresh=0.3"])  # fmt: skip
    with pytest.raises(ConfigError, match="max_staleness"):
        load_config(GRPOJobConfig, "configs/local/grpo.yaml", ["algorithm.max_staleness=2"])
    with pytest.raises(ConfigError, match="max_lora_rank"):
        load_config(GRPOJobConfig, "configs/local/grpo.yaml", ["lora.r=64"])
    assert load_config(GRPOJobConfig, "configs/cluster/grpo.yaml").learners.use_gpu


def test_sync_is_a_section_and_the_old_scalar_is_refused_with_the_new_shape():
    job = load_config(GRPOJobConfig, "configs/local/grpo.yaml")
    assert job.sync == SyncSection(weights="lora", transport="auto", bucket_mb=256)
    for given in ("full", "lora"):
        for overrides in ([f"sync={given}"], []):  # override, and the scalar in a file's data
            with pytest.raises(ConfigError) as raised:
                if overrides:
                    load_config(GRPOJobConfig, "configs/local/grpo.yaml", overrides)
                else:
                    validate_config(GRPOJobConfig, {"sync": given})
            message = str(raised.value)
            assert "key 'sync': " in message and "sync is a section now" in message
            assert f"sync.weights={given}" in message
            assert f"sync: {{weights: {given}, transport: auto}}" in message
            assert "contradicts" not in message  # the scalar is the one error named
    with pytest.raises(ConfigError, match="sync is a section now"):
        validate_config(GRPOJobConfig, {"sync": "full", "lora": {"enabled": False}})
    with pytest.raises(ConfigError, match="sync.transport"):
        load_config(GRPOJobConfig, None, ["sync.transport=nccl"])
    with pytest.raises(ConfigError, match="sync.bucket_mb"):
        load_config(GRPOJobConfig, None, ["sync.bucket_mb=0"])


def test_sync_transport_resolves_auto_by_fsdp_version_and_keeps_an_explicit_one():
    auto = SyncSection()
    assert auto.transport == "auto"
    assert auto.resolved_transport(fsdp_version=2) == "collective"
    assert auto.resolved_transport(fsdp_version=1) == "object_store"
    for explicit in ("collective", "object_store"):
        assert SyncSection(transport=explicit).resolved_transport(fsdp_version=2) == explicit
    assert SyncSection(transport="object_store").resolved_transport(1) == "object_store"
    job = load_config(GRPOJobConfig, None, ["sync.transport=object_store", "sync.bucket_mb=64"])
    assert job.sync.resolved_transport(job.learners.fsdp.version) == "object_store"
    assert job.sync.bucket_mb == 64
    with pytest.raises(ConfigError, match="learners.fsdp.version=1 use sync.transport"):
        load_config(GRPOJobConfig, None, ["sync.transport=collective", "learners.fsdp.version=1"])
    fsdp1 = load_config(GRPOJobConfig, None, ["learners.fsdp.version=1"])
    assert fsdp1.sync.resolved_transport(fsdp1.learners.fsdp.version) == "object_store"


def test_full_weight_sync_turns_lora_off():
    for data in ({"sync": {"weights": "full"}}, {"sync": {"weights": "full", "transport": "auto"}}):
        job = validate_config(GRPOJobConfig, data)
        assert job.sync.weights == "full" and not job.lora.enabled
    full = load_config(GRPOJobConfig, "configs/local/grpo.yaml", ["sync.weights=full"])
    assert not full.lora.enabled and full.sync.transport == "auto"
    assert validate_config(GRPOJobConfig, {}).lora.enabled  # no sync section: LoRA
    assert validate_config(GRPOJobConfig, {"sync": {"transport": "collective"}}).lora.enabled
    in_code = GRPOJobConfig(sync=SyncSection(weights="full"))
    assert not in_code.lora.enabled


def test_validation_metrics_sum_the_objective_rates():
    from mmrad.rl.metrics import validation_metrics
    from mmrad.task.answer import Verdict

    normal, anomalous = item(False, "n").record, item(True, "a").record
    box = anomalous["boxes"][0]
    right = Verdict(True, [box], ["scratch"], format_ok=True)
    wrong = Verdict(True, [box], ["scratch"], format_ok=False)  # Yes on a normal image
    metrics = validation_metrics([right, wrong], [anomalous, normal], ["det_accuracy"])
    assert metrics["val/det_accuracy"] == metrics["val/objective"] == 0.5
    assert metrics["val/format_ok"] == 0.5 and metrics["val/loc_recall"] == 1.0
    both = validation_metrics([right, wrong], [anomalous, normal], ["det_accuracy", "loc_recall"])
    assert both["val/objective"] == 1.5
    only_normal = validation_metrics([wrong], [normal], ["loc_recall"])  # no boxes to find
    assert "val/objective" not in only_normal and "val/loc_recall" not in only_normal


def test_validation_needs_known_rates_and_runs_when_due():
    with pytest.raises(ConfigError, match="objective terms"):
        load_config(GRPOJobConfig, "configs/local/grpo.yaml", ["validation.objective=[f1]"])
    validation = load_config(
        GRPOJobConfig, "configs/local/grpo.yaml", ["validation.every=3"]
    ).validation
    assert [s for s in range(1, 8) if validation.due(s, max_steps=7)] == [3, 6, 7]
    assert not load_config(GRPOJobConfig, "configs/local/grpo.yaml").validation.due(7, 7)


@pytest.mark.parametrize("where", ["local", "s3"])
def test_the_coordinators_tokenizer_gives_transformers_ids(tiny_model, where, request):
    """Batch making reads ``tokenizer.json`` without transformers (from object storage
    that file alone, not the weights); its ids must be the ones the model's transformers
    tokenizer gives (vision tokens found, answers equal)."""
    from transformers import AutoTokenizer

    from mmrad.model.loading import ModelSource
    from mmrad.rl.making import END_OF_TURN_TOKEN, VISION_TOKENS, ids_tokenizer

    source = ModelSource(tiny_model)
    if where == "s3":
        request.getfixturevalue("s3_server")
        source = ModelSource(f"s3://{TEST_BUCKET}/models/tokenizer-only")
        Storage().write_bytes(f"{source.path}/tokenizer.json",
                              (Path(tiny_model) / "tokenizer.json").read_bytes())  # fmt: skip
    ours, theirs = ids_tokenizer(source), AutoTokenizer.from_pretrained(tiny_model)
    for token in (*VISION_TOKENS, END_OF_TURN_TOKEN):
        assert ours.token_to_id(token) == theirs.convert_tokens_to_ids(token) is not None, token
    for text in (YES_BOX, ground_truth_answer(item(True), True, "generic"), "héllo  wörld\n x"):
        assert ours.encode(text).ids == theirs.encode(text), text


def test_the_coordinator_and_the_pool_import_without_torch():
    """The coordinator's actor imports its module first thing; torch (and the
    torch.distributed modules that checkpoints pull in) come only when a batch is built,
    and never in the rollout pool's routing code."""
    import subprocess
    import sys

    code = (
        "import sys\nsys.modules['torch'] = None\n"
        "import mmrad.rl.coordinator, mmrad.rl.pool, mmrad.rl.weight_sender\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert done.returncode == 0, done.stderr[-2000:]
