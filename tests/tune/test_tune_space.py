"""The sweep's search-space declaration, parameter application and objective."""

from __future__ import annotations

import pytest
from pydantic import ValidationError
from ray import tune

from mmrad.task.metrics import objective_value
from mmrad.tune.space import Dimension, apply_params, to_tune_space


def test_each_distribution_becomes_its_tune_domain():
    space = to_tune_space(
        {
            "a": Dimension(uniform=(0.5, 2.0)),
            "b": Dimension(loguniform=(1e-6, 1e-4)),
            "c": Dimension(choice=[0.3, 0.5]),
            "d": Dimension(grid=[1, 2, 3]),
        }
    )
    assert isinstance(space["a"], tune.search.sample.Float)
    assert (space["a"].lower, space["a"].upper) == (0.5, 2.0)
    assert isinstance(space["b"].sampler, tune.search.sample.LogUniform)
    assert space["c"].categories == [0.3, 0.5]
    assert space["d"] == {"grid_search": [1, 2, 3]}


@pytest.mark.parametrize(
    "given, message",
    [
        ({}, "exactly one"),
        ({"uniform": (1.0, 2.0), "choice": [1]}, "exactly one"),
        ({"uniform": (2.0, 1.0)}, "below high"),
        ({"loguniform": (0.0, 1.0)}, "positive"),
        ({"choice": []}, "at least 1"),
        ({"normal": (0, 1)}, "normal"),
    ],
)
def test_bad_dimensions_are_named(given, message):
    with pytest.raises(ValidationError, match=message):
        Dimension.model_validate(given)


def test_apply_params_sets_dotted_keys_without_touching_the_input():
    base = {"rewards": {"weights": {"format": 1.0}}, "algorithm": {"lr": 1e-5}}
    out = apply_params(base, {"rewards.weights.localization": 2.0, "algorithm.lr": 3e-5,
                              "algorithm.kl.beta": 0.01})  # fmt: skip
    assert out == {
        "rewards": {"weights": {"format": 1.0, "localization": 2.0}},
        "algorithm": {"lr": 3e-5, "kl": {"beta": 0.01}},
    }
    assert base == {"rewards": {"weights": {"format": 1.0}}, "algorithm": {"lr": 1e-5}}


def test_objective_sums_the_named_metrics_and_is_undefined_when_one_is():
    metrics = {"det_accuracy": 0.75, "loc_accuracy": 0.25, "loc_f1": None}
    assert objective_value(metrics, ["det_accuracy", "loc_accuracy"]) == 1.0
    assert objective_value(metrics, ["det_accuracy"]) == 0.75
    assert objective_value(metrics, ["loc_f1"]) is None
    assert objective_value(metrics, ["missing"]) is None
