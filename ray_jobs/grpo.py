"""ray job submit --working-dir . -- python -m ray_jobs.grpo --config configs/local/grpo.yaml"""

from mmrad.jobs import parse_job_args, print_result
from mmrad.rl.config import GRPOJobConfig
from mmrad.rl.job import run_grpo

if __name__ == "__main__":
    print_result(run_grpo(parse_job_args(GRPOJobConfig)))
