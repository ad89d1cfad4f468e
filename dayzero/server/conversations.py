"""Generation for the three conversation APIs (/v1/chat/completions, /v1/responses, /v1/messages):
a Prepared request (recipe.py) through the engine loop, its output shaped by deepseek-recipe.

Streamed: each engine delta's token ids (and logprobs) go into the library's stream processor,
whose chunks / events go out as SSE as they come (tool-call arguments as fragments, reasoning and
content deltas). Not streamed: the same chunks accumulated into the library's response object.
Either way the library decodes, parses and counts; this module only moves deltas and bytes.
"""
from __future__ import annotations

import asyncio
import json

from fastapi.responses import JSONResponse

from dayzero.server.cpu_pool import INLINE_OUTPUT_IDS, LARGE_OUTPUT_IDS
from dayzero.server.engine_loop import finished_or_left
from dayzero.server.protocol import APIError
from dayzero.server.recipe import Prepared, error_body


async def complete(server, p: Prepared, request, tracker):
    out = server.proto.output(p)
    reason = None

    async def collect():
        nonlocal reason
        async for d in server.loop.generate(out.id, p.prompt_ids, p.params):
            if d.error or d.finish_reason == "abort":
                raise APIError(503, f"generation failed: {d.error or 'the engine aborted the request'}")
            tracker.tokens(len(d.token_ids))
            large = out.n_out + len(d.token_ids) > INLINE_OUTPUT_IDS
            if large:
                await server.cpu.run(out.push, d.token_ids, d.logprobs, d.finish_reason,
                                     large=out.n_out > LARGE_OUTPUT_IDS)
            else:
                out.push(d.token_ids, d.logprobs, d.finish_reason)
            reason = d.finish_reason
            if out.done and reason is None:  # ended by the library (a stop sequence): abort the rest
                reason = "stop"
                break

    task = asyncio.ensure_future(collect())
    try:
        if not await finished_or_left(task, request):
            tracker.done(server.metrics, "abort")
            return JSONResponse({}, status_code=499)
        task.result()
    except APIError as e:
        e.api = p.api
        raise
    finally:
        task.cancel()
        out.close()
    tracker.done(server.metrics, reason)
    return JSONResponse(out.body())


async def stream(server, p: Prepared, tracker):
    """SSE in the API's own shape. Leaving early (client gone) aborts via generate()'s finally."""
    out = server.proto.output(p)
    reason = "abort"
    try:
        async for d in server.loop.generate(out.id, p.prompt_ids, p.params):
            if d.error or d.finish_reason == "abort":
                e = APIError(503, f"generation failed: {d.error or 'the engine aborted the request'}")
                ev = "event: error\n" if p.api != "chat" else ""
                yield ev + "data: " + json.dumps(error_body(p.api, e)) + "\n\n"
                return
            tracker.tokens(len(d.token_ids))
            if out.n_out + len(d.token_ids) <= INLINE_OUTPUT_IDS:
                chunks = out.push(d.token_ids, d.logprobs, d.finish_reason)
                text = out.sse(chunks)
            else:
                text = await server.cpu.run(lambda: out.sse(out.push(d.token_ids, d.logprobs, d.finish_reason)),
                                            large=out.n_out > LARGE_OUTPUT_IDS)
            if text:
                yield text
            if d.finish_reason is not None:
                reason = d.finish_reason
            elif out.done:  # ended by the library (a stop sequence): leaving aborts the rest
                reason = "stop"
                break
        yield out.sse_done()
    finally:
        out.close()
        tracker.done(server.metrics, reason)
