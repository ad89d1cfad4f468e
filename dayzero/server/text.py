"""Incremental detokenisation for streaming: emit only text that can no longer change.

The text of a request is always decoded from all its output ids (byte-level BPE can split one
character over several tokens), cut at the first stop string, and while the request runs, a tail
that is an unfinished UTF-8 character or the start of a stop string is held back. So the
concatenated stream equals the non-streamed text.
"""
from __future__ import annotations


class TextState:
    def __init__(self, tokenizer, stop: list[str], drop_ids: set[int], keep_special: bool):
        self.tok, self.stop, self.drop_ids, self.keep_special = tokenizer, stop, drop_ids, keep_special
        self.ids: list[int] = []
        self.sent = 0  # characters of text already emitted
        self.text = ""  # the text emitted so far
        self.given = 0  # ids whose text (and count) the caller has passed on

    def full(self, finished: bool) -> str:
        ids = self.ids
        if finished and ids and ids[-1] in self.drop_ids:
            ids = ids[:-1]  # the EOS / stop token that ended the request is not text
        if self.tok is None:
            return ""
        text = self.tok.decode(ids, skip_special_tokens=not self.keep_special)
        for s in self.stop:
            i = text.find(s)
            if i >= 0:
                text = text[:i]
        if not finished:
            held = len(text) - len(text.rstrip("\ufffd"))
            for s in self.stop:
                for n in range(min(len(s) - 1, len(text)), 0, -1):
                    if s.startswith(text[-n:]):
                        held = max(held, n)
                        break
            text = text[:len(text) - held]
        return text

    def add(self, ids: list[int], finished: bool) -> str:
        """Append new ids; return the newly safe text."""
        self.ids += ids
        text = self.full(finished)
        if len(text) <= self.sent:
            return ""
        out = text[self.sent:]
        self.sent, self.text = len(text), text
        return out
