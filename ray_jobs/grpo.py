"""GRPO as a Ray job (the submit command: :mod:`ray_jobs`):
``python -m ray_jobs.grpo --config configs/cluster/grpo.yaml``."""

from mmrad.jobs import run_job
from mmrad.rl.config import GRPOJobConfig
from mmrad.rl.job import run_grpo

if __name__ == "__main__":
    run_job(GRPOJobConfig, run_grpo)
