"""The Ray Serve application: one FastAPI ingress deployment, each replica one
:class:`~mmrad.engine.async_engine.AsyncEngine` (continuous batching) on the exported model.

Routes: ``POST /v1/detect``, ``POST /v1/chat/completions`` (OpenAI-compatible),
``GET /v1/models``, ``GET /healthz`` (no token; 503 when the engine died). With a token
configured every ``/v1`` route needs ``Authorization: Bearer <token>`` (401 otherwise).
Every refusal is a JSON error (:mod:`mmrad.serve.errors`), and so is a server fault;
nothing a client sends can take a replica down: bodies are size-capped and their JSON
nesting bounded before parsing, images are checked before decoding
(:mod:`mmrad.serve.images`) and decoded within a memory budget
(:mod:`mmrad.serve.decoding`), engine errors caused by a request become 4xx.

``import_path: mmrad.serve.app:app_builder`` in a Serve config (see
:mod:`mmrad.serve.config`); the file's ``deployments`` entry for ``MMRADServer`` sets
``autoscaling_config``, ``max_ongoing_requests`` and ``ray_actor_options``.
"""

from __future__ import annotations

import asyncio
import hmac
import logging
import time
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from ray import serve
from starlette.exceptions import HTTPException as StarletteHTTPException

from mmrad.config import ConfigError, validate_config
from mmrad.engine.requests import on_grid, query_grid
from mmrad.serve.admission import RETRY_AFTER_S
from mmrad.serve.api import (
    JSON_TYPE,
    DetectResponse,
    media_type,
    parse_detect,
    parse_json,
    read_body,
)
from mmrad.serve.config import DEPLOYMENT_NAME, ServeArgs, resolve_auth_token
from mmrad.serve.decoding import (
    DecodedImage,
    DecodeSlots,
    decode_budget_bytes,
    decode_for_model,
    grid_png_uri,
)
from mmrad.serve.detect import detect_sampling, detection, inspection
from mmrad.serve.errors import ApiError, JSONServerErrors, error_body
from mmrad.serve.images import ImageLimits, png_base64
from mmrad.serve.openai_api import (
    check_chat_images,
    check_request_fields,
    model_list,
    replace_image_url,
    requested_model,
    sequences,
    validated,
    with_default_max_tokens,
)

log = logging.getLogger(__name__)

api = FastAPI(title="mmrad", summary="Industrial anomaly detection with a reasoning VLM.")
api.add_middleware(JSONServerErrors)


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
    from vllm.exceptions import GracefulHTTPError, VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(err, ApiError):
        return err
    if isinstance(err, EngineDeadError):
        return ApiError(503, "the engine stopped; this replica is being replaced")
    if isinstance(err, GracefulHTTPError):  # vLLM's own queue bounds (none set by mmrad)
        return ApiError(err.http_status, err.message, headers={"Retry-After": RETRY_AFTER_S})
    cause = err.__cause__ if err.__cause__ is not None else err
    if isinstance(cause, VLLMClientError | ValueError | TypeError):
        return ApiError(400, f"the engine refused the request: {cause}",
                        getattr(cause, "parameter", None))  # fmt: skip
    return err


def _json_object(body: bytes) -> dict[str, Any]:
    data = parse_json(body)
    if not isinstance(data, dict):
        raise ApiError(422, "request body must be a JSON object")
    return data


def vllm_response(result: Any, ticket: Any) -> Any:
    """The HTTP response of a vLLM serving call: its error as JSON with its status, a
    whole response as JSON, or its server-sent events, holding ``ticket`` until they end."""
    from pydantic import BaseModel

    from mmrad.serve.vllm_api import ErrorResponse

    if isinstance(result, ErrorResponse):
        return JSONResponse(result.model_dump(), status_code=result.error.code)
    if isinstance(result, BaseModel):
        return JSONResponse(result.model_dump())
    return StreamingResponse(ticket.keep_for(result), media_type="text/event-stream")


def _overlay(query: DecodedImage, verdict: Any) -> str:
    from mmrad.serve.overlay import draw_on_preview

    return png_base64(draw_on_preview(query.preview, query.size, verdict.boxes, verdict.labels))


