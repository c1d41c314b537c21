"""Reward-weight sweeps on Ray Tune (``mmrad tune`` / ``python -m ray_jobs.tune``).

- ``space``: the search space declared in YAML (dotted GRPO keys → distributions) and how
  a trial's values are set on a GRPO config. Pure: no Ray Tune objects until asked.
- ``config``: :class:`~mmrad.tune.config.TuneJobConfig` and each trial's base GRPO config.
- ``job``: the sweep (each trial a short GRPO run, ASHA on ``val/objective``, resume).
- ``report``: the trials' table, the objective figure and the best trial's GRPO config.

The objective itself (a sum of validation rates) is :func:`mmrad.task.metrics.objective_value`,
which GRPO's validation computes: rl never imports tune.

Importing this package imports neither Ray nor torch.
"""
