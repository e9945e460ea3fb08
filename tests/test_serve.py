"""``tokenprune serve``: a live server on 127.0.0.1, driven by the official ``openai`` client."""

from __future__ import annotations

import asyncio
import base64
import dataclasses
import io
import ipaddress
import json
import logging
import os
import pathlib
import re
import socket
import threading
import time
import urllib.request

import httpx
import openai
import pytest
from fastapi.responses import Response
from PIL import Image

from tokenprune.config import PrunerConfig
from tokenprune.serve import Limits, build_engine
from tokenprune.serve.app import create_app
from tokenprune.serve.background import BackgroundServer
from tokenprune.testing import save_tiny_checkpoint

MODEL = "tiny"
KEY = "tp-test-key-0123"


def image_url(size: int = 48, color: tuple[int, int, int] = (200, 30, 30), fmt: str = "PNG") -> str:
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), color).save(buffer, format=fmt)
    return f"data:image/{fmt.lower()};base64,{base64.b64encode(buffer.getvalue()).decode()}"


def user(text: str, *images: str) -> list[dict]:
    parts = [{"type": "image_url", "image_url": {"url": url}} for url in images]
    return [{"role": "user", "content": [*parts, {"type": "text", "text": text}]}]


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_tiny_checkpoint(tmp_path_factory.mktemp("tiny"))


@pytest.fixture(scope="module")
def engine(checkpoint):
    limits = Limits(
        max_images=2, max_image_bytes=64 * 1024, max_image_pixels=512 * 512, max_prompt_tokens=400
    )
    return build_engine(str(checkpoint), MODEL, PrunerConfig("dart", keep_ratio=0.25), limits)


@pytest.fixture(scope="module")
def server(engine):
    with BackgroundServer(create_app(engine, max_batch=8, window_s=0.02, max_body_bytes=256 * 1024)) as live:
        yield live


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=60)


def test_models_and_health(client, server):
    assert [m.id for m in client.models.list().data] == [MODEL]
    assert httpx.get(f"{server.url}/health").json() == {"status": "ok"}


def test_chat_completion_reports_pruned_visual_tokens(client):
    response = client.chat.completions.create(
        model=MODEL, messages=user("what color is it?", image_url()), max_tokens=5
    )
    usage = response.model_dump()["usage"]
    assert usage["visual_tokens"] == {"before": 64, "after": 16}
    assert usage["completion_tokens"] <= 5 and usage["prompt_tokens"] > 64
    assert response.choices[0].finish_reason in ("stop", "length")
    assert isinstance(response.choices[0].message.content, str)


def test_the_answer_is_the_pruned_models_answer(client, engine, checkpoint):
    """Served text equals a direct greedy ``generate`` of the same prompt with the same pruner, on the same
    checkpoint loaded apart (the served model keeps its pruner between batches)."""
    import torch
    from transformers import LlavaForConditionalGeneration

    import tokenprune as tp

    messages = user("describe the picture", image_url(color=(10, 90, 200)))
    response = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
    processor, model = engine.processor, LlavaForConditionalGeneration.from_pretrained(checkpoint).eval()
    template = [
        {"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "describe the picture"}]}
    ]
    text = processor.apply_chat_template(template, add_generation_prompt=True)
    with io.BytesIO(base64.b64decode(messages[0]["content"][0]["image_url"]["url"].split(",")[1])) as f:
        picture = Image.open(f).convert("RGB")
    inputs = processor(images=picture, text=text, return_tensors="pt")
    with tp.pruned(model, "dart", keep_ratio=0.25), torch.no_grad():
        out = model.generate(**inputs, max_new_tokens=6, do_sample=False, pad_token_id=0)
    new = out[0, inputs["input_ids"].shape[1] :].tolist()
    eos = model.generation_config.eos_token_id
    new = new[: new.index(eos)] if eos in new else new
    assert response.choices[0].message.content == processor.tokenizer.decode(new, skip_special_tokens=True)


def test_compiled_decoding_serves_the_eager_answer(client, checkpoint):
    """``serve --compile``: a static cache and a compiled decode step behind the pruner give the answer the
    eager server gives."""
    limits = Limits(max_images=1, max_prompt_tokens=400)
    engine = build_engine(str(checkpoint), MODEL, PrunerConfig("dart", keep_ratio=0.25), limits, compile=True)
    assert engine.decoding["cache_implementation"] == "static"
    messages = user("describe the picture", image_url(color=(10, 90, 200)))
    with BackgroundServer(create_app(engine, max_batch=2, window_s=0.0)) as live:
        compiled = openai.OpenAI(base_url=f"{live.url}/v1", api_key="unused", max_retries=0, timeout=120)
        answer = compiled.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
    assert engine.model._compiled_call is not None  # the decode steps ran compiled
    eager = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=6)
    assert answer.choices[0].message.content == eager.choices[0].message.content


