"""Ray Serve application for anomaly detection with an exported model.

- ``config``: the Serve config file (Ray's schema) and :class:`ServeArgs`, the mmrad
  application's ``args``.
- ``app``: the application (``import_path: mmrad.serve.app:app_builder``): one FastAPI
  ingress deployment whose replicas each own an
  :class:`~mmrad.engine.async_engine.AsyncEngine`.
- ``api`` / ``detect`` / ``overlay``: ``POST /v1/detect``.
- ``vllm_api``: vLLM's own OpenAI serving classes on the replica's engine (chat and
  completions); ``openai_api``: the checks in front of them and ``/v1/models``.
- ``adapters``: one LoRA adapter per production line, chosen by the request's ``model``.
- ``images`` / ``errors``: limits and checks at the edge, JSON errors.
- ``deploy``: deploying a config file as ``serve run FILE`` does.
- ``metrics``: mmrad's Prometheus counters beside Ray Serve's.

Importing this package imports neither Ray nor vLLM.
"""

from mmrad.serve.config import (
    DEPLOYMENT_NAME,
    IMPORT_PATH,
    ServeArgs,
    ServeFile,
    load_serve_file,
    validate_serve_config,
)

__all__ = [
    "DEPLOYMENT_NAME",
    "IMPORT_PATH",
    "ServeArgs",
    "ServeFile",
    "load_serve_file",
    "validate_serve_config",
]
