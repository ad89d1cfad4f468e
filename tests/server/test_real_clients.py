"""/v1/responses and /v1/messages through the real `openai` and `anthropic` clients.

Against the toy server process (random weights): shapes, usage (input tokens = the library's
rendering tokenized by the checkpoint's tokenizer), streamed == not streamed. Against a loopback
uvicorn server over a scripted engine (what a random model never writes): tool calls, streamed and
not, as each client parses them."""
from __future__ import annotations

import json
import threading
import time

import pytest

from tests.server.conftest import free_port
from tests.server.test_chat_scripted import CALL, ScriptedEngine

openai = pytest.importorskip("openai")
anthropic = pytest.importorskip("anthropic")
dr = pytest.importorskip("deepseek_recipe")

SEED = {"seed": 7}


@pytest.fixture(scope="module")
def aclient(server):
    return anthropic.Anthropic(base_url=server.url, api_key="unused", max_retries=0, timeout=120)


def _input_tokens(toy_dir, body: dict, api) -> int:
    from dayzero.tokenizer import Tokenizer

    conv = api(dict(body, model="DeepSeek-V4-Pro")).convert(dr.ConversionOptions()).conversation
    prompt = dr.DeepseekV4Encoding().render_conversation(conv).prompt
    return len(Tokenizer(toy_dir / "tokenizer.json").encode(prompt, add_special_tokens=False))


def test_responses_stream_equals_nonstream(client, toy_dir):
    kw = dict(model="toy", input="Say hello", instructions="Be brief.", max_output_tokens=12,
              reasoning={"effort": "high"}, extra_body=SEED)
    r = client.responses.create(**kw)
    assert r.object == "response" and r.status in ("completed", "incomplete")
    assert r.usage.input_tokens == _input_tokens(toy_dir, {"input": "Say hello", "instructions": "Be brief.",
                                                           "reasoning": {"effort": "high"}}, dr.ResponsesRequest)
    assert 0 < r.usage.output_tokens <= 12
    events = list(client.responses.create(stream=True, **kw))
    final = events[-1]
    assert final.type in ("response.completed", "response.incomplete")
    assert final.response.output_text == r.output_text
    assert "".join(e.delta for e in events if e.type == "response.output_text.delta") == r.output_text
    assert final.response.usage.output_tokens == r.usage.output_tokens


def test_messages_stream_equals_nonstream(aclient, toy_dir):
    kw = dict(model="toy", max_tokens=12, system="Be brief.", messages=[{"role": "user", "content": "Say hello"}],
              thinking={"type": "disabled"}, extra_body={"temperature": 0})
    m = aclient.messages.create(**kw)
    assert m.type == "message" and m.role == "assistant" and m.stop_reason in ("end_turn", "max_tokens")
    body = {k: v for k, v in kw.items() if k not in ("model", "extra_body")}
    assert m.usage.input_tokens == _input_tokens(toy_dir, body, dr.MessagesRequest)
    with aclient.messages.stream(**kw) as s:
        streamed = "".join(s.text_stream)
        final = s.get_final_message()
    text = "".join(b.text for b in m.content if b.type == "text")
    assert streamed == text and final.usage.output_tokens == m.usage.output_tokens


def test_messages_errors_are_anthropic_errors(aclient):
    with pytest.raises(anthropic.NotFoundError):
        aclient.messages.create(model="nope", max_tokens=5, messages=[{"role": "user", "content": "x"}])
    with pytest.raises(anthropic.BadRequestError) as e:
        aclient.messages.create(model="toy", max_tokens=5, messages=[{"role": "user", "content": "x"}],
                                extra_body={"temperature": 9})
    assert "temperature" in str(e.value)


@pytest.fixture(scope="module")
def scripted_url(full_tok):
    """The app over a scripted engine that writes a text and a tool call, on a loopback uvicorn."""
    import uvicorn
    from types import SimpleNamespace

    from dayzero.server.app import ServerArgs, build_app

    script = full_tok.encode("Let me check." + CALL, add_special_tokens=False)
    llm = SimpleNamespace(engine=ScriptedEngine(script, eos=1), tokenizer=full_tok,
                          args=SimpleNamespace(max_seq_len=4096, eos_token_id=1, vocab_size=full_tok.vocab_size))
    port = free_port()
    srv = uvicorn.Server(uvicorn.Config(build_app(llm, ServerArgs(model_name="scripted")), host="127.0.0.1",
                                        port=port, log_level="error"))
    t = threading.Thread(target=srv.run, daemon=True)
    t.start()
    deadline = time.monotonic() + 30
    while not srv.started and time.monotonic() < deadline:
        time.sleep(0.05)
    yield f"http://127.0.0.1:{port}"
    srv.should_exit = True
    t.join(10)


ARGS = {"city": "Oslo", "days": 2}


def test_openai_clients_parse_tool_calls(scripted_url):
    c = openai.OpenAI(base_url=scripted_url + "/v1", api_key="unused", max_retries=0)
    tools = [{"type": "function", "function": {"name": "get_weather", "parameters": {"type": "object"}}}]
    msgs = [{"role": "user", "content": "Weather in Oslo?"}]
    r = c.chat.completions.create(model="scripted", messages=msgs, tools=tools, max_tokens=300,
                                  extra_body={"thinking": {"type": "disabled"}})
    (call,) = r.choices[0].message.tool_calls
    assert call.function.name == "get_weather" and json.loads(call.function.arguments) == ARGS
    args = "".join(tc.function.arguments or "" for ch in c.chat.completions.create(
        model="scripted", messages=msgs, tools=tools, max_tokens=300, stream=True,
        extra_body={"thinking": {"type": "disabled"}}) for tc in (ch.choices[0].delta.tool_calls or []))
    assert json.loads(args) == ARGS
    rtools = [{"type": "function", "name": "get_weather", "parameters": {"type": "object"}}]
    r = c.responses.create(model="scripted", input="Weather in Oslo?", tools=rtools, max_output_tokens=300)
    (fc,) = [o for o in r.output if o.type == "function_call"]
    assert fc.name == "get_weather" and json.loads(fc.arguments) == ARGS
    events = list(c.responses.create(model="scripted", input="Weather in Oslo?", tools=rtools,
                                     max_output_tokens=300, stream=True))
    done = [e for e in events if e.type == "response.function_call_arguments.done"]
    assert len(done) == 1 and json.loads(done[0].arguments) == ARGS


def test_anthropic_client_parses_tool_use(scripted_url):
    c = anthropic.Anthropic(base_url=scripted_url, api_key="unused", max_retries=0)
    kw = dict(model="scripted", max_tokens=300, messages=[{"role": "user", "content": "Weather in Oslo?"}],
              tools=[{"name": "get_weather", "input_schema": {"type": "object"}}])
    m = c.messages.create(**kw)
    (use,) = [b for b in m.content if b.type == "tool_use"]
    assert use.name == "get_weather" and use.input == ARGS and m.stop_reason == "tool_use"
    with c.messages.stream(**kw) as s:
        final = s.get_final_message()
    (use,) = [b for b in final.content if b.type == "tool_use"]
    assert use.input == ARGS and final.stop_reason == "tool_use"
