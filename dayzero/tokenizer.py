"""A thin wrapper over a checkpoint's tokenizer.json (Hugging Face `tokenizers` format)."""
from __future__ import annotations

import functools
import os

from tokenizers import Tokenizer as _HFTokenizer


class Tokenizer:
    def __init__(self, path: str | os.PathLike):
        try:
            self._tok = _HFTokenizer.from_file(str(path))
        except Exception as e:  # tokenizers raises a bare Exception for malformed files
            raise ValueError(f"{path}: not a valid tokenizer.json ({e})") from None

    @property
    def vocab_size(self) -> int:
        return self._tok.get_vocab_size(with_added_tokens=True)

    # The *_batch calls release the GIL while the Rust code runs (the single-item calls hold it: a
    # 2 MB prompt held it for ~2 s), so a long prompt tokenized on a worker thread stalls neither
    # the server's event loop nor the engine thread.
    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode_batch([text], add_special_tokens=add_special_tokens)[0].ids

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return self._tok.decode_batch([ids], skip_special_tokens=skip_special_tokens)[0]

    @functools.cached_property
    def max_token_bytes(self) -> int:
        """An upper bound on the UTF-8 bytes of text one token stands for: the longest token of the
        vocabulary (added tokens included) decoded alone, plus 1 for a decoder that drops a leading
        space. A token whose bytes are an incomplete UTF-8 character decodes to U+FFFD (3 bytes),
        which only overestimates."""
        n = self._tok.get_vocab_size(with_added_tokens=True)
        texts = self._tok.decode_batch([[i] for i in range(n)], skip_special_tokens=False)
        return max(len(t.encode("utf-8", "surrogatepass")) for t in texts) + 1

    def min_tokens(self, text: str) -> tuple[int, int]:
        """(a lower bound on len(encode(text)), the UTF-8 bytes it is computed from), in linear time
        without tokenizing: every token covers at most max_token_bytes bytes of the (normalized)
        text. Lets a server refuse a prompt that cannot fit its context before tokenizing it."""
        if self._tok.normalizer is not None:
            text = self._tok.normalizer.normalize_str(text)
        n = len(text.encode("utf-8", "surrogatepass"))
        return -(-n // self.max_token_bytes), n

    def to_json(self) -> str:
        """The tokenizer.json text (for libraries that load their own copy)."""
        return self._tok.to_str()

    def token_to_id(self, token: str) -> int | None:
        return self._tok.token_to_id(token)
