"""An OpenAI-compatible HTTP API over a bundle: the base and every adapter are models, one per request.

On a CPU bundle, requests share one continuously batched decode loop (`scheduler`), whatever
their adapter, and adapters can be loaded and unloaded while it runs (`POST /v1/adapters`,
`DELETE /v1/adapters/NAME`, with the admin key, from folders named by --adapter-dir). Other
targets run each request on its own onnxruntime-genai generator, `workers` at a time. A request
whose client goes away stops at once. `GET /metrics` is in Prometheus' text format.
Adapter names are looked up, never used as paths.
"""

from __future__ import annotations

import asyncio
import json
import re
import threading
import time
import uuid
from contextlib import asynccontextmanager, suppress
from dataclasses import dataclass
from pathlib import Path
from typing import AsyncIterator, Optional, Union

from fastapi import Request  # at module level: FastAPI reads the handlers' annotations from here
from pydantic import BaseModel, ConfigDict, Field

from slmops.core.errors import SlmopsError
from slmops.shipping.batching import AdapterClash
from slmops.shipping.metrics import Metrics
from slmops.shipping.runtime import Completion, Runtime, Sampling
from slmops.shipping.scheduler import AdapterInUse, Event, Scheduler, ShuttingDown, UnknownAdapter

BASE = "base"
ADAPTER_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,63}$")


@dataclass
class ServeOptions:
    api_key: Optional[str] = None
    admin_key: Optional[str] = None  # for loading and unloading adapters; none: they are off
    adapter_dirs: tuple[Path, ...] = ()  # where adapters may be loaded from at run time
    batching: bool = True  # continuous batching (CPU bundles); False: a generator per request
    max_batch: int = 32  # sequences decoded together
    workers: int = 2  # generations at once without batching
    max_queue: int = 64  # requests waiting beyond those, then 503
    max_context: Optional[int] = None  # tokens per sequence (prompt + reply); default: the model's
    adapter_capacity: Optional[int] = None  # LoRA rank columns kept for adapters
    prefix_cache_mb: int = 256  # KV of prompt prefixes kept for reuse (0: none)
    threads: Optional[int] = None
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


class AdapterRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    name: str
    path: str


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


def _busy() -> ApiError:
    return ApiError(503, "server busy: the request queue is full; retry later", "server_error", "queue_full")


class PerRequest:
    """No batching: each request on its own onnxruntime-genai generator, `workers` at once."""

    def __init__(self, runtime: Runtime, workers: int, max_queue: int):
        self.runtime = runtime
        self.workers, self.capacity, self.inside = workers, workers + max_queue, 0
        self._slots: Optional[asyncio.Semaphore] = None
        for name in runtime.adapter_names:
            runtime.load_adapter(name)

    @property
    def adapters(self) -> list[str]:
        return self.runtime.adapter_names

    async def events(self, prompt: str, adapter, sampling: Sampling, stop) -> AsyncIterator[Event]:
        if self.inside >= self.capacity:
            raise _busy()
        if self._slots is None:  # made inside the server's event loop
            self._slots = asyncio.Semaphore(self.workers)
        self.inside += 1
        try:
            async with self._slots:
                async for event in self._generate(prompt, adapter, sampling, stop):
                    yield event
        finally:
            self.inside -= 1

    async def _generate(self, prompt, adapter, sampling, stop) -> AsyncIterator[Event]:
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        cancelled = threading.Event()
        result = Completion("", 0, 0, "length", 0.0)

        def produce() -> None:
            try:
                for piece in self.runtime.stream(prompt, adapter, sampling, stop, result):
                    if cancelled.is_set():  # the client went away: stop generating
                        return
                    loop.call_soon_threadsafe(queue.put_nowait, Event("token", piece))
                loop.call_soon_threadsafe(queue.put_nowait, Event("done", completion=result))
            except SlmopsError as exc:
                loop.call_soon_threadsafe(queue.put_nowait, Event("refused", str(exc)))
            except Exception as exc:  # reported in-band: the HTTP status may already be sent
                loop.call_soon_threadsafe(queue.put_nowait, Event("error", f"{type(exc).__name__}: {exc}"))

        threading.Thread(target=produce, daemon=True).start()
        try:
            async for event in _until_done(queue):
                yield event
        finally:
            cancelled.set()


