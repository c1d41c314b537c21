"""An OpenAI-compatible chat completions client for evaluation and annotation.

How the paper's generalist baselines (GPT-4o, Qwen2.5-VL-72B behind vLLM, ...) and our
own Serve deployment are evaluated. Images go out already resized to the model grid, as
PNG data URIs, and the prompt states that grid's size, so boxes come back in it whatever
the endpoint does internally. Calls are concurrent but bounded (``max_concurrency``).
Retries are the ``openai`` SDK's own (``max_retries`` = the target's ``retries``): it
retries timeouts, connection errors, 408, 409, 429 and 5xx, obeys an ``x-should-retry``
header, and waits a server's ``retry-after-ms`` / ``Retry-After`` when that is between 0
and 120 s (longer: no retry), else backs off from 0.5 s, doubling up to 8 s, with up to
25% jitter. Other 4xx are not retried; whatever still fails is recorded on that sample
and the rest go on. P(Yes) comes from ``logprobs.top_logprobs`` of the answer's first
token when the endpoint returns them.

The API key is read from the environment variable the config names (by the driver, which
hands it to the actors as a ``SecretStr``: variables set in the driver after Ray started
do not reach workers); it is never logged or put in an error message.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from pydantic import SecretStr

from mmrad.config import PixelBudget
from mmrad.engine.requests import to_grid_image
from mmrad.engine.sampling import Sampling, answer_score
from mmrad.eval.config import EndpointTarget

NO_KEY = "EMPTY"  # what vLLM-style servers without auth accept; the SDK wants some key
ERROR_BODY_CHARS = 300
RETRY_COUNT_HEADER = "x-stainless-retry-count"  # the SDK's retries so far, on each request


class EndpointConfigError(ValueError):
    """The endpoint target cannot be used (e.g. its API key variable is unset)."""


@dataclass(frozen=True)
class EndpointResult:
    """One sample's outcome: ``n`` completions (fewer if the endpoint returned fewer),
    their P(Yes) scores (``None`` without log-probs), or an ``error`` after the last
    try. ``latency_ms`` spans every try and backoff; ``attempts`` counts the tries."""

    completions: tuple[str, ...] = ()
    scores: tuple[float | None, ...] = ()
    finish_reasons: tuple[str | None, ...] = ()
    latency_ms: float = 0.0
    error: str | None = None
    attempts: int = 0


# -- request and response -----------------------------------------------------------------


def image_data_uri(image: Any, pixels: PixelBudget) -> str:
    """The image resized to its model grid, as a PNG data URI (lossless: the endpoint
    sees the pixels our own engine would)."""
    buffer = io.BytesIO()
    to_grid_image(image, pixels).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def openai_messages(prompt: Any, pixels: PixelBudget) -> list[dict[str, Any]]:
    """A :class:`~mmrad.eval.inference.ChatPrompt` as OpenAI messages: each image
    placeholder becomes an ``image_url`` part holding the next image."""
    images = iter(prompt.images)
    messages = []
    for message in prompt.messages:
        content = message.get("content")
        if isinstance(content, list):
            parts = []
            for part in content:
                if part.get("type") == "image":
                    url = image_data_uri(next(images), pixels)
                    parts.append({"type": "image_url", "image_url": {"url": url}})
                else:
                    parts.append({"type": "text", "text": str(part.get("text", ""))})
            content = parts
        messages.append({"role": message.get("role", "user"), "content": content})
    return messages


def request_body(model: str, messages: list[dict[str, Any]], sampling: Sampling) -> dict:
    """Chat completions arguments for ``sampling``."""
    body: dict[str, Any] = {
        "model": model,
        "messages": messages,
        "n": sampling.n,
        "temperature": sampling.temperature,
        "top_p": sampling.top_p,
        "max_tokens": sampling.max_tokens,
    }
    if sampling.seed is not None:
        body["seed"] = sampling.seed
    if sampling.stop:
        body["stop"] = list(sampling.stop)
    if sampling.logprobs:
        body["logprobs"] = True
        body["top_logprobs"] = sampling.logprobs
    return body


def choice_score(choice: Mapping[str, Any]) -> float | None:
    """P(Yes) from a choice's ``logprobs.content`` (token texts and their top
    alternatives), as :func:`mmrad.engine.sampling.answer_score` reads the engine's."""
    logprobs = choice.get("logprobs") or {}
    content = logprobs.get("content") or []
    if not content:
        return None
    tokens = [str(step.get("token", "")) for step in content]
    tops = [_alternatives(step.get("top_logprobs") or []) for step in content]
    return answer_score(tokens, tops)


