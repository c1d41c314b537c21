"""ray job submit --working-dir . -- python -m ray_jobs.tune --config configs/local/tune.yaml"""

from mmrad.jobs import parse_job_args, print_result
from mmrad.tune.config import TuneJobConfig
from mmrad.tune.job import run_tune

if __name__ == "__main__":
    print_result(run_tune(parse_job_args(TuneJobConfig)))