def test_streaming_yields_chunks_and_usage(client):
    stream = client.chat.completions.create(
        model=MODEL, messages=user("and now?", image_url()), max_tokens=6, stream=True
    )
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    assert chunks[-1].choices[0].finish_reason in ("stop", "length")
    text = "".join(c.choices[0].delta.content or "" for c in chunks)
    whole = client.chat.completions.create(model=MODEL, messages=user("and now?", image_url()), max_tokens=6)
    assert text == whole.choices[0].message.content
    assert chunks[-1].model_dump()["usage"]["visual_tokens"]["after"] == 16


def test_stream_ends_with_done(server):
    body = {"model": MODEL, "messages": user("hi", image_url()), "max_tokens": 3, "stream": True}
    with httpx.stream("POST", f"{server.url}/v1/chat/completions", json=body, timeout=60) as response:
        lines = [line for line in response.iter_lines() if line]
    assert response.headers["content-type"].startswith("text/event-stream")
    assert lines[-1] == "data: [DONE]"
    assert all(line.startswith("data: ") for line in lines)
    assert json.loads(lines[-2][6:])["object"] == "chat.completion.chunk"


def test_per_request_override(client):
    def visual(extra):
        response = client.chat.completions.create(
            model=MODEL, messages=user("q", image_url()), max_tokens=2, extra_body=extra
        )
        return response.model_dump()["usage"]["visual_tokens"]

    assert visual({"tokenprune": {"method": "fastv", "budget": 10}}) == {"before": 64, "after": 10}
    assert visual({"tokenprune": {"method": "none"}}) == {"before": 64, "after": 64}
    assert visual({"tokenprune": {"keep_ratio": 0.5}}) == {"before": 64, "after": 32}


def test_text_only_and_two_images(client):
    text_only = client.chat.completions.create(
        model=MODEL, messages=[{"role": "user", "content": "hello"}], max_tokens=3
    )
    assert text_only.model_dump()["usage"]["visual_tokens"] == {"before": 0, "after": 0}
    two = client.chat.completions.create(
        model=MODEL, messages=user("compare", image_url(), image_url(color=(0, 0, 0))), max_tokens=3
    )
    assert two.model_dump()["usage"]["visual_tokens"] == {"before": 128, "after": 32}


@pytest.mark.parametrize(
    ("body", "status", "code"),
    [
        ({"model": "gpt-9", "messages": [{"role": "user", "content": "x"}]}, 404, "model_not_found"),
        ({"model": MODEL, "messages": []}, 400, "invalid_value"),
        ({"model": MODEL}, 400, "invalid_value"),
        (
            {"model": MODEL, "messages": user("x", image_url(), image_url(), image_url())},
            400,
            "too_many_images",
        ),
        ({"model": MODEL, "messages": user("x", "data:image/png;base64,!!!")}, 400, None),
        (
            {
                "model": MODEL,
                "messages": user("x", "data:image/png;base64," + base64.b64encode(b"no").decode()),
            },
            400,
            "invalid_image",
        ),
        ({"model": MODEL, "messages": user("x", image_url(size=600))}, 400, "image_too_large"),
        ({"model": MODEL, "messages": user("x", "http://127.0.0.1:1/cat.png")}, 400, None),
        ({"model": MODEL, "messages": user("x", "/etc/passwd")}, 400, None),
        ({"model": MODEL, "messages": user("word " * 500)}, 400, "context_length_exceeded"),
        ({"model": MODEL, "messages": user("x"), "tokenprune": {"method": "nope"}}, 400, None),
        ({"model": MODEL, "messages": user("x"), "tokenprune": {"keep_ratio": 1.5}}, 400, None),
        ({"model": MODEL, "messages": user("x"), "tokenprune": {"budget": 65}}, 400, None),
        ({"model": MODEL, "messages": user("x"), "max_tokens": 0}, 400, "invalid_value"),
        ({"model": MODEL, "messages": user("x"), "n": 2}, 400, None),
        ({"model": MODEL, "messages": [{"role": "robot", "content": "x"}]}, 400, "invalid_value"),
    ],
)
def test_bad_requests_get_openai_errors(server, body, status, code):
    response = httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)
    assert response.status_code == status, response.text
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    assert error["code"] == code
    assert " object at 0x" not in error["message"], error["message"]  # no Python repr in an API error


