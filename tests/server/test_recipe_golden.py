"""Golden tests: the prompt dayzero sends to the model is deepseek-recipe's rendering, its ids are the
library's encoding, and usage.prompt_tokens is that encoding's length, over a matrix of
conversations x thinking modes x efforts x V4 / V4.1 (chosen from config.json)."""
from __future__ import annotations

import copy
import itertools

import pytest

dr = pytest.importorskip("deepseek_recipe")

from dayzero.server.protocol import APIError  # noqa: E402
from dayzero.server.recipe import Protocol, model_version  # noqa: E402
from dayzero.tokenizer import Tokenizer  # noqa: E402

NAME = "golden"
TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Weather for a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "days": {"type": "integer"}},
                   "required": ["city"]}}}]
CALL = {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
CONVERSATIONS = {
    "user": [{"role": "user", "content": "Hello"}],
    "system": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello"}],
    "multi-turn": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"},
                   {"role": "assistant", "content": "Hello!"}, {"role": "user", "content": "How are you?"}],
    "tools": [{"role": "user", "content": "Weather in Oslo?"}],
    "tool-call-and-result": [{"role": "user", "content": "Weather in Oslo?"},
                             {"role": "assistant", "content": None, "tool_calls": [CALL]},
                             {"role": "tool", "tool_call_id": "call_1", "content": "sunny, 21 C"}],
}
MODES = [{}, {"thinking": {"type": "disabled"}}, {"thinking": {"type": "enabled"}},
         {"thinking": {"type": "enabled"}, "reasoning_effort": "high"},
         {"thinking": {"type": "enabled"}, "reasoning_effort": "max"}, {"reasoning_effort": "low"}]
CONFIGS = {"v4": {"model_type": "deepseek_v4", "architectures": ["DeepseekV4ForCausalLM"]},
           "v4.1": {"model_type": "deepseek_v41", "architectures": ["DeepseekV41ForCausalLM"]}}


def _proto(tok, version: str, context: int = 1 << 16) -> Protocol:
    return Protocol(NAME, tok, context, eos_id=1, vocab_size=tok.vocab_size, config=CONFIGS[version])


def test_version_from_config():
    assert model_version(CONFIGS["v4.1"]) == dr.ModelVersion.DeepseekV41Flash
    assert model_version(CONFIGS["v4"]) == dr.ModelVersion.DeepseekV4Pro
    assert model_version(None) == dr.ModelVersion.DeepseekV4Pro


@pytest.mark.parametrize("version", ["v4", "v4.1"])
def test_prompt_is_the_library_rendering_and_encoding(full_tok, version):
    proto = _proto(full_tok, version)
    assert proto.native, "the test tokenizer holds every special token: the library's encode must apply"
    enc_cls = dr.DeepseekV41Encoding if version == "v4.1" else dr.DeepseekV4Encoding
    lib_tok = dr.Tokenizer.from_str(full_tok.to_json())
    seen = set()
    for (cname, msgs), mode in itertools.product(CONVERSATIONS.items(), MODES):
        body = {"model": NAME, "messages": copy.deepcopy(msgs), **mode}
        if cname.startswith("tool"):
            body["tools"] = TOOLS
        p = proto.prepare("chat", copy.deepcopy(body))
        # independently: the library alone, with the version's official model name
        lib_body = dict(copy.deepcopy(body), model="DeepSeek-V4.1-Flash" if version == "v4.1" else "DeepSeek-V4-Pro")
        conv = dr.ChatCompletionRequest(lib_body).convert(dr.ConversionOptions()).conversation
        expected = enc_cls().render_conversation(conv).prompt
        assert p.prompt == expected, (cname, mode)
        assert p.prompt_ids == enc_cls().with_tokenizer(lib_tok).encode(conv), (cname, mode)
        seen.add(p.prompt)
    # the matrix is not degenerate: modes, efforts and tools change the prompt
    assert len(seen) >= 20


