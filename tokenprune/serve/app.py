"""The OpenAI-compatible HTTP app: chat completions (streamed or not), models, health and metrics.

Every error is a 4xx (or, for a failure inside generation, a 500) in the OpenAI shape
``{"error": {"message", "type", "param", "code"}}``; a bad request never reaches the model. With an API
key, every route but ``/health`` and ``/metrics`` answers 401 to a request without it.

The logger ``tokenprune.serve.app`` writes one line when the app starts and stops, and one per request
once its answer is sent: method, path, status, latency and, for a completion, the visual tokens before and
after pruning.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
import uuid
from collections.abc import AsyncIterator

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response, StreamingResponse
from starlette.exceptions import HTTPException

from .auth import OPEN_PATHS, bearer_matches, check_api_key
from .batcher import Batcher
from .engine import Completion, Engine, Job
from .media import load_image
from .protocol import ChatRequest, RequestError, conversation, pruner_config

log = logging.getLogger(__name__)


def create_app(
    engine: Engine,
    *,
    max_batch: int = 8,
    window_s: float = 0.01,
    max_body_bytes: int = 32 * 2**20,
    api_key: str | None = None,
) -> FastAPI:
    """The FastAPI app serving ``engine``; requests within ``window_s`` are batched up to ``max_batch``.

    With ``api_key``, a request to any route but :data:`~tokenprune.serve.auth.OPEN_PATHS` needs the header
    ``Authorization: Bearer <api_key>``; a ``ValueError`` if no client could send that key.
    """
    if api_key is not None:
        check_api_key(api_key)
    batcher = Batcher(engine, max_batch, window_s)
    metrics = engine.metrics
    answered = [0]  # requests whose answer was sent, for the log line at shutdown

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        await batcher.start()
        pruning = engine.default.describe() if engine.default is not None else "no pruning by default"
        log.info("started: serving %s, %s", engine.name, pruning)
        try:
            yield
        finally:
            await batcher.stop()
            log.info("stopped: %d requests answered", answered[0])

    app = FastAPI(title="tokenprune", lifespan=lifespan)

    def error(err: RequestError) -> JSONResponse:
        metrics.request(err.status)
        return JSONResponse(err.body(), status_code=err.status)

    @app.exception_handler(RequestError)
    async def on_request_error(request: Request, err: RequestError) -> JSONResponse:
        return error(err)

    @app.exception_handler(RequestValidationError)
    async def on_validation_error(request: Request, err: RequestValidationError) -> JSONResponse:
        first = err.errors()[0] if err.errors() else {}
        location = [str(p) for p in first.get("loc", ()) if p != "body"]
        if first.get("type") == "json_invalid":
            return error(RequestError("the request body is not valid JSON", code="invalid_json"))
        message = f"{'.'.join(location) or 'body'}: {first.get('msg', 'invalid request')}"
        return error(RequestError(message, param=".".join(location) or None, code="invalid_value"))

    @app.exception_handler(HTTPException)
    async def on_http_error(request: Request, err: HTTPException) -> JSONResponse:
        kind = "not_found_error" if err.status_code == 404 else "invalid_request_error"
        return error(RequestError(str(err.detail), status=err.status_code, kind=kind))

    @app.middleware("http")
    async def limit_body(request: Request, call_next):
        length = request.headers.get("content-length")
        if length is not None and (not length.isdigit() or int(length) > max_body_bytes):
            return error(RequestError(f"request body over {max_body_bytes} bytes", status=413))
        return await call_next(request)

    if api_key is not None:  # added last, so it runs first: nothing is read for a request without the key

        @app.middleware("http")
        async def require_api_key(request: Request, call_next):
            if request.url.path in OPEN_PATHS or bearer_matches(
                request.headers.get("authorization"), api_key
            ):
                return await call_next(request)
            given = "authorization" in request.headers
            message = "invalid API key" if given else "missing API key: send 'Authorization: Bearer <key>'"
            response = error(RequestError(message, status=401, code="invalid_api_key"))
            response.headers["WWW-Authenticate"] = "Bearer"
            return response

    @app.middleware("http")  # added last, so it runs first: it sees every answer, a 401 or 413 too
    async def log_request(request: Request, call_next):
        start = time.perf_counter()
        response = await call_next(request)
        body = response.body_iterator

        async def logged() -> AsyncIterator[bytes]:
            async for chunk in body:
                yield chunk
            seconds = time.perf_counter() - start
            line = f"{request.method} {request.url.path} {response.status_code} {seconds:.3f} s"
            visual = getattr(request.state, "visual_tokens", None)
            log.info(line if visual is None else f"{line}, visual tokens {visual[0]} -> {visual[1]}")
            answered[0] += 1

        response.body_iterator = logged()
        return response

    @app.get("/health")
    async def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return PlainTextResponse(metrics.render())

    @app.get("/v1/models")
    async def models() -> dict:
        model = {"id": engine.name, "object": "model", "created": 0, "owned_by": "tokenprune"}
        return {"object": "list", "data": [model]}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Response:
        if body.model != engine.name:
            raise RequestError(
                f"the model {body.model!r} does not exist; this server serves {engine.name!r}",
                status=404,
                param="model",
                code="model_not_found",
                kind="not_found_error",
            )
        config = pruner_config(engine.default, body.tokenprune)
        engine.check(config)
        messages, sources = conversation(body, engine.limits)
        images = [await load_image(url, engine.limits, param) for url, param in sources]
        max_tokens = body.max_completion_tokens or body.max_tokens
        loop = asyncio.get_running_loop()
        input_ids, pixels, max_new = await loop.run_in_executor(
            None, engine.prepare, messages, images, max_tokens
        )
        job = Job(input_ids, pixels, max_new, body.temperature, body.top_p, body.seed, config, loop)
        batcher.submit(job)
        completion_id, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if body.stream:
            metrics.request(200)
            return StreamingResponse(
                _stream(job, completion_id, created, engine.name, request), media_type="text/event-stream"
            )
        text = []
        while True:
            kind, payload = await job.events.get()
            if kind == "delta":
                text.append(payload)
            elif kind == "error":
                metrics.request(500)
                return JSONResponse(
                    {"error": {"message": payload, "type": "server_error", "param": None, "code": None}},
                    status_code=500,
                )
            else:
                metrics.request(200)
                _record_visual_tokens(request, payload)
                return JSONResponse(_response(payload, completion_id, created, engine.name))

    return app


def _record_visual_tokens(request: Request, completion: Completion) -> None:
    """Keep the completion's visual tokens before and after pruning for the request's log line."""
    request.state.visual_tokens = (completion.visual_tokens, completion.kept_visual_tokens)


def _usage(completion: Completion) -> dict:
    return {
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "total_tokens": completion.prompt_tokens + completion.completion_tokens,
        "visual_tokens": {"before": completion.visual_tokens, "after": completion.kept_visual_tokens},
    }


def _response(completion: Completion, completion_id: str, created: int, model: str) -> dict:
    message = {"role": "assistant", "content": completion.text}
    choice = {"index": 0, "message": message, "finish_reason": completion.finish_reason, "logprobs": None}
    return {
        "id": completion_id,
        "object": "chat.completion",
        "created": created,
        "model": model,
        "choices": [choice],
        "usage": _usage(completion),
    }


async def _stream(
    job: Job, completion_id: str, created: int, model: str, request: Request
) -> AsyncIterator[str]:
    """Server-sent ``chat.completion.chunk`` events: the role, each new piece of text, the finish reason
    with the usage, then ``[DONE]``; the visual tokens are kept for the request's log line."""

    def chunk(delta: dict, finish_reason: str | None = None, **extra: object) -> str:
        choice = {"index": 0, "delta": delta, "finish_reason": finish_reason, "logprobs": None}
        body = {
            "id": completion_id,
            "object": "chat.completion.chunk",
            "created": created,
            "model": model,
            "choices": [choice],
            **extra,
        }
        return f"data: {json.dumps(body)}\n\n"

    yield chunk({"role": "assistant", "content": ""})
    while True:
        kind, payload = await job.events.get()
        if kind == "delta":
            yield chunk({"content": payload})
        elif kind == "error":
            error = {"message": payload, "type": "server_error", "param": None, "code": None}
            yield f"data: {json.dumps({'error': error})}\n\n"
            break
        else:
            _record_visual_tokens(request, payload)
            yield chunk({}, payload.finish_reason, usage=_usage(payload))
            break
    yield "data: [DONE]\n\n"
