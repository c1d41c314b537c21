"""Chain-of-thought annotation as a Ray job (the submit command: :mod:`ray_jobs`):
``python -m ray_jobs.annotate --config configs/local/annotate.yaml``."""

from mmrad.annotate.config import AnnotateJobConfig
from mmrad.annotate.job import run_annotate
from mmrad.jobs import run_job

if __name__ == "__main__":
    run_job(AnnotateJobConfig, run_annotate)
