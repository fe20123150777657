"""OpenAI-compatible HTTP server over the engine (FastAPI).

Endpoints: POST /v1/chat/completions (JSON or SSE stream), POST /v1/completions, GET /v1/models (carries the
medical advisory), GET /health, GET /metrics (Prometheus text), GET / (web chat page).

Errors use the OpenAI shape {"error": {"message", "type", "param", "code"}}: validation -> 400 naming the field,
unknown model -> 404, full queue -> 429, shutting down -> 503. A client that disconnects cancels its generation
(the engine slot is freed). Prompt and completion text are never logged unless log_text is set.
"""

from __future__ import annotations

import asyncio
import html
import json
import logging
import time
import uuid
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, AsyncIterator, Literal, Optional, Union

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from angelmed import MEDICAL_ADVISORY
from angelmed.infer.backends import chat_prompt_ids
from angelmed.infer.engine import (RECOMMENDED_SAMPLING, Delta, Engine, EngineClosed, EngineError,
                                   GenerationRequest, QueueFull)

log = logging.getLogger("angelmed.serve")
STATIC = Path(__file__).parent / "static"


@dataclass
class ServerConfig:
    served_model_name: str = "angelmed"
    api_key: str | None = None
    log_text: bool = False
    safety: bool = True
    # used when a request leaves a sampling setting out (generation_config.json, else spec §11)
    sampling_defaults: dict = field(default_factory=lambda: dict(RECOMMENDED_SAMPLING))
    drain_timeout_s: float = 30.0


# ---- request schemas -------------------------------------------------------------------------------------
class _Lenient(BaseModel):
    model_config = ConfigDict(extra="ignore")  # OpenAI clients send fields we do not use (user, metadata, ...)


class ContentPart(_Lenient):
    type: Literal["text"]
    text: str


class ChatMessage(_Lenient):
    role: Literal["system", "user", "assistant", "tool", "developer"]
    content: Optional[Union[str, list[ContentPart]]] = ""

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(p.text for p in self.content)
        return self.content or ""


class StreamOptions(_Lenient):
    include_usage: bool = False


class _SamplingFields(_Lenient):
    model: str
    max_tokens: Optional[int] = Field(None, ge=1)
    temperature: Optional[float] = Field(None, ge=0, le=2)
    top_p: Optional[float] = Field(None, gt=0, le=1)
    top_k: Optional[int] = Field(None, ge=-1)
    repetition_penalty: Optional[float] = Field(None, gt=0, le=10)
    frequency_penalty: Optional[float] = Field(None, ge=-2, le=2)
    presence_penalty: Optional[float] = Field(None, ge=-2, le=2)
    seed: Optional[int] = None
    stop: Optional[Union[str, list[str]]] = None
    stream: bool = False
    stream_options: Optional[StreamOptions] = None
    n: int = Field(1, ge=1, le=16)
    cache_salt: Optional[str] = Field(None, max_length=256)  # as vLLM: prefix reuse only within the same salt


class ChatCompletionRequest(_SamplingFields):
    messages: list[ChatMessage] = Field(min_length=1)
    max_completion_tokens: Optional[int] = Field(None, ge=1)
    logprobs: bool = False
    top_logprobs: Optional[int] = Field(None, ge=0, le=20)


class CompletionRequest(_SamplingFields):
    prompt: Union[str, list[int]]
    logprobs: Optional[int] = Field(None, ge=0, le=5)  # legacy API: how many alternatives per token


