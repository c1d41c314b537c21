"""The Ray Serve application: one FastAPI ingress deployment, each replica one
:class:`~mmrad.engine.async_engine.AsyncEngine` (continuous batching) on the exported model.

Routes: ``POST /v1/detect``, ``POST /v1/chat/completions`` (OpenAI-compatible),
``GET /v1/models``, ``GET /healthz`` (no token; 503 when the engine died). With a token
configured every ``/v1`` route needs ``Authorization: Bearer <token>`` (401 otherwise).
Every refusal is a JSON error (:mod:`mmrad.serve.errors`); nothing a client sends can
take a replica down: bodies are size-capped before parsing, images are checked before
decoding (:mod:`mmrad.serve.images`), engine errors caused by a request become 4xx.

``import_path: mmrad.serve.app:app_builder`` in a Serve config (see
:mod:`mmrad.serve.config`); the file's ``deployments`` entry for ``MMRADServer`` sets
``autoscaling_config``, ``max_ongoing_requests`` and ``ray_actor_options``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import AsyncIterator, Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from pydantic import ValidationError
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmrad.config import ConfigError, validate_config
from mmrad.engine.requests import grid_of
from mmrad.serve.api import (
    JSON_TYPE,
    DetectResponse,
    media_type,
    parse_detect,
    parse_json,
    read_body,
)
from mmrad.serve.config import DEPLOYMENT_NAME, ServeArgs, resolve_auth_token
from mmrad.serve.detect import detect_sampling, detection, inspection
from mmrad.serve.errors import ApiError, error_body, validation_error
from mmrad.serve.images import ImageLimits, png_base64
from mmrad.serve.openai_api import (
    ChatRequest,
    ResponseMeta,
    chat_messages,
    chat_response,
    chat_stream,
    check_model,
    model_list,
)

log = logging.getLogger(__name__)

api = FastAPI(title="mmrad", summary="Industrial anomaly detection with a reasoning VLM.")


@api.exception_handler(ApiError)
async def _api_error(request: Request, err: ApiError) -> JSONResponse:
    return JSONResponse(err.body(), status_code=err.status, headers=err.headers)


@api.exception_handler(StarletteHTTPException)
async def _http_error(request: Request, err: StarletteHTTPException) -> JSONResponse:
    return JSONResponse(error_body(err.status_code, str(err.detail)), status_code=err.status_code)


@api.exception_handler(RequestValidationError)
async def _validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
    return JSONResponse(error_body(422, str(err.errors())), status_code=422)


# Defined before the deployment class: Serve pickles the class when it is decorated,
# with only the module globals that exist by then.


def engine_error(err: Exception) -> Exception:
    """An engine failure as the client should see it: the request's own fault → 400,
    a dead engine → 503 (Serve's health check then replaces the replica), else as is."""
    from vllm.exceptions import VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(err, ApiError):
        return err
    if isinstance(err, EngineDeadError):
        return ApiError(503, "the engine stopped; this replica is being replaced")
    cause = err.__cause__ if err.__cause__ is not None else err
    if isinstance(cause, VLLMClientError | ValueError | TypeError):
        return ApiError(400, f"the engine refused the request: {cause}")
    return err


def _chat_request(body: bytes) -> ChatRequest:
    data = parse_json(body)
    if not isinstance(data, dict):
        raise ApiError(422, "request body must be a JSON object")
    try:
        return ChatRequest.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None


def _overlay(image: Any, verdict: Any) -> str:
    from mmrad.serve.overlay import draw_boxes

    return png_base64(draw_boxes(image, verdict.boxes, verdict.labels))


@serve.deployment(
    name=DEPLOYMENT_NAME,
    max_ongoing_requests=16,
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=10,
    health_check_timeout_s=30,
)
@serve.ingress(api)
class MMRADServer:
    """One replica: the model's engine behind the HTTP API."""

    def __init__(self, args: Mapping[str, Any]):
        from mmrad.engine.async_engine import AsyncEngine
        from mmrad.serve.metrics import ServeMetrics
        from mmrad.serve.model import load_served_model

        self.args = ServeArgs.model_validate(dict(args))
        self._token = resolve_auth_token(self.args)
        self.model = load_served_model(self.args)
        self.engine = AsyncEngine(
            self.model.path, self.args.engine, self.model.pixels, self.model.variant
        )
        self.limits = ImageLimits(self.args.max_upload_bytes, self.args.max_pixels)
        self.metrics = ServeMetrics()
        self.created = int(time.time())
        log.info("serving %s from %s (auth %s)", self.args.model_name, self.model.path,
                 "on" if self._token else "off")  # fmt: skip

    # -- routes ---------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        try:
            await self.engine.check_health()
        except Exception as err:
            return JSONResponse(error_body(503, f"engine unhealthy: {err}"), status_code=503)
        return JSONResponse({"status": "ok", "model": self.args.model_name})

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        async with self.metrics.track("/v1/models"):
            self._authorize(request)
            return model_list(self.args.model_name, self.created, self.model.contract.record())

    @api.post("/v1/detect", response_model=DetectResponse)
    async def detect(self, request: Request) -> DetectResponse:
        """Is the query image anomalous, where, and why (see :mod:`mmrad.serve.api`)."""
        start = time.perf_counter()
        async with self.metrics.track("/v1/detect"):
            self._authorize(request)
            body = await read_body(request, self.args.max_upload_bytes)
            parsed = await parse_detect(
                request.headers.get("content-type"),
                request.headers,
                body,
                dict(request.query_params),
                self.limits,
            )
            item = inspection(parsed.image, parsed.reference, parsed.options.category,
                              self.model.contract)  # fmt: skip
            prompt = await asyncio.to_thread(self.engine.request, item)
            try:
                [completion] = await self.engine.generate(
                    prompt, detect_sampling(self.args.max_tokens)
                )
            except Exception as err:
                raise engine_error(err) from err
            self.metrics.generated("/v1/detect", len(completion.token_ids))
            threshold = parsed.options.threshold
            result = detection(
                completion,
                grid_of(item, self.model.pixels),
                reasoning=self.model.variant.reasoning,
                threshold=self.args.threshold if threshold is None else threshold,
            )
            self.metrics.detected(result.anomalous)
            overlay = None
            if parsed.options.overlay:
                overlay = await asyncio.to_thread(_overlay, parsed.image, result.verdict)
            return DetectResponse(
                anomalous=result.anomalous,
                score=result.score,
                boxes=[list(box) for box in result.verdict.boxes],
                labels=list(result.verdict.labels),
                reasoning=result.verdict.reasoning,
                format_ok=result.verdict.format_ok,
                threshold=result.threshold,
                completion=result.completion,
                width=parsed.image.width,
                height=parsed.image.height,
                model=self.args.model_name,
                latency_ms=1000 * (time.perf_counter() - start),
                overlay_png=overlay,
            )

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        """OpenAI chat completions (see :mod:`mmrad.serve.openai_api`)."""
        async with self.metrics.track("/v1/chat/completions"):
            self._authorize(request)
            body = await read_body(request, self.args.max_upload_bytes)
            if media_type(request.headers.get("content-type")) != JSON_TYPE:
                raise ApiError(415, f"content type must be {JSON_TYPE}")
            chat = await asyncio.to_thread(_chat_request, body)
            check_model(chat.model, self.args.model_name)
            prompt = await asyncio.to_thread(self._chat_prompt, chat)
            sampling = chat.sampling(self.args.max_tokens)
            meta = ResponseMeta(model=self.args.model_name, top_logprobs=chat.top_logprobs or 0)
            if not chat.stream:
                final = await self._final_output(prompt, sampling)
                self.metrics.generated(
                    "/v1/chat/completions", sum(len(o.token_ids) for o in final.outputs)
                )
                return JSONResponse(chat_response(final, meta))
            deltas = await self._started_stream(prompt, sampling)
            events = chat_stream(deltas, meta, chat.n, chat.include_usage)
            return StreamingResponse(events, media_type="text/event-stream")

    # -- helpers --------------------------------------------------------------------------

    async def check_health(self) -> None:
        """Serve's health check: a dead engine core makes Serve replace this replica."""
        await self.engine.check_health()

    def __del__(self) -> None:
        engine = getattr(self, "engine", None)
        if engine is not None:
            engine.close()

    def _authorize(self, request: Request) -> None:
        """401 unless the request carries the configured bearer token (constant-time
        comparison; the token never appears in a message or log)."""
        if self._token is None:
            return
        scheme, _, given = request.headers.get("authorization", "").partition(" ")
        if scheme.lower() == "bearer" and hmac.compare_digest(
            given.strip().encode(), self._token.encode()
        ):
            return
        raise ApiError(401, "missing or wrong bearer token (Authorization: Bearer <token>)",
                       headers={"WWW-Authenticate": "Bearer"})  # fmt: skip

    def _chat_prompt(self, chat: ChatRequest) -> dict[str, Any]:
        messages, images = chat_messages(chat, self.limits, self.args.engine.max_images)
        return self.engine.chat_request(messages, images)

    async def _final_output(self, prompt: dict[str, Any], sampling: Any) -> Any:
        final = None
        try:
            async for output in self.engine.outputs(prompt, sampling):
                final = output
        except Exception as err:
            raise engine_error(err) from err
        if final is None:
            raise ApiError(500, "the engine returned no output")
        return final

    async def _started_stream(self, prompt: dict[str, Any], sampling: Any) -> AsyncIterator[Any]:
        """The engine's delta stream, started here so that a request the engine refuses
        (a prompt too long, say) gets its 4xx before the 200 of a stream is sent."""
        stream = self.engine.outputs(prompt, sampling, stream=True)
        try:
            first = await anext(stream)
        except Exception as err:
            raise engine_error(err) from err

        async def rest() -> AsyncIterator[Any]:
            yield first
            try:
                async for output in stream:
                    yield output
            except Exception as err:
                raise engine_error(err) from err

        return rest()


def app_builder(args: dict[str, Any]) -> serve.Application:
    """The application for ``import_path: mmrad.serve.app:app_builder``: ``args`` are
    checked here (a bad key fails the deploy with a message naming it) and handed to
    every replica."""
    try:
        validate_config(ServeArgs, args, "serve application args")
    except ConfigError as err:
        raise ValueError(str(err)) from None
    return MMRADServer.bind(dict(args))
