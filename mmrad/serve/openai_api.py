"""The OpenAI chat completions protocol on top of the engine: what existing clients
(the ``openai`` SDK, evaluation's endpoint client, annotation) send and read.

Honoured: ``messages`` with ``text`` and ``image_url`` parts (``data:`` URIs only: the
server fetches nothing), ``n``, ``temperature``, ``top_p``, ``max_tokens`` /
``max_completion_tokens``, ``seed``, ``stop``, ``logprobs`` + ``top_logprobs`` (the
OpenAI ``logprobs.content`` shape), ``stream`` (server-sent events ending in
``data: [DONE]``, with ``stream_options.include_usage``). Other OpenAI parameters are
ignored, as vLLM's own server does.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Literal

from PIL import Image
from pydantic import BaseModel, ConfigDict, Field, model_validator

from mmrad.engine.sampling import Sampling, TokenLogprobs, token_logprobs
from mmrad.serve.errors import ApiError
from mmrad.serve.images import ImageLimits, decode_base64_image

MAX_N = 16
MAX_TOP_LOGPROBS = 20  # OpenAI's limit, and vLLM's default cap


class ImageURL(BaseModel):
    url: str
    detail: str | None = None


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class ImagePart(BaseModel):
    type: Literal["image_url"]
    image_url: ImageURL


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="ignore")

    role: Literal["system", "user", "assistant"]
    content: str | list[TextPart | ImagePart] | None = None


class StreamOptions(BaseModel):
    include_usage: bool = False


class ChatRequest(BaseModel):
    """An OpenAI chat completions request (the parameters mmrad honours)."""

    model_config = ConfigDict(extra="ignore")

    model: str
    messages: list[ChatMessage] = Field(min_length=1)
    n: int = Field(1, ge=1, le=MAX_N)
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: int | None = Field(None, ge=0, le=MAX_TOP_LOGPROBS)
    stream: bool = False
    stream_options: StreamOptions | None = None
    seed: int | None = None
    stop: str | list[str] | None = None

    @model_validator(mode="after")
    def _top_needs_logprobs(self) -> ChatRequest:
        if self.top_logprobs and not self.logprobs:
            raise ValueError("top_logprobs needs logprobs: true")
        return self

    def sampling(self, default_max_tokens: int) -> Sampling:
        stop = [self.stop] if isinstance(self.stop, str) else list(self.stop or [])
        return Sampling(
            n=self.n,
            temperature=self.temperature,
            top_p=self.top_p,
            max_tokens=self.max_completion_tokens or self.max_tokens or default_max_tokens,
            logprobs=(self.top_logprobs or 0) if self.logprobs else None,
            seed=self.seed,
            stop=tuple(stop),
        )

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)


def chat_messages(
    request: ChatRequest, limits: ImageLimits, max_images: int
) -> tuple[list[dict[str, Any]], list[Image.Image]]:
    """The request's messages as chat-template messages (images as ``{"type": "image"}``
    placeholders) and the decoded images in order. Runs the image checks of
    :mod:`mmrad.serve.images` on every image."""
    messages, images = [], []
    for m, message in enumerate(request.messages):
        if message.content is None or isinstance(message.content, str):
            messages.append({"role": message.role, "content": message.content or ""})
            continue
        parts: list[dict[str, Any]] = []
        for p, part in enumerate(message.content):
            if isinstance(part, TextPart):
                parts.append({"type": "text", "text": part.text})
                continue
            where = f"messages.{m}.content.{p}.image_url.url"
            if not part.image_url.url.startswith("data:"):
                raise ApiError(400, f"field {where!r}: only data: URIs are accepted", where)
            if len(images) == max_images:
                raise ApiError(400, f"field {where!r}: more than {max_images} images", where)
            images.append(decode_base64_image(part.image_url.url, where, limits))
            parts.append({"type": "image"})
        messages.append({"role": message.role, "content": parts})
    return messages, images


# -- responses --------------------------------------------------------------------------


def openai_logprobs(steps: TokenLogprobs, top: int) -> dict[str, Any]:
    """``{"content": [{token, logprob, bytes, top_logprobs: [...]}, ...]}``."""
    content = []
    for token, logprob, alternatives in zip(steps.tokens, steps.logprobs, steps.top, strict=True):
        best = sorted(alternatives.items(), key=lambda kv: kv[1], reverse=True)[:top]
        content.append(
            {
                "token": token,
                "logprob": logprob,
                "bytes": list(token.encode("utf-8")),
                "top_logprobs": [
                    {"token": t, "logprob": v, "bytes": list(t.encode("utf-8"))} for t, v in best
                ],
            }
        )
    return {"content": content}


@dataclass
class ResponseMeta:
    model: str
    top_logprobs: int
    id: str = field(default_factory=lambda: f"chatcmpl-{uuid.uuid4().hex}")
    created: int = field(default_factory=lambda: int(time.time()))

    def envelope(self, kind: str) -> dict[str, Any]:
        return {"id": self.id, "object": kind, "created": self.created, "model": self.model}


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def chat_response(final: Any, meta: ResponseMeta) -> dict[str, Any]:
    """A ``chat.completion`` from vLLM's final ``RequestOutput``."""
    choices = []
    for output in sorted(final.outputs, key=lambda o: o.index):
        steps = token_logprobs(output)
        choices.append(
            {
                "index": output.index,
                "message": {"role": "assistant", "content": output.text},
                "logprobs": None if steps is None else openai_logprobs(steps, meta.top_logprobs),
                "finish_reason": output.finish_reason,
            }
        )
    completion_tokens = sum(len(o.token_ids) for o in final.outputs)
    return {
        **meta.envelope("chat.completion"),
        "choices": choices,
        "usage": usage(len(final.prompt_token_ids or []), completion_tokens),
    }