class Batched:
    """Continuous batching: every request is a row of the scheduler's running batch."""

    def __init__(self, runtime: Runtime, options: ServeOptions, metrics: Metrics):
        self.runtime = runtime
        self.scheduler = Scheduler(
            runtime,
            slots=options.max_batch,
            max_len=options.max_context,
            threads=options.threads,
            adapter_capacity=options.adapter_capacity,
            prefix_cache_bytes=options.prefix_cache_mb << 20,
            observe=metrics.observe,
        )
        self.capacity = options.max_batch + options.max_queue

    @property
    def adapters(self) -> list[str]:
        return self.scheduler.adapters

    async def events(self, prompt: str, adapter, sampling: Sampling, stop) -> AsyncIterator[Event]:
        if sum(self.scheduler.load) >= self.capacity:
            raise _busy()
        loop = asyncio.get_running_loop()
        queue: asyncio.Queue[Event] = asyncio.Queue()
        seq = self.scheduler.submit(
            self.runtime.encode(prompt),
            adapter,
            sampling,
            stop,
            lambda event: loop.call_soon_threadsafe(queue.put_nowait, event),
        )
        try:
            async for event in _until_done(queue):
                yield event
        finally:
            if seq.finish is None:  # the client went away (or the server stops): free its row
                self.scheduler.cancel(seq)


async def _until_done(queue: asyncio.Queue) -> AsyncIterator[Event]:
    """A request's events from its queue, up to the one that ends it."""
    while True:
        event = await queue.get()
        yield event
        if event.kind != "token":
            return