@serve.deployment(
    name=DEPLOYMENT_NAME,
    max_ongoing_requests=16,
    ray_actor_options={"num_cpus": 0.5},
    health_check_period_s=10,
    health_check_timeout_s=30,
    # a stopping replica looks for requests in flight this often (Serve's 2 s default
    # is also how long an idle replica waited before it stopped)
    graceful_shutdown_wait_loop_s=0.5,
)
@serve.ingress(api)
class MMRADServer:
    """One replica: the model's engine behind the HTTP API."""

    async def __init__(self, args: Mapping[str, Any]):
        from mmrad.engine.async_engine import AsyncEngine
        from mmrad.serve.admission import Admission
        from mmrad.serve.metrics import ServeMetrics
        from mmrad.serve.model import (
            in_flight_limit,
            load_served_model,
            served_adapters,
            served_engine,
        )
        from mmrad.serve.vllm_api import serving_state

        self.args = ServeArgs.model_validate(dict(args))
        self._token = resolve_auth_token(self.args)
        self.model = load_served_model(self.args)
        engine_config = served_engine(self.args)
        self.engine = AsyncEngine(self.model.path, engine_config, self.model.pixels,
                                  self.model.variant, ray_metrics=True)  # fmt: skip
        self.serving = await serving_state(self.engine.client, self.model.path,
                                           self.args.model_name)  # fmt: skip
        self.adapters = await served_adapters(self.args, self.model, self.serving.models)
        self.admission = Admission(in_flight_limit(self.args))
        self.limits = ImageLimits(self.args.max_upload_bytes, self.args.max_pixels)
        self.decodes = DecodeSlots(self.args.max_concurrent_decodes)
        self.metrics = ServeMetrics()
        self.created = int(time.time())
        budget = decode_budget_bytes(self.args.max_pixels, self.args.max_concurrent_decodes)
        log.info("serving %s from %s with adapters %s (auth %s); image decodes take at most "
                 "%.0f MiB", self.args.model_name, self.model.path,
                 sorted(self.args.adapters) or "none", "on" if self._token else "off",
                 budget / 2**20)  # fmt: skip

    # -- routes ---------------------------------------------------------------------------

    @api.get("/healthz")
    async def healthz(self) -> JSONResponse:
        try:
            await self.engine.check_health()
        except Exception as err:
            return JSONResponse(error_body(503, f"engine unhealthy: {err}"), status_code=503)
        return JSONResponse({"status": "ok", "model": self.args.model_name,
                             "engine_requests": self.engine.unfinished_requests(),
                             "admitted_sequences": self.admission.held})  # fmt: skip

    @api.get("/v1/models")
    async def models(self, request: Request) -> dict[str, Any]:
        async with self.metrics.track("/v1/models"):
            self._authorize(request)
            return model_list(self.args.model_name, self.created, self.model.contract.record(),
                              self.args.adapters, await self.adapters.loaded())  # fmt: skip

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
            model = parsed.options.model or self.args.model_name
            lora = await self.adapters.resolve(model)
            query = await self._decode(parsed.image, preview=parsed.options.overlay)
            reference = None
            if parsed.reference is not None:
                reference = (await self._decode(parsed.reference)).on_grid
            item = inspection(query.on_grid, reference, parsed.options.category,
                              self.model.contract)  # fmt: skip
            prompt = await asyncio.to_thread(self.engine.request, item)
            try:
                with self.admission.admit(1):
                    [completion] = await self.engine.generate(
                        prompt, detect_sampling(self.args.max_tokens), lora=lora
                    )
            except Exception as err:
                raise engine_error(err) from err
            self.metrics.generated("/v1/detect", len(completion.token_ids))
            threshold = parsed.options.threshold
            result = detection(
                completion,
                query_grid(query.size, self.model.pixels),
                reasoning=self.model.variant.reasoning,
                threshold=self.args.threshold if threshold is None else threshold,
                answer_unit=self.model.contract.answer_unit,
            )
            self.metrics.detected(result.anomalous)
            overlay = None
            if parsed.options.overlay:
                overlay = await asyncio.to_thread(_overlay, query, result.verdict)
            return DetectResponse(
                anomalous=result.anomalous,
                score=result.score,
                boxes=[list(box) for box in result.verdict.boxes],
                labels=list(result.verdict.labels),
                reasoning=result.verdict.reasoning,
                format_ok=result.verdict.format_ok,
                threshold=result.threshold,
                completion=result.completion,
                width=query.size[0],
                height=query.size[1],
                model=model,
                latency_ms=1000 * (time.perf_counter() - start),
                overlay_png=overlay,
            )

    @api.post("/v1/chat/completions")
    async def chat_completions(self, request: Request) -> Any:
        """OpenAI chat completions, answered by vLLM's own serving layer (see
        :mod:`mmrad.serve.openai_api` for what is checked in front of it)."""
        from mmrad.serve.vllm_api import ChatCompletionRequest

        async with self.metrics.track("/v1/chat/completions"):
            data = await self._openai_body(request, ChatCompletionRequest)
            images = await asyncio.to_thread(check_chat_images, data, self.limits,
                                             self.args.engine.max_images)  # fmt: skip
            for part, image in images:
                if not on_grid(image.size, self.model.pixels):  # else vLLM decodes it as sent
                    uri = await self.decodes.run(grid_png_uri, image, self.limits,
                                                 self.model.pixels)  # fmt: skip
                    replace_image_url(part, uri)
            create = self.serving.chat.create_chat_completion
            return await self._generate("/v1/chat/completions", request, data,
                                        ChatCompletionRequest, create)  # fmt: skip

    @api.post("/v1/completions")
    async def completions(self, request: Request) -> Any:
        """OpenAI (legacy) completions on a text prompt, by vLLM's serving layer."""
        from mmrad.serve.vllm_api import CompletionRequest

        async with self.metrics.track("/v1/completions"):
            data = await self._openai_body(request, CompletionRequest)
            create = self.serving.completion.create_completion
            return await self._generate("/v1/completions", request, data, CompletionRequest,
                                        create)  # fmt: skip

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

    async def _decode(self, image: Any, preview: bool = False) -> DecodedImage:
        """``image`` decoded within the replica's decode budget (:mod:`mmrad.serve.decoding`)."""
        return await self.decodes.run(decode_for_model, image, self.limits, self.model.pixels,
                                      preview)  # fmt: skip

    async def _openai_body(self, request: Request, request_type: type) -> dict[str, Any]:
        """An authorised OpenAI request's JSON object: within the byte limit, no fields
        this server does not support, ``max_tokens`` defaulted."""
        self._authorize(request)
        body = await read_body(request, self.args.max_upload_bytes)
        if media_type(request.headers.get("content-type")) != JSON_TYPE:
            raise ApiError(415, f"content type must be {JSON_TYPE}")
        data = await asyncio.to_thread(_json_object, body)
        check_request_fields(data, request_type)
        return with_default_max_tokens(data, self.args.max_tokens)

    async def _generate(
        self, route: str, request: Request, data: dict[str, Any], request_type: type, create: Any
    ) -> Any:
        """Run a vLLM serving call (``create``) on the request ``data`` names the model
        (or adapter) of, within this replica's admission limit."""
        await self.adapters.resolve(requested_model(data))
        with self.admission.admit(sequences(data)) as ticket:
            try:
                parsed = validated(request_type, data)  # vLLM's own checks raise its errors
                result = await create(parsed, request)
            except Exception as err:
                raise engine_error(err) from err
            usage = getattr(result, "usage", None)
            if usage is not None:
                self.metrics.generated(route, usage.completion_tokens or 0)
            return vllm_response(result, ticket)


def app_builder(args: dict[str, Any]) -> serve.Application:
    """The application for ``import_path: mmrad.serve.app:app_builder``: ``args`` are
    checked here (a bad key fails the deploy with a message naming it) and handed to
    every replica."""
    try:
        validate_config(ServeArgs, args, "serve application args")
    except ConfigError as err:
        raise ValueError(str(err)) from None
    return MMRADServer.bind(dict(args))
