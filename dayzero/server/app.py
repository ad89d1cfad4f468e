"""The HTTP app: /health, /v1/models, /v1/completions, /v1/chat/completions, /v1/responses, /v1/messages
(Anthropic), /metrics. The three conversation APIs go through deepseek-recipe (recipe.py, conversations.py).

The event loop only moves bytes. Work whose cost grows with what a client sends or asks for (JSON
parsing, chat rendering, tokenization, detokenization of long outputs, response JSON) runs in
`CpuPool`, so no request can hold up /health or another request's stream: one client posting
2 MB prompts held /health for 1.2 s at the median before (docs/BENCHMARKS.md, "Noisy neighbour").
"""
from __future__ import annotations

import asyncio
import contextlib
import json
import secrets
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from dayzero.server import conversations
from dayzero.server.cpu_pool import INLINE_OUTPUT_IDS, LARGE_BODY_BYTES, LARGE_OUTPUT_IDS, CpuPool
from dayzero.server.engine_loop import EngineDead, EngineLoop, Overloaded, finished_or_left
from dayzero.server.metrics import Metrics
from dayzero.server.protocol import APIError, GenRequest, Validator, bad
from dayzero.server.recipe import APIS, Prepared, Protocol, error_body, tokenizer_config
from dayzero.server.text import TextState


@dataclass(frozen=True)
class ServerArgs:
    model_name: str
    api_key: str | None = None
    max_model_len: int | None = None  # default: the model's max_seq_len, capped by the KV cache capacity
    max_in_flight: int | None = None  # default: 4 x max_num_seqs; more answer 429
    max_body_bytes: int = 4 * 2**20
    cpu_workers: int = 2  # threads per lane of CpuPool
    model_dir: str | None = None  # its config.json picks the prompt encoding (V4 or V4.1)
    builtin: bool = False  # the built-in plain-text model: its own chat defaults (recipe.py)


class _Tracker:
    """Per-request timing for the TTFT / TPOT / latency histograms."""

    def __init__(self, n_prompt: int):
        self.n_prompt = n_prompt
        self.t0 = time.monotonic()
        self.first: float | None = None
        self.last: float | None = None
        self.n = 0

    def tokens(self, k: int) -> None:
        if k:
            now = time.monotonic()
            self.first = self.first or now
            self.last = now
            self.n += k

    def done(self, metrics: Metrics, reason: str) -> None:
        ttft = None if self.first is None else self.first - self.t0
        tpot = (self.last - self.first) / (self.n - 1) if self.n > 1 else None
        metrics.request_done(self.n_prompt, self.n, reason, ttft, tpot, time.monotonic() - self.t0)


class _SSEResponse(StreamingResponse):
    """A stream that gives its in-flight slot back however it ends, even if its body never started
    (a client gone before the first byte)."""

    def __init__(self, body, on_close):
        super().__init__(body, media_type="text/event-stream",
                         headers={"Cache-Control": "no-cache", "X-Accel-Buffering": "no"})
        self._on_close = on_close

    async def __call__(self, scope, receive, send):
        try:
            await super().__call__(scope, receive, send)
        finally:
            self._on_close()


def _sse(obj) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


