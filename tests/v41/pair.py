"""A dayzero V41Transformer and transformers' deepseek_v41 (the oracle) holding the same random weights,
copied by the official tensor names, with the same byte-level BPE tokenizer bound for Engram."""
from __future__ import annotations

import functools
from pathlib import Path
from types import SimpleNamespace

import torch

from dayzero.testing import random_state, tiny_tokenizer
from dayzero.v41 import V41Args
from dayzero.v41.model import V41Transformer
from tests.v41.oracle import oracle, oracle_text_config
from tests.v41.tiny import hub, text_config

ENGRAM = dict(engram_max_ngram_size=3, engram_vocab_size=40, engram_n_heads=2, engram_head_dim=32,
              engram_pad_id=5)  # the key both read (the oracle ignores `engram_pad_token_id`)


@functools.lru_cache(maxsize=1)
def tokenizer_file() -> Path:
    import tempfile
    path = Path(tempfile.mkdtemp(prefix="v41tok")) / "tokenizer.json"
    tiny_tokenizer(path, vocab_size=320)
    return path


def tokenizers():
    """(tokenizers.Tokenizer for dayzero, PreTrainedTokenizerFast for the oracle) of one file."""
    from tokenizers import Tokenizer
    from transformers import PreTrainedTokenizerFast
    path = tokenizer_file()
    return Tokenizer.from_file(str(path)), PreTrainedTokenizerFast(tokenizer_file=str(path))


def engram_text(text: dict, layers: list[int]) -> dict:
    """`text` with Engram on `layers`: the compressed vocabulary and table sizes as the ORACLE derives
    them from the tokenizer and its prime layout (dayzero checks its own derivation against them)."""
    oracle()  # puts the oracle on sys.path (or skips)
    from deepseek_v41.modeling_deepseek_v41 import EngramLayout, build_compressed_token_map
    _, fast = tokenizers()
    _, compressed = build_compressed_token_map(fast)
    ns = SimpleNamespace(engram_layer_ids=layers, engram_num_embeddings=[], **ENGRAM)
    layout = EngramLayout.from_config(ns)
    rows = [sum(sum(per) for per in layer) for layer in layout.primes]
    return {**text, "vocab_size": len(fast), "engram_layer_ids": layers, "engram_num_embeddings": rows,
            "engram_compressed_vocab_size": compressed, **ENGRAM}


def oracle_name(name: str) -> str:
    return "lm_head.weight" if name == "head.weight" else "model." + name


def build(text: dict, seed: int = 0):
    """(ours, oracle model), fp32, eval, the oracle's weights copied into ours by name."""
    o = oracle()
    args = V41Args.from_dict(hub(text))
    ours = V41Transformer(args)
    theirs = o.DeepseekV41ForCausalLM(o.DeepseekV41Config(text_config=oracle_text_config(text))).eval()
    state = random_state(ours, seed=seed)
    theirs_sd = theirs.state_dict()
    mapped = {oracle_name(k): v for k, v in state.items()}
    assert set(mapped) == set(theirs_sd), (sorted(set(mapped) - set(theirs_sd)), sorted(set(theirs_sd) - set(mapped)))
    theirs.load_state_dict(mapped, strict=True)
    # the direction the parity claims: every tensor of ours comes from the oracle's tensor of that name
    theirs_sd = theirs.state_dict()
    ours.load_state_dict({k: theirs_sd[oracle_name(k)] for k in ours.state_dict()}, strict=True)
    if args.engram_layer_ids:
        tok, fast = tokenizers()
        ours.bind_tokenizer(tok)
        theirs.model.bind_tokenizer(fast)
    return ours.eval(), theirs


def oracle_logits(theirs, ids: torch.Tensor) -> torch.Tensor:
    with torch.no_grad():
        return theirs(input_ids=ids, use_cache=True).logits  # its cache path (README: the no-cache path is wrong)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


def schedule_text(ratios, kv, index, cand, **changes) -> dict:
    return text_config(ratios, kv, index, cand, **changes)