def test_malformed_and_oversized_bodies(server):
    url = f"{server.url}/v1/chat/completions"
    bad_json = httpx.post(url, content=b"{not json", headers={"content-type": "application/json"})
    assert bad_json.status_code == 400 and bad_json.json()["error"]["code"] == "invalid_json"
    huge = httpx.post(url, content=b"x" * (300 * 1024), headers={"content-type": "application/json"})
    assert huge.status_code == 413 and "error" in huge.json()
    missing = httpx.get(f"{server.url}/v1/nothing")
    assert missing.status_code == 404 and "error" in missing.json()


def test_metrics_count_requests_and_tokens(client, server):
    client.chat.completions.create(model=MODEL, messages=user("q", image_url()), max_tokens=2)
    text = httpx.get(f"{server.url}/metrics").text
    values = {
        line.split(" ")[0]: float(line.split(" ")[1])
        for line in text.splitlines()
        if not line.startswith("#")
    }
    assert values['tokenprune_requests_total{status="200"}'] >= 1
    assert values["tokenprune_visual_tokens_in_total"] >= 64
    assert values["tokenprune_visual_tokens_kept_total"] < values["tokenprune_visual_tokens_in_total"]
    assert values["tokenprune_prefill_seconds_total"] > 0


def test_concurrent_requests_are_batched(server, engine):
    """Sixteen clients at once: every request answered, and fewer batches than requests."""
    import asyncio

    async def main():
        client = openai.AsyncOpenAI(base_url=f"{server.url}/v1", api_key="unused", max_retries=0, timeout=120)
        calls = [
            client.chat.completions.create(model=MODEL, messages=user(f"q{i}", image_url()), max_tokens=3)
            for i in range(16)
        ]
        return await asyncio.gather(*calls)

    before = dict(engine.metrics.totals)
    responses = asyncio.run(main())
    assert len(responses) == 16 and all(r.choices[0].message.content is not None for r in responses)
    batches = engine.metrics.totals["batches"] - before.get("batches", 0)
    assert engine.metrics.totals["batched_requests"] - before.get("batched_requests", 0) == 16
    assert batches < 16


def test_load_of_64_clients_and_fuzz_of_200_requests(engine):
    """The issue's load and fuzz runs, bounded, on a server with an API key: 64 concurrent clients with the
    key, no failure and bounded memory, with and without pruning; 200 malformed requests, half of them with
    a wrong, missing or garbled key, all answered 4xx JSON errors, exactly those without the key a 401;
    still healthy."""
    from tokenprune.eval.serve_load import malformed_requests, run_serve_benchmark

    results = run_serve_benchmark(
        engine, clients=64, rounds=1, max_tokens=3, max_batch=16, fuzz=200, api_key=KEY
    )
    pruned, unpruned = results["load"]
    for run in (pruned, unpruned):
        assert run["requests"] == 64 and run["failures"] == 0
        assert run["peak_rss_growth_mib"] < 1024
    assert pruned["visual_tokens_after"] == 64 * 16 and unpruned["visual_tokens_after"] == 64 * 64
    fuzz = results["fuzz"]
    assert fuzz["four_xx_json_errors"] == fuzz["requests"] == 200, fuzz["other"][:5]
    sent = malformed_requests(MODEL, 200, engine.limits, seed=0, api_key=KEY)
    keyless = sum(headers.get("authorization") != f"Bearer {KEY}" for _, headers in sent)
    assert 50 < keyless < 150 and fuzz["unauthorized"] == keyless
    assert fuzz["healthy_after"]


def test_serve_command_refuses_bad_settings(tmp_path):
    from typer.testing import CliRunner

    from tokenprune.cli import app

    result = CliRunner().invoke(app, ["serve", "--method", "nope"])
    assert result.exit_code == 2 and "unknown method" in result.output
    result = CliRunner().invoke(app, ["serve", "--model", str(tmp_path / "missing")])
    assert result.exit_code == 2 and "no checkpoint directory" in result.output
    result = CliRunner().invoke(app, ["bench-serve", "--arch", "vit-h", "--out", str(tmp_path)])
    assert result.exit_code == 2 and "unknown --arch 'vit-h'" in result.output


