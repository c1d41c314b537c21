"""What a finished sweep writes: the trials' table (CSV and Markdown), a figure of the
objective against each swept key, and the best trial's GRPO config as a runnable file."""

from __future__ import annotations

import csv
import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import yaml

from mmrad.config import validate_config
from mmrad.rl.config import GRPOJobConfig
from mmrad.storage import Storage, join
from mmrad.tune.config import OBJECTIVE_METRIC, TuneJobConfig
from mmrad.tune.space import apply_params

RESULTS_CSV = "results.csv"
RESULTS_MD = "results.md"
FIGURE = "objective.png"
BEST_CONFIG = "best_grpo.yaml"


@dataclass(frozen=True)
class TrialRow:
    trial: str
    status: str
    params: dict[str, Any]
    objective: float | None  # at the trial's last validation
    best_objective: float | None  # over all its validations
    validations: int
    steps: int | None


@dataclass(frozen=True)
class SweepOutputs:
    results_uri: str
    best_trial: str | None
    best_objective: float | None
    best_config_uri: str | None


def trial_rows(results, keys: Sequence[str]) -> list[TrialRow]:
    """One row per trial of a Tune ``ResultGrid``, best final objective first."""
    rows = []
    for result in results:
        metrics = result.metrics or {}
        history = result.metrics_dataframe
        values = []
        if history is not None and OBJECTIVE_METRIC in history:
            values = [v for v in history[OBJECTIVE_METRIC].tolist() if _defined(v)]
        rows.append(
            TrialRow(
                trial=str(metrics.get("trial_id") or result.path.rsplit("/", 1)[-1]),
                status="error" if result.error else "done",
                params={key: result.config.get(key) for key in keys},
                objective=values[-1] if values else None,
                best_objective=max(values) if values else None,
                validations=len(values),
                steps=metrics.get("step"),
            )
        )
    return sorted(rows, key=lambda r: (r.objective is None, -(r.objective or 0.0), r.trial))


def _defined(value: Any) -> bool:
    return isinstance(value, int | float) and not math.isnan(value)


def results_csv(rows: Sequence[TrialRow], keys: Sequence[str]) -> str:
    out = io.StringIO()
    writer = csv.writer(out)
    writer.writerow(["trial", "status", *keys, "objective", "best_objective", "validations",
                     "steps"])  # fmt: skip
    for row in rows:
        writer.writerow([row.trial, row.status, *(row.params[k] for k in keys), row.objective,
                         row.best_objective, row.validations, row.steps])  # fmt: skip
    return out.getvalue()


def results_markdown(rows: Sequence[TrialRow], keys: Sequence[str], objective: str) -> str:
    def cell(value: Any) -> str:
        return f"{value:.4g}" if isinstance(value, float) else str(value)

    header = ["trial", "status", *keys, "objective", "best", "validations", "steps"]
    lines = [
        f"# Sweep results\n\nObjective: `{OBJECTIVE_METRIC}` = {objective}, at each trial's "
        "last validation; best first.\n",
        "| " + " | ".join(header) + " |",
        "|" + "---|" * len(header),
    ]
    for row in rows:
        values = [row.trial, row.status, *(row.params[k] for k in keys), row.objective,
                  row.best_objective, row.validations, row.steps]  # fmt: skip
        lines.append("| " + " | ".join(cell(v) for v in values) + " |")
    return "\n".join(lines) + "\n"


def objective_figure(rows: Sequence[TrialRow], keys: Sequence[str]) -> bytes:
    """PNG: one panel per swept key, each trial's final objective against its value (the
    best trial in red)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    scored = [row for row in rows if row.objective is not None]
    fig, axes = plt.subplots(1, len(keys), figsize=(4 * len(keys), 3.4), squeeze=False)
    for ax, key in zip(axes[0], keys, strict=True):
        xs = [_plottable(row.params[key]) for row in scored]
        ax.scatter(xs, [row.objective for row in scored], color="tab:blue")
        if scored:
            ax.scatter([xs[0]], [scored[0].objective], color="tab:red", label="best")
            ax.legend(loc="best", fontsize=8)
        ax.set_xlabel(key, fontsize=9)
        ax.set_ylabel(OBJECTIVE_METRIC)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    return buffer.getvalue()


def _plottable(value: Any) -> Any:
    return value if isinstance(value, int | float) else str(value)


def best_config(base: Mapping[str, Any], params: Mapping[str, Any], name: str) -> str:
    """The best trial's GRPO config as YAML: ``base`` with its values, as a new run."""
    config = apply_params(base, params)
    config["run"] = {**config["run"], "name": name}
    job = validate_config(GRPOJobConfig, config, f"best trial {params}")
    return yaml.safe_dump(job.model_dump(mode="json"), sort_keys=False)


def write_sweep_outputs(
    results, job: TuneJobConfig, base: Mapping[str, Any], sweep_uri: str, storage: Storage
) -> SweepOutputs:
    keys = list(job.search_space)
    rows = trial_rows(results, keys)
    results_uri = join(sweep_uri, RESULTS_CSV)
    storage.write_text(results_uri, results_csv(rows, keys))
    objective = " + ".join(job.objective)
    storage.write_text(join(sweep_uri, RESULTS_MD), results_markdown(rows, keys, objective))
    storage.write_bytes(join(sweep_uri, FIGURE), objective_figure(rows, keys))
    best = rows[0] if rows and rows[0].objective is not None else None
    config_uri = None
    if best is not None:
        config_uri = join(sweep_uri, BEST_CONFIG)
        text = best_config(base, best.params, f"{job.run.name}-best")
        storage.write_text(config_uri, text)
    return SweepOutputs(
        results_uri=results_uri,
        best_trial=best.trial if best else None,
        best_objective=best.objective if best else None,
        best_config_uri=config_uri,
    )
