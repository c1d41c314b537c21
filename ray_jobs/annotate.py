"""Chain-of-thought annotation as a Ray job:

ray job submit --working-dir . -- python -m ray_jobs.annotate --config configs/local/annotate.yaml
"""

from mmrad.annotate.config import AnnotateJobConfig
from mmrad.annotate.job import run_annotate
from mmrad.jobs import parse_job_args, print_result

if __name__ == "__main__":
    print_result(run_annotate(parse_job_args(AnnotateJobConfig)))
