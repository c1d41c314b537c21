"""The GRPO config's ``rewards`` section: a preset with weights and parameters on top."""

import typing

import pytest

from mmrad.config import ConfigError, dump_config, load_config
from mmrad.rl.config import GRPOJobConfig, RewardSection
from mmrad.task.rewards import REWARD_PRESETS, resolve_rewards
from mmrad.tune.space import apply_params

LOCAL, CLUSTER = "configs/local/grpo.yaml", "configs/cluster/grpo.yaml"


def test_the_preset_names_are_the_presets():
    names = typing.get_args(RewardSection.model_fields["preset"].annotation)
    assert set(names) == set(REWARD_PRESETS)


def test_the_default_is_the_paper_preset():
    section = RewardSection()
    assert section.preset == "paper"
    assert section.resolved() == resolve_rewards("paper")


@pytest.mark.parametrize("path", [LOCAL, CLUSTER])
def test_shipped_grpo_configs_use_the_paper_preset(path):
    rewards = load_config(GRPOJobConfig, path).rewards
    assert rewards.preset == "paper"
    assert rewards.resolved() == resolve_rewards("paper")


def test_given_weights_and_params_go_on_top_of_the_preset():
    overrides = ["rewards.preset=legacy", "rewards.weights.label=0.5",
                 "rewards.params.localization.threshold=0.1"]  # fmt: skip
    weights, params = load_config(GRPOJobConfig, LOCAL, overrides).rewards.resolved()
    assert weights == {"format": 0.5, "detection": 1.0, "localization": 1.0, "label": 0.5}
    legacy = REWARD_PRESETS["legacy"].params["localization"]
    assert params["localization"] == {**legacy, "threshold": 0.1}


def test_preset_none_takes_the_weights_given_alone():
    overrides = ["rewards.preset=none", "rewards.weights={format: 1.0}"]
    assert load_config(GRPOJobConfig, LOCAL, overrides).rewards.resolved()[0] == {"format": 1.0}


def test_a_dumped_config_keeps_the_preset_and_what_was_given(tmp_path):
    job = load_config(GRPOJobConfig, LOCAL, ["rewards.params.missed_boxes.threshold=0.3"])
    path = tmp_path / "config.yaml"
    path.write_text(dump_config(job))
    again = load_config(GRPOJobConfig, path)
    assert again.rewards == job.rewards
    assert again.rewards.params == {"missed_boxes": {"threshold": 0.3}}
    assert again.rewards.resolved() == job.rewards.resolved()
    # a changed preset on the dump applies whole: no hybrid of two presets
    legacy = load_config(GRPOJobConfig, path, ["rewards.preset=legacy"]).rewards.resolved()
    assert legacy[0] == REWARD_PRESETS["legacy"].weights


def test_weights_without_a_preset_are_refused_naming_the_choice():
    """A config written before presets (a run's old config.yaml) meant other defaults."""
    old = {"weights": {"format": 0.5, "detection": 1.0, "localization": 1.0}}
    with pytest.raises(ValueError, match="without a preset: give preset: paper"):
        RewardSection.model_validate(old)
    assert RewardSection.model_validate({**old, "preset": "legacy"}).resolved() == (
        resolve_rewards("legacy")
    )


def test_a_sweep_sets_one_parameter_or_weight_on_the_dumped_base():
    """Tune's trials start from the validated base dumped to a dict (mmrad.tune.config)."""
    base = load_config(GRPOJobConfig, CLUSTER).model_dump(mode="json")
    point = {"rewards.params.missed_boxes.threshold": 0.3, "rewards.weights.localization": 1.5,
             "rewards.params.localization.threshold": 0.1}  # fmt: skip
    weights, params = GRPOJobConfig.model_validate(apply_params(base, point)).rewards.resolved()
    assert weights == {"format": 1.0, "detection": 1.0, "missed_boxes": -0.2,
                       "localization": 1.5}  # fmt: skip
    assert params["missed_boxes"] == {"threshold": 0.3}
    assert params["localization"]["threshold"] == 0.1


@pytest.mark.parametrize(
    ("override", "match"),
    [
        ("rewards.preset=paperish", r"rewards\.preset.*'paper', 'legacy' or 'none'"),
        ("rewards.weights.speed=1", r"rewards.*weights: unknown component.*'speed'"),
        ("rewards.params.missed_boxes.tresh=0.3", r"unknown parameter.*'tresh'.*'missed_boxes'"),
        ("rewards.weights=3", r"rewards\.weights.*valid dictionary"),
    ],
)
def test_bad_rewards_name_the_key(override, match):
    with pytest.raises(ConfigError, match=match):
        load_config(GRPOJobConfig, LOCAL, [override])