def test_the_pruner_stays_attached_while_the_config_does_not_change(client, engine):
    client.chat.completions.create(model=MODEL, messages=user("a", image_url()), max_tokens=2)
    first = engine.model._tokenprune_pruner
    client.chat.completions.create(model=MODEL, messages=user("b", image_url()), max_tokens=2)
    assert engine.model._tokenprune_pruner is first and first.config == engine.default
    extra = {"tokenprune": {"method": "none"}}
    client.chat.completions.create(
        model=MODEL, messages=user("c", image_url()), max_tokens=2, extra_body=extra
    )
    assert not hasattr(engine.model, "_tokenprune_pruner")


# -- access: the API key -----------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def keyed_server(engine):
    with BackgroundServer(create_app(engine, max_batch=8, window_s=0.02, api_key=KEY)) as live:
        yield live


def keyed_client(server, key: str) -> openai.OpenAI:
    return openai.OpenAI(base_url=f"{server.url}/v1", api_key=key, max_retries=0, timeout=60)


def test_the_client_with_the_key_gets_answers(keyed_server):
    client = keyed_client(keyed_server, KEY)
    assert [m.id for m in client.models.list().data] == [MODEL]
    response = client.chat.completions.create(model=MODEL, messages=user("q", image_url()), max_tokens=2)
    assert response.model_dump()["usage"]["visual_tokens"] == {"before": 64, "after": 16}


@pytest.mark.parametrize("key", [KEY + "x", KEY[:-1], KEY.upper(), "unused"])
def test_a_wrong_key_is_an_authentication_error(keyed_server, key):
    client = keyed_client(keyed_server, key)
    with pytest.raises(openai.AuthenticationError) as raised:
        client.models.list()
    assert raised.value.status_code == 401
    assert raised.value.body == {
        "message": "invalid API key",
        "type": "invalid_request_error",
        "param": None,
        "code": "invalid_api_key",
    }
    with pytest.raises(openai.AuthenticationError):
        client.chat.completions.create(model=MODEL, messages=user("q", image_url()), max_tokens=2)


@pytest.mark.parametrize(
    "header",
    [
        None,
        "",
        "Bearer",
        KEY,
        f"Basic {KEY}",
        f"Bearer  {KEY}",
        b"Bearer \xff" + KEY.encode(),
        "Bearer " + "k" * 4096,
    ],
)
@pytest.mark.parametrize(("method", "path"), [("GET", "/v1/models"), ("POST", "/v1/chat/completions")])
def test_every_v1_route_refuses_a_request_without_the_key(keyed_server, header, method, path):
    headers = {} if header is None else {"authorization": header}
    body = {"model": MODEL, "messages": user("q")}
    response = httpx.request(method, f"{keyed_server.url}{path}", json=body, headers=headers, timeout=60)
    assert response.status_code == 401, response.text
    assert response.headers["www-authenticate"] == "Bearer"
    error = response.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["code"] == "invalid_api_key"
    assert ("missing" in error["message"]) == (header is None)


def test_the_key_is_checked_before_the_body_and_the_route(keyed_server):
    url = keyed_server.url
    bad_json = httpx.post(f"{url}/v1/chat/completions", content=b"{not json")
    huge = httpx.post(f"{url}/v1/chat/completions", content=b"x" * (300 * 1024))
    missing = httpx.get(f"{url}/v1/nothing")
    assert [r.status_code for r in (bad_json, huge, missing)] == [401, 401, 401]
    authorized = httpx.get(f"{url}/v1/nothing", headers={"authorization": f"Bearer {KEY}"})
    assert authorized.status_code == 404
    lower_scheme = httpx.get(f"{url}/v1/models", headers={"authorization": f"bearer {KEY}"})
    assert lower_scheme.status_code == 200


def test_health_and_metrics_stay_open(keyed_server):
    assert httpx.get(f"{keyed_server.url}/health").json() == {"status": "ok"}
    metrics = httpx.get(f"{keyed_server.url}/metrics")
    assert metrics.status_code == 200 and "tokenprune_requests_total" in metrics.text


