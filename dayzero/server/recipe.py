"""The chat protocols through DeepSeek's own library, `deepseek-recipe`: Chat Completions, Responses
and Anthropic Messages bodies -> a conversation -> the prompt and its token ids; model output ->
each API's chunks, events and response objects (reasoning, content, DSML tool calls, streamed
argument fragments, usage).

dayzero adds what the library leaves to the caller: the served model name, the context limit, the
engine's sampling parameters (plus vLLM's `top_k`, `min_p`, `ignore_eos`, `stop_token_ids`, and `seed`
where the API has none),
constrained decoding of the output constraint (constrain.py) and refusing what the engine cannot do
(images). Prompt encoding: with a checkpoint tokenizer that holds every special token the encoding
spells (a real V4 / V4.1 tokenizer), the library's `encode` gives the ids; any other tokenizer (the
built-in model's, the toy tokenizer of `dayzero toy`) encodes the library's rendered prompt text
with the checkpoint's own tokenizer, where a special token it lacks is plain text.
"""
from __future__ import annotations

import json
import threading
import time
import uuid
from dataclasses import dataclass
from pathlib import Path

import deepseek_recipe as dr

from dayzero.engine.sampling import SamplingParams
from dayzero.server.chat_checks import check_chat, image_part, param_named
from dayzero.server.protocol import APIError, bad
from dayzero.server.text import TextState

APIS = ("chat", "responses", "messages")
_REQUEST = {"chat": dr.ChatCompletionRequest, "responses": dr.ResponsesRequest, "messages": dr.MessagesRequest}
_RESPONSE = {"chat": dr.ChatCompletionResponse, "responses": dr.ResponsesResponse, "messages": dr.MessagesResponse}
_ID_PREFIX = {"chat": "chatcmpl-", "responses": "resp_", "messages": "msg_"}
# the sampling defaults of the built-in model (docs/BUILTIN.md, "Samples") and its chat reply length
BUILTIN_CHAT_DEFAULTS = {"temperature": 0.8, "top_p": 0.95, "max_tokens": 256}
MAX_LOGPROBS = 20


def model_version(config: dict | None) -> dr.ModelVersion:
    """V4.1 checkpoints say so in config.json (`model_type: deepseek_v41`,
    `DeepseekV41ForCausalLM`); everything else is rendered as V4."""
    config = config or {}
    if config.get("model_type") == "deepseek_v41" or "DeepseekV41ForCausalLM" in (config.get("architectures") or ()):
        return dr.ModelVersion.DeepseekV41Flash
    return dr.ModelVersion.DeepseekV4Pro


def encoding_for(version: dr.ModelVersion):
    return dr.DeepseekV41Encoding() if version == dr.ModelVersion.DeepseekV41Flash else dr.DeepseekV4Encoding()


@dataclass
class Prepared:
    """A converted request, ready for the engine."""
    api: str
    request: dr.ConversationRequest
    prompt: str
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool
    echo: dr.ResponsesEcho | None = None
    namespace_map: dict | None = None
    logprobs: int | None = None


def _error(api: str, status: int, message: str, param: str | None = None) -> APIError:
    e = APIError(status, message, param=param)
    e.api = api
    return e


def _extra_num(body: dict, name: str, default, lo, hi=None, integer=False):
    v = body.get(name)
    if v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise bad(name, f"must be {'an integer' if integer else 'a number'}, got {type(v).__name__}")
    if v != v or v < lo or (hi is not None and v > hi):
        raise bad(name, f"must be in [{lo}, {hi if hi is not None else 'inf'}], got {v}")
    return v


