"""Load and fuzz runs against a live ``tokenprune serve`` on 127.0.0.1.

:func:`run_load` sends ``clients`` concurrent chat requests with an image, through the official
``openai`` client, and reports failures, throughput, latency and the server process's memory growth;
:func:`run_fuzz` sends malformed requests and checks every answer is a 4xx OpenAI-shaped error.
"""

from __future__ import annotations

import asyncio
import base64
import io
import json
import random
import resource
import statistics
import time
from dataclasses import dataclass

import httpx
from PIL import Image


def data_url(size: int = 48, seed: int = 0) -> str:
    """A PNG data URL of a random-coloured square."""
    rng = random.Random(seed)
    buffer = io.BytesIO()
    Image.new("RGB", (size, size), tuple(rng.randrange(256) for _ in range(3))).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode()


def chat_messages(text: str, image: str) -> list[dict]:
    return [
        {
            "role": "user",
            "content": [{"type": "image_url", "image_url": {"url": image}}, {"type": "text", "text": text}],
        }
    ]


@dataclass
class LoadResult:
    """One load run: ``label`` names the pruning, times in seconds, memory in MiB."""

    label: str
    clients: int
    requests: int
    failures: int
    seconds: float
    requests_per_s: float
    completion_tokens_per_s: float
    latency_p50_s: float
    latency_p95_s: float
    visual_tokens_before: int
    visual_tokens_after: int
    peak_rss_growth_mib: float


