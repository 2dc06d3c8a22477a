"""An OpenAI-compatible HTTP API over a bundle: the base and every adapter are models, one per request.

Generation is blocking (onnxruntime-genai), so it runs in worker threads; each request has its own
generator with its own active adapter, so concurrent requests for different adapters never mix.
A bounded queue answers 503 when full. Adapter names are looked up in the manifest, never used as paths.
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from pydantic import BaseModel, ConfigDict, Field

from slmops.core.errors import SlmopsError
from slmops.shipping.runtime import Completion, Runtime, Sampling


@dataclass
class ServeOptions:
    api_key: Optional[str] = None
    workers: int = 2  # generations at once
    max_queue: int = 64  # requests waiting beyond the workers, then 503
    max_body_bytes: int = 1 << 20
    max_tokens_limit: int = 2048
    variant: Optional[str] = None  # of a model package


class ChatMessage(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str


class _Request(BaseModel):
    model_config = ConfigDict(extra="allow")  # OpenAI clients send fields we do not use (n=1, user, ...)
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    temperature: float = Field(1.0, ge=0, le=2)
    top_p: float = Field(1.0, gt=0, le=1)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False


class ChatRequest(_Request):
    messages: list[ChatMessage] = Field(min_length=1)


class CompletionRequest(_Request):
    prompt: str


class ApiError(Exception):
    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: Optional[str] = None,
        param: Optional[str] = None,
    ):
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.kind, "param": self.param, "code": self.code}}


class Gate:
    """At most `workers` generations at once and `max_queue` waiting; beyond that, 503."""

    def __init__(self, workers: int, max_queue: int):
        self.slots = asyncio.Semaphore(workers)
        self.capacity = workers + max_queue
        self.inside = 0

    async def __aenter__(self):
        if self.inside >= self.capacity:
            raise ApiError(503, "server busy: the request queue is full; retry later", "server_error", "queue_full")
        self.inside += 1
        await self.slots.acquire()

    async def __aexit__(self, *exc):
        self.slots.release()
        self.inside -= 1


def create_app(bundle: Path, options: ServeOptions = ServeOptions()):
    from fastapi import FastAPI, Request
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import StreamingResponse

    runtime = Runtime(bundle, variant=options.variant)
    for name in runtime.adapter_names:
        runtime.load_adapter(name)
    base_id = "base"
    created = int(time.time())
    app = FastAPI(title="slmops", docs_url=None, redoc_url=None, openapi_url=None)
    state: dict[str, Optional[Gate]] = {"gate": None}

    def gate() -> Gate:
        current = state["gate"]
        if current is None:  # made inside the server's event loop
            current = state["gate"] = Gate(options.workers, options.max_queue)
        return current

    @app.middleware("http")
    async def guard(request: Request, call_next):
        if options.api_key and request.url.path != "/health":
            if request.headers.get("authorization", "") != f"Bearer {options.api_key}":
                return _error(
                    ApiError(
                        401,
                        "missing or wrong API key; send Authorization: Bearer KEY",
                        "invalid_request_error",
                        "invalid_api_key",
                    )
                )
        length = request.headers.get("content-length")
        if length and length.isdigit() and int(length) > options.max_body_bytes:
            return _error(
                ApiError(
                    413,
                    f"request body is {length} bytes, the limit is {options.max_body_bytes}",
                    code="request_too_large",
                )
            )
        return await call_next(request)

    @app.exception_handler(ApiError)
    async def api_error(_request, exc: ApiError):
        return _error(exc)

    @app.exception_handler(RequestValidationError)
    async def bad_request(_request, exc: RequestValidationError):
        first = exc.errors()[0] if exc.errors() else {}
        where = ".".join(str(p) for p in first.get("loc", ())[1:]) or "body"
        message = (
            "request body is not valid JSON"
            if first.get("type") == "json_invalid"
            else f"{where}: {first.get('msg', 'invalid')}"
        )
        return _error(ApiError(400, message, param=where))

    @app.exception_handler(Exception)
    async def internal(_request, exc: Exception):
        return _error(ApiError(500, f"internal error: {type(exc).__name__}", "server_error"))

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": [base_id, *runtime.adapter_names]}

    @app.get("/v1/models")
    async def models():
        ids = [base_id, *runtime.adapter_names]
        return {
            "object": "list",
            "data": [{"id": i, "object": "model", "created": created, "owned_by": "slmops"} for i in ids],
        }

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest):
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        prompt = runtime.chat_prompt(messages)
        return await _complete(req, prompt, "chat.completion")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest):
        return await _complete(req, req.prompt, "text_completion")

    async def _complete(req: _Request, prompt: str, kind: str):
        adapter = _adapter(req.model)
        sampling = _sampling(req)
        stop = tuple([req.stop] if isinstance(req.stop, str) else (req.stop or []))
        rid = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        if req.stream:
            g = gate()
            await g.__aenter__()  # a full queue is a 503 before the stream starts
            return StreamingResponse(
                _stream(g, req.model, adapter, prompt, sampling, stop, kind, rid), media_type="text/event-stream"
            )
        async with gate():
            result = await asyncio.to_thread(_generate, prompt, adapter, sampling, stop)
        return _body(kind, rid, req.model, result)

    def _generate(prompt, adapter, sampling, stop) -> Completion:
        try:
            return runtime.generate(prompt, adapter, sampling, stop)
        except SlmopsError as exc:
            raise ApiError(400, str(exc)) from None

    async def _stream(held: Gate, model, adapter, prompt, sampling, stop, kind, rid):
        try:
            loop = asyncio.get_running_loop()
            queue: asyncio.Queue = asyncio.Queue()
            result = Completion("", 0, 0, "length", 0.0)

            def produce():
                try:
                    for piece in runtime.stream(prompt, adapter, sampling, stop, result):
                        loop.call_soon_threadsafe(queue.put_nowait, ("piece", piece))
                    loop.call_soon_threadsafe(queue.put_nowait, ("done", None))
                except Exception as exc:  # reported in-band: the HTTP status is already sent
                    loop.call_soon_threadsafe(queue.put_nowait, ("error", str(exc)))

            threading.Thread(target=produce, daemon=True).start()
            while True:
                what, value = await queue.get()
                if what == "piece":
                    yield _sse(_chunk(kind, rid, model, value, None))
                elif what == "error":
                    yield _sse(ApiError(500, value, "server_error").body())
                    break
                else:
                    yield _sse(_chunk(kind, rid, model, "", result.finish_reason, usage=_usage(result)))
                    break
            yield "data: [DONE]\n\n"
        finally:
            await held.__aexit__(None, None, None)

    def _adapter(model: str) -> Optional[str]:
        if model in (base_id, runtime.manifest.base.name):
            return None
        if model not in runtime.manifest.adapters:
            raise ApiError(
                404,
                f"model '{model}' not found; GET /v1/models lists: {', '.join([base_id, *runtime.adapter_names])}",
                code="model_not_found",
                param="model",
            )
        return model

    def _sampling(req: _Request) -> Sampling:
        limit = min(options.max_tokens_limit, runtime.context_length)
        wanted = req.max_completion_tokens or req.max_tokens or 256
        if wanted > limit:
            raise ApiError(400, f"max_tokens {wanted} is above this server's limit of {limit}", param="max_tokens")
        return Sampling(max_new_tokens=wanted, temperature=req.temperature, top_p=req.top_p, seed=req.seed)

    return app


def _error(exc: ApiError):
    from fastapi.responses import JSONResponse

    return JSONResponse(exc.body(), status_code=exc.status)


def _usage(result: Completion) -> dict:
    return {
        "prompt_tokens": result.prompt_tokens,
        "completion_tokens": result.completion_tokens,
        "total_tokens": result.prompt_tokens + result.completion_tokens,
    }


def _body(kind: str, rid: str, model: str, result: Completion) -> dict:
    if kind == "chat.completion":
        choice = {
            "index": 0,
            "message": {"role": "assistant", "content": result.text},
            "finish_reason": result.finish_reason,
            "logprobs": None,
        }
    else:
        choice = {"index": 0, "text": result.text, "finish_reason": result.finish_reason, "logprobs": None}
    return {
        "id": rid,
        "object": kind,
        "created": int(time.time()),
        "model": model,
        "choices": [choice],
        "usage": _usage(result),
    }


def _chunk(kind: str, rid: str, model: str, text: str, finish: Optional[str], usage: Optional[dict] = None) -> dict:
    if kind == "chat.completion":
        choice = {"index": 0, "delta": {"content": text} if text else {}, "finish_reason": finish, "logprobs": None}
        obj = "chat.completion.chunk"
    else:
        choice = {"index": 0, "text": text, "finish_reason": finish, "logprobs": None}
        obj = "text_completion"
    out = {"id": rid, "object": obj, "created": int(time.time()), "model": model, "choices": [choice]}
    if usage is not None:
        out["usage"] = usage
    return out


def _sse(obj: dict) -> str:
    return f"data: {json.dumps(obj)}\n\n"