def test_builtin_style_tokenizer_encodes_the_rendered_text(tmp_path):
    """A tokenizer without the library's special tokens (the built-in model's, dayzero toy's):
    the rendered prompt is the library's, tokenized by the checkpoint's own tokenizer."""
    from dayzero.builtin import builtin_path

    tok = Tokenizer(builtin_path() / "tokenizer.json")
    proto = Protocol(NAME, tok, 4096, eos_id=1, vocab_size=tok.vocab_size, builtin=True)
    assert not proto.native
    p = proto.prepare("chat", {"messages": CONVERSATIONS["system"]})
    conv = dr.ChatCompletionRequest({"model": "DeepSeek-V4-Pro", "messages": CONVERSATIONS["system"],
                                     "thinking": {"type": "disabled"}}).convert(dr.ConversionOptions()).conversation
    assert p.prompt == dr.DeepseekV4Encoding().render_conversation(conv).prompt
    assert p.prompt_ids == tok.encode(p.prompt, add_special_tokens=False)
    # built-in defaults: no thinking, a short reply, the sampling of docs/BUILTIN.md
    assert not p.request.conversation.thinking_mode
    assert (p.params.max_tokens, p.params.temperature, p.params.top_p) == (256, 0.8, 0.95)


@pytest.mark.parametrize("api,body", [
    ("responses", {"input": [{"role": "user", "content": "Hello"}], "instructions": "Be brief."}),
    ("messages", {"system": "Be brief.", "messages": [{"role": "user", "content": "Hello"}], "max_tokens": 50}),
])
def test_other_apis_render_the_same_conversation(full_tok, api, body):
    proto = _proto(full_tok, "v4")
    chat = proto.prepare("chat", {"messages": CONVERSATIONS["system"]})
    other = proto.prepare(api, body)
    assert other.prompt == chat.prompt and other.prompt_ids == chat.prompt_ids


def test_library_rejections_are_400s(full_tok):
    """What the library rejects (past dayzero's own field checks) is a 400 with the field its message
    names as `param`."""
    proto = _proto(full_tok, "v4")
    user = CONVERSATIONS["user"]
    cases = [("responses", {"input": []}, None),
             ("messages", {"messages": user, "max_tokens": 5, "temperature": 7}, "temperature"),
             ("messages", {"messages": [{"role": "bogus", "content": "x"}], "max_tokens": 5}, None),
             ("chat", {"messages": user, "tool_choice": "required", "thinking": {"type": "enabled"},
                       "tools": TOOLS}, "tool_choice"),
             ("chat", {"messages": [{"role": "user", "content": "hi"}],
                       "response_format": {"type": "json_object"}}, "response_format")]
    for api, body, param in cases:
        with pytest.raises(APIError) as e:
            proto.prepare(api, body)
        assert e.value.status == 400 and e.value.message, (api, body)
        if param is not None:
            assert e.value.param == param, (api, body, e.value.message)
    with pytest.raises(APIError) as e:
        proto.prepare("chat", {"model": "other", "messages": CONVERSATIONS["user"]})
    assert e.value.status == 404
    # V4.1 passes images on (V4 renders them as "[Unsupported Image]"); dayzero refuses both first
    image = [{"role": "user", "content": [
        {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}]}]
    with pytest.raises(APIError) as e:
        _proto(full_tok, "v4.1").prepare("messages", {"messages": image, "max_tokens": 5})
    assert e.value.status == 400 and "vision is not built" in e.value.message  # test_image_inputs.py: all APIs


def test_prompt_past_the_context_names_the_apis_own_field(full_tok):
    proto = _proto(full_tok, "v4", context=64)
    long = "Hello " * 200
    for api, body, field in [("chat", {"messages": [{"role": "user", "content": long}]}, "messages"),
                             ("responses", {"input": long}, "input"),
                             ("messages", {"messages": [{"role": "user", "content": long}], "max_tokens": 5},
                              "messages")]:
        with pytest.raises(APIError) as e:
            proto.prepare(api, body)
        assert e.value.status == 400 and e.value.param == field and "context is 64 tokens" in e.value.message
