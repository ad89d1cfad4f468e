"""DeepSeek-V4 chat encoding and output parsing (dayzero/server/chat.py), no server needed."""
from __future__ import annotations

import json

import pytest

from dayzero.server import chat
from dayzero.server.chat import (ASSISTANT, BOS, END_THINK, EOS, THINK, TOOL_CALLS, USER, ChatFormatError,
                                 encode_messages, encode_tool_calls, parse_output, parse_tool_calls, split_output)

TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Weather for a city",
                                           "parameters": {"type": "object",
                                                          "properties": {"city": {"type": "string"}}}}}]


def test_token_spellings():
    assert BOS == "<\uff5cbegin\u2581of\u2581sentence\uff5c>" and EOS == "<\uff5cend\u2581of\u2581sentence\uff5c>"
    assert USER == "<\uff5cUser\uff5c>" and ASSISTANT == "<\uff5cAssistant\uff5c>"
    assert TOOL_CALLS == "<\uff5cDSML\uff5ctool_calls>"


def test_chat_and_thinking_generation_prompts():
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    assert encode_messages(msgs) == f"{BOS}Be brief.{USER}Hi{ASSISTANT}{END_THINK}"
    assert encode_messages(msgs, thinking=True) == f"{BOS}Be brief.{USER}Hi{ASSISTANT}{THINK}"


def test_history_drops_reasoning_and_closes_turns():
    msgs = [{"role": "user", "content": "a"},
            {"role": "assistant", "content": "b", "reasoning_content": "hidden"},
            {"role": "user", "content": [{"type": "text", "text": "c"}, {"type": "text", "text": "d"}]}]
    p = encode_messages(msgs, thinking=True)
    assert p == f"{BOS}{USER}a{ASSISTANT}{END_THINK}b{EOS}{USER}cd{ASSISTANT}{THINK}"
    assert "hidden" not in p


def test_reasoning_effort_max_prefixes_first_message():
    msgs = [{"role": "user", "content": "Prove it"}]
    p = encode_messages(msgs, thinking=True, reasoning_effort="max")
    assert p.startswith(BOS + chat.MAX_EFFORT_PREFIX + USER + "Prove it")
    assert encode_messages(msgs, thinking=True, reasoning_effort="high") == encode_messages(msgs, thinking=True)
    with pytest.raises(ChatFormatError) as e:
        encode_messages(msgs, reasoning_effort="ultra")
    assert e.value.param == "reasoning_effort"


