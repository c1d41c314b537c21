"""What a reward-weight sweep searches over and how its results are read back.

A search space is declared in YAML as dotted GRPO config keys, each with a distribution::

    search_space:
      rewards.weights.localization: {uniform: [0.5, 2.0]}
      rewards.params.localization.threshold: {choice: [0.3, 0.5, 0.7]}
      optimizer.lr: {loguniform: [1.0e-6, 1.0e-4]}

Pure: no Ray Tune objects are built until :func:`to_tune_space` is called.
"""

from __future__ import annotations

import copy
from collections.abc import Mapping
from typing import Any

from pydantic import Field, model_validator

from mmrad.config import Section

DISTRIBUTIONS = ("uniform", "loguniform", "choice", "grid")


class Dimension(Section):
    """Exactly one of: ``uniform: [low, high]``, ``loguniform: [low, high]``,
    ``choice: [values]`` (sampled), ``grid: [values]`` (every value, times num_samples)."""

    uniform: tuple[float, float] | None = None
    loguniform: tuple[float, float] | None = None
    choice: list[Any] | None = Field(None, min_length=1)
    grid: list[Any] | None = Field(None, min_length=1)

    @model_validator(mode="after")
    def _exactly_one(self) -> Dimension:
        given = [name for name in DISTRIBUTIONS if getattr(self, name) is not None]
        if len(given) != 1:
            raise ValueError(f"give exactly one of {list(DISTRIBUTIONS)}, got {given or 'none'}")
        for name in ("uniform", "loguniform"):
            bounds = getattr(self, name)
            if bounds is not None and not bounds[0] < bounds[1]:
                raise ValueError(f"{name}: low {bounds[0]} must be below high {bounds[1]}")
            if name == "loguniform" and bounds is not None and bounds[0] <= 0:
                raise ValueError(f"loguniform: low {bounds[0]} must be positive")
        return self

    def example(self) -> Any:
        """One value the dimension can take (to check a config before sweeping)."""
        for name in DISTRIBUTIONS:
            values = getattr(self, name)
            if values is not None:
                return values[0]
        raise AssertionError("unreachable: exactly one distribution is set")

    def to_tune(self) -> Any:
        from ray import tune

        if self.uniform is not None:
            return tune.uniform(*self.uniform)
        if self.loguniform is not None:
            return tune.loguniform(*self.loguniform)
        if self.choice is not None:
            return tune.choice(self.choice)
        return tune.grid_search(self.grid)


def to_tune_space(space: Mapping[str, Dimension]) -> dict[str, Any]:
    """``{dotted key: Ray Tune domain}`` (Tune's param_space, flat keys)."""
    return {key: dimension.to_tune() for key, dimension in space.items()}


def apply_params(config: Mapping[str, Any], params: Mapping[str, Any]) -> dict[str, Any]:
    """A deep copy of a config dict with each dotted ``key: value`` of ``params`` set;
    a missing intermediate section is created (the config model validates it after)."""
    result = copy.deepcopy(dict(config))
    for dotted, value in params.items():
        node = result
        *parents, leaf = dotted.split(".")
        for part in parents:
            child = node.get(part)
            if not isinstance(child, dict):
                child = node[part] = {}
            node = child
        node[leaf] = value
    return result
