"""ray job submit --working-dir . -- python -m ray_jobs.serve --config configs/cluster/serve.yaml

Deploys the file's applications (as ``serve run FILE`` does) and blocks until the job is
stopped, which deletes them."""

from mmrad.config import RayConfig
from mmrad.ray_env import init_ray
from mmrad.serve.deploy import parse_serve_args, serve_until_stopped

if __name__ == "__main__":
    serve_file = parse_serve_args()
    init_ray(RayConfig())
    serve_until_stopped(serve_file)
