"""Inspect a folder (or s3:// prefix) of new images as a Ray job:

ray job submit --working-dir . -- python -m ray_jobs.detect --config configs/local/detect.yaml \
    input=s3://bucket/new-images output=s3://bucket/detections reference=s3://bucket/refs

(name the reference: the config file's is the demo's coins/reference_0.png)
"""

from mmrad.detect.config import DetectJobConfig
from mmrad.detect.job import run_detect
from mmrad.jobs import parse_job_args, print_result

if __name__ == "__main__":
    print_result(run_detect(parse_job_args(DetectJobConfig)))