def test_the_key_is_compared_in_constant_time(monkeypatch):
    from tokenprune.serve import auth

    compared = []

    def spy(a, b):
        compared.append((a, b))
        return a == b

    monkeypatch.setattr(auth.secrets, "compare_digest", spy)
    assert auth.bearer_matches(f"Bearer {KEY}", KEY) and not auth.bearer_matches("Bearer nope", KEY)
    assert compared == [(KEY.encode(), KEY.encode()), (b"nope", KEY.encode())]


@pytest.mark.parametrize("key", ["", "two words", "tab\tkey", "clé"])
def test_a_key_no_client_can_send_is_refused_at_startup(engine, key):
    with pytest.raises(ValueError, match="API key"):
        create_app(engine, api_key=key)


@pytest.mark.parametrize(
    ("host", "loopback"),
    [("127.0.0.1", True), ("127.0.0.2", True), ("localhost", True), ("::1", True), ("0.0.0.0", False)]
    + [("::", False), ("", False), ("10.1.2.3", False), ("192.168.0.7", False)],
)
def test_loopback_hosts(host, loopback):
    from tokenprune.serve.auth import is_loopback

    assert is_loopback(host) is loopback


@pytest.fixture
def started(monkeypatch):
    """Runs ``tokenprune serve`` up to ``uvicorn.run``, which records its app and address instead."""
    import uvicorn

    calls = []
    monkeypatch.setattr(uvicorn, "run", lambda app, **kwargs: calls.append((app, kwargs)))
    monkeypatch.delenv("TOKENPRUNE_API_KEY", raising=False)
    return calls


def invoke_serve(*args: str, env: dict | None = None):
    from typer.testing import CliRunner

    from tokenprune.cli import app

    return CliRunner().invoke(app, ["serve", "--device", "cpu", "--model", MODEL, *args], env=env)


def test_serve_warns_when_exposed_without_a_key(started):
    from starlette.testclient import TestClient

    result = invoke_serve("--host", "0.0.0.0")
    assert result.exit_code == 0, result.output
    assert "warning:" in result.output and "without an API key" in result.output
    ((app, kwargs),) = started
    assert kwargs["host"] == "0.0.0.0"
    assert TestClient(app).get("/v1/models").status_code == 200


def test_serve_takes_the_key_from_the_environment(started):
    from starlette.testclient import TestClient

    result = invoke_serve("--host", "0.0.0.0", env={"TOKENPRUNE_API_KEY": KEY})
    assert result.exit_code == 0, result.output
    assert "warning:" not in result.output
    ((app, _),) = started
    client = TestClient(app)
    assert client.get("/v1/models").status_code == 401
    assert client.get("/v1/models", headers={"authorization": f"Bearer {KEY}"}).status_code == 200


def test_serve_on_loopback_does_not_warn(started):
    result = invoke_serve("--host", "127.0.0.1")
    assert result.exit_code == 0, result.output
    assert "warning:" not in result.output and len(started) == 1


def test_serve_starts_with_a_readable_banner(started):
    result = invoke_serve("--keep-ratio", "0.111", "--port", "8123")
    assert result.exit_code == 0, result.output
    text = plain(result.output)
    assert "tokenprune serve http://127.0.0.1:8123/v1" in text and "model tiny" in text
    assert "pruning dart: 11.1% of each image's visual tokens kept from decoder layer 2" in text
    assert "runs on cpu, float32, sdpa attention" in text
    assert "PrunerConfig(" not in result.output


def test_a_python_repr_never_reaches_a_client():
    from tokenprune.serve.protocol import RequestError, without_reprs

    assert without_reprs("cannot identify image file <_io.BytesIO object at 0x7ff712ab>") == (
        "cannot identify image file BytesIO"
    )
    assert str(RequestError("bad <foo.Bar object at 0xDEAD> here")) == "bad Bar here"


