"""/v1/completions bodies -> validated generation requests; every rejection names its field. (The
conversation APIs go through deepseek-recipe: recipe.py, chat_checks.py.)

Validation is written out by hand (not a schema library) so that each error message and `param`
is exactly the OpenAI field at fault, and nothing malformed reaches the engine.
"""
from __future__ import annotations

from dataclasses import dataclass

from dayzero.engine.sampling import SamplingParams

MAX_LOGPROBS = 20
MAX_STOP = 16


class APIError(Exception):
    def __init__(self, status: int, message: str, param: str | None = None, type_: str | None = None,
                 code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.param, self.code = status, message, param, code
        self.type = type_ or {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error",
                              413: "invalid_request_error", 429: "rate_limit_error",
                              503: "service_unavailable"}.get(status, "invalid_request_error")

    def body(self) -> dict:
        return {"error": {"message": self.message, "type": self.type, "param": self.param, "code": self.code}}


def bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param)


@dataclass
class GenRequest:
    kind: str  # "completion" (the conversation APIs are recipe.py's Prepared)
    prompt_ids: list[int]
    params: SamplingParams
    stream: bool = False
    include_usage: bool = False
    logprobs: int | None = None  # top-N alternatives


_MISSING = object()


def _num(body: dict, name: str, default, lo=None, hi=None, lo_open=False, integer=False):
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    if isinstance(v, bool) or not isinstance(v, (int, float)) or (integer and not isinstance(v, int)):
        raise bad(name, f"must be {'an integer' if integer else 'a number'}, got {type(v).__name__}")
    if v != v or v in (float("inf"), float("-inf")):
        raise bad(name, f"must be finite, got {v}")
    if lo is not None and (v <= lo if lo_open else v < lo):
        raise bad(name, f"must be {'>' if lo_open else '>='} {lo}, got {v}")
    if hi is not None and v > hi:
        raise bad(name, f"must be <= {hi}, got {v}")
    return v


def _bool(body: dict, name: str, default: bool) -> bool:
    v = body.get(name, _MISSING)
    if v is _MISSING or v is None:
        return default
    if not isinstance(v, bool):
        raise bad(name, f"must be a boolean, got {type(v).__name__}")
    return v


def _stop(body: dict) -> list[str] | None:
    v = body.get("stop")
    if v is None:
        return None
    if isinstance(v, str):
        v = [v]
    if not isinstance(v, list) or not all(isinstance(s, str) for s in v):
        raise bad("stop", "must be a string or a list of strings")
    if len(v) > MAX_STOP:
        raise bad("stop", f"at most {MAX_STOP} stop sequences, got {len(v)}")
    v = [s for s in v if s]
    return v or None


def _unsupported(body: dict, defaults: dict) -> None:
    for name, ok in defaults.items():
        v = body.get(name)
        if v is not None and v not in ok:
            raise bad(name, f"only {ok[0]!r} is supported by this server, got {v!r}")


