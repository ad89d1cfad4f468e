"""The engine loop hands Output.push its tokens in deltas whose size depends on timing (one token
when the loop keeps up, several under load or with speculation). The reply - text, reasoning,
finish and usage - must not depend on that grouping, streamed or not, and its usage must count the
tokens generated. Both paths: text (a tokenizer without DeepSeek's special tokens: dayzero decodes,
the library parses spellings) and tokens (the library decodes). On the token path the counts are
only checked for not depending on the grouping: there the library drops the count of the tokens of
an unfinished UTF-8 character at the end and counts reasoning tokens by re-encoding the reasoning
text (not fixed: the counts are the library's)."""
from __future__ import annotations

import json
import random

import pytest

pytest.importorskip("deepseek_recipe")

from dayzero.server.recipe import Protocol  # noqa: E402

EOS = 1
USER = [{"role": "user", "content": "Say hello"}]
BODIES = {  # thinking on: the output starts in reasoning
    "responses": {"input": "Say hello", "reasoning": {"effort": "high"}, "max_output_tokens": 64},
    "chat": {"messages": USER, "reasoning_effort": "high", "max_tokens": 64},
    "messages": {"messages": USER, "max_tokens": 64, "thinking": {"type": "enabled", "budget_tokens": 32}},
}


@pytest.fixture(scope="module", params=["text", "native"])
def proto(request, tmp_path_factory):
    from dayzero.testing import tiny_tokenizer
    from dayzero.tokenizer import Tokenizer

    p = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    if request.param == "text":
        tiny_tokenizer(p)
    else:
        from conftest import recipe_tokenizer
        recipe_tokenizer(p)
    tok = Tokenizer(p)
    proto = Protocol("toy", tok, 4096, eos_id=EOS, vocab_size=tok.vocab_size)
    assert proto.native == (request.param == "native")
    return proto


def _outputs(proto, rng):
    """Token id lists: a reasoning / answer split by the thinking-end tag, a reply with a multi-byte
    character split over byte tokens, and random ids (what the random toy model generates)."""
    enc = lambda s: proto.tok.encode(s, add_special_tokens=False)  # noqa: E731
    outs = [enc("Some reasoning here</think>Hello there, friend"), enc("pensée é 🦊</think>voilà ✓ fin"),
            enc("no end tag, reasoning only")]
    for _ in range(6):
        outs.append([rng.randrange(2, proto.tok.vocab_size) for _ in range(12)])
    return outs


def _groupings(ids, rng):
    yield [ids]
    yield [[t] for t in ids]
    for _ in range(2):
        cuts = sorted(rng.sample(range(1, len(ids)), min(4, len(ids) - 1)))
        b = [0, *cuts, len(ids)]
        yield [ids[b[i]:b[i + 1]] for i in range(len(b) - 1)]


def _reply(api: str, stream: bool, pushed) -> dict:
    """What a client sees: text, reasoning, finish and usage (ids and timestamps left out)."""
    if not stream:
        return _from_body(api, pushed)
    events = [json.loads(d) for _, d in pushed]
    if api == "responses":
        return _from_body(api, events[-1]["response"])
    if api == "chat":
        d = [e["choices"][0] for e in events if e["choices"]]
        usage = [e["usage"] for e in events if e.get("usage")]
        assert len(usage) == 1
        return {"text": "".join(c["delta"].get("content") or "" for c in d),
                "reasoning": "".join(c["delta"].get("reasoning_content") or "" for c in d),
                "finish": [c["finish_reason"] for c in d if c["finish_reason"]], "usage": usage[0]}
    deltas = [e["delta"] for e in events if e["type"] == "content_block_delta"]
    end = [e for e in events if e["type"] == "message_delta"]
    assert len(end) == 1
    return {"text": "".join(d.get("text", "") for d in deltas),
            "reasoning": "".join(d.get("thinking", "") for d in deltas),
            "finish": end[0]["delta"]["stop_reason"], "usage": {"output_tokens": end[0]["usage"]["output_tokens"]}}


def _from_body(api: str, b: dict) -> dict:
    if api == "responses":
        items = b["output"]
        return {"text": "".join(c["text"] for i in items if i["type"] == "message" for c in i["content"]),
                "reasoning": "".join(c["text"] for i in items if i["type"] == "reasoning"
                                     for c in i.get("content") or ()),
                "finish": [b["status"], b.get("incomplete_details")],
                "usage": {k: v for k, v in b["usage"].items()}}
    if api == "chat":
        c = b["choices"][0]
        return {"text": c["message"].get("content") or "", "reasoning": c["message"].get("reasoning_content") or "",
                "finish": [c["finish_reason"]], "usage": b["usage"]}
    blocks = b["content"]
    return {"text": "".join(x["text"] for x in blocks if x["type"] == "text"),
            "reasoning": "".join(x["thinking"] for x in blocks if x["type"] == "thinking"),
            "finish": b["stop_reason"], "usage": {"output_tokens": b["usage"]["output_tokens"]}}


def _counts(api: str, usage: dict) -> tuple[int, int | None]:
    if api == "responses":
        return usage["output_tokens"], usage["output_tokens_details"]["reasoning_tokens"]
    if api == "chat":
        return usage["completion_tokens"], usage["completion_tokens_details"]["reasoning_tokens"]
    return usage["output_tokens"], None


@pytest.mark.parametrize("api", sorted(BODIES))
def test_reply_and_usage_do_not_depend_on_delta_grouping(proto, api):
    rng = random.Random(0)
    for ids in _outputs(proto, rng):
        for finish in ("length", "stop"):
            gen = ids + [EOS] if finish == "stop" else ids  # the EOS that ends a reply is not output
            seen = {}
            for stream in (False, True):
                body = dict(BODIES[api], model="toy", stream=stream)
                if stream and api == "chat":
                    body["stream_options"] = {"include_usage": True}
                p = proto.prepare(api, body)
                for groups in _groupings(gen, rng):
                    out = proto.output(p)
                    pushed = []
                    for i, g in enumerate(groups):
                        pushed += out.push(g, None, finish if i == len(groups) - 1 else None)
                    assert out.done
                    reply = _reply(api, stream, pushed if stream else out.body())
                    seen.setdefault(stream, reply)
                    assert reply == seen[stream], (api, stream, gen, groups)
                    n, reasoning = _counts(api, reply["usage"])
                    if proto.native:
                        continue
                    assert n == len(ids), (api, stream, gen)
                    if reasoning is not None:
                        assert 0 <= reasoning <= n, (api, stream, gen, reply)
            s, ns = seen[True], seen[False]
            assert (s["text"], s["reasoning"]) == (ns["text"], ns["reasoning"])
            assert _counts(api, s["usage"]) == _counts(api, ns["usage"]), (api, gen)


def test_text_path_reasoning_tokens_count_the_ids_before_the_tag(proto):
    """The text path counts the ids whose text comes before `</think>`, as the library counts the
    ids before the `</think>` token on the token path."""
    if proto.native:
        pytest.skip("the token path's reasoning count is the library's")
    enc = lambda s: proto.tok.encode(s, add_special_tokens=False)  # noqa: E731
    p = proto.prepare("responses", dict(BODIES["responses"], model="toy"))
    for reasoning, answer in (("Some reasoning here", "Hello there"), ("pensée é 🦊", "voilà")):
        out = proto.output(p)
        out.push(enc(reasoning + "</think>" + answer), None, "length")
        assert out.body()["usage"]["output_tokens_details"]["reasoning_tokens"] == len(enc(reasoning))
