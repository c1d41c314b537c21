"""Thin ``ray job submit`` entry points, one per job: ``python -m ray_jobs.<job> --config
FILE [key.sub=value ...] [--print-config]``. On the cluster (``cluster.yaml``; every node
runs the image, whose venv is ``/opt/mmrad/venv``)::

    ray job submit --address http://127.0.0.1:8265 --working-dir . \\
      --runtime-env configs/cluster/job_env.yaml \\
      -- /opt/mmrad/venv/bin/python -m ray_jobs.sft --config configs/cluster/sft.yaml

``job_env.yaml`` names the job's interpreter (``py_executable``) for every worker the job
starts, whatever Python the cluster was started with; Ray runs the entrypoint as a shell
command, not as a worker, so the entrypoint names the same interpreter. User errors end
with the CLI's exit status and one line (:mod:`mmrad.jobs`).
"""