def _alternatives(top: Sequence[Mapping[str, Any]]) -> dict[str, float]:
    return {str(alt.get("token", "")): float(alt.get("logprob")) for alt in top}


def result_from_response(
    data: Mapping[str, Any], latency_ms: float, attempts: int
) -> EndpointResult:
    choices = sorted(data.get("choices") or [], key=lambda c: c.get("index", 0))
    if not choices:
        return EndpointResult(latency_ms=latency_ms, attempts=attempts,
                              error="the endpoint returned no choices")  # fmt: skip
    return EndpointResult(
        completions=tuple(str((c.get("message") or {}).get("content") or "") for c in choices),
        scores=tuple(choice_score(c) for c in choices),
        finish_reasons=tuple(c.get("finish_reason") for c in choices),
        latency_ms=latency_ms,
        attempts=attempts,
    )


# -- the client ---------------------------------------------------------------------------


@dataclass
class EndpointClient:
    """Bounded chat completions against ``target``, retried by the ``openai`` SDK."""

    target: EndpointTarget
    pixels: PixelBudget
    key: SecretStr | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.key is None:  # from this process's environment
            self.key = SecretStr(api_key(self.target))

    def complete_many(self, prompts: Sequence[Any], sampling: Sampling) -> list[EndpointResult]:
        """Every prompt's result, in order; at most ``max_concurrency`` in flight."""
        return asyncio.run(self._complete_all(prompts, sampling))

    def sdk_client(self) -> Any:
        """An ``AsyncOpenAI`` whose retries and per-try timeout are the target's."""
        from openai import AsyncOpenAI

        return AsyncOpenAI(
            base_url=self.target.url,
            api_key=self.key.get_secret_value(),
            max_retries=self.target.retries,
            timeout=self.target.timeout_s,
        )

    async def _complete_all(
        self, prompts: Sequence[Any], sampling: Sampling
    ) -> list[EndpointResult]:
        limit = asyncio.Semaphore(self.target.max_concurrency)
        async with self.sdk_client() as client:

            async def one(prompt: Any) -> EndpointResult:
                async with limit:
                    return await self.complete(client, prompt, sampling)

            return list(await asyncio.gather(*(one(p) for p in prompts)))

    async def complete(self, client: Any, prompt: Any, sampling: Sampling) -> EndpointResult:
        """One sample, with the SDK's retries; never raises for what the endpoint does."""
        start = time.perf_counter()
        try:
            body = request_body(self.target.model, openai_messages(prompt, self.pixels), sampling)
        except Exception as err:
            return EndpointResult(error=f"building the request failed: {type(err).__name__}: {err}")
        try:
            raw = await client.chat.completions.with_raw_response.create(**body)
            data, tries = raw.parse().model_dump(), raw.retries_taken + 1
        except Exception as err:  # what is left after the SDK's last retry
            tries = tries_before(err)
            error = f"after {tries} tries: {failure_message(err, self.target.timeout_s)}"
            return EndpointResult(latency_ms=_ms_since(start), attempts=tries, error=error)
        return result_from_response(data, _ms_since(start), tries)


def tries_before(err: Exception) -> int:
    """How many tries the SDK made before raising ``err``: it numbers each request it
    sends in a retry-count header (1 for errors that carry no request)."""
    request = getattr(err, "request", None)
    count = request.headers.get(RETRY_COUNT_HEADER) if request is not None else None
    return int(count) + 1 if count and count.isdigit() else 1


def failure_message(err: Exception, timeout_s: float) -> str:
    """What went wrong, for the sample's ``error`` (never the key)."""
    import openai

    if isinstance(err, openai.APIStatusError):
        text = _short(getattr(err.response, "text", "") or str(err))
        return f"HTTP {err.status_code}: {text}"
    if isinstance(err, openai.APITimeoutError):  # before its base class, APIConnectionError
        return f"timed out after {timeout_s:g} s"
    if isinstance(err, openai.APIConnectionError):
        return f"connection failed: {_short(str(err.__cause__ or err))}"
    return f"{type(err).__name__}: {_short(str(err))}"  # a malformed response body, say


def api_key(target: EndpointTarget) -> str:
    """The key from the environment variable ``target.api_key_env`` names."""
    if target.api_key_env is None:
        return NO_KEY
    value = os.environ.get(target.api_key_env)
    if not value:
        raise EndpointConfigError(
            f"target.api_key_env: environment variable {target.api_key_env} is not set "
            "(set it, or api_key_env: null for an endpoint without a key)"
        )
    return value


def _ms_since(start: float) -> float:
    return 1000 * (time.perf_counter() - start)


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= ERROR_BODY_CHARS else text[:ERROR_BODY_CHARS] + " …"
