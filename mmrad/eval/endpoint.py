"""An OpenAI-compatible chat completions client for evaluation and annotation.

How the paper's generalist baselines (GPT-4o, Qwen2.5-VL-72B behind vLLM, ...) and our
own Serve deployment are evaluated. Images go out already resized to the model grid, as
PNG data URIs, and the prompt states that grid's size, so boxes come back in it whatever
the endpoint does internally. Calls are concurrent but bounded (``max_concurrency``);
429, 5xx, timeouts and connection errors are retried with exponential backoff and full
jitter (a ``Retry-After`` header is honoured), other 4xx are not; whatever still fails is
recorded on that sample and the rest go on. P(Yes) comes from ``logprobs.top_logprobs``
of the answer's first token when the endpoint returns them.

The API key is read from the environment variable the config names (by the driver, which
hands it to the actors as a ``SecretStr``: variables set in the driver after Ray started
do not reach workers); it is never logged or put in an error message.
"""

from __future__ import annotations

import asyncio
import base64
import io
import os
import random
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


class EndpointConfigError(ValueError):
    """The endpoint target cannot be used (e.g. its API key variable is unset)."""


@dataclass(frozen=True)
class EndpointResult:
    """One sample's outcome: ``n`` completions (fewer if the endpoint returned fewer),
    their P(Yes) scores (``None`` without log-probs), or an ``error`` after the last
    try. ``latency_ms`` spans every try and backoff."""

    completions: tuple[str, ...] = ()
    scores: tuple[float | None, ...] = ()
    finish_reasons: tuple[str | None, ...] = ()
    latency_ms: float = 0.0
    error: str | None = None
    attempts: int = 0


# -- retry policy (pure) ------------------------------------------------------------------


def is_retryable(status: int | None) -> bool:
    """429 (rate limited) and 5xx are worth another try; ``None`` = no response at all
    (timeout, connection refused or reset)."""
    return status is None or status == 429 or status >= 500


def backoff_delay(
    attempt: int,
    base_s: float,
    max_s: float,
    retry_after_s: float | None = None,
    rng: random.Random | None = None,
) -> float:
    """Seconds to wait before retry number ``attempt`` (0-based): "full jitter", uniform
    in ``[0, min(max_s, base_s * 2**attempt)]``, so many clients rate-limited at once
    spread out; a server's ``Retry-After`` is a floor (capped at ``max_s``)."""
    ceiling = min(max_s, base_s * 2**attempt)
    delay = (rng or random).uniform(0.0, ceiling)
    if retry_after_s is not None:
        delay = max(delay, min(max_s, retry_after_s))
    return delay


def retry_after_seconds(headers: Mapping[str, str] | None) -> float | None:
    """``Retry-After`` in seconds (the HTTP-date form is ignored)."""
    value = (headers or {}).get("retry-after")
    try:
        return max(0.0, float(value)) if value is not None else None
    except ValueError:
        return None


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
class _Failure:
    status: int | None
    message: str
    retry_after_s: float | None = None


@dataclass
class EndpointClient:
    """Bounded, retrying chat completions against ``target`` (the ``openai`` SDK, with
    its own retries off so the policy above is the only one)."""

    target: EndpointTarget
    pixels: PixelBudget
    key: SecretStr | None = field(default=None, repr=False)
    rng: random.Random = field(default_factory=random.Random)

    def __post_init__(self) -> None:
        if self.key is None:  # from this process's environment
            self.key = SecretStr(api_key(self.target))

    def complete_many(self, prompts: Sequence[Any], sampling: Sampling) -> list[EndpointResult]:
        """Every prompt's result, in order; at most ``max_concurrency`` in flight."""
        return asyncio.run(self._complete_all(prompts, sampling))

    async def _complete_all(
        self, prompts: Sequence[Any], sampling: Sampling
    ) -> list[EndpointResult]:
        from openai import AsyncOpenAI

        limit = asyncio.Semaphore(self.target.max_concurrency)
        client = AsyncOpenAI(
            base_url=self.target.url,
            api_key=self.key.get_secret_value(),
            max_retries=0,
            timeout=self.target.timeout_s,
        )
        async with client:

            async def one(prompt: Any) -> EndpointResult:
                async with limit:
                    return await self.complete(client, prompt, sampling)

            return list(await asyncio.gather(*(one(p) for p in prompts)))

    async def complete(self, client: Any, prompt: Any, sampling: Sampling) -> EndpointResult:
        """One sample, with retries; never raises for what the endpoint does."""
        start = time.perf_counter()
        try:
            body = request_body(self.target.model, openai_messages(prompt, self.pixels), sampling)
        except Exception as err:
            return EndpointResult(error=f"building the request failed: {type(err).__name__}: {err}")
        attempt = 0
        while True:
            attempt += 1
            outcome = await self._try(client, body)
            elapsed_ms = 1000 * (time.perf_counter() - start)
            if not isinstance(outcome, _Failure):
                return result_from_response(outcome, elapsed_ms, attempt)
            retries_left = attempt <= self.target.retries
            if not (retries_left and is_retryable(outcome.status)):
                error = f"after {attempt} tries: {outcome.message}"
                return EndpointResult(latency_ms=elapsed_ms, attempts=attempt, error=error)
            delay = backoff_delay(attempt - 1, self.target.backoff_s, self.target.max_backoff_s,
                                  outcome.retry_after_s, self.rng)  # fmt: skip
            await asyncio.sleep(delay)

    async def _try(self, client: Any, body: dict) -> dict | _Failure:
        import openai

        try:
            response = await client.chat.completions.create(**body)
            return response.model_dump()
        except openai.APIStatusError as err:
            text = _short(getattr(err.response, "text", "") or str(err))
            headers = {k.lower(): v for k, v in err.response.headers.items()}
            return _Failure(err.status_code, f"HTTP {err.status_code}: {text}",
                            retry_after_seconds(headers))  # fmt: skip
        except openai.APITimeoutError:
            return _Failure(None, f"timed out after {self.target.timeout_s:g} s")
        except openai.APIConnectionError as err:
            return _Failure(None, f"connection failed: {_short(str(err.__cause__ or err))}")
        except Exception as err:  # a malformed response body, for instance
            return _Failure(0, f"{type(err).__name__}: {_short(str(err))}")


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


def _short(text: str) -> str:
    text = " ".join(text.split())
    return text if len(text) <= ERROR_BODY_CHARS else text[:ERROR_BODY_CHARS] + " …"