def sse(data: Mapping[str, Any] | str) -> str:
    """One server-sent event."""
    text = data if isinstance(data, str) else json.dumps(data, separators=(",", ":"))
    return f"data: {text}\n\n"


async def chat_stream(
    deltas: AsyncIterator[Any], meta: ResponseMeta, n: int, include_usage: bool
) -> AsyncIterator[str]:
    """``chat.completion.chunk`` events from vLLM's delta outputs: first the assistant
    role for each choice, then text (and log-probs) as tokens come, a last chunk per
    choice with its ``finish_reason``, optionally the usage, then ``[DONE]``. An error
    mid-stream is sent as an ``error`` event before ``[DONE]`` (the status is already 200)."""
    chunk = meta.envelope("chat.completion.chunk")
    for index in range(n):
        delta = {"role": "assistant", "content": ""}
        yield sse({**chunk, "choices": [_chunk_choice(index, delta, None, None)]})
    prompt_tokens = completion_tokens = 0
    try:
        async for output in deltas:
            prompt_tokens = len(output.prompt_token_ids or []) or prompt_tokens
            for part in output.outputs:
                completion_tokens += len(part.token_ids)
                if not (part.text or part.token_ids or part.finish_reason):
                    continue
                steps = token_logprobs(part)
                logprobs = None if steps is None else openai_logprobs(steps, meta.top_logprobs)
                delta = {"content": part.text}
                choice = _chunk_choice(part.index, delta, logprobs, part.finish_reason)
                yield sse({**chunk, "choices": [choice]})
    except ApiError as err:
        yield sse(err.body())
    except Exception as err:  # the client gets a reason instead of a cut connection
        yield sse({"error": {"message": f"generation failed: {type(err).__name__}",
                             "type": "server_error", "param": None, "code": 500}})  # fmt: skip
    else:
        if include_usage:
            yield sse({**chunk, "choices": [], "usage": usage(prompt_tokens, completion_tokens)})
    yield sse("[DONE]")


def _chunk_choice(
    index: int, delta: dict[str, Any], logprobs: dict | None, finish_reason: str | None
) -> dict[str, Any]:
    return {"index": index, "delta": delta, "logprobs": logprobs, "finish_reason": finish_reason}


def check_model(requested: str, served: str) -> None:
    """404 for a model this server does not serve (as OpenAI and vLLM answer)."""
    if requested != served:
        raise ApiError(404, f"model {requested!r} does not exist; this server has {served!r}",
                       "model")  # fmt: skip


def model_list(served: str, created: int, contract: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's model list; ``mmrad_contract`` says how the model is prompted (what a
    client building its own prompts needs, overrides of the export included)."""
    entry = {"id": served, "object": "model", "created": created, "owned_by": "mmrad",
             "mmrad_contract": contract}  # fmt: skip
    return {"object": "list", "data": [entry]}
