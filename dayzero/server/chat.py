"""DeepSeek-V4 chat encoding: OpenAI messages -> prompt text, model output -> content / reasoning / tools.

The token spellings are the V4 tokenizer's (｜ is U+FF5C, ▁ is U+2581). Where the published notes
leave the layout open (tool definitions, tool results, the max-effort prefix), the choices here are
dayzero's own and are written down in docs/SERVER.md; encode and parse are inverse on them.

Prompt layout:

    BOS {system text}[{tools section}]
    <｜User｜>{user text}
    <｜Assistant｜></think>{content}[DSML tool calls]EOS        (a past assistant turn)
    <｜User｜><｜DSML｜tool_result name="f">{result}</｜DSML｜tool_result>...   (tool results)
    <｜Assistant｜><think>        (generation prompt, thinking mode)
    <｜Assistant｜></think>       (generation prompt, chat mode)

A tokenizer that lacks a special token encodes its spelling as plain text.
"""
from __future__ import annotations

import json
import re
import secrets
from dataclasses import dataclass, field

BOS = "<｜begin▁of▁sentence｜>"
EOS = "<｜end▁of▁sentence｜>"
USER = "<｜User｜>"
ASSISTANT = "<｜Assistant｜>"
THINK = "<think>"
END_THINK = "</think>"
DSML = "｜DSML｜"
TOOL_CALLS = f"<{DSML}tool_calls>"
TOOL_CALLS_END = f"</{DSML}tool_calls>"
INVOKE_END = f"</{DSML}invoke>"
PARAM_END = f"</{DSML}parameter>"
TOOL_RESULT_END = f"</{DSML}tool_result>"
SPECIAL_TOKENS = (BOS, EOS, USER, ASSISTANT, THINK, END_THINK)

# dayzero's wording (the published encoder's exact sentence is not in our notes)
MAX_EFFORT_PREFIX = ("Reasoning Effort: Absolute maximum. Think as long and as carefully as the problem "
                     "needs before answering.\n\n")
REASONING_EFFORTS = ("low", "medium", "high", "max")
ROLES = ("system", "developer", "user", "assistant", "tool")


class ChatFormatError(ValueError):
    """A message list that cannot be encoded; `param` names the offending field."""

    def __init__(self, param: str, message: str):
        super().__init__(f"{param}: {message}")
        self.param = param


