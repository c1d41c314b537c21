"""mmrad's own Prometheus counters, next to the ones Ray Serve keeps.

Serve already exports, per application/deployment/replica/route:
``ray_serve_num_http_requests_total`` (by status code), ``ray_serve_http_request_latency_ms``,
``ray_serve_deployment_processing_latency_ms``, ``ray_serve_replica_processing_queries``,
``ray_serve_deployment_replica_healthy``, and the autoscaler's target and running
replica counts. These add what Serve cannot see:

- ``mmrad_serve_requests_total`` by route and outcome (``ok`` or the HTTP error status,
  so refused uploads, bombs and bad tokens are counted apart),
- ``mmrad_serve_generated_tokens_total`` by route,
- ``mmrad_serve_detections_total`` by verdict (``anomalous``, ``normal``, ``undecided``).

Ray's metrics agent on every node serves all of them at
``http://<node>:<metrics_export_port>/metrics`` (``ray start --metrics-export-port=8080``;
``ray.nodes()[i]["MetricsExportPort"]`` otherwise) and writes a Prometheus service
discovery file to ``<ray temp dir>/session_latest/metrics/prometheus/``.
(``ray_`` is prefixed to custom metric names by Ray.)
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from mmrad.serve.errors import ApiError


class ServeMetrics:
    """The counters of one replica (Ray adds the application, deployment and replica
    tags)."""

    def __init__(self) -> None:
        from ray.serve import metrics

        self.requests = metrics.Counter(
            "mmrad_serve_requests",
            description="Requests by route and outcome (ok or the HTTP error status).",
            tag_keys=("route", "outcome"),
        )
        self.tokens = metrics.Counter(
            "mmrad_serve_generated_tokens",
            description="Tokens generated, by route.",
            tag_keys=("route",),
        )
        self.detections = metrics.Counter(
            "mmrad_serve_detections",
            description="Detections by verdict (anomalous, normal, undecided).",
            tag_keys=("verdict",),
        )

    @asynccontextmanager
    async def track(self, route: str) -> AsyncIterator[None]:
        """Count one request on ``route`` by how it ended."""
        outcome = "500"
        try:
            yield
            outcome = "ok"
        except ApiError as err:
            outcome = str(err.status)
            raise
        finally:
            self.requests.inc(tags={"route": route, "outcome": outcome})

    def generated(self, route: str, tokens: int) -> None:
        if tokens:
            self.tokens.inc(tokens, tags={"route": route})

    def detected(self, anomalous: bool | None) -> None:
        verdict = "undecided" if anomalous is None else "anomalous" if anomalous else "normal"
        self.detections.inc(tags={"verdict": verdict})
