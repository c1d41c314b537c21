"""Batch evaluation as a Ray job (the submit command: :mod:`ray_jobs`):
``python -m ray_jobs.evaluate --config configs/cluster/eval.yaml``."""

from mmrad.eval.config import EvalJobConfig
from mmrad.eval.job import run_eval
from mmrad.jobs import run_job

if __name__ == "__main__":
    run_job(EvalJobConfig, run_eval)
