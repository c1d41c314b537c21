"""ray job submit --working-dir . -- python -m ray_jobs.sft --config configs/local/sft.yaml"""

from mmrad.config import SFTJobConfig
from mmrad.jobs import parse_job_args, print_result
from mmrad.sft.job import run_sft

if __name__ == "__main__":
    print_result(run_sft(parse_job_args(SFTJobConfig)))