def _text(content, param: str) -> str:
    """OpenAI content: a string, null, or a list of {"type": "text", "text": ...} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        out = []
        for i, part in enumerate(content):
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                raise ChatFormatError(f"{param}[{i}]", "only text content parts ({'type': 'text', 'text': ...}) "
                                                       "are supported")
            out.append(part["text"])
        return "".join(out)
    raise ChatFormatError(param, f"must be a string, null or a list of text parts, got {type(content).__name__}")


def _tools_section(tools: list[dict]) -> str:
    lines = [
        "## Tools",
        "You can call the functions listed below. To call functions, end your answer with:",
        f"{TOOL_CALLS}",
        f'<{DSML}invoke name="FUNCTION">',
        f'<{DSML}parameter name="ARGUMENT" string="true">a string value, written as is{PARAM_END}',
        f'<{DSML}parameter name="ARGUMENT" string="false">any other value, as JSON{PARAM_END}',
        INVOKE_END,
        TOOL_CALLS_END,
        "Several invoke blocks may follow each other. Function results come back in the next user turn.",
        "",
        "### Functions",
    ]
    lines += [json.dumps(t["function"], ensure_ascii=False, sort_keys=True) for t in tools]
    return "\n".join(lines)


def validate_tools(tools) -> list[dict]:
    if tools is None:
        return []
    if not isinstance(tools, list):
        raise ChatFormatError("tools", "must be a list")
    for i, t in enumerate(tools):
        if not isinstance(t, dict) or t.get("type", "function") != "function" or not isinstance(t.get("function"), dict):
            raise ChatFormatError(f"tools[{i}]", "must be {'type': 'function', 'function': {...}}")
        fn = t["function"]
        name = fn.get("name")
        if not isinstance(name, str) or not name:
            raise ChatFormatError(f"tools[{i}].function.name", "must be a non-empty string")
        if fn.get("description") is not None and not isinstance(fn["description"], str):
            raise ChatFormatError(f"tools[{i}].function.description", "must be a string")
        if fn.get("parameters") is not None and not isinstance(fn["parameters"], dict):
            raise ChatFormatError(f"tools[{i}].function.parameters", "must be a JSON Schema object")
    return tools


def encode_tool_calls(calls: list[dict], param: str = "tool_calls") -> str:
    """OpenAI tool_calls -> DSML. String arguments are written raw, everything else as JSON.
    Each call must be {"id"?: str, "type"?: "function", "function": {"name": non-empty str,
    "arguments": a string holding a JSON object (or the object itself)}}."""
    out = [TOOL_CALLS]
    for i, c in enumerate(calls):
        q = f"{param}[{i}]"
        if not isinstance(c, dict):
            raise ChatFormatError(q, "must be an object {'type': 'function', 'function': {...}}")
        if c.get("type", "function") != "function":
            raise ChatFormatError(f"{q}.type", f"must be 'function', got {c.get('type')!r}")
        if c.get("id") is not None and not isinstance(c["id"], str):
            raise ChatFormatError(f"{q}.id", "must be a string")
        fn = c.get("function")
        if not isinstance(fn, dict):
            raise ChatFormatError(f"{q}.function", "is required: {'name': ..., 'arguments': ...}")
        if not isinstance(fn.get("name"), str) or not fn["name"]:
            raise ChatFormatError(f"{q}.function.name", "must be a non-empty string")
        if "arguments" not in fn or fn["arguments"] is None:
            raise ChatFormatError(f"{q}.function.arguments", "is required (a JSON object string, '{}' for none)")
        args = fn["arguments"]
        if isinstance(args, str):
            if not args.strip():
                raise ChatFormatError(f"{q}.function.arguments", "must be a JSON object string, got an empty "
                                                                 "string ('{}' for no arguments)")
            try:
                args = json.loads(args)
            except (json.JSONDecodeError, RecursionError) as e:
                raise ChatFormatError(f"{q}.function.arguments", f"is not valid JSON ({e})") from None
        if not isinstance(args, dict):
            raise ChatFormatError(f"{q}.function.arguments", f"must encode a JSON object, got "
                                                             f"{type(args).__name__}")
        out.append(f'<{DSML}invoke name="{fn["name"]}">')
        for k, v in args.items():
            if isinstance(v, str):
                out.append(f'<{DSML}parameter name="{k}" string="true">{v}{PARAM_END}')
            else:
                out.append(f'<{DSML}parameter name="{k}" string="false">{json.dumps(v, ensure_ascii=False)}{PARAM_END}')
        out.append(INVOKE_END)
    out.append(TOOL_CALLS_END)
    return "\n".join(out)


def encode_messages(messages, tools=None, thinking: bool = False, reasoning_effort: str | None = None) -> str:
    """OpenAI chat messages -> the V4 prompt text, ending with the assistant generation prompt."""
    if not isinstance(messages, list) or not messages:
        raise ChatFormatError("messages", "must be a non-empty list")
    if reasoning_effort is not None and reasoning_effort not in REASONING_EFFORTS:
        raise ChatFormatError("reasoning_effort", f"must be one of {', '.join(REASONING_EFFORTS)}, "
                                                  f"got {reasoning_effort!r}")
    tools = validate_tools(tools)
    system, turns = [], []
    call_names: dict[str, str] = {}
    pending_tool = False  # inside a run of tool-result messages
    seen_turn = False
    for i, m in enumerate(messages):
        p = f"messages[{i}]"
        if not isinstance(m, dict):
            raise ChatFormatError(p, "must be an object")
        if "role" not in m:
            raise ChatFormatError(f"{p}.role", "is required")
        role = m.get("role")
        if role not in ROLES:
            raise ChatFormatError(f"{p}.role", f"must be one of {', '.join(ROLES)}, got {role!r}")
        if m.get("name") is not None and not isinstance(m["name"], str):
            raise ChatFormatError(f"{p}.name", "must be a string")
        # OpenAI's rules: content is required except on an assistant message that has tool_calls
        if m.get("content") is None and not (role == "assistant" and m.get("tool_calls")):
            raise ChatFormatError(f"{p}.content", f"is required for a {role} message" + (
                " without tool_calls" if role == "assistant" else "") + (
                "" if "content" not in m else " (got null)"))
        text = _text(m.get("content"), f"{p}.content")
        if role != "tool":
            pending_tool = False  # the next tool result opens a new user turn
        if role in ("system", "developer"):
            if seen_turn:  # a late system message becomes part of the conversation
                turns.append(f"{USER}{text}")
            else:
                system.append(text)
        elif role == "user":
            seen_turn = True
            turns.append(f"{USER}{text}")
        elif role == "assistant":
            seen_turn = True
            calls = m.get("tool_calls") or []
            if not isinstance(calls, list):
                raise ChatFormatError(f"{p}.tool_calls", "must be a list")
            body = text + (encode_tool_calls(calls, f"{p}.tool_calls") if calls else "")
            for c in calls:
                if isinstance(c.get("id"), str):
                    call_names[c["id"]] = c["function"]["name"]
            turns.append(f"{ASSISTANT}{END_THINK}{body}{EOS}")
        else:  # tool
            seen_turn = True
            call_id = m.get("tool_call_id")
            if call_id is not None and not isinstance(call_id, str):
                raise ChatFormatError(f"{p}.tool_call_id", "must be a string")
            name = m.get("name") or call_names.get(call_id, "")
            if not isinstance(name, str):
                raise ChatFormatError(f"{p}.name", "must be a string")
            block = f'<{DSML}tool_result name="{name}">{text}{TOOL_RESULT_END}'
            turns.append(block if pending_tool else f"{USER}{block}")
            pending_tool = True
    if not seen_turn:
        raise ChatFormatError("messages", "needs at least one user, assistant or tool message")
    sys_text = "\n\n".join(system)
    if tools:
        sys_text = (sys_text + "\n\n" if sys_text else "") + _tools_section(tools)
    prompt = BOS + sys_text + "".join(turns)
    if reasoning_effort == "max":
        # prefix to the first message of the conversation (after BOS)
        prompt = BOS + MAX_EFFORT_PREFIX + prompt[len(BOS):]
    return prompt + ASSISTANT + (THINK if thinking else END_THINK)


# ---- parsing model output -----------------------------------------------------------------------

@dataclass
class ParsedOutput:
    content: str = ""
    reasoning_content: str | None = None
    tool_calls: list[dict] = field(default_factory=list)


_INVOKE = re.compile(rf'<{DSML}invoke name="([^"]*)">(.*?){re.escape(INVOKE_END)}', re.S)
_PARAM = re.compile(rf'<{DSML}parameter name="([^"]*)" string="(true|false)">(.*?){re.escape(PARAM_END)}', re.S)


def parse_tool_calls(block: str) -> list[dict] | None:
    """The DSML after TOOL_CALLS -> OpenAI tool_calls, or None when it does not parse."""
    body = block.split(TOOL_CALLS_END, 1)[0]
    calls = []
    for m in _INVOKE.finditer(body):
        args = {}
        for pm in _PARAM.finditer(m.group(2)):
            name, is_str, value = pm.groups()
            if is_str == "true":
                args[name] = value
            else:
                try:
                    args[name] = json.loads(value)
                except json.JSONDecodeError:
                    args[name] = value
        calls.append({"id": f"call_{secrets.token_hex(12)}", "type": "function",
                      "function": {"name": m.group(1), "arguments": json.dumps(args, ensure_ascii=False)}})
    return calls or None


def _held(text: str, tag: str) -> int:
    """Length of the longest suffix of `text` that is a proper prefix of `tag` (may still become it)."""
    for n in range(min(len(tag) - 1, len(text)), 0, -1):
        if tag.startswith(text[-n:]):
            return n
    return 0


def split_output(text: str, thinking: bool, tools: bool, final: bool) -> tuple[str, str, str | None]:
    """Model output so far -> (reasoning, content, tool-call DSML or None).

    With final=False, text that may still turn into a tag is held back, so the result on any prefix
    of an output is a prefix of the result on the whole (what streaming relies on)."""
    reasoning = ""
    if thinking:
        if text.startswith(THINK):
            text = text[len(THINK):]
        elif not final and THINK.startswith(text):
            return "", "", None
        if END_THINK in text:
            reasoning, text = text.split(END_THINK, 1)
        else:
            cut = len(text) if final else len(text) - _held(text, END_THINK)
            return text[:cut], "", None
    elif text.startswith(END_THINK):
        text = text[len(END_THINK):]
    elif not final and END_THINK.startswith(text):
        return reasoning, "", None
    if tools and TOOL_CALLS in text:
        content, rest = text.split(TOOL_CALLS, 1)
        return reasoning, content, rest
    cut = len(text) if final or not tools else len(text) - _held(text, TOOL_CALLS)
    return reasoning, text[:cut], None


def parse_output(text: str, thinking: bool, tools: bool) -> ParsedOutput:
    reasoning, content, dsml = split_output(text, thinking, tools, final=True)
    out = ParsedOutput(content=content, reasoning_content=reasoning if thinking else None)
    if dsml is not None:
        calls = parse_tool_calls(dsml)
        if calls is None:
            out.content = content + TOOL_CALLS + dsml  # not a tool call after all: keep the text
        else:
            out.tool_calls = calls
    return out