def test_the_server_logs_start_stop_and_one_line_per_request(engine, caplog):
    from starlette.testclient import TestClient

    caplog.set_level(logging.INFO, logger="tokenprune.serve")
    body = {"model": MODEL, "messages": user("q", image_url()), "max_tokens": 2}
    with TestClient(create_app(engine, window_s=0.0)) as client:
        assert client.post("/v1/chat/completions", json=body).status_code == 200
        with client.stream("POST", "/v1/chat/completions", json={**body, "stream": True}) as streamed:
            assert streamed.status_code == 200 and "[DONE]" in "".join(streamed.iter_text())
        assert client.get("/health").status_code == 200
        assert client.post("/v1/chat/completions", json={**body, "model": "gpt-9"}).status_code == 404
    lines = [r.getMessage() for r in caplog.records if r.name.startswith("tokenprune.serve")]
    assert lines[0] == f"started: serving tiny, {engine.default.describe()}"
    assert lines[-1] == "stopped: 4 requests answered"
    took = r"\d+\.\d{3} s"
    expected = [rf"POST /v1/chat/completions 200 {took}, visual tokens 64 -> 16"] * 2
    expected += [rf"GET /health 200 {took}$", rf"POST /v1/chat/completions 404 {took}$"]
    assert len(lines) == 6 and all(re.match(p, line) for p, line in zip(expected, lines[1:-1], strict=True))


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--allow-local-images"], "--allowed-local-media-path"),
        (["--api-key", "two words"], "API key"),
        (["--allow-private-image-urls"], "--allow-remote-images"),
        (["--allowed-local-media-path", "/no/such/dir"], "does not exist"),
    ],
)
def test_serve_refuses_unsafe_or_removed_settings(started, args, message):
    result = invoke_serve(*args)
    assert result.exit_code == 2 and message in plain(result.output), result.output
    assert started == []


def plain(text: str) -> str:
    """``text`` without box drawing and line breaks (typer wraps its error panels)."""
    return " ".join(text.replace("│", " ").split())


# -- access: local image files -----------------------------------------------------------------------------


def png_bytes(color: tuple[int, int, int] = (200, 30, 30)) -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (48, 48), color).save(buffer, format="PNG")
    return buffer.getvalue()


@pytest.fixture(scope="module")
def media(tmp_path_factory):
    """``allowed/`` (the media directory: an image, one in a folder, symlinks in and out, a FIFO) beside
    ``outside/`` (an image the server must not read)."""
    root = tmp_path_factory.mktemp("media")
    allowed, outside = root / "allowed", root / "outside"
    (allowed / "sub").mkdir(parents=True)
    outside.mkdir()
    (allowed / "red.png").write_bytes(png_bytes())
    (allowed / "sub" / "blue image.png").write_bytes(png_bytes((0, 0, 200)))
    (outside / "secret.png").write_bytes(png_bytes((0, 0, 0)))
    (allowed / "inner.png").symlink_to(allowed / "red.png")
    (allowed / "escape.png").symlink_to(outside / "secret.png")
    (allowed / "escape-dir").symlink_to(outside)
    os.mkfifo(allowed / "fifo.png")
    return root


@pytest.fixture(scope="module")
def media_engine(checkpoint, media):
    limits = Limits(
        max_images=2,
        max_image_bytes=64 * 1024,
        max_prompt_tokens=400,
        allow_remote_images=True,
        allowed_local_media_path=media / "allowed",
    )
    return build_engine(str(checkpoint), MODEL, PrunerConfig("dart", keep_ratio=0.25), limits)


@pytest.fixture(scope="module")
def media_server(media_engine):
    with BackgroundServer(create_app(media_engine, max_batch=4, window_s=0.0)) as live:
        yield live


def chat(server, url: str) -> httpx.Response:
    body = {"model": MODEL, "messages": user("what color?", url), "max_tokens": 2}
    return httpx.post(f"{server.url}/v1/chat/completions", json=body, timeout=60)


def file_url(path: pathlib.Path | str) -> str:
    return "file://" + urllib.request.pathname2url(str(path))


@pytest.mark.parametrize(
    "where",
    [
        "allowed/red.png",
        "allowed/sub/blue image.png",
        "allowed/sub/../red.png",
        "allowed/inner.png",
    ],
)
@pytest.mark.parametrize("form", ["file URL", "path"])
def test_files_under_the_media_directory_are_read(media_server, media, where, form):
    path = f"{media}/{where}"
    response = chat(media_server, file_url(path) if form == "file URL" else path)
    assert response.status_code == 200, response.text
    assert response.json()["usage"]["visual_tokens"] == {"before": 64, "after": 16}


@pytest.mark.parametrize(
    "url",
    [
        "{root}/outside/secret.png",
        "{root}/allowed/../outside/secret.png",
        "file://{root}/allowed/%2e%2e/outside/secret.png",
        "{root}/allowed/escape.png",
        "{root}/allowed/escape-dir/secret.png",
        "/etc/passwd",
        "file:///etc/passwd",
    ],
)
def test_files_outside_the_media_directory_are_refused(media_server, media, url):
    response = chat(media_server, url.format(root=media))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "image_path_not_allowed" and "outside" in error["message"]
    assert error["param"] == "messages[0].content[0]"


