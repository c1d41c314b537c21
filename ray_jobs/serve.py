"""Deploy a Serve config file's applications as a Ray job (the submit command:
:mod:`ray_jobs`) and block until the job is stopped, which deletes them::

    python -m ray_jobs.serve --config configs/cluster/serve.yaml

``--print-config`` prints the resolved file (Ray Serve's schema)."""

from mmrad.config import RayConfig
from mmrad.jobs import run_entry
from mmrad.serve.config import load_serve_file
from mmrad.serve.deploy import dump_serve_file, run_serve

if __name__ == "__main__":
    run_entry(
        load_serve_file,
        lambda file: run_serve(file, RayConfig()),
        dump=dump_serve_file,
        description="Deploy a Serve config file and block.",
    )