def test_tools_in_system_and_tool_results():
    msgs = [{"role": "system", "content": "S"}, {"role": "user", "content": "weather?"},
            {"role": "assistant", "content": None, "tool_calls": [
                {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}},
                {"id": "c2", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Rome"}'}}]},
            {"role": "tool", "tool_call_id": "c1", "content": "rain"},
            {"role": "tool", "tool_call_id": "c2", "content": "sun"}]
    p = encode_messages(msgs, tools=TOOLS)
    system = p[len(BOS):p.index(USER)]
    assert system.startswith("S\n\n## Tools") and json.dumps(TOOLS[0]["function"], sort_keys=True) in system
    assert p.count(TOOL_CALLS) == 2  # the format description and the past call
    # the two tool results share one user turn, named by their call ids
    tail = p[p.rindex(EOS) + len(EOS):]
    assert tail == (f'{USER}<｜DSML｜tool_result name="get_weather">rain</｜DSML｜tool_result>'
                    f'<｜DSML｜tool_result name="get_weather">sun</｜DSML｜tool_result>{ASSISTANT}{END_THINK}')


@pytest.mark.parametrize("msgs,param", [
    ([], "messages"),
    ([{"role": "system", "content": "only"}], "messages"),
    (["hi"], "messages[0]"),
    ([{"role": "robot", "content": "x"}], "messages[0].role"),
    ([{"role": "user", "content": {"a": 1}}], "messages[0].content"),
    ([{"role": "user", "content": "x"}, {"role": "assistant", "tool_calls": [
        {"function": {"name": "f", "arguments": "not json"}}]}], "messages[1].tool_calls[0].function.arguments"),
])
def test_bad_messages_name_the_field(msgs, param):
    with pytest.raises(ChatFormatError) as e:
        encode_messages(msgs)
    assert e.value.param == param


def test_tool_call_round_trip():
    calls = [{"type": "function", "function": {"name": "f", "arguments": json.dumps(
        {"s": "two\nlines <b>", "n": 3, "x": [1, {"y": None}], "t": True})}},
             {"type": "function", "function": {"name": "g", "arguments": "{}"}}]
    dsml = encode_tool_calls(calls)
    parsed = parse_tool_calls(dsml[len(TOOL_CALLS):])
    assert [c["function"]["name"] for c in parsed] == ["f", "g"]
    assert [json.loads(c["function"]["arguments"]) for c in parsed] == [
        json.loads(c["function"]["arguments"]) for c in calls]
    assert all(c["id"].startswith("call_") and c["type"] == "function" for c in parsed)


def test_parse_output_modes():
    out = parse_output("let me think</think>The answer.", thinking=True, tools=False)
    assert (out.reasoning_content, out.content, out.tool_calls) == ("let me think", "The answer.", [])
    out = parse_output("still thinking", thinking=True, tools=False)  # cut off by max_tokens
    assert (out.reasoning_content, out.content) == ("still thinking", "")
    out = parse_output("plain answer", thinking=False, tools=False)
    assert (out.reasoning_content, out.content) == (None, "plain answer")
    call = encode_tool_calls([{"function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}])
    out = parse_output("hmm</think>Checking." + call, thinking=True, tools=True)
    assert out.content == "Checking." and out.reasoning_content == "hmm"
    assert out.tool_calls[0]["function"] == {"name": "get_weather", "arguments": '{"city": "Oslo"}'}
    # without tools in the request the DSML stays text; a broken block stays text too
    assert parse_output("a" + call, thinking=False, tools=False).content == "a" + call
    assert parse_output("a" + TOOL_CALLS + "garbage", thinking=False, tools=True).content == "a" + TOOL_CALLS + "garbage"


@pytest.mark.parametrize("thinking,tools", [(True, True), (True, False), (False, True), (False, False)])
def test_streaming_split_is_prefix_monotone(thinking, tools):
    """What streaming emits for any prefix is a prefix of the final parse: the concatenated deltas
    equal the non-streamed message."""
    call = encode_tool_calls([{"function": {"name": "f", "arguments": '{"q": "x"}'}}])
    text = ("<think>" if thinking else "") + "reason <b>ing</th" + ("</think>" if thinking else "") + "answer <｜DS" + \
        " more" + call
    final = parse_output(text, thinking, tools)
    prev_r, prev_c = "", ""
    for i in range(len(text) + 1):
        r, c, _ = split_output(text[:i], thinking, tools, final=False)
        assert r.startswith(prev_r) and c.startswith(prev_c), i
        assert (final.reasoning_content or "").startswith(r) and final.content.startswith(c), i
        prev_r, prev_c = r, c


def test_toy_tokenizer_encodes_missing_specials_as_text(tmp_path):
    from dayzero.testing import tiny_tokenizer
    from dayzero.tokenizer import Tokenizer

    tiny_tokenizer(tmp_path / "tokenizer.json")
    tok = Tokenizer(tmp_path / "tokenizer.json")
    assert tok.token_to_id(USER) is None and tok.token_to_id(BOS) == 0
    p = encode_messages([{"role": "user", "content": "Hi"}], thinking=True)
    ids = tok.encode(p, add_special_tokens=False)
    assert ids[0] == 0 and ids.count(0) == 1
    assert tok.decode(ids, skip_special_tokens=False) == p
