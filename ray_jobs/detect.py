"""Inspect a folder (or s3:// prefix) of new images as a Ray job (the submit command:
:mod:`ray_jobs`)::

    python -m ray_jobs.detect --config configs/local/detect.yaml \
        input=s3://bucket/new-images output=s3://bucket/detections reference=s3://bucket/refs

(name the reference: the config file's is the demo's coins/reference_0.png)
"""

from mmrad.detect.config import DetectJobConfig
from mmrad.detect.job import run_detect
from mmrad.jobs import run_job

if __name__ == "__main__":
    run_job(DetectJobConfig, run_detect)
