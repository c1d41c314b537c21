"""What a GRPO run logs, named as TRL names it, and the sample table.

Per step (JSONL + TensorBoard through :class:`~mmrad.train.metrics_log.MetricsLog`):

- rewards over every rollout the step drew: ``reward/total/mean|std``,
  ``reward/<component>/mean|std``; ``rollout/det_accuracy`` (decision right);
- groups: ``groups/zero_variance_share`` (of the groups drawn), ``groups/draws``,
  ``groups/filled_zero_variance``, ``groups/contrastive_positive|negative``;
  ``rollout/groups``, ``rollout/samples``, ``rollout/incomplete_groups``;
- ``advantages/mean|std|max|min`` of the trained batch;
- ``completions/mean_length|max_length|min_length|clipped_ratio``;
- learner, under the names SFT uses too (:func:`mmrad.train.core.shared_metrics`):
  ``train/loss`` (policy loss plus the KL term), ``train/grad_norm``, ``train/lr``,
  ``perf/tokens_per_s`` (learner tokens per second of learner time),
  ``perf/peak_memory_mb_per_worker``; GRPO's own: ``loss/policy``, ``kl``, ``entropy``,
  ``clip_ratio/low_mean|high_mean|region_mean``, ``approx_kl``,
  ``mismatch/mean_abs|max_abs|kl``, ``tis/mean_weight|capped_share``;
- ``rollout/tokens_per_s``; ``time/rollout|reward|learner|sync|wait|step``,
  ``time/generation`` (the engines' own sampling time within ``time/rollout``),
  ``time/sync_critical`` (:func:`critical_sync`), ``time/between_steps`` (the previous
  step's validation, checkpoint and reports), ``time/overhead``
  (:func:`step_overhead`) and ``time/rollout_hidden_share``;
  ``version_lag`` (max) and ``version_lag/mean``;
- every ``validation.every`` steps: ``val/<metric>`` (the evaluation job's rates on
  greedy answers to held-out prompts), ``val/format_ok`` and ``val/objective``;
- after a sync check: ``sync/logprob_max_abs_diff`` (engines vs learner, new weights)
  and ``sync/logprob_max_abs_change`` (engines' new vs the learner's previous weights).

Every ``sample_table_every`` steps, a table of completions with their per-component
rewards goes to ``samples.jsonl`` beside ``metrics.jsonl`` and to TensorBoard as text.
"""

from __future__ import annotations

import json
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mmrad.rl.batch import Group
from mmrad.storage import Storage
from mmrad.task.answer import Verdict
from mmrad.task.metrics import RATE_KEYS, evaluate, objective_value
from mmrad.train.metrics_log import read_table

if TYPE_CHECKING:
    from mmrad.train.metrics_log import MetricsLog

SAMPLES_FILE = "samples.jsonl"
SAMPLE_TEXT_CHARS = 400  # a table cell's completion is cut here (the JSONL keeps it whole)

LEARNER_RENAMES = {
    "clip_fraction/low": "clip_ratio/low_mean",
    "clip_fraction/high": "clip_ratio/high_mean",
    "clip_fraction": "clip_ratio/region_mean",
    "logprob_mismatch/mean_abs": "mismatch/mean_abs",
    "logprob_mismatch/max_abs": "mismatch/max_abs",
    "logprob_mismatch/kl": "mismatch/kl",
}
"""``mmrad.rl.grpo``'s metric names → the names the run logs."""


def mean_std(values: Sequence[float]) -> tuple[float, float]:
    """Mean and population standard deviation (0 for fewer than two values)."""
    if not values:
        return 0.0, 0.0
    mean = sum(values) / len(values)
    return mean, statistics.pstdev(values) if len(values) > 1 else 0.0


def rollout_metrics(groups: Sequence[Group], group_size: int) -> dict[str, float]:
    """Rewards, detection accuracy, group variance and completion lengths over every
    group the step drew, as sampled (before contrastive replacement)."""
    samples = [s for g in groups for s in g.samples]
    metrics: dict[str, float] = {
        "rollout/groups": float(len(groups)),
        "rollout/samples": float(len(samples)),
        "rollout/incomplete_groups": float(sum(len(g.samples) != group_size for g in groups)),
    }
    if not samples:
        return metrics
    metrics["reward/total/mean"], metrics["reward/total/std"] = mean_std(
        [s.reward for s in samples]
    )
    for name in samples[0].components:
        mean, std = mean_std([s.components[name] for s in samples])
        metrics[f"reward/{name}/mean"], metrics[f"reward/{name}/std"] = mean, std
    lengths = [len(s.token_ids) for s in samples]
    metrics.update({
        "rollout/det_accuracy": sum(s.decision_right for s in samples) / len(samples),
        "groups/zero_variance_share": sum(not g.has_variance for g in groups) / len(groups),
        "completions/mean_length": sum(lengths) / len(lengths),
        "completions/max_length": float(max(lengths)),
        "completions/min_length": float(min(lengths)),
        "completions/clipped_ratio": sum(s.finish_reason == "length" for s in samples)
        / len(samples),
    })  # fmt: skip
    return metrics


