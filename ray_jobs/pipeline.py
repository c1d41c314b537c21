"""`ray job submit --working-dir . -- python -m ray_jobs.pipeline --config FILE`."""

from mmrad.config import PipelineConfig
from mmrad.jobs import parse_job_args
from mmrad.pipeline import print_summary, run_pipeline

if __name__ == "__main__":
    print_summary(run_pipeline(parse_job_args(PipelineConfig)))