def _peak_rss_mib() -> float:
    """This process's peak resident memory (the in-process server's included), MiB."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


async def _load(
    url: str,
    model: str,
    clients: int,
    rounds: int,
    max_tokens: int,
    extra_body: dict | None,
    api_key: str | None,
):
    import openai

    client = openai.AsyncOpenAI(base_url=f"{url}/v1", api_key=api_key or "unused", max_retries=0, timeout=300)
    latencies, usages, failures = [], [], 0

    async def one(i: int) -> None:
        nonlocal failures
        for r in range(rounds):
            start = time.perf_counter()
            try:
                response = await client.chat.completions.create(
                    model=model,
                    messages=chat_messages(f"question {i}.{r}: what is in the image?", data_url(seed=i)),
                    max_tokens=max_tokens,
                    extra_body=extra_body,
                )
            except openai.OpenAIError:
                failures += 1
                continue
            latencies.append(time.perf_counter() - start)
            usages.append(response.model_dump()["usage"])

    await asyncio.gather(*(one(i) for i in range(clients)))
    await client.close()
    return latencies, usages, failures


def run_load(
    url: str,
    model: str,
    *,
    label: str,
    clients: int = 64,
    rounds: int = 1,
    max_tokens: int = 8,
    extra_body: dict | None = None,
    api_key: str | None = None,
) -> LoadResult:
    """``clients`` concurrent clients, each sending ``rounds`` requests one after another (with the server's
    ``api_key``, if it has one)."""
    rss_before = _peak_rss_mib()
    start = time.perf_counter()
    load = _load(url, model, clients, rounds, max_tokens, extra_body, api_key)
    latencies, usages, failures = asyncio.run(load)
    seconds = time.perf_counter() - start
    latencies.sort()
    return LoadResult(
        label=label,
        clients=clients,
        requests=clients * rounds,
        failures=failures,
        seconds=seconds,
        requests_per_s=len(latencies) / seconds,
        completion_tokens_per_s=sum(u["completion_tokens"] for u in usages) / seconds,
        latency_p50_s=statistics.median(latencies) if latencies else float("nan"),
        latency_p95_s=latencies[int(0.95 * (len(latencies) - 1))] if latencies else float("nan"),
        visual_tokens_before=sum(u["visual_tokens"]["before"] for u in usages),
        visual_tokens_after=sum(u["visual_tokens"]["after"] for u in usages),
        peak_rss_growth_mib=_peak_rss_mib() - rss_before,
    )


def malformed_requests(
    model: str, count: int, limits, seed: int = 0, api_key: str | None = None
) -> list[tuple[bytes, dict[str, str | bytes]]]:
    """``count`` malformed ``(body, headers)`` for the chat endpoint: broken JSON, wrong types and values,
    bad images, unknown model, bad pruning overrides, and requests over the server's ``limits``. For a
    server with ``api_key``, half of them carry the right key and half a wrong, missing or garbled one."""
    rng = random.Random(seed)
    good = {"model": model, "messages": chat_messages("hi", data_url())}
    json_headers = {"content-type": "application/json"}

    def mutated() -> dict:
        body = json.loads(json.dumps(good))
        choice = rng.randrange(14)
        if choice == 0:
            body["model"] = rng.choice(["", "gpt-4o", 7, None, ["tiny"]])
        elif choice == 1:
            body["messages"] = rng.choice([[], "hello", 3, None, [{}], [{"role": "user"}]])
        elif choice == 2:
            body["messages"][0]["role"] = rng.choice(["robot", "", 5, None])
        elif choice == 3:
            body["messages"][0]["content"] = rng.choice([5, None, [{"type": "video"}], [{"type": "text"}]])
        elif choice == 4:
            part = body["messages"][0]["content"][0]
            part["image_url"]["url"] = rng.choice(
                [
                    "data:image/png;base64,%%%",
                    "data:text/plain;base64,aGk=",
                    "ftp://x/y.png",
                    "",
                    "/etc/passwd",
                    "data:image/png;base64," + base64.b64encode(rng.randbytes(64)).decode(),
                ]
            )
        elif choice == 5:
            images = limits.max_images + rng.randrange(1, 4)
            body["messages"][0]["content"] = [body["messages"][0]["content"][0]] * images
        elif choice == 6:
            body["max_tokens"] = rng.choice([0, -3, "many", 1.5])
        elif choice == 7:
            body["temperature"] = rng.choice([-1, 3, "hot"])
        elif choice == 8:
            body["tokenprune"] = rng.choice(
                [
                    {"method": "nope"},
                    {"keep_ratio": 0},
                    {"keep_ratio": 2},
                    {"budget": -1},
                    {"budget": 10**6},
                    {"layer": 99, "method": "fastv"},
                    {"colour": "red"},
                    "dart",
                ]
            )
        elif choice == 9:
            body["n"] = rng.choice([0, 2, 5])
        elif choice == 10:
            words = limits.max_prompt_tokens + rng.randrange(1, 99)
            body["messages"][0]["content"][1]["text"] = "word " * words
        elif choice == 11:
            body["top_p"] = rng.choice([0, 1.5, "x"])
        elif choice == 12:
            body["stream"] = rng.choice(["yes", 3, [True]])
        else:
            del body["model"]
        return body

    def authorization() -> dict[str, str | bytes]:
        if api_key is None:
            return {}
        if rng.random() < 0.5:
            return {"authorization": f"Bearer {api_key}"}
        wrong: list[dict[str, str | bytes]] = [
            {},
            {"authorization": ""},
            {"authorization": "Bearer"},
            {"authorization": api_key},
            {"authorization": f"Basic {api_key}"},
            {"authorization": f"Bearer {api_key}x"},
            {"authorization": f"Bearer {api_key[:-1]}"},
            {"authorization": f"Bearer  {api_key}"},
            {"authorization": f"Bearer {api_key.upper()}x"},
            {"authorization": b"Bearer \xff\xfe" + api_key.encode()},
            {"authorization": "Bearer " + "k" * 4096},
        ]
        return rng.choice(wrong)

    requests = []
    for i in range(count):
        kind = i % 4
        headers = {**json_headers, **authorization()}
        if kind == 0:  # broken JSON
            raw = json.dumps(mutated()).encode()
            requests.append((raw[: rng.randrange(1, max(2, len(raw) - 1))], headers))
        elif kind == 1:
            requests.append((rng.randbytes(rng.randrange(1, 200)), headers))
        else:
            requests.append((json.dumps(mutated()).encode(), headers))
    return requests


@dataclass
class FuzzResult:
    """``unauthorized`` counts the 401 answers among the ``four_xx_json_errors``."""

    requests: int
    four_xx_json_errors: int
    unauthorized: int
    other: list[str]
    healthy_after: bool


def run_fuzz(
    url: str, model: str, limits, count: int = 200, seed: int = 0, api_key: str | None = None
) -> FuzzResult:
    """Send :func:`malformed_requests` concurrently; count the 4xx answers in the OpenAI error shape whose
    message holds no Python object repr (the others are listed in ``other``)."""
    from tokenprune.serve.protocol import PYTHON_REPR

    async def main() -> list[httpx.Response | Exception]:
        async with httpx.AsyncClient(timeout=120) as client:
            calls = [
                client.post(f"{url}/v1/chat/completions", content=body, headers=headers)
                for body, headers in malformed_requests(model, count, limits, seed, api_key)
            ]
            return await asyncio.gather(*calls, return_exceptions=True)

    good, unauthorized, other = 0, 0, []
    for response in asyncio.run(main()):
        if isinstance(response, Exception):
            other.append(f"{type(response).__name__}: {response}")
            continue
        try:
            error = response.json().get("error", {})
        except ValueError:
            error = {}
        shaped = 400 <= response.status_code < 500 and {"message", "type", "param", "code"} <= set(error)
        if shaped and PYTHON_REPR.search(str(error["message"])):
            other.append(f"{response.status_code} with a Python repr: {error['message'][:200]}")
        elif shaped:
            good += 1
            unauthorized += response.status_code == 401
        else:
            other.append(f"{response.status_code}: {response.text[:200]}")
    healthy = httpx.get(f"{url}/health", timeout=30).json() == {"status": "ok"}
    return FuzzResult(count, good, unauthorized, other, healthy)


def load_markdown_table(load: list[dict]) -> str:
    """The load runs (:class:`LoadResult` as dicts) as a Markdown table, one row per pruning setting."""
    lines = [
        "| pruning | failed | req/s | tok/s | p50 s | p95 s | visual in/kept | RSS growth MiB |",
        "|---|---|---|---|---|---|---|---|",
    ]
    lines += [
        f"| {r['label']} | {r['failures']} | {r['requests_per_s']:.2f} | "
        f"{r['completion_tokens_per_s']:.1f} | {r['latency_p50_s']:.2f} | {r['latency_p95_s']:.2f} | "
        f"{r['visual_tokens_before']}/{r['visual_tokens_after']} | {r['peak_rss_growth_mib']:.0f} |"
        for r in load
    ]
    return "\n".join(lines)


def _label(config) -> str:
    amount = f"keep_ratio={config.keep_ratio}" if config.budget is None else f"budget={config.budget}"
    return f"{config.method} {amount}"


def run_serve_benchmark(
    engine,
    *,
    clients: int = 64,
    rounds: int = 2,
    max_tokens: int = 8,
    max_batch: int = 16,
    fuzz: int = 200,
    api_key: str | None = None,
) -> dict:
    """Serve ``engine`` on 127.0.0.1 (requiring ``api_key``, if given) and run the load with the server's
    pruner and without pruning (the ``tokenprune: {"method": "none"}`` override), then the fuzz, whose
    requests then also carry wrong and missing keys. Returns the results as a dict."""
    from dataclasses import asdict

    from tokenprune.serve.app import create_app
    from tokenprune.serve.background import BackgroundServer

    app = create_app(engine, max_batch=max_batch, window_s=0.02, api_key=api_key)
    with BackgroundServer(app) as server:
        run_load(server.url, engine.name, label="warm-up", clients=2, rounds=1, max_tokens=2, api_key=api_key)
        pruned = run_load(
            server.url,
            engine.name,
            label=_label(engine.default),
            clients=clients,
            rounds=rounds,
            max_tokens=max_tokens,
            api_key=api_key,
        )
        unpruned = run_load(
            server.url,
            engine.name,
            label="unpruned",
            clients=clients,
            rounds=rounds,
            max_tokens=max_tokens,
            extra_body={"tokenprune": {"method": "none"}},
            api_key=api_key,
        )
        fuzzed = run_fuzz(server.url, engine.name, engine.limits, count=fuzz, api_key=api_key)
    return {
        "load": [asdict(pruned), asdict(unpruned)],
        "throughput_ratio": pruned.requests_per_s / unpruned.requests_per_s,
        "fuzz": asdict(fuzzed),
    }
