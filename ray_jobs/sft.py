"""Supervised fine-tuning as a Ray job (the submit command: :mod:`ray_jobs`):
``python -m ray_jobs.sft --config configs/cluster/sft.yaml``."""

from mmrad.config import SFTJobConfig
from mmrad.jobs import run_job
from mmrad.sft.job import run_sft

if __name__ == "__main__":
    run_job(SFTJobConfig, run_sft)
