"""ray job submit --working-dir . -- python -m ray_jobs.evaluate --config configs/local/eval.yaml"""

from mmrad.eval.config import EvalJobConfig
from mmrad.eval.job import run_eval
from mmrad.jobs import parse_job_args, print_result

if __name__ == "__main__":
    print_result(run_eval(parse_job_args(EvalJobConfig)))
