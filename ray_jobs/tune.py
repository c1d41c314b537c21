"""A reward-weight sweep on Ray Tune as a Ray job (the submit command: :mod:`ray_jobs`):
``python -m ray_jobs.tune --config configs/cluster/tune.yaml``."""

from mmrad.jobs import run_job
from mmrad.tune.config import TuneJobConfig
from mmrad.tune.job import run_tune

if __name__ == "__main__":
    run_job(TuneJobConfig, run_tune)