@pytest.mark.parametrize(
    ("url", "message"),
    [
        ("{root}/allowed/missing.png", "cannot read"),
        ("{root}/allowed/fifo.png", "not a regular file"),
        ("{root}/allowed/sub", "Is a directory"),
        ("file:allowed/red.png", "must be absolute"),
        ("file://elsewhere{root}/allowed/red.png", "file of this machine"),
        ("{root}/allowed/red.png\x00.png", "cannot read"),
    ],
)
def test_unreadable_local_images_are_clear_errors(media_server, media, url, message):
    response = chat(media_server, url.format(root=media))
    assert response.status_code == 400, response.text
    assert message in response.json()["error"]["message"]


def test_local_files_are_refused_without_a_media_directory(server, checkpoint):
    response = chat(server, file_url(checkpoint / "config.json"))
    assert response.status_code == 400 and "disabled" in response.json()["error"]["message"]


def test_the_media_directory_must_be_a_directory(media):
    with pytest.raises(ValueError, match="not a directory"):
        Limits(allowed_local_media_path=media / "allowed" / "red.png")
    assert (
        Limits(allowed_local_media_path=media / "allowed" / "sub" / "..").allowed_local_media_path
        == (media / "allowed").resolve()
    )


def test_serve_hands_its_image_options_to_the_server(started, media):
    from starlette.testclient import TestClient

    allowed = str(media / "allowed")
    result = invoke_serve("--allowed-local-media-path", allowed, "--allow-remote-images")
    assert result.exit_code == 0, result.output
    ((app, _),) = started

    def post(url: str) -> httpx.Response:
        body = {"model": MODEL, "messages": user("q", url), "max_tokens": 1}
        return client.post("/v1/chat/completions", json=body)

    with TestClient(app) as client:
        assert post(f"{allowed}/red.png").status_code == 200
        assert post(f"{media}/outside/secret.png").json()["error"]["code"] == "image_path_not_allowed"
        assert post("http://localhost:9/img.png").json()["error"]["code"] == "image_url_not_allowed"


# -- access: remote images -----------------------------------------------------------------------------------


class ImageHost:
    """A local http server of images: ``/img.png``, ``/slow.png`` (answers after ``delay_s``), ``/big.png``
    (over the limit), ``/redirect`` (to ``/img.png``), ``/loop`` (to itself), ``/away`` (to 127.0.0.2);
    ``hits`` counts the requests per path."""

    delay_s = 3.0

    def __init__(self):
        from fastapi import FastAPI
        from fastapi.responses import RedirectResponse

        self.hits: dict[str, int] = {}
        self.slow_started = threading.Event()
        app = FastAPI()

        @app.middleware("http")
        async def count(request, call_next):
            self.hits[request.url.path] = self.hits.get(request.url.path, 0) + 1
            return await call_next(request)

        @app.get("/img.png")
        async def img():
            return Response(png_bytes(), media_type="image/png")

        @app.get("/big.png")
        async def big():
            return Response(b"\x89PNG" + b"0" * (200 * 1024), media_type="image/png")

        @app.get("/slow.png")
        async def slow():
            self.slow_started.set()
            await asyncio.sleep(self.delay_s)
            return Response(png_bytes(), media_type="image/png")

        @app.get("/redirect")
        async def redirect():
            return RedirectResponse("/img.png", status_code=302)

        @app.get("/loop")
        async def loop():
            return RedirectResponse("/loop", status_code=302)

        @app.get("/away")
        async def away():
            return RedirectResponse(f"http://127.0.0.2:{self.server.port}/img.png", status_code=302)

        self.server = BackgroundServer(app)

    def url(self, path: str, host: str = "127.0.0.1") -> str:
        return f"http://{host}:{self.server.port}{path}"


@pytest.fixture(scope="module")
def image_host():
    host = ImageHost()
    with host.server:
        yield host


@pytest.fixture
def private_urls_allowed(media_engine, monkeypatch):
    limits = dataclasses.replace(media_engine.limits, allow_private_image_urls=True)
    monkeypatch.setattr(media_engine, "limits", limits)


