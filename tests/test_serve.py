"""``tokenprune serve``: a live server on 127.0.0.1, driven by the official ``openai`` client."""

from __future__ import annotations

import base64
import io
import json

import httpx
import openai
import pytest
from PIL import Image

from tokenprune.config import PrunerConfig
from tokenprune.serve import Limits, build_engine
from tokenprune.serve.app import create_app
from tokenprune.serve.background import BackgroundServer
from tokenprune.testing import save_tiny_checkpoint

MODEL = "tiny"


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
    """The issue's load and fuzz runs, bounded: 64 concurrent clients with no failure and bounded memory,
    with and without pruning; 200 malformed requests all answered 4xx JSON errors; still healthy."""
    from tokenprune.eval.serve_load import run_serve_benchmark

    results = run_serve_benchmark(engine, clients=64, rounds=1, max_tokens=3, max_batch=16, fuzz=200)
    pruned, unpruned = results["load"]
    for run in (pruned, unpruned):
        assert run["requests"] == 64 and run["failures"] == 0
        assert run["peak_rss_growth_mib"] < 1024
    assert pruned["visual_tokens_after"] == 64 * 16 and unpruned["visual_tokens_after"] == 64 * 64
    fuzz = results["fuzz"]
    assert fuzz["four_xx_json_errors"] == fuzz["requests"] == 200, fuzz["other"][:5]
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
