"""Incremental detokenisation (dayzero/server/text.py): the stream concatenates to the final text."""
from __future__ import annotations

import pytest

from dayzero.server.text import TextState


@pytest.fixture(scope="module")
def tok(tmp_path_factory):
    from dayzero.testing import tiny_tokenizer
    from dayzero.tokenizer import Tokenizer

    p = tmp_path_factory.mktemp("tok") / "tokenizer.json"
    tiny_tokenizer(p)
    return Tokenizer(p)


@pytest.mark.parametrize("text,stop", [
    ("The quick brown fox jumps over the lazy dog.", []),
    ("The quick brown fox jumps over the lazy dog.", ["lazy"]),
    ("The quick brown fox jumps over the lazy dog.", ["fox j", "over"]),
    ("Ünïcödé 🦊 splits over byte tokens ✓", ["🦊"]),
    ("Ünïcödé 🦊 splits over byte tokens ✓", []),
])
def test_stream_concatenation_equals_final(tok, text, stop):
    ids = tok.encode(text, add_special_tokens=False) + [1]  # ends with EOS
    for step in (1, 2, 3):
        ts = TextState(tok, stop, drop_ids={1}, keep_special=True)
        out = []
        for i in range(0, len(ids), step):
            chunk = ids[i:i + step]
            out.append(ts.add(chunk, finished=i + step >= len(ids)))
        final = TextState(tok, stop, drop_ids={1}, keep_special=True)
        final.ids = ids
        want = final.full(finished=True)
        assert "".join(out) == want
        assert "\ufffd" not in want
        cut = min([text.index(s) for s in stop if s in text], default=len(text))
        assert want == text[:cut]