def create_app(bundle: Path, options: ServeOptions = ServeOptions()):
    from fastapi import FastAPI
    from fastapi.exceptions import RequestValidationError
    from fastapi.responses import PlainTextResponse, StreamingResponse

    runtime = Runtime(bundle, threads=options.threads, variant=options.variant)
    metrics = Metrics()
    batched = options.batching and runtime.manifest.target.name == "cpu"
    engine: Union[Batched, PerRequest] = (
        Batched(runtime, options, metrics) if batched else PerRequest(runtime, options.workers, options.max_queue)
    )
    if batched and options.admin_key:
        from slmops.shipping.export import warm_live_adapters

        warm_live_adapters()
    created = int(time.time())
    sources: dict[str, str] = {}  # adapter -> sha256, for those loaded at run time

    @asynccontextmanager
    async def lifespan(_app):
        if isinstance(engine, Batched):
            engine.scheduler.start()
        yield
        if isinstance(engine, Batched):  # uvicorn has drained (or given up on) the requests by now
            await asyncio.to_thread(engine.scheduler.stop)

    app = FastAPI(title="slmops", docs_url=None, redoc_url=None, openapi_url=None, lifespan=lifespan)

    app.add_middleware(Guard, options=options)

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

    def model_ids() -> list[str]:
        return [BASE, *engine.adapters]

    @app.get("/health")
    async def health():
        return {"status": "ok", "models": model_ids()}

    @app.get("/metrics")
    async def prometheus():
        return PlainTextResponse(metrics.render(), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {
            "object": "list",
            "data": [
                {"id": i, "object": "model", "created": created, "owned_by": "slmops", **_source(sources, i)}
                for i in model_ids()
            ],
        }

    @app.post("/v1/adapters")
    async def load_adapter(request: Request, body: AdapterRequest):
        scheduler = _admin(request, engine, options)
        if not ADAPTER_NAME.match(body.name) or body.name == BASE:
            raise ApiError(
                400, f"bad adapter name '{body.name}': use letters, digits, '.', '_', '-' (not 'base')", param="name"
            )
        if body.name in engine.adapters:
            raise ApiError(409, f"adapter '{body.name}' is already loaded; DELETE it first", code="adapter_exists")
        path = _allowed(Path(body.path), options.adapter_dirs)
        start = time.perf_counter()
        try:
            tensors, digest = await asyncio.to_thread(_read_adapter, runtime, body.name, path)
            await asyncio.to_thread(scheduler.add_adapter, body.name, tensors)
        except AdapterClash as exc:  # another POST of the same name won the race
            raise ApiError(409, str(exc), code="adapter_exists") from None
        except SlmopsError as exc:
            raise ApiError(400, str(exc), param="path") from None
        sources[body.name] = digest
        return {
            "id": body.name,
            "object": "model",
            "sha256": digest,
            "load_seconds": round(time.perf_counter() - start, 3),
        }

    @app.delete("/v1/adapters/{name}")
    async def unload_adapter(request: Request, name: str):
        scheduler = _admin(request, engine, options)
        if name not in engine.adapters:
            raise ApiError(404, f"adapter '{name}' is not loaded", code="model_not_found")

        try:
            await asyncio.to_thread(scheduler.remove_adapter, name)
        except AdapterInUse as exc:
            raise ApiError(409, str(exc), code="in_use") from None
        except UnknownAdapter as exc:  # another DELETE got there first
            raise ApiError(404, str(exc), code="model_not_found") from None
        sources.pop(name, None)
        return {"id": name, "object": "model", "deleted": True}

    @app.post("/v1/chat/completions")
    async def chat(req: ChatRequest, request: Request):
        messages = [{"role": m.role, "content": m.content} for m in req.messages]
        return await _complete(req, request, runtime.chat_prompt(messages), "chat.completion")

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, request: Request):
        return await _complete(req, request, req.prompt, "text_completion")

    async def _complete(req: _Request, request: Request, prompt: str, kind: str):
        adapter = _adapter(req.model)
        sampling = _sampling(req)
        stop = tuple([req.stop] if isinstance(req.stop, str) else (req.stop or []))
        rid = f"{'chatcmpl' if kind == 'chat.completion' else 'cmpl'}-{uuid.uuid4().hex[:24]}"
        events = _checked(engine.events(prompt, adapter, sampling, stop), req.model)
        first = await anext(events)  # refusals (503, a prompt too long) come before any byte is sent
        if req.stream:
            return StreamingResponse(_stream(first, events, req.model, kind, rid), media_type="text/event-stream")
        return await _whole(first, events, request, req.model, kind, rid)

    async def _checked(events: AsyncIterator[Event], model: str) -> AsyncIterator[Event]:
        """The engine's events, its refusals as ApiErrors, and each request counted once, as it ends."""
        status = "cancelled"
        try:
            async for event in events:
                if event.kind == "refused":
                    raise ApiError(400, event.text)
                status = {"done": "200", "error": "500"}.get(event.kind, status)
                yield event
        except ApiError as exc:
            status = str(exc.status)
            raise
        except ShuttingDown as exc:
            status = "503"
            raise ApiError(503, str(exc), "server_error", "shutting_down") from None
        except SlmopsError as exc:
            status = "400"
            raise ApiError(400, str(exc)) from None
        finally:
            metrics.request(model, status)

    async def _whole(first: Event, events, request: Request, model: str, kind: str, rid: str):
        """Wait for the whole reply, stopping the generation if the client disconnects meanwhile."""
        rest = asyncio.ensure_future(_drain(first, events))
        while not rest.done():
            done, _ = await asyncio.wait({rest}, timeout=0.25)
            if not done and await request.is_disconnected():
                rest.cancel()
                with suppress(asyncio.CancelledError):
                    await rest  # let go of the generator before closing it (which frees the row)
                await events.aclose()
                raise ApiError(499, "client closed the request")
        event = rest.result()
        await events.aclose()
        if event.kind == "error":
            raise ApiError(500, event.text, "server_error")
        assert event.completion is not None
        return _body(kind, rid, model, event.completion)

    async def _stream(first: Event, events, model: str, kind: str, rid: str):
        try:
            event: Optional[Event] = first
            while event is not None:
                if event.kind == "token":
                    yield _sse(_chunk(kind, rid, model, event.text, None))
                elif event.kind == "error":
                    yield _sse(ApiError(500, event.text, "server_error").body())
                    break
                else:
                    done = event.completion
                    assert done is not None
                    yield _sse(_chunk(kind, rid, model, "", done.finish_reason, usage=_usage(done)))
                    break
                event = await anext(events, None)
            yield "data: [DONE]\n\n"
        finally:
            await events.aclose()  # a client that went away cancels its generation here

    def _adapter(model: str) -> Optional[str]:
        if model in (BASE, runtime.manifest.base.name):
            return None
        if model not in engine.adapters:
            raise ApiError(
                404,
                f"model '{model}' not found; GET /v1/models lists: {', '.join(model_ids())}",
                code="model_not_found",
                param="model",
            )
        return model

    def _sampling(req: _Request) -> Sampling:
        limit = min(options.max_tokens_limit, options.max_context or runtime.context_length, runtime.context_length)
        wanted = req.max_completion_tokens or req.max_tokens or 256
        if wanted > limit:
            raise ApiError(400, f"max_tokens {wanted} is above this server's limit of {limit}", param="max_tokens")
        return Sampling(max_new_tokens=wanted, temperature=req.temperature, top_p=req.top_p, seed=req.seed)

    return app


