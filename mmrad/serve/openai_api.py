"""The OpenAI routes' checks in front of vLLM's own serving layer, and the model list.

vLLM's serving classes (:mod:`mmrad.serve.vllm_api`) implement the protocol: chat and
completions, ``n``, sampling parameters, ``stop``, ``seed``, log-probs, ``stream`` with
usage, ``response_format`` (JSON object and JSON schema), penalties, ``logit_bias``.
What stays in front, because vLLM's server would accept it:

- fields vLLM does not know are refused with a 400 naming them (vLLM only logs them), and
  so are ``tools`` and ``functions`` (tool calling is not enabled), so a client never gets
  an answer that silently ignored what it asked for;
- images: ``data:`` URIs only (the server fetches nothing), at most ``max_images`` per
  request, each checked for type, bytes and decoded pixels from its header, then decoded
  within the replica's decode budget and handed to vLLM as a PNG on its model grid
  (:mod:`mmrad.serve.decoding`); part types other than text and images refused;
- ``max_tokens`` defaults to the app's ``max_tokens`` instead of the rest of the context.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, ValidationError

from mmrad.serve.errors import ApiError, validation_error
from mmrad.serve.images import EncodedImage, ImageLimits, checked_base64_image

CONTENT_PART_TYPES = ("text", "image_url")


def unknown_fields(data: Mapping[str, Any], request_type: type[BaseModel]) -> list[str]:
    """Top-level keys of ``data`` that ``request_type`` has no field (or alias) for."""
    known = set()
    for name, field in request_type.model_fields.items():
        known |= {name, field.alias, field.validation_alias}
    return sorted(key for key in data if key not in known)


UNSERVED_FIELDS = {"tools": "tool calling", "functions": "function calling"}
"""Fields vLLM knows but answers without when its server was not started for them (the
chat template may still render the tools into the prompt): refused when not empty."""


def check_request_fields(data: Mapping[str, Any], request_type: type[BaseModel]) -> None:
    """400 naming the first field this server does not support."""
    unknown = unknown_fields(data, request_type)
    if unknown:
        raise ApiError(400, f"field {unknown[0]!r} is not supported by this server "
                       f"(unknown: {', '.join(unknown)})", unknown[0])  # fmt: skip
    for name, feature in UNSERVED_FIELDS.items():
        if data.get(name):
            raise ApiError(400, f"field {name!r}: {feature} is not enabled on this server", name)


def check_chat_images(
    data: Mapping[str, Any], limits: ImageLimits, max_images: int
) -> list[tuple[dict[str, Any], EncodedImage]]:
    """Every content part a text or a ``data:`` image within the limits (see the module
    docstring), and each image part with its image, not yet decoded; malformed messages
    are left to the request's own validation."""
    images: list[tuple[dict[str, Any], EncodedImage]] = []
    count = 0
    messages = data.get("messages")
    for m, message in enumerate(messages if isinstance(messages, list) else []):
        content = message.get("content") if isinstance(message, dict) else None
        for p, part in enumerate(content if isinstance(content, list) else []):
            if not isinstance(part, dict):
                continue
            where = f"messages.{m}.content.{p}"
            kind = part.get("type")
            if kind not in CONTENT_PART_TYPES:
                raise ApiError(400, f"field {where + '.type'!r}: {kind!r} parts are not "
                               f"accepted ({', '.join(CONTENT_PART_TYPES)})", where)  # fmt: skip
            if kind == "image_url":
                count += 1
                if count > max_images:
                    raise ApiError(400, f"field {where!r}: more than {max_images} images", where)
                images.append((part, check_image_part(part, f"{where}.image_url.url", limits)))
    return images


def check_image_part(part: Mapping[str, Any], where: str, limits: ImageLimits) -> EncodedImage:
    image_url = part.get("image_url")
    url = image_url.get("url") if isinstance(image_url, dict) else image_url
    if not isinstance(url, str):
        raise ApiError(400, f"field {where!r}: expected a data: URI", where)
    if not url.startswith("data:"):
        raise ApiError(400, f"field {where!r}: only data: URIs are accepted", where)
    return checked_base64_image(url, where, limits)


def replace_image_url(part: dict[str, Any], url: str) -> None:
    """Point an ``image_url`` part at ``url``, keeping its other keys (``detail``)."""
    image_url = part.get("image_url")
    part["image_url"] = {**(image_url if isinstance(image_url, dict) else {}), "url": url}


def with_default_max_tokens(data: Mapping[str, Any], max_tokens: int) -> dict[str, Any]:
    """``data`` with ``max_tokens`` set when the client set no token limit."""
    if data.get("max_tokens") is None and data.get("max_completion_tokens") is None:
        return {**data, "max_tokens": max_tokens}
    return dict(data)


def validated(request_type: type[BaseModel], data: Mapping[str, Any]) -> Any:
    """``request_type`` from ``data``, or a 422 naming every bad field."""
    try:
        return request_type.model_validate(data)
    except ValidationError as err:
        raise validation_error(err) from None


def requested_model(data: Mapping[str, Any]) -> str:
    model = data.get("model")
    if not isinstance(model, str):
        raise ApiError(422, "field 'model': a model name (string) is required", "model")
    return model


def sequences(data: Mapping[str, Any]) -> int:
    """The engine slots a request asks for (its ``n``; malformed values count 1 and are
    refused by validation)."""
    n = data.get("n")
    return n if isinstance(n, int) and 1 <= n <= 128 else 1


def model_list(
    served: str,
    created: int,
    contract: dict[str, Any],
    adapters: Mapping[str, str],
    loaded: set[str],
) -> dict[str, Any]:
    """OpenAI's model list: the base model first (its ``mmrad_contract`` says how it is
    prompted: what a client building its own prompts needs), then each adapter with the
    base as ``parent`` and whether this replica has loaded it yet."""
    base = {"id": served, "object": "model", "created": created, "owned_by": "mmrad",
            "mmrad_contract": contract}  # fmt: skip
    entries = [
        {
            "id": name,
            "object": "model",
            "created": created,
            "owned_by": "mmrad",
            "parent": served,
            "root": uri,
            "loaded": name in loaded,
        }  # fmt: skip
        for name, uri in adapters.items()
    ]
    return {"object": "list", "data": [base, *entries]}