def advantage_metrics(advantages: Sequence[float]) -> dict[str, float]:
    if not advantages:
        return {}
    mean, std = mean_std(advantages)
    return {
        "advantages/mean": mean,
        "advantages/std": std,
        "advantages/max": float(max(advantages)),
        "advantages/min": float(min(advantages)),
    }


def renamed(metrics: Mapping[str, float]) -> dict[str, float]:
    return {LEARNER_RENAMES.get(k, k): v for k, v in metrics.items()}


def hidden_share(rollout_seconds: float, wait_seconds: float) -> float:
    """Share of the batch's rollout time the learners did not wait for: 1 when the
    rollouts ran entirely while the learners trained, 0 when they waited throughout."""
    if rollout_seconds <= 0:
        return 0.0
    return min(1.0, max(0.0, 1.0 - wait_seconds / rollout_seconds))


def critical_sync(gather: float, apply: float, previous_gather: float, channel: bool) -> float:
    """Weight-sync seconds the learners wait through in a step: their own gather and send
    (``gather``) plus what of the engines' ``apply`` (of the weights the previous step
    sent: the apply a batch logs came before it) outlasted that send. Over the channel the
    engines receive while the learners send, so only the receive's tail past
    ``previous_gather`` counts; through the object store the engines load after the
    learners are done, so all of it does. For ``max_staleness: 0``: with overlap the
    apply a batch logs is of older weights, and on sync-check steps the check applies
    the new weights within the step that sent them."""
    tail = max(0.0, apply - previous_gather) if channel else apply
    return gather + tail


def step_overhead(metrics: Mapping[str, float]) -> float:
    """Seconds of a step that are neither the engines' sampling, the learners' compute,
    the weight sync the learners wait through nor the previous step's validation,
    checkpoint and reports (``time/between_steps``): the coordinator, Ray calls,
    serialisation, prompt decoding and scoring. Meant for ``max_staleness: 0``, where
    these run one after another; with overlap, sampling hides behind learning and this
    goes negative."""
    parts = ("time/generation", "time/learner", "time/sync_critical", "time/between_steps")
    return metrics["time/step"] - sum(metrics.get(key, 0.0) for key in parts)


class SampleTable:
    """Appends sample rows to ``samples.jsonl`` in ``folder`` and mirrors them to
    TensorBoard as a markdown table. With ``log`` (the run's ``MetricsLog``, which writes
    in ``folder``), the file is one of the log's tables: cut to the rows of steps up to
    the log's resume step when opened, and uploaded with the metrics."""

    def __init__(self, folder: str | Path, log: MetricsLog | None = None):
        self.log = log
        if log is None:
            self.path = Path(folder) / SAMPLES_FILE
            return
        if Path(folder).resolve() != log.local_dir.resolve():
            raise ValueError(f"{folder}: the sample table goes in its log's {log.local_dir}")
        self.path = log.table(SAMPLES_FILE)

    def write(self, step: int, rows: Sequence[Mapping[str, Any]]) -> None:
        if not rows:
            return
        with open(self.path, "a") as handle:
            for row in rows:
                handle.write(json.dumps({"step": step, **row}) + "\n")
        if self.log is not None:
            self.log.text(step, "samples", markdown_table(rows))


def markdown_table(rows: Sequence[Mapping[str, Any]]) -> str:
    columns = [k for k in rows[0] if k not in ("step",)]
    lines = ["| " + " | ".join(columns) + " |", "|" + "---|" * len(columns)]
    for row in rows:
        lines.append("| " + " | ".join(_cell(row.get(c)) for c in columns) + " |")
    return "\n".join(lines)


def _cell(value: Any) -> str:
    if isinstance(value, float):
        return f"{value:.3f}"
    text = str(value)[:SAMPLE_TEXT_CHARS]
    return text.replace("|", "\\|").replace("\n", " ")


def read_samples(run_uri: str | Path, storage: Storage | None = None) -> list[dict[str, Any]]:
    """The sample table of a run directory, local or ``s3://``."""
    return read_table(storage or Storage(), run_uri, SAMPLES_FILE)


def validation_metrics(
    verdicts: Sequence[Verdict], records: Sequence[Mapping[str, Any]], objective: Sequence[str]
) -> dict[str, float]:
    """``val/<rate>`` for every defined rate, ``val/format_ok`` and ``val/objective`` (the
    sum of the ``objective`` rates; left out when one of them is undefined)."""
    overall = evaluate(verdicts, records)
    metrics = {f"val/{key}": float(overall[key]) for key in RATE_KEYS if overall[key] is not None}
    metrics["val/format_ok"] = sum(v.format_ok for v in verdicts) / max(len(verdicts), 1)
    value = objective_value(overall, objective)
    if value is not None:
        metrics["val/objective"] = value
    return metrics
