"""vLLM's own OpenAI serving layer behind the Serve app, and one adapter per production
line, driven with the official ``openai`` client and plain HTTP against the package's
running app (see ``conftest.py``: the SFT export plus three adapters, two loaded at once)."""

from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.serve.conftest import MAX_LOADED_ADAPTERS
from tests.serve.test_serve_app import auth, chat_messages_for, data_uri, detect_json, png_bytes

pytestmark = pytest.mark.integration


def openai_client(endpoint):
    import openai

    return openai.OpenAI(
        base_url=f"{endpoint.base_url}/v1", api_key=endpoint.api_key, max_retries=0, timeout=300
    )


def greedy(client, model: str, messages: list[dict], max_tokens: int = 256, **extra):
    return client.chat.completions.create(
        model=model, messages=messages, temperature=0, max_tokens=max_tokens, **extra
    )


def test_vllm_layer_answers_what_the_protocol_allows(serve_endpoint, inspection):
    import openai

    endpoint = serve_endpoint
    client = openai_client(endpoint)
    messages = chat_messages_for(inspection)
    plain = greedy(client, endpoint.model, messages, max_tokens=32).choices[0]
    assert plain.message.content and not plain.message.content.lstrip().startswith("{")

    # stop: the answer is cut before the first occurrence of the stop string.
    text = plain.message.content
    stop = next(text[i : i + 3] for i in range(4, len(text) - 3) if text[i : i + 3].strip())
    stopped = greedy(client, endpoint.model, messages, max_tokens=32, stop=[stop]).choices[0]
    assert stopped.message.content == text[: text.index(stop)]
    assert stopped.finish_reason == "stop"

    # response_format: vLLM's structured outputs constrain the same greedy answer to JSON.
    as_json = greedy(client, endpoint.model, messages, max_tokens=32,
                     response_format={"type": "json_object"}).choices[0]  # fmt: skip
    assert as_json.message.content.lstrip().startswith("{"), as_json.message.content
    schema = {"type": "object", "properties": {"anomalous": {"type": "boolean"}},
              "required": ["anomalous"], "additionalProperties": False}  # fmt: skip
    verdict = {"type": "json_schema", "json_schema": {"name": "verdict", "schema": schema}}
    typed = greedy(client, endpoint.model, messages, max_tokens=32, response_format=verdict)
    typed = typed.choices[0]
    assert typed.finish_reason == "stop", typed.message.content
    assert set(json.loads(typed.message.content)) == {"anomalous"}

    # Sampling parameters vLLM's server takes pass through: penalties are accepted, and a
    # logit bias against the greedy answer's first token changes the answer.
    penalised = greedy(client, endpoint.model, messages, max_tokens=8, presence_penalty=1.5,
                       frequency_penalty=1.5)  # fmt: skip
    assert penalised.choices[0].finish_reason == "length"
    first = greedy(client, endpoint.model, messages, max_tokens=1,
                   extra_body={"return_token_ids": True}).choices[0]  # fmt: skip
    [first_id] = first.model_extra["token_ids"]
    biased = greedy(client, endpoint.model, messages, max_tokens=8,
                    logit_bias={str(first_id): -100}).choices[0]  # fmt: skip
    assert not biased.message.content.startswith(first.message.content)
    completion = client.completions.create(
        model=endpoint.model, prompt="Is the bottle cracked?", max_tokens=6, temperature=0
    )
    assert completion.usage.completion_tokens == 6 and completion.choices[0].text

    # What the server does not support is refused by name, never silently ignored.
    with pytest.raises(openai.BadRequestError, match="'colour'"):
        greedy(client, endpoint.model, messages, max_tokens=4, extra_body={"colour": "red"})
    audio = [{"role": "user", "content": [{"type": "input_audio", "input_audio": {}}]}]
    with pytest.raises(openai.BadRequestError, match="input_audio"):
        greedy(client, endpoint.model, audio, max_tokens=4)
    tool = {"type": "function", "function": {"name": "measure", "parameters": {}}}
    with pytest.raises(openai.BadRequestError, match="'tools'"):
        greedy(client, endpoint.model, messages, max_tokens=4, tools=[tool])
    for hostile in ({"seed": 2**64}, {"seed": -(10**30)}, {"max_tokens": 2**70}):
        response = httpx.post(f"{endpoint.base_url}/v1/chat/completions", headers=auth(endpoint),
                              json={"model": endpoint.model, "messages": messages, **hostile},
                              timeout=60)  # fmt: skip
        assert 400 <= response.status_code < 500, (hostile, response.text)
        assert response.json()["error"]["message"], hostile


def test_each_adapter_answers_as_when_sent_alone(serve_endpoint, inspection):
    """Base and adapter requests batched together answer exactly as each alone (greedy),
    on /v1/chat/completions and /v1/detect; unknown names get a 404 listing the known."""
    import openai

    endpoint = serve_endpoint
    client = openai_client(endpoint)
    listed = client.models.list().data
    assert [m.id for m in listed] == [endpoint.model, *endpoint.adapters]
    assert all(m.parent == endpoint.model for m in listed[1:])

    messages = chat_messages_for(inspection)
    names = [endpoint.model, "line-a", "line-b"]
    alone = {name: greedy(client, name, messages) for name in names}
    answers = {name: reply.choices[0].message.content for name, reply in alone.items()}
    assert len(set(answers.values())) == len(names), answers  # each adapter changes answers
    assert {name: reply.model for name, reply in alone.items()} == {n: n for n in names}

    def detect(name: str) -> str:
        form = {} if name == endpoint.model else {"model": name}
        response = detect_json(endpoint, inspection, **form)
        assert response.status_code == 200, response.text
        assert response.json()["model"] == name
        return response.json()["completion"]

    def chat(name: str) -> str:
        return greedy(client, name, messages).choices[0].message.content

    jobs = [(chat, name) for name in names] * 2 + [(detect, name) for name in names]
    with ThreadPoolExecutor(len(jobs)) as pool:
        together = list(pool.map(lambda job: (job[1], job[0](job[1])), jobs))
    assert [answer for _, answer in together] == [answers[name] for name, _ in together]

    with pytest.raises(openai.NotFoundError, match="line-a"):
        greedy(client, "line-z", messages, max_tokens=1)
    missing = detect_json(endpoint, inspection, model="line-z")
    assert missing.status_code == 404 and "'line-c'" in missing.json()["error"]["message"]

    greedy(client, "line-c", messages, max_tokens=4)  # the third: one of a and b is dropped
    models = httpx.get(f"{endpoint.base_url}/v1/models", headers=auth(endpoint), timeout=30)
    loaded = {m["id"] for m in models.json()["data"][1:] if m["loaded"]}
    assert "line-c" in loaded and len(loaded) == MAX_LOADED_ADAPTERS, loaded
    dropped = ({"line-a", "line-b"} - loaded).pop()
    assert chat(dropped) == answers[dropped]  # reloaded from its folder (line-b: from S3)


def test_bad_image_parts_are_refused_before_vllm(serve_endpoint, inspection):
    endpoint = serve_endpoint
    good = data_uri(png_bytes(inspection["image"]))
    parts = [{"type": "image_url", "image_url": {"url": good}}] * 3
    body = {"model": endpoint.model, "messages": [{"role": "user", "content": parts}]}
    response = httpx.post(f"{endpoint.base_url}/v1/chat/completions", headers=auth(endpoint),
                          json=body, timeout=60)  # fmt: skip
    assert response.status_code == 400 and "more than 2 images" in response.text
