"""Image inputs: every chat API's image parts get a 400 naming vision as not supported, for V4 and V4.1
checkpoints alike (deepseek-recipe renders a V4 image as text, so the check runs before it); and a real
`dayzero serve` of a tiny V4.1 answers text and refuses an image over HTTP."""
from __future__ import annotations

import httpx
import pytest

pytest.importorskip("deepseek_recipe")

from dayzero.server.protocol import APIError  # noqa: E402
from dayzero.server.recipe import Protocol  # noqa: E402
from tests.server.conftest import ServerProcess  # noqa: E402
from tests.server.test_recipe_golden import CONFIGS  # noqa: E402

PNG = "data:image/png;base64,AA=="
ANTHROPIC_IMAGE = {"type": "image", "source": {"type": "base64", "media_type": "image/png", "data": "AA=="}}
# (api, body, the image part's field path, its type)
CASES = [
    ("chat", {"messages": [{"role": "user", "content": [{"type": "text", "text": "what?"},
                                                        {"type": "image_url", "image_url": {"url": PNG}}]}]},
     "messages[0].content[1]", "image_url"),
    ("messages", {"max_tokens": 5, "messages": [{"role": "user", "content": [ANTHROPIC_IMAGE]}]},
     "messages[0].content[0]", "image"),
    ("messages", {"max_tokens": 5, "messages": [
        {"role": "user", "content": "weather?"},
        {"role": "assistant", "content": [{"type": "tool_use", "id": "t1", "name": "cam", "input": {}}]},
        {"role": "user", "content": [{"type": "tool_result", "tool_use_id": "t1", "content": [ANTHROPIC_IMAGE]}]}]},
     "messages[2].content[0].content[0]", "image"),
    ("responses", {"input": [{"role": "user", "content": [{"type": "input_text", "text": "what?"},
                                                          {"type": "input_image", "image_url": PNG}]}]},
     "input[0].content[1]", "input_image"),
]


@pytest.mark.parametrize("version", ["v4", "v4.1"])
@pytest.mark.parametrize("api, body, path, kind", CASES)
def test_image_parts_are_a_400_naming_vision(full_tok, version, api, body, path, kind):
    proto = Protocol("img", full_tok, 1 << 16, eos_id=1, vocab_size=full_tok.vocab_size, config=CONFIGS[version])
    with pytest.raises(APIError) as e:
        proto.prepare(api, body)
    assert e.value.status == 400 and e.value.param == path
    assert e.value.message == (f"{path}: image input ({kind!r} part) is not supported: vision is not built; "
                               "dayzero runs DeepSeek-V4 and V4.1 on text only")
    text_only = {"chat": {"messages": [{"role": "user", "content": "what?"}]},
                 "messages": {"max_tokens": 5, "messages": [{"role": "user", "content": "what?"}]},
                 "responses": {"input": "what?"}}[api]
    assert proto.prepare(api, text_only).prompt_ids  # the same API without the image goes through


@pytest.fixture(scope="module")
def v41_server(tmp_path_factory):
    from dayzero.v41.toy import write_toy
    s = ServerProcess(write_toy(tmp_path_factory.mktemp("v41serve") / "m"), name="v41")
    yield s
    s.stop()


def test_serve_runs_v41_and_refuses_images(v41_server):
    url = v41_server.url + "/v1/chat/completions"
    ok = httpx.post(url, json={"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4,
                               "temperature": 0}, timeout=60)
    assert ok.status_code == 200, ok.text
    assert ok.json()["usage"]["completion_tokens"] == 4
    bad = httpx.post(url, json={"messages": [{"role": "user", "content": [
        {"type": "image_url", "image_url": {"url": PNG}}]}], "max_tokens": 4}, timeout=60)
    assert bad.status_code == 400
    err = bad.json()["error"]
    assert err["param"] == "messages[0].content[0]" and "vision is not built" in err["message"]