class APIError(Exception):
    def __init__(self, status: int, message: str, type_: str = "invalid_request_error", param: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param = status, message, type_, param


def _error(status: int, message: str, type_: str, param: str | None = None) -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": status}}, status)


# ---- the safety layer (written separately; optional until merged) --------------------------------------
def load_safety(enabled: bool):
    if not enabled:
        return None
    try:
        from angelmed.safety import SafetyGuard
    except ImportError as e:
        log.warning("medical safety layer unavailable (%s); serving without it", e)
        return None
    return SafetyGuard(enabled=True)


# ---- metrics -----------------------------------------------------------------------------------------------
class HTTPCounters:
    def __init__(self):
        self.by_key: dict[tuple[str, int], int] = {}
        self.latency_sum = 0.0
        self.latency_count = 0

    def add(self, endpoint: str, status: int, seconds: float | None = None) -> None:
        self.by_key[(endpoint, status)] = self.by_key.get((endpoint, status), 0) + 1
        if seconds is not None:
            self.latency_sum += seconds
            self.latency_count += 1


def prometheus_text(engine: Engine, http: HTTPCounters) -> str:
    m = engine.metrics
    active = sum(s is not None for s in engine.slots)
    rows = [
        ("angelmed_requests_total", "counter", "generation requests by final state",
         [({"state": "submitted"}, m.requests_submitted), ({"state": "finished"}, m.requests_finished),
          ({"state": "cancelled"}, m.requests_cancelled), ({"state": "failed"}, m.requests_failed)]),
        ("angelmed_requests_cancelled_total", "counter", "requests cancelled (client gone or aborted)",
         [({}, m.requests_cancelled)]),
        ("angelmed_prompt_tokens_total", "counter", "prompt tokens of admitted requests", [({}, m.prompt_tokens)]),
        ("angelmed_prompt_tokens_cached_total", "counter", "prompt tokens whose K/V a slot still held (not prefilled)",
         [({}, m.prompt_tokens_cached)]),
        ("angelmed_generated_tokens_total", "counter", "tokens generated", [({}, m.tokens_generated)]),
        ("angelmed_engine_steps_total", "counter", "engine scheduler steps", [({}, m.steps)]),
        ("angelmed_active_slots", "gauge", "requests decoding now", [({}, active)]),
        ("angelmed_max_slots", "gauge", "batch slots in the KV cache", [({}, m.max_batch)]),
        ("angelmed_queue_depth", "gauge", "requests waiting for a slot", [({}, len(engine._pending))]),
        ("angelmed_spec_drafted_tokens_total", "counter", "speculative tokens drafted", [({}, m.spec_drafted)]),
        ("angelmed_spec_accepted_tokens_total", "counter", "speculative tokens accepted", [({}, m.spec_accepted)]),
        ("angelmed_http_requests_total", "counter", "HTTP requests by endpoint and status",
         [({"endpoint": e, "status": str(s)}, n) for (e, s), n in sorted(http.by_key.items())]),
        ("angelmed_request_latency_seconds_sum", "counter", "total latency of generation requests",
         [({}, round(http.latency_sum, 6))]),
        ("angelmed_request_latency_seconds_count", "counter", "generation requests timed",
         [({}, http.latency_count)]),
    ]
    out = []
    for name, kind, help_, samples in rows:
        out += [f"# HELP {name} {help_}", f"# TYPE {name} {kind}"]
        for labels, value in samples:
            lab = ",".join(f'{k}="{v}"' for k, v in labels.items())
            out.append(f"{name}{{{lab}}} {value}" if lab else f"{name} {value}")
    return "\n".join(out) + "\n"


# ---- the app -----------------------------------------------------------------------------------------------
def create_app(engine: Engine, tokenizer: Any, config: ServerConfig | None = None) -> FastAPI:
    """The engine's runner thread is started at app startup and drained at shutdown (SIGTERM)."""
    cfg = config or ServerConfig()
    guard = load_safety(cfg.safety)
    http = HTTPCounters()

    @asynccontextmanager
    async def lifespan(app: FastAPI):
        engine.start()
        yield
        log.info("shutting down: draining %d active and %d queued requests",
                 sum(s is not None for s in engine.slots), len(engine._pending))
        await asyncio.to_thread(engine.shutdown, True, cfg.drain_timeout_s)

    app = FastAPI(title="angelmed", lifespan=lifespan)

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError):
        errs = exc.errors()
        first = errs[0] if errs else {}
        loc = [str(x) for x in first.get("loc", ()) if x != "body"]
        param = ".".join(loc) or None
        msg = first.get("msg", "invalid request")
        if first.get("type") == "json_invalid":
            msg, param = f"malformed JSON body: {first.get('ctx', {}).get('error', msg)}", None
        http.add(request.url.path, 400)
        return _error(400, f"{param}: {msg}" if param else msg, "invalid_request_error", param)

    @app.exception_handler(APIError)
    async def _api_error(request: Request, exc: APIError):
        http.add(request.url.path, exc.status)
        return _error(exc.status, exc.message, exc.type, exc.param)

    @app.middleware("http")
    async def _auth(request: Request, call_next):
        if cfg.api_key and request.url.path.startswith("/v1/"):
            if request.headers.get("authorization", "") != f"Bearer {cfg.api_key}":
                http.add(request.url.path, 401)
                return _error(401, "missing or invalid API key (Authorization: Bearer ...)", "authentication_error")
        return await call_next(request)

    # ---- helpers ----
    def check_model(name: str) -> None:
        if name != cfg.served_model_name:
            raise APIError(404, f"model {name!r} does not exist; this server serves {cfg.served_model_name!r}",
                           "model_not_found", "model")

    def build_requests(body: _SamplingFields, prompt_ids: list[int], max_tokens: int | None,
                       default_max: int | None, logprobs: bool, top_logprobs: int = 0) -> list[GenerationRequest]:
        """One engine request per choice (`n`); choice i of a seeded request uses seed + i."""
        for name in ("frequency_penalty", "presence_penalty"):
            if getattr(body, name):
                raise APIError(400, f"{name}: not supported (use repetition_penalty)", param=name)
        ctx = engine.max_seq_len
        if len(prompt_ids) >= ctx:
            raise APIError(400, f"prompt is {len(prompt_ids)} tokens; the context is {ctx} tokens "
                                "(at least one must be left for the reply)", param="messages")
        room = ctx - len(prompt_ids)
        if max_tokens is not None and max_tokens > room:
            raise APIError(400, f"max_tokens: {max_tokens} is too large: prompt {len(prompt_ids)} + max_tokens "
                                f"exceeds the context of {ctx} tokens (at most {room})", param="max_tokens")
        if max_tokens is None:
            max_tokens = room if default_max is None else min(default_max, room)
        d = cfg.sampling_defaults
        stop = [body.stop] if isinstance(body.stop, str) else list(body.stop or [])
        if any(not s for s in stop) or len(stop) > 16:
            raise APIError(400, "stop: up to 16 non-empty strings", param="stop")
        top_k = body.top_k if body.top_k is not None else d.get("top_k", 0)
        return [GenerationRequest(
            prompt_ids=prompt_ids, max_tokens=max_tokens,
            temperature=body.temperature if body.temperature is not None else d.get("temperature", 0.0),
            top_p=body.top_p if body.top_p is not None else d.get("top_p", 1.0),
            top_k=max(0, top_k),
            repetition_penalty=(body.repetition_penalty if body.repetition_penalty is not None
                                else d.get("repetition_penalty", 1.0)),
            seed=None if body.seed is None else body.seed + i, stop=stop, logprobs=logprobs,
            top_logprobs=top_logprobs, request_id=f"cmpl-{uuid.uuid4().hex}", cache_salt=body.cache_salt)
            for i in range(body.n)]

    def submit_error(e: Exception) -> APIError:
        if isinstance(e, QueueFull):
            return APIError(429, f"server busy: {e}", "rate_limit_error")
        if isinstance(e, EngineClosed):
            return APIError(503, "server is shutting down", "server_error")
        if isinstance(e, EngineError):
            return APIError(503, f"engine unavailable: {e}", "server_error")
        return APIError(400, str(e))

    async def start_streams(reqs: list[GenerationRequest]):
        """Submit every choice now (together, so they share one prefill) and wait for their first deltas, so
        queue/closed/validation errors become HTTP errors. Returns the streams and their first deltas."""
        gens = [engine.stream(r) for r in reqs]
        heads = await asyncio.gather(*(g.__anext__() for g in gens), return_exceptions=True)
        bad = next((h for h in heads if isinstance(h, BaseException)), None)
        if bad is not None:
            for g in gens:
                await g.aclose()  # cancels the choices that did start
            if isinstance(bad, (EngineError, ValueError)):
                raise submit_error(bad) from None
            raise bad
        return gens, heads

    async def merged(gens, heads) -> AsyncIterator[tuple[int, Delta]]:
        """(choice index, delta) from all streams as they arrive; closing it cancels what is still running."""
        q: asyncio.Queue = asyncio.Queue()

        async def pump(i: int, gen, head: Delta) -> None:
            try:
                await q.put((i, head))
                if head.finish_reason is None:
                    async for d in gen:
                        await q.put((i, d))
            finally:  # even if the stream raised: the merge must not wait for it forever
                q.put_nowait((i, None))

        tasks = [asyncio.create_task(pump(i, g, h)) for i, (g, h) in enumerate(zip(gens, heads))]
        try:
            running = len(tasks)
            while running:
                i, d = await q.get()
                if d is None:
                    running -= 1
                else:
                    yield i, d
        finally:
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)  # a generator cannot close while a task awaits it
            for g in gens:
                await g.aclose()

    async def collect(request: Request, reqs: list[GenerationRequest]) -> list[list[Delta]]:
        """Every choice's deltas; cancel them all if the client goes away meanwhile."""
        deltas: list[list[Delta]] = [[] for _ in reqs]
        stream = merged(*await start_streams(reqs))

        async def consume():
            async for i, d in stream:
                deltas[i].append(d)

        task = asyncio.create_task(consume())
        while not task.done():
            await asyncio.wait({task}, timeout=0.25)
            if not task.done() and await request.is_disconnected():
                task.cancel()
                await stream.aclose()
                for r in reqs:
                    engine.cancel(r.request_id)
                raise APIError(499, "client disconnected")
        task.result()
        failed = next((ds[-1] for ds in deltas if ds and ds[-1].finish_reason == "error"), None)
        if failed is not None:
            raise APIError(500, f"generation failed: {failed.error}", "server_error")
        return deltas

    def log_done(kind: str, req: GenerationRequest, n_out: int, finish: list, t0: float, texts: list[str] = ()):
        dt = time.monotonic() - t0
        http.add(kind, 200, dt)
        extra = f" prompt_ids={req.prompt_ids!r} completions={list(texts)!r}" if cfg.log_text else ""
        log.info("%s %s prompt_tokens=%d completion_tokens=%d finish=%s %.3fs%s", kind, req.request_id,
                 len(req.prompt_ids), n_out, ",".join(map(str, finish)), dt, extra)

    def cached_of(collected: list[list[Delta]]) -> int:
        """Prompt tokens served from cache: the prompt is counted once, so the most any choice reused."""
        return max((ds[-1].cached_tokens for ds in collected if ds), default=0)

    def usage(req: GenerationRequest, n_out: int, cached: int) -> dict:
        return {"prompt_tokens": len(req.prompt_ids), "completion_tokens": n_out,
                "total_tokens": len(req.prompt_ids) + n_out, "prompt_tokens_details": {"cached_tokens": cached}}

    def sse(obj: Any) -> str:
        return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"

    def lp_item(t: int, lp: float) -> dict:
        s = tokenizer.decode([t])
        return {"token": s, "logprob": lp, "bytes": list(s.encode())}

    def lp_content(token_ids: list[int], lps: list[float] | None, tops: list | None = None) -> dict | None:
        if lps is None:
            return None
        tops = tops or [[]] * len(lps)
        return {"content": [{**lp_item(t, lp), "top_logprobs": [lp_item(a, v) for a, v in top]}
                            for t, lp, top in zip(token_ids, lps, tops)]}

    # ---- endpoints ----
    @app.get("/health")
    async def health():
        if not engine.running:
            return JSONResponse({"status": "unavailable"}, 503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(prometheus_text(engine, http), media_type="text/plain; version=0.0.4")

    @app.get("/v1/models")
    async def models():
        return {"object": "list", "data": [{
            "id": cfg.served_model_name, "object": "model", "created": int(time.time()), "owned_by": "angelmed",
            "max_model_len": engine.max_seq_len,
            "metadata": {"medical_advisory": MEDICAL_ADVISORY, "safety_layer": guard is not None}}]}

    @app.get("/", response_class=HTMLResponse)
    async def index():
        page = (STATIC / "index.html").read_text()
        return page.replace("{{ADVISORY}}", html.escape(MEDICAL_ADVISORY)).replace(
            "{{MODEL}}", html.escape(cfg.served_model_name))

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        t0 = time.monotonic()
        check_model(body.model)
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        prompt_ids = chat_prompt_ids(tokenizer, messages)
        user_text = next((m["content"] for m in reversed(messages) if m["role"] == "user"), "")
        max_tokens = body.max_completion_tokens or body.max_tokens
        if body.top_logprobs and not body.logprobs:
            raise APIError(400, "top_logprobs: needs logprobs: true", param="top_logprobs")
        reqs = build_requests(body, prompt_ids, max_tokens, None, body.logprobs, body.top_logprobs or 0)
        req = reqs[0]
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())

        if not body.stream:
            choices, n_out, finishes, contents = [], 0, [], []
            collected = await collect(request, reqs)
            for i, deltas in enumerate(collected):
                text = "".join(d.text for d in deltas)
                n_out += sum(len(d.token_ids) for d in deltas)
                finishes.append(deltas[-1].finish_reason if deltas else "stop")
                contents.append(guard.ensure_guidance(user_text, text) if guard is not None else text)
                lps = [x for d in deltas for x in (d.logprobs or [])] if body.logprobs else None
                tops = [x for d in deltas for x in (d.top_logprobs or [])] if body.top_logprobs else None
                choices.append({"index": i, "message": {"role": "assistant", "content": contents[-1]},
                                "logprobs": lp_content([t for d in deltas for t in d.token_ids], lps, tops),
                                "finish_reason": finishes[-1]})
            log_done("/v1/chat/completions", req, n_out, finishes, t0, contents)
            return {"id": cid, "object": "chat.completion", "created": created, "model": cfg.served_model_name,
                    "choices": choices, "usage": usage(req, n_out, cached_of(collected))}

        gens, heads = await start_streams(reqs)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        def chunk(i: int, delta: dict, finish: str | None = None, logprobs: dict | None = None) -> str:
            return sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                        "model": cfg.served_model_name,
                        "choices": [{"index": i, "delta": delta, "logprobs": logprobs, "finish_reason": finish}]})

        async def events():
            texts, finishes = [""] * len(reqs), [None] * len(reqs)
            n_out = cached = 0
            stream = merged(gens, heads)
            try:
                for i in range(len(reqs)):
                    yield chunk(i, {"role": "assistant", "content": ""})
                async for i, d in stream:
                    if d.finish_reason == "error":
                        yield sse({"error": {"message": f"generation failed: {d.error}", "type": "server_error"}})
                        return
                    n_out += len(d.token_ids)
                    cached = max(cached, d.cached_tokens)
                    texts[i] += d.text
                    if d.text or (body.logprobs and d.token_ids):
                        yield chunk(i, {"content": d.text}, None,
                                    lp_content(d.token_ids, d.logprobs, d.top_logprobs) if body.logprobs else None)
                    if d.finish_reason is not None:
                        suffix = guard.guidance_suffix(user_text, texts[i]) if guard is not None else ""
                        if suffix:
                            texts[i] += suffix
                            yield chunk(i, {"content": suffix})
                        finishes[i] = d.finish_reason
                        yield chunk(i, {}, d.finish_reason)
                if include_usage:
                    yield sse({"id": cid, "object": "chat.completion.chunk", "created": created,
                               "model": cfg.served_model_name, "choices": [], "usage": usage(req, n_out, cached)})
                yield "data: [DONE]\n\n"
                log_done("/v1/chat/completions", req, n_out, finishes, t0, texts)
            finally:  # client disconnect lands here (CancelledError/GeneratorExit): cancel, free the slots
                await stream.aclose()

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest, request: Request):
        t0 = time.monotonic()
        check_model(body.model)
        if isinstance(body.prompt, str):
            prompt_ids = list(tokenizer.encode(body.prompt))
        else:
            prompt_ids = list(body.prompt)
            if not prompt_ids or any(not 0 <= t < engine.vocab_size for t in prompt_ids):
                raise APIError(400, f"prompt: token ids must be in [0, {engine.vocab_size})", param="prompt")
        if not prompt_ids:
            raise APIError(400, "prompt: empty", param="prompt")
        reqs = build_requests(body, prompt_ids, body.max_tokens, 16, body.logprobs is not None, body.logprobs or 0)
        req = reqs[0]
        cid, created = f"cmpl-{uuid.uuid4().hex}", int(time.time())

        def top_map(top: list[tuple[int, float]]) -> dict[str, float]:
            m: dict[str, float] = {}
            for a, v in top:  # most likely first: where two ids decode to the same text, the likelier one stays
                m.setdefault(tokenizer.decode([a]), v)
            return m

        def choice(i: int, text: str, finish: str | None, token_ids=None, lps=None, tops=None) -> dict:
            lp = None
            if body.logprobs is not None and lps is not None:
                lp = {"tokens": [tokenizer.decode([t]) for t in token_ids], "token_logprobs": lps}
                if tops:
                    lp["top_logprobs"] = [top_map(top) for top in tops]
            return {"index": i, "text": text, "logprobs": lp, "finish_reason": finish}

        if not body.stream:
            choices, n_out, finishes, texts = [], 0, [], []
            collected = await collect(request, reqs)
            for i, deltas in enumerate(collected):
                texts.append("".join(d.text for d in deltas))
                n_out += sum(len(d.token_ids) for d in deltas)
                finishes.append(deltas[-1].finish_reason if deltas else "stop")
                choices.append(choice(i, texts[-1], finishes[-1], [t for d in deltas for t in d.token_ids],
                                      [x for d in deltas for x in (d.logprobs or [])],
                                      [x for d in deltas for x in (d.top_logprobs or [])]))
            log_done("/v1/completions", req, n_out, finishes, t0, texts)
            return {"id": cid, "object": "text_completion", "created": created, "model": cfg.served_model_name,
                    "choices": choices, "usage": usage(req, n_out, cached_of(collected))}

        gens, heads = await start_streams(reqs)
        include_usage = bool(body.stream_options and body.stream_options.include_usage)

        async def events():
            finishes = [None] * len(reqs)
            n_out = cached = 0
            stream = merged(gens, heads)
            try:
                async for i, d in stream:
                    if d.finish_reason == "error":
                        yield sse({"error": {"message": f"generation failed: {d.error}", "type": "server_error"}})
                        return
                    n_out += len(d.token_ids)
                    cached = max(cached, d.cached_tokens)
                    finishes[i] = d.finish_reason
                    if d.text or d.finish_reason:
                        yield sse({"id": cid, "object": "text_completion", "created": created,
                                   "model": cfg.served_model_name,
                                   "choices": [choice(i, d.text, d.finish_reason, d.token_ids, d.logprobs,
                                                      d.top_logprobs)]})
                if include_usage:
                    yield sse({"id": cid, "object": "text_completion", "created": created,
                               "model": cfg.served_model_name, "choices": [], "usage": usage(req, n_out, cached)})
                yield "data: [DONE]\n\n"
                log_done("/v1/completions", req, n_out, finishes, t0)
            finally:
                await stream.aclose()

        return StreamingResponse(events(), media_type="text/event-stream", headers={"Cache-Control": "no-cache"})

    app.state.engine, app.state.config = engine, cfg
    return app