async def _drain(first: Event, events: AsyncIterator[Event]) -> Event:
    """The event that ends a request (its completion holds the whole text)."""
    event = first
    while event.kind == "token":
        event = await anext(events)
    return event


def _admin(request, engine, options: ServeOptions) -> Scheduler:
    if not options.admin_key:
        raise ApiError(403, "loading adapters at run time is off; start the server with --admin-key", code="no_admin")
    if request.headers.get("authorization", "") != f"Bearer {options.admin_key}":
        raise ApiError(401, "missing or wrong admin key; send Authorization: Bearer ADMIN_KEY", code="invalid_api_key")
    if not isinstance(engine, Batched):
        raise ApiError(
            400, "adapters load at run time only on the batched server (a CPU bundle, without --no-batching)"
        )
    return engine.scheduler


def _allowed(path: Path, roots: tuple[Path, ...]) -> Path:
    """`path` resolved (links followed) if it lies in one of `roots`; 403 otherwise."""
    resolved = path.expanduser().resolve()
    if not any(resolved.is_relative_to(root.expanduser().resolve()) for root in roots):
        where = ", ".join(str(r) for r in roots) or "none (start the server with --adapter-dir DIR)"
        raise ApiError(403, f"'{path}' is outside the folders adapters may be loaded from: {where}", param="path")
    if not resolved.exists():
        raise ApiError(400, f"'{path}' does not exist", param="path")
    return resolved


def _read_adapter(runtime: Runtime, name: str, path: Path):
    from slmops.shipping.export import live_adapter

    return live_adapter(runtime.model_dir, runtime.manifest, name, path)


def _source(sources: dict[str, str], model: str) -> dict:
    return {"sha256": sources[model]} if model in sources else {}


class Guard:
    """The API key and the body-size limit, checked before a request reaches a handler.

    A plain ASGI middleware: Starlette's BaseHTTPMiddleware wraps `receive`, and a handler behind it
    never sees the client disconnect (the non-streaming path polls for it)."""

    def __init__(self, app, options: ServeOptions):
        self.app, self.options = app, options

    async def __call__(self, scope, receive, send):
        if scope["type"] == "http":
            refusal = self.refusal(scope)
            if refusal is not None:
                await _error(refusal)(scope, receive, send)
                return
        await self.app(scope, receive, send)

    def refusal(self, scope) -> Optional[ApiError]:
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope["headers"]}
        path, key = scope["path"], self.options.api_key
        admin = path.startswith("/v1/adapters") and scope["method"] != "GET"  # checked by its own key
        if key and path not in ("/health", "/metrics") and not admin:
            if headers.get("authorization", "") != f"Bearer {key}":
                return ApiError(401, "missing or wrong API key; send Authorization: Bearer KEY", code="invalid_api_key")
        length = headers.get("content-length", "")
        if length.isdigit() and int(length) > self.options.max_body_bytes:
            return ApiError(
                413,
                f"request body is {length} bytes, the limit is {self.options.max_body_bytes}",
                code="request_too_large",
            )
        return None


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