class Server:
    def __init__(self, llm, sargs: ServerArgs):
        self.llm, self.sargs = llm, sargs
        eng = llm.engine
        limit = min(llm.args.max_seq_len, eng.max_tokens)
        self.context = min(limit, sargs.max_model_len) if sargs.max_model_len else limit
        self.loop = EngineLoop(eng, sargs.max_in_flight or 4 * eng.max_num_seqs)
        self.metrics = Metrics(sargs.model_name)
        self.tok = llm.tokenizer
        self.eos = {llm.args.eos_token_id}
        self.validator = Validator(sargs.model_name, self.tok, llm.args.vocab_size, self.context, self.eos)
        self.proto = Protocol(sargs.model_name, self.tok, self.context, llm.args.eos_token_id, llm.args.vocab_size,
                              config=tokenizer_config(sargs.model_dir), builtin=sargs.builtin)
        if self.tok is not None and hasattr(self.tok, "max_token_bytes"):
            self.tok.max_token_bytes  # noqa: B018 - scan the vocabulary now, not in the first request
        self.cpu = CpuPool(sargs.cpu_workers)
        self.created = int(time.time())

    # ---- plumbing ---------------------------------------------------------------------------------
    def auth(self, request: Request) -> None:
        key = self.sargs.api_key
        if key is None:
            return
        got = request.headers.get("authorization", "")
        if not (got.startswith("Bearer ") and secrets.compare_digest(got[7:].encode(), key.encode())):
            raise APIError(401, "a valid API key is required: send 'Authorization: Bearer KEY'",
                           code="invalid_api_key")

    async def read_body(self, request: Request) -> bytes:
        limit = self.sargs.max_body_bytes
        declared = request.headers.get("content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise APIError(413, f"request body of {declared} bytes exceeds the {limit}-byte limit")
        chunks, size = [], 0
        async for c in request.stream():
            size += len(c)
            if size > limit:
                raise APIError(413, f"request body exceeds the {limit}-byte limit")
            chunks.append(c)
        return b"".join(chunks)

    def parse(self, data: bytes, kind: str) -> GenRequest | Prepared:
        """Body bytes -> a validated request (JSON, rendering, tokenization): runs in the CpuPool."""
        try:
            body = json.loads(data)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        try:
            if kind == "completion":
                return self.validator.completion(body)
            return self.proto.prepare(kind, body, getattr(self.tok, "min_tokens", None))
        except ValueError as e:  # SamplingParams.<field>: ...
            msg = str(e)
            field = msg.split(":", 1)[0].removeprefix("SamplingParams.")
            raise bad(field, msg.split(": ", 1)[-1]) from None

    def token_str(self, t: int) -> str:
        return self.tok.decode([t], skip_special_tokens=False) if self.tok is not None else str(t)

    def _top(self, lp: dict[int, float], n: int) -> list[tuple[int, float]]:
        return sorted(lp.items(), key=lambda kv: -kv[1])[:n]

    def _top_dict(self, lp: dict[int, float], n: int) -> dict[str, float]:
        out: dict[str, float] = {}
        for k, v in self._top(lp, n):  # distinct ids can decode alike (partial UTF-8): keep the likeliest
            out.setdefault(self.token_str(k), v)
        return out

    def completion_logprobs(self, ids, lps, n: int, offset: int) -> dict:
        toks = [self.token_str(t) for t in ids]
        offsets = []
        for s in toks:
            offsets.append(offset)
            offset += len(s)
        return {"tokens": toks, "token_logprobs": [lp[t] for t, lp in zip(ids, lps)],
                "top_logprobs": [self._top_dict(lp, n) for lp in lps],
                "text_offset": offsets}

    def usage(self, g: GenRequest, n_out: int) -> dict:
        return {"prompt_tokens": len(g.prompt_ids), "completion_tokens": n_out,
                "total_tokens": len(g.prompt_ids) + n_out}

    # ---- generation -------------------------------------------------------------------------------
    async def handle(self, request: Request, kind: str):
        try:
            return await self._handle(request, kind)
        except APIError as e:
            if getattr(e, "api", None) is None:
                e.api = kind  # the error in this API's own shape
            raise

    async def _handle(self, request: Request, kind: str):
        self.auth(request)
        # the slot is taken before the body is read: it bounds the bodies held in memory and the
        # work waiting for the CpuPool by --max-in-flight
        try:
            self.loop.reserve()
        except Overloaded as e:
            self.metrics.reject(429)
            raise APIError(429, f"server busy: {e}; retry later", code="too_many_requests") from None
        except EngineDead as e:
            self.metrics.reject(503)
            raise APIError(503, f"engine unavailable: {e}") from None
        streaming = False
        try:
            data = await self.read_body(request)
            g = await self.cpu.run(self.parse, data, kind, large=len(data) > LARGE_BODY_BYTES)
            if kind in APIS:
                tr = _Tracker(len(g.prompt_ids))
                if g.stream:
                    streaming = True
                    return _SSEResponse(conversations.stream(self, g, tr), self.loop.unreserve)
                return await conversations.complete(self, g, request, tr)
            rid = "cmpl-" + uuid.uuid4().hex
            if g.stream:
                streaming = True  # the stream gives the slot back when it ends
                return _SSEResponse(self.stream(g, rid), self.loop.unreserve)
            return await self.complete(g, rid, request)
        finally:
            if not streaming:
                self.loop.unreserve()

    def _text_state(self, g: GenRequest) -> TextState:
        drop = set(g.params.stop_token_ids or ()) | (set() if g.params.ignore_eos else self.eos)
        return TextState(self.tok, g.params.stop_strings, drop, keep_special=False)

    async def complete(self, g: GenRequest, rid: str, request: Request):
        ts, tr = self._text_state(g), _Tracker(len(g.prompt_ids))
        ids, lps, reason = [], [], None

        async def collect():
            nonlocal reason
            async for d in self.loop.generate(rid, g.prompt_ids, g.params):
                if d.error:
                    raise APIError(503, f"generation failed: {d.error}")
                ids.extend(d.token_ids)
                lps.extend(d.logprobs or [])
                tr.tokens(len(d.token_ids))
                reason = d.finish_reason

        task = asyncio.ensure_future(collect())
        try:
            if not await finished_or_left(task, request):
                tr.done(self.metrics, "abort")
                return JSONResponse({}, status_code=499)
            task.result()
        finally:
            task.cancel()
        if reason == "abort":
            raise APIError(503, "the engine aborted the request")
        tr.done(self.metrics, reason)
        ts.ids = ids
        return await self.cpu.run(self.response, g, rid, ts, ids, lps, reason, large=len(ids) > LARGE_OUTPUT_IDS)

    def response(self, g: GenRequest, rid: str, ts: TextState, ids, lps, reason: str) -> JSONResponse:
        """The whole answer of a non-streamed request, detokenized and serialized: runs in the CpuPool."""
        return JSONResponse(self._response_body(g, rid, ts, ids, lps, reason))

    def _response_body(self, g: GenRequest, rid: str, ts: TextState, ids, lps, reason: str) -> dict:
        text = ts.full(finished=True)
        lp = None if g.logprobs is None else self.completion_logprobs(ids, lps, g.logprobs, 0)
        return {"id": rid, "object": "text_completion", "created": int(time.time()), "model": self.sargs.model_name,
                "choices": [{"index": 0, "text": text, "logprobs": lp, "finish_reason": reason}],
                "usage": self.usage(g, len(ids)), "system_fingerprint": None}

    async def stream(self, g: GenRequest, rid: str):
        """SSE chunks as OpenAI shapes them. Leaving early (client gone) aborts via generate()'s finally."""
        ts, tr = self._text_state(g), _Tracker(len(g.prompt_ids))
        created, name, obj = int(time.time()), self.sargs.model_name, "text_completion"
        usage_null = {"usage": None} if g.include_usage else {}
        offset = 0
        reason = "abort"
        n_out = 0

        def chunk(choice: dict) -> str:
            return _sse({"id": rid, "object": obj, "created": created, "model": name, "system_fingerprint": None,
                         "choices": [dict(index=0, logprobs=None, finish_reason=None) | choice], **usage_null})

        def shape(d) -> str:
            """One engine delta -> its SSE text ('' if nothing is safe to send yet). Detokenizes
            the whole output so far (text.py), so it moves to the CpuPool once the output is long."""
            nonlocal offset
            finished = d.finish_reason is not None
            new = ts.add(d.token_ids, finished)
            lp = None
            if g.logprobs is not None and d.token_ids:
                lp = self.completion_logprobs(d.token_ids, d.logprobs, g.logprobs, offset)
            offset += len(new)
            if new or lp or finished:
                return chunk({"text": new, "logprobs": lp, "finish_reason": d.finish_reason if finished else None})
            return ""

        try:
            async for d in self.loop.generate(rid, g.prompt_ids, g.params):
                if d.error or d.finish_reason == "abort":
                    yield _sse(APIError(503, f"generation failed: {d.error or 'the engine aborted the request'}")
                               .body())
                    break
                tr.tokens(len(d.token_ids))
                n_out += len(d.token_ids)
                if n_out <= INLINE_OUTPUT_IDS:
                    out = shape(d)
                else:
                    out = await self.cpu.run(shape, d, large=n_out > LARGE_OUTPUT_IDS)
                if out:
                    yield out
                if d.finish_reason is not None:
                    reason = d.finish_reason
            if g.include_usage:
                yield _sse({"id": rid, "object": obj, "created": created, "model": name, "system_fingerprint": None,
                            "choices": [], "usage": self.usage(g, n_out)})
            yield "data: [DONE]\n\n"
        finally:
            tr.done(self.metrics, reason)


def build_app(llm, sargs: ServerArgs) -> FastAPI:
    server = Server(llm, sargs)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        server.loop.start()
        yield
        server.loop.stop()
        server.cpu.shutdown()

    app = FastAPI(title="dayzero", lifespan=lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.server = server

    @app.exception_handler(APIError)
    async def api_error(_, e: APIError):
        return JSONResponse(error_body(getattr(e, "api", None), e), status_code=e.status)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_, e: StarletteHTTPException):
        return JSONResponse(APIError(e.status_code, str(e.detail)).body(), status_code=e.status_code)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_, e: RequestValidationError):
        return JSONResponse(APIError(400, str(e)).body(), status_code=400)

    @app.get("/health")
    async def health():
        if not server.loop.alive:
            return JSONResponse({"status": "error", "error": server.loop.error}, status_code=503)
        return {"status": "ok"}

    @app.get("/metrics")
    async def metrics():
        return PlainTextResponse(server.metrics.render(server.loop.stats, server.loop.in_flight),
                                 media_type="text/plain; version=0.0.4")

    def model_card():
        return {"id": sargs.model_name, "object": "model", "created": server.created, "owned_by": "dayzero",
                "max_model_len": server.context}

    @app.get("/v1/models")
    async def models(request: Request):
        server.auth(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model(model_id: str, request: Request):
        server.auth(request)
        if model_id != sargs.model_name:
            raise APIError(404, f"model: the model {model_id!r} does not exist", param="model",
                           code="model_not_found")
        return model_card()

    @app.post("/v1/completions")
    async def completions(request: Request):
        return await server.handle(request, "completion")

    @app.post("/v1/chat/completions")
    async def chat_completions(request: Request):
        return await server.handle(request, "chat")

    @app.post("/v1/responses")
    async def responses(request: Request):
        return await server.handle(request, "responses")

    @app.post("/v1/messages")
    async def messages(request: Request):
        return await server.handle(request, "messages")

    return app
