"""One Weights & Biases run per mmrad run, resumed by an id made from the run directory.

W&B wants steps that only go forward: a row whose step is behind the run's (a step run
again after a crash) was logged by the first run and is left out.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path
from typing import Any

from mmrad.config import WandbSection
from mmrad.storage import local_path
from mmrad.tracking.mlflow_run import run_key
from mmrad.tracking.values import metric_values


class WandbRun:
    def __init__(self, run, job: str):
        self.run = run
        self.job = job

    @classmethod
    def open(
        cls,
        section: WandbSection,
        name: str,
        run_uri: str,
        job: str,
        params: Mapping[str, str],
        resume: bool = True,
    ) -> WandbRun:
        """The run of ``run_uri`` (resumed when ``resume``, else a new one)."""
        import wandb

        folder = local_path(section.dir).absolute()
        folder.mkdir(parents=True, exist_ok=True)
        run = wandb.init(
            project=section.project,
            entity=section.entity,
            name=name,
            id=run_key(run_uri) if resume else None,
            resume="allow" if resume else None,
            dir=str(folder),
            mode=section.mode,
            job_type=job,
            config=dict(params),
            tags=[job],
            reinit="create_new",
        )
        return cls(run, job)

    def log_params(self, params: Mapping[str, str]) -> None:
        self.run.config.update(dict(params), allow_val_change=True)

    def log_rows(self, rows: Iterable[Mapping[str, Any]]) -> None:
        for row in rows:
            step = int(row.get("step", 0))
            values = metric_values(row)
            if values and step >= self.run.step:
                self.run.log(values, step=step)

    def log_files(self, paths: Sequence[Path]) -> None:
        import wandb

        if not paths:
            return
        artifact = wandb.Artifact(f"{self.job}-{self.run.id}", type="run-files")
        for path in paths:
            artifact.add_file(str(path))
        self.run.log_artifact(artifact)

    def finish(self, failed: bool) -> None:
        self.run.finish(exit_code=1 if failed else 0)
