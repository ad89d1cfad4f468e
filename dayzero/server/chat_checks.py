"""Field-by-field checks of a Chat Completions body before deepseek-recipe converts it.

The library converts and validates requests, but its errors name no field path (`missing field
`content``, `Invalid temperature value ...`). These checks run first so that a malformed body is a
400 whose `param` is the exact field (`messages[1].tool_calls[0].function.arguments`); what they let
through, the library judges (its error's `param` is then the request field its message names, if any).
They also refuse what dayzero's engine cannot do: non-text content parts (images, audio, files); image
parts of every API (`image_part`) with an error naming vision as not supported.
"""
from __future__ import annotations

import json
import re

from dayzero.server.protocol import MAX_LOGPROBS, _bool, _num, bad

ROLES = ("system", "user", "assistant", "tool", "latest_reminder")  # the library's roles
REASONING_EFFORTS = ("none", "minimal", "low", "medium", "high", "xhigh", "ultra", "max")  # the library's


def _content(content, param: str) -> None:
    if content is None:
        return
    if isinstance(content, str):
        try:
            content.encode("utf-8")
        except UnicodeEncodeError as e:  # a lone surrogate from a JSON \ud800 escape
            raise bad(param, f"is not valid Unicode ({e.reason} at character {e.start})") from None
        return
    if isinstance(content, list):
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise bad(f"{param}[{i}]", "only text content parts ({'type': 'text', 'text': ...}) are supported "
                                           "by this server")
        return
    raise bad(param, f"must be a string, null or a list of text parts, got {type(content).__name__}")


IMAGE_TYPES = ("image_url", "image", "input_image")  # Chat Completions, Anthropic Messages, Responses


def image_part(body: dict, api: str) -> tuple[str, str] | None:
    """(field path, part type) of the first image content part of a chat body (in `messages`, or
    `input` for Responses, at any depth: tool results too), None if there is none."""
    field = "input" if api == "responses" else "messages"

    def walk(x, path):
        if isinstance(x, dict):
            if x.get("type") in IMAGE_TYPES:
                return path, x["type"]
            items = x.items()
        elif isinstance(x, list):
            items = ((f"[{i}]", v) for i, v in enumerate(x))
        else:
            return None
        for k, v in items:
            found = walk(v, path + (k if k.startswith("[") else f".{k}"))
            if found:
                return found
        return None

    return walk(body.get(field), field)


def _tool_calls(calls, param: str) -> None:
    if not isinstance(calls, list):
        raise bad(param, "must be a list")
    for i, c in enumerate(calls):
        q = f"{param}[{i}]"
        if not isinstance(c, dict):
            raise bad(q, "must be an object {'type': 'function', 'function': {...}}")
        if c.get("type", "function") != "function":
            raise bad(f"{q}.type", f"must be 'function', got {c.get('type')!r}")
        if c.get("id") is not None and not isinstance(c["id"], str):
            raise bad(f"{q}.id", "must be a string")
        fn = c.get("function")
        if not isinstance(fn, dict):
            raise bad(f"{q}.function", "is required: {'name': ..., 'arguments': ...}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"{q}.function.name", "must be a non-empty string")
        args = fn.get("arguments")
        if args is None:
            raise bad(f"{q}.function.arguments", "is required (a JSON object string, '{}' for none)")
        if not isinstance(args, str) or not args.strip():
            raise bad(f"{q}.function.arguments", "must be a JSON object string ('{}' for no arguments)")
        try:
            value = json.loads(args)
        except (json.JSONDecodeError, RecursionError) as e:
            raise bad(f"{q}.function.arguments", f"is not valid JSON ({e})") from None
        if not isinstance(value, dict):
            raise bad(f"{q}.function.arguments", f"must encode a JSON object, got {type(value).__name__}")


def _messages(msgs) -> None:
    if msgs is None:
        raise bad("messages", "is required")
    if not isinstance(msgs, list) or not msgs:
        raise bad("messages", "must be a non-empty list")
    for i, m in enumerate(msgs):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise bad(p, "must be an object")
        if "role" not in m:
            raise bad(f"{p}.role", "is required")
        role = m["role"]
        if role not in ROLES:
            raise bad(f"{p}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise bad(f"{p}.name", "must be a string")
        # OpenAI's rule: content is required except on an assistant message with tool_calls
        if m.get("content") is None and not (role == "assistant" and m.get("tool_calls")):
            raise bad(f"{p}.content", f"is required for a {role} message"
                      + (" without tool_calls" if role == "assistant" else "")
                      + ("" if "content" not in m else " (got null)"))
        _content(m.get("content"), f"{p}.content")
        if role == "assistant" and m.get("tool_calls") is not None:
            _tool_calls(m["tool_calls"], f"{p}.tool_calls")
        if role == "tool" and m.get("tool_call_id") is not None and not isinstance(m["tool_call_id"], str):
            raise bad(f"{p}.tool_call_id", "must be a string")


def _tools(tools) -> None:
    if tools is None:
        return
    if not isinstance(tools, list):
        raise bad("tools", "must be a list")
    for i, t in enumerate(tools):
        if (not isinstance(t, dict) or t.get("type", "function") != "function"
                or not isinstance(t.get("function"), dict)):
            raise bad(f"tools[{i}]", "must be {'type': 'function', 'function': {'name': ..., 'parameters': ...}}")
        fn = t["function"]
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise bad(f"tools[{i}].function.name", "must be a non-empty string")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise bad(f"tools[{i}].function.description", "must be a string")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise bad(f"tools[{i}].function.parameters", "must be a JSON Schema object")


def check_chat(body: dict, context: int) -> None:
    _messages(body.get("messages"))
    _tools(body.get("tools"))
    _num(body, "temperature", None, lo=0, hi=2)
    _num(body, "top_p", None, lo=0, hi=1, lo_open=True)
    _num(body, "seed", None, lo=0, integer=True)
    for name in ("max_tokens", "max_completion_tokens"):
        n = _num(body, name, None, lo=1, integer=True)
        if n is not None and n >= context:
            raise bad(name, f"{n} tokens exceed this server's {context}-token context")
    want_lp = _bool(body, "logprobs", False)
    if _num(body, "top_logprobs", None, lo=0, hi=MAX_LOGPROBS, integer=True) is not None and not want_lp:
        raise bad("top_logprobs", "needs logprobs=true")
    _bool(body, "stream", False)
    effort = body.get("reasoning_effort")
    if effort is not None and effort not in REASONING_EFFORTS:
        raise bad("reasoning_effort", f"must be one of {', '.join(REASONING_EFFORTS)}, got {effort!r}")


def param_named(message: str, body: dict) -> str | None:
    """The request field a library error message names (`Invalid temperature value` -> temperature)."""
    if "response_format" in body and re.search(r"json schema|regex", message, re.I):
        return "response_format"
    for key in sorted(body, key=len, reverse=True):
        if re.search(rf"(?<![\w.]){re.escape(key)}(?![\w])", message):
            return key
    return None