class Protocol:
    def __init__(self, model_name: str, tokenizer, context: int, eos_id: int, vocab_size: int,
                 config: dict | None = None, builtin: bool = False):
        self.model_name, self.tok, self.context, self.eos_id = model_name, tokenizer, context, eos_id
        self.vocab_size, self.builtin = vocab_size, builtin
        self.version = model_version(config)
        # the built-in model is a plain-text model: no reasoning unless asked for
        self.options = (dr.ConversionOptions(default_thinking_mode=not builtin)
                        .with_model_versions_by_name({model_name: self.version}))
        self.rtok = dr.Tokenizer.from_str(tokenizer.to_json()) if tokenizer is not None else None
        self.encoding = encoding_for(self.version)
        self.native = False  # the library's prompt encoding works with this tokenizer
        if self.rtok is not None:
            enc = self.encoding.with_tokenizer(self.rtok)
            probe = dr.Conversation([dr.UserMessage("x")], thinking_mode=True,
                                    tools=[dr.ToolDefinition("f", None, {"type": "object"})])
            try:
                enc.encode(probe)
                self.encoding, self.native = enc, True
            except RuntimeError:  # a special token the tokenizer lacks (built-in, toy tokenizers)
                pass
        self._constrainer = None
        self._lock = threading.Lock()  # requests are prepared on CpuPool threads

    # ---- requests ---------------------------------------------------------------------------------
    def render(self, conversation: dr.Conversation) -> str:
        return self.encoding.render_conversation(conversation).prompt

    def encode(self, conversation: dr.Conversation, prompt: str) -> list[int]:
        if self.native:
            return self.encoding.encode(conversation)
        return self.tok.encode(prompt, add_special_tokens=False)

    def prepare(self, api: str, body, min_tokens=None) -> Prepared:
        """A request body (parsed JSON) -> Prepared; APIError (400/404) naming what is wrong."""
        if not isinstance(body, dict):
            raise _error(api, 400, "the request body must be a JSON object")
        if self.tok is None:
            raise _error(api, 400, "this model has no tokenizer; chat APIs need one", "model")
        model = body.get("model")
        if model is None:
            body = dict(body, model=self.model_name)  # optional here, as on /v1/completions
        elif not isinstance(model, str):
            raise _error(api, 400, f"model: must be a string, got {type(model).__name__}", "model")
        elif model != self.model_name:
            e = _error(api, 404, f"model: the model {model!r} does not exist; this server serves "
                                 f"{self.model_name!r}", "model")
            e.code = "model_not_found"
            raise e
        image = image_part(body, api)
        if image is not None:  # before the library, which renders a V4 image as text
            raise _error(api, 400, f"{image[0]}: image input ({image[1]!r} part) is not supported: vision is not "
                                   f"built; dayzero runs DeepSeek-V4 and V4.1 on text only", image[0])
        if api == "chat":
            try:
                check_chat(body, self.context)
            except APIError as e:
                e.api = api
                raise
            for name, ok in {"presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},)}.items():
                if body.get(name) not in (None, *ok):
                    raise _error(api, 400, f"{name}: only {ok[0]!r} is supported by this server, "
                                           f"got {body[name]!r}", name)
        echo = namespace_map = None
        try:
            req = _REQUEST[api](body)
            if api == "responses":
                echo = req.echo()
                namespace_map = req.namespace_tool_map(self.options)
            conv_req = req.convert(self.options)
        except dr.ConversionError as e:
            raise _error(api, e.status_code, str(e), param_named(str(e), body)) from None
        except Exception as e:  # noqa: BLE001 - ValueError: the body does not deserialize (the library
            # names the field); anything else the library cannot take is a bad request, never a 500
            raise _error(api, 400, str(e), param_named(str(e), body)) from None
        conv = conv_req.conversation
        for i, m in enumerate(conv.messages):
            if m.image_sources:
                raise _error(api, 400, f"messages[{i}]: images are not supported by this server (text only)",
                             f"messages[{i}]")
        prompt = self.render(conv)
        field = "input" if api == "responses" else "messages"  # where the prompt came from
        if min_tokens is not None:
            at_least, nbytes = min_tokens(prompt)
            if at_least >= self.context:
                raise _error(api, 400, f"{field}: the prompt is at least {at_least} tokens ({nbytes} bytes of "
                                       f"text); this server's context is {self.context} tokens", field)
        try:
            ids = self.encode(conv, prompt)
        except Exception as e:  # noqa: BLE001 - e.g. a lone surrogate from a JSON \ud800 escape
            raise _error(api, 400, f"{field}: cannot be tokenized ({type(e).__name__}: {e})", field) from None
        io = conv_req.inference_options
        requested = io.max_tokens
        if requested is None and self.builtin:
            requested = BUILTIN_CHAT_DEFAULTS["max_tokens"]
        if len(ids) >= self.context:
            raise _error(api, 400, f"{field}: the prompt is {len(ids)} tokens; this server's context is "
                                   f"{self.context} tokens", field)
        if io.max_tokens is None:
            max_tokens = conv_req.resolve_max_tokens(len(ids), self.context)
            if requested is not None:
                max_tokens = min(max_tokens, requested)
        elif len(ids) + io.max_tokens > self.context:
            name = {"chat": "max_tokens", "responses": "max_output_tokens", "messages": "max_tokens"}[api]
            if api == "chat" and body.get("max_completion_tokens") is not None:
                name = "max_completion_tokens"
            raise _error(api, 400, f"{name}: {io.max_tokens} tokens after a {len(ids)}-token prompt exceed this "
                                   f"server's {self.context}-token context (at most {self.context - len(ids)})", name)
        else:
            max_tokens = io.max_tokens
        temperature, top_p = io.temperature, io.top_p
        if self.builtin:  # the library's defaults are the big models'; the built-in model has its own
            if body.get("temperature") is None and not conv.thinking_mode:
                temperature = BUILTIN_CHAT_DEFAULTS["temperature"]
            if body.get("top_p") is None:
                top_p = BUILTIN_CHAT_DEFAULTS["top_p"]
        stop_ids = body.get("stop_token_ids")
        if stop_ids is not None and (not isinstance(stop_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in stop_ids)):
            raise bad("stop_token_ids", f"must be a list of token ids in [0, {self.vocab_size})")
        ignore_eos = body.get("ignore_eos", False)
        if not isinstance(ignore_eos, bool):
            raise bad("ignore_eos", f"must be a boolean, got {type(ignore_eos).__name__}")
        logprobs = None
        if io.logprobs and not self.native:
            raise _error(api, 400, "logprobs: not available on this model: its tokenizer lacks DeepSeek's special "
                                   "tokens, so its output is parsed as text", "logprobs")
        if io.logprobs:
            logprobs = min(io.top_logprobs or 0, MAX_LOGPROBS)
        processor = None
        constraint = io.output_constraint
        if constraint is not None and constraint.kind in ("json", "regex"):
            processor = self.constrainer().processor(constraint, conv.thinking_mode, api)
        seed = io.seed  # the Responses and Messages APIs have no seed: taken as an extra, as `top_k` is
        if seed is None:
            seed = _extra_num(body, "seed", None, 0, integer=True)
        params = SamplingParams(
            temperature=float(temperature if temperature is not None else 1.0),
            top_p=float(top_p if top_p is not None else 1.0),
            top_k=_extra_num(body, "top_k", -1, -1, integer=True),
            min_p=_extra_num(body, "min_p", 0.0, 0, 1),
            max_tokens=max_tokens, seed=seed, stop=list(conv_req.parsing_options.stop_sequences) or None,
            stop_token_ids=stop_ids, ignore_eos=ignore_eos, logprobs=logprobs, logits_processor=processor)
        return Prepared(api, conv_req, prompt, ids, params, conv_req.stream, echo, namespace_map, logprobs)

    def constrainer(self):
        """The llguidance tokenizer, built on the first constrained request (it scans the vocabulary)."""
        with self._lock:
            if self._constrainer is None:
                from dayzero.server.constrain import Constrainer
                self._constrainer = Constrainer(self.tok, self.eos_id, self.vocab_size)
            return self._constrainer

    # ---- outputs ----------------------------------------------------------------------------------
    def output(self, p: Prepared) -> Output:
        return Output(self, p)


class Output:
    """Engine deltas -> the API's chunks (streamed) or its response object (accumulated)."""

    def __init__(self, proto: Protocol, p: Prepared):
        self.p, self.api = p, p.api
        self.id = _ID_PREFIX[p.api] + uuid.uuid4().hex
        name = proto.model_name
        req_cls = _REQUEST[p.api]
        gen = req_cls.chunk_generator(p.request, self.id, name)
        if p.api == "responses":
            if p.namespace_map:
                gen = gen.with_namespace_tool_map(p.namespace_map)
            gen = gen.with_echo(p.echo)
        self.proc = dr.StreamProcessor(gen, p.request.parsing_options, proto.rtok)
        self.cls = _RESPONSE[p.api]
        self.response = self.cls(self.id, name, int(time.time()), len(p.prompt_ids), 0)
        self.drop = set(p.params.stop_token_ids or ()) | (set() if p.params.ignore_eos else {proto.eos_id})
        # The library parses tags by token id, so token chunks need a tokenizer whose special tokens are
        # the library's (proto.native). Any other tokenizer: dayzero decodes (keeping special-token
        # spellings) and hands the library text, which it parses by spelling; no logprobs then.
        self.text = None if proto.native else TextState(proto.tok, [], set(), keep_special=True)
        # Text chunks carry no ids, so the library counts reasoning tokens by re-encoding the reasoning
        # text, which need not be the tokens generated (a random model's ids decode to U+FFFD, which
        # re-encodes as 3 byte tokens). dayzero counts them from the ids instead (reasoning_tokens).
        po = p.request.parsing_options
        stage = po.thinking_initial_stage
        self.think_end = (po.special_tokens.token(dr.SpecialToken.ThinkingEnd)
                          if self.text is not None and stage is not None and stage.starts_in_reasoning() else None)
        self.n_out = 0
        self._started = False
        self.done = False  # the response is complete

    def _start(self) -> list:
        if self._started:
            return []
        self._started = True
        return self.proc.push(dr.InferenceChunk.ready(
            prompt_usage=dr.PromptUsage(prompt_tokens=len(self.p.prompt_ids))))

    def push(self, ids: list[int], logprobs, finish_reason: str | None) -> list:
        """One engine delta -> (SSE event name, JSON) pairs when streaming; else accumulated into
        the response object."""
        out = self._start()
        self.n_out += len(ids)
        if self.done:  # the library ended the reply (a stop sequence): later tokens are not part of it
            return []
        if finish_reason is not None and ids and ids[-1] in self.drop and finish_reason == "stop":
            ids, logprobs = ids[:-1], (logprobs[:-1] if logprobs else logprobs)
        if self.text is not None:
            new = self.text.add(ids, finish_reason is not None)
            if new or ids:
                out += self.proc.push(dr.InferenceChunk.text(new, len(ids)))
                self.text.given = len(self.text.ids)
        elif ids:
            lp = None
            if self.p.logprobs is not None and logprobs:
                n = self.p.logprobs
                lp = [(d[t], sorted(d.items(), key=lambda kv: -kv[1])[:n]) for t, d in zip(ids, logprobs)]
            # One token a chunk: the library holds back a chunk whose text ends in an unfinished UTF-8
            # character whole, and drops what it holds at the end (text and count); so a delta of
            # several tokens would lose them all, and the reply would depend on the delta grouping.
            for i, t in enumerate(ids):
                out += self.proc.push(dr.InferenceChunk.tokens([t], lp[i:i + 1] if lp else None))
                if self.proc.finished:
                    break
        if finish_reason is not None and not self.proc.finished:
            fr = dr.InferenceFinishReason.Length if finish_reason == "length" else dr.InferenceFinishReason.Stop
            out += self.proc.push(dr.InferenceChunk.finish(fr))
        if finish_reason is not None or self.proc.finished:
            out += self.proc.finish()
            self.done = True
        if self.p.stream:  # (event name, data) pairs; serializing consumes nothing, accumulating does
            return [(self.cls.sse_event_name(c), self._usage_fixed(c.to_json()) if self.done else c.to_json())
                    for c in out]
        for c in out:
            self.response.accumulate(c)
        return []

    def close(self) -> None:
        if not self.proc.finished:
            self.proc.close()

    def sse(self, chunks) -> str:
        return "".join((f"event: {ev}\n" if ev else "") + f"data: {data}\n\n" for ev, data in chunks)

    def sse_done(self) -> str:
        d = self.cls.sse_done_data()
        return f"data: {d}\n\n" if d is not None else ""

    def body(self) -> dict:
        return json.loads(self._usage_fixed(self.response.to_json()))

    def reasoning_tokens(self) -> int:
        """Text path, thinking mode: how many of the ids given to the library decode to text wholly
        before the first thinking-end tag (all of them when there is none), as the library counts
        the ids before the `</think>` token on the token path. O(log n) decodes, at the end only."""
        ids, decode = self.text.ids[:self.text.given], self.text.tok.decode
        at = decode(ids, skip_special_tokens=False).find(self.think_end)
        if at < 0:
            return len(ids)
        lo, hi = 0, len(ids)  # the largest k whose prefix ids[:k] decodes to at most `at` characters
        while lo < hi:
            k = (lo + hi + 1) // 2
            if len(decode(ids[:k], skip_special_tokens=False).rstrip("\ufffd")) <= at:
                lo = k
            else:
                hi = k - 1
        return lo

    def _usage_fixed(self, data: str) -> str:
        """`data` (a JSON object) with each `reasoning_tokens` replaced by dayzero's count."""
        if self.think_end is None or '"reasoning_tokens"' not in data:
            return data
        n = self.reasoning_tokens()

        def fix(o):
            if isinstance(o, dict):
                return {k: (n if k == "reasoning_tokens" else fix(v)) for k, v in o.items()}
            return [fix(v) for v in o] if isinstance(o, list) else o
        return json.dumps(fix(json.loads(data)), ensure_ascii=False, separators=(",", ":"))


def error_body(api: str, e: APIError) -> dict:
    """An error in the API's own shape: Anthropic's for /v1/messages, OpenAI's otherwise."""
    if api == "messages":
        kind = {401: "authentication_error", 404: "not_found_error", 413: "request_too_large",
                429: "rate_limit_error", 503: "overloaded_error"}.get(e.status, "invalid_request_error")
        return {"type": "error", "error": {"type": kind, "message": e.message}}
    return e.body()


def tokenizer_config(model_dir) -> dict | None:
    if model_dir is None:
        return None
    p = Path(model_dir) / "config.json"
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError):
        return None
