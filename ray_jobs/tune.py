"""ray job submit --working-dir . -- python -m ray_jobs.tune --config configs/local/tune.yaml"""

from mmrad.jobs import parse_job_args, print_result
from mmrad.tune import run_tune
from mmrad.tune_config import TuneJobConfig

if __name__ == "__main__":
    print_result(run_tune(parse_job_args(TuneJobConfig)))
