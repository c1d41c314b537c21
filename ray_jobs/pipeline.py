"""The whole pipeline as a Ray job (the submit command: :mod:`ray_jobs`):
``python -m ray_jobs.pipeline --config configs/cluster/pipeline.yaml``."""

from mmrad.config import PipelineConfig
from mmrad.jobs import run_job
from mmrad.pipeline import dump_pipeline, print_summary, run_pipeline

if __name__ == "__main__":
    run_job(PipelineConfig, run_pipeline, show=print_summary, dump=dump_pipeline)