@pytest.mark.parametrize(
    "url",
    [
        "http://localhost:{port}/img.png",
        "http://127.0.0.1:{port}/img.png",
        "http://[::1]:{port}/img.png",
        "http://[::ffff:127.0.0.1]:{port}/img.png",
        "http://0.0.0.0:{port}/img.png",
        "https://10.0.0.1/img.png",
        "http://192.168.1.20/img.png",
        "http://169.254.169.254/latest/meta-data/",
        "http://[fe80::1]/img.png",
        "http://100.64.0.1/img.png",
    ],
)
def test_image_urls_of_private_addresses_are_refused(media_server, image_host, url):
    before = dict(image_host.hits)
    response = chat(media_server, url.format(port=image_host.server.port))
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["code"] == "image_url_not_allowed" and "public addresses only" in error["message"]
    assert image_host.hits == before  # refused before any connection


def test_a_host_with_one_private_address_among_public_ones_is_refused(media_server, monkeypatch):
    resolve = socket.getaddrinfo

    def fake(host, *args, **kwargs):
        if host != "mixed.example":
            return resolve(host, *args, **kwargs)
        return [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("93.184.216.34", 80)),
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.0.0.7", 80)),
        ]

    monkeypatch.setattr(socket, "getaddrinfo", fake)
    response = chat(media_server, "http://mixed.example/img.png")
    assert response.status_code == 400
    assert response.json()["error"]["code"] == "image_url_not_allowed" and "10.0.0.7" in response.text


@pytest.mark.parametrize(
    ("address", "public"),
    [
        ("93.184.216.34", True),
        ("2606:4700:4700::1111", True),
        ("127.0.0.1", False),
        ("10.1.2.3", False),
        ("172.16.0.1", False),
        ("192.168.0.1", False),
        ("169.254.169.254", False),
        ("100.64.0.1", False),
        ("0.0.0.0", False),
        ("224.0.0.1", False),
        ("::1", False),
        ("fe80::1", False),
        ("fd00::1", False),
        ("::ffff:127.0.0.1", False),
        ("::ffff:10.0.0.1", False),
        ("::ffff:93.184.216.34", True),
    ],
)
def test_public_addresses(address, public):
    from tokenprune.serve.media import is_public

    assert is_public(ipaddress.ip_address(address)) is public


@pytest.mark.usefixtures("private_urls_allowed")
def test_private_image_urls_are_fetched_when_allowed(media_server, image_host):
    for path in ("/img.png", "/redirect"):
        response = chat(media_server, image_host.url(path, host="localhost"))
        assert response.status_code == 200, response.text
        assert response.json()["usage"]["visual_tokens"] == {"before": 64, "after": 16}
    loop = chat(media_server, image_host.url("/loop"))
    assert loop.status_code == 400 and "redirects more than 3 times" in loop.text
    assert image_host.hits["/loop"] == 4
    missing = chat(media_server, image_host.url("/missing.png"))
    assert missing.status_code == 400 and "HTTP 404" in missing.text
    big = chat(media_server, image_host.url("/big.png"))
    assert big.status_code == 400 and big.json()["error"]["code"] == "image_too_large"


def test_redirect_targets_are_checked_like_the_url(media_server, image_host, monkeypatch):
    """With 127.0.0.1 taken for a public address, its redirect to 127.0.0.2 is still refused."""
    from tokenprune.serve import media

    monkeypatch.setattr(media, "is_public", lambda address: str(address) == "127.0.0.1")
    assert chat(media_server, image_host.url("/img.png")).status_code == 200
    before = image_host.hits.get("/away", 0)
    response = chat(media_server, image_host.url("/away"))
    assert image_host.hits["/away"] == before + 1
    assert response.status_code == 400 and "127.0.0.2" in response.json()["error"]["message"]


@pytest.mark.usefixtures("private_urls_allowed")
def test_a_slow_image_fetch_does_not_block_the_server(media_server, image_host):
    image_host.slow_started.clear()
    answers = []
    request = threading.Thread(target=lambda: answers.append(chat(media_server, image_host.url("/slow.png"))))
    request.start()
    assert image_host.slow_started.wait(30)
    start = time.perf_counter()
    assert httpx.get(f"{media_server.url}/health", timeout=30).status_code == 200
    assert time.perf_counter() - start < ImageHost.delay_s / 3
    request.join(60)
    assert answers[0].status_code == 200, answers[0].text