class Validator:
    def __init__(self, model_name: str, tokenizer, vocab_size: int, context: int, eos_ids: set[int]):
        self.model_name, self.tokenizer, self.vocab_size, self.context = model_name, tokenizer, vocab_size, context
        self.eos_ids = eos_ids

    def _encode(self, text: str, param: str, add_special: bool) -> list[int]:
        # Refuse what cannot fit before tokenizing it: every token covers at most max_token_bytes
        # bytes of text, so ceil(bytes / max_token_bytes) tokens is a lower bound (exact reasoning,
        # no false refusals; tokenizer.py). On this server that caps the text a request may make it
        # tokenize at context x max_token_bytes bytes.
        bound = getattr(self.tokenizer, "min_tokens", None)
        if bound is not None:
            try:
                at_least, nbytes = bound(text)
            except Exception:  # noqa: BLE001 - a normalizer that fails: the tokenizer will say why below
                at_least = 0
            if at_least >= self.context:
                raise bad(param, f"the prompt is at least {at_least} tokens ({nbytes} bytes of text, at most "
                                 f"{self.tokenizer.max_token_bytes} bytes a token); this server's context is "
                                 f"{self.context} tokens")
        try:
            return self.tokenizer.encode(text, add_special_tokens=add_special)
        except Exception as e:  # noqa: BLE001 - e.g. a lone surrogate from a JSON \ud800 escape
            raise bad(param, f"cannot be tokenized ({type(e).__name__}: {e})") from None

    def _common(self, body) -> None:
        if not isinstance(body, dict):
            raise APIError(400, "the request body must be a JSON object", param=None)
        model = body.get("model")
        if model is not None and not isinstance(model, str):
            raise bad("model", f"must be a string, got {type(model).__name__}")
        if model not in (None, self.model_name):
            raise APIError(404, f"model: the model {model!r} does not exist; this server serves "
                                f"{self.model_name!r}", param="model", code="model_not_found")
        _unsupported(body, {"n": (1,), "best_of": (1,), "echo": (False,), "suffix": ("",),
                            "presence_penalty": (0, 0.0), "frequency_penalty": (0, 0.0), "logit_bias": ({},)})

    def _params(self, body: dict, n_prompt: int, default_max: int | None, max_name: str,
                logprobs: int | None) -> SamplingParams:
        room = self.context - n_prompt
        if room < 1:
            raise bad("prompt", f"the prompt is {n_prompt} tokens; this server's context is {self.context} tokens")
        max_tokens = _num(body, max_name, None, lo=1, integer=True)
        if max_tokens is None:
            max_tokens = room if default_max is None else min(default_max, room)
        elif max_tokens > room:
            raise bad(max_name, f"{max_tokens} tokens after a {n_prompt}-token prompt exceed this server's "
                                f"{self.context}-token context (at most {room})")
        stop_ids = body.get("stop_token_ids")
        if stop_ids is not None and (not isinstance(stop_ids, list) or not all(
                isinstance(t, int) and not isinstance(t, bool) and 0 <= t < self.vocab_size for t in stop_ids)):
            raise bad("stop_token_ids", f"must be a list of token ids in [0, {self.vocab_size})")
        top_k = _num(body, "top_k", -1, lo=-1, integer=True)
        return SamplingParams(
            temperature=_num(body, "temperature", 1.0, lo=0, hi=2),
            top_p=_num(body, "top_p", 1.0, lo=0, hi=1, lo_open=True),
            top_k=top_k, min_p=_num(body, "min_p", 0.0, lo=0, hi=1),
            max_tokens=max_tokens, seed=_num(body, "seed", None, lo=0, integer=True),
            stop=_stop(body), stop_token_ids=stop_ids, ignore_eos=_bool(body, "ignore_eos", False),
            logprobs=logprobs)

    def _stream(self, body: dict) -> tuple[bool, bool]:
        stream = _bool(body, "stream", False)
        opts = body.get("stream_options")
        if opts is None:
            return stream, False
        if not isinstance(opts, dict):
            raise bad("stream_options", "must be an object")
        if not stream:
            raise bad("stream_options", "is only allowed with stream=true")
        return stream, _bool({"stream_options.include_usage": opts.get("include_usage")},
                             "stream_options.include_usage", False)

    def completion(self, body) -> GenRequest:
        self._common(body)
        if "prompt" not in body:
            raise bad("prompt", "is required")
        p = body["prompt"]
        if isinstance(p, list) and len(p) == 1 and isinstance(p[0], (str, list)):
            p = p[0]  # a batch of one
        if isinstance(p, str):
            if self.tokenizer is None:
                raise bad("prompt", "this model has no tokenizer; send token ids")
            if not p:
                raise bad("prompt", "must not be empty")
            ids = self._encode(p, "prompt", True)
        elif isinstance(p, list) and p and all(isinstance(t, int) and not isinstance(t, bool) for t in p):
            if not all(0 <= t < self.vocab_size for t in p):
                raise bad("prompt", f"token ids must be in [0, {self.vocab_size})")
            ids = list(p)
        elif isinstance(p, list) and len(p) > 1:
            raise bad("prompt", "only one prompt per request (n=1, no batches) is supported")
        else:
            raise bad("prompt", "must be a non-empty string or a non-empty list of token ids")
        lp = _num(body, "logprobs", None, lo=0, hi=MAX_LOGPROBS, integer=True)
        stream, usage = self._stream(body)
        params = self._params(body, len(ids), 16, "max_tokens", lp)
        return GenRequest("completion", ids, params, stream, usage, lp)
