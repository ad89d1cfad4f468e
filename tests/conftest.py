"""Shared fixtures: tiny checkpoints in the official layout, built once per session."""
from __future__ import annotations

import os

import torch

if not torch.cuda.is_available():  # Triton kernels run on the CPU interpreter (set before any @triton.jit)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest

from dayzero.loader.model_io import checkpoint_state
from dayzero.loader.writer import save_state
from dayzero.reference.model import Transformer
from dayzero.testing import TINY, random_state, tiny_args, tiny_tokenizer

FORMATS = {
    "fp32": dict(quant=None, expert_dtype=None, dtype="float32"),
    "fp8": dict(quant="fp8", expert_dtype="fp4", dtype="bfloat16"),
}


@pytest.fixture(scope="session")
def make_ckpt(tmp_path_factory):
    """make_ckpt(preset, fmt, mtp=1, seed=0, tokenizer=False) -> directory of a random-weight tiny
    checkpoint in the official layout (with a byte-level BPE tokenizer.json if asked)."""
    cache: dict = {}

    def make(preset: str = "flash", fmt: str = "fp32", mtp: int = 1, seed: int = 0, tokenizer: bool = False,
             **changes):
        key = (preset, fmt, mtp, seed, tokenizer, tuple(sorted(changes.items())))
        if key not in cache:
            args = tiny_args(preset, n_mtp_layers=mtp, **changes)
            state = random_state(Transformer(args), seed=seed)
            target = args.replace(**FORMATS[fmt])
            d = tmp_path_factory.mktemp(f"{preset}-{fmt}")
            tok = None
            if tokenizer:
                tok = tmp_path_factory.mktemp("tok") / "tokenizer.json"
                tiny_tokenizer(tok)
            save_state(d, checkpoint_state(target, state), target.to_hf_dict(), max_shard_bytes=1 << 20,
                       tokenizer_json=tok)
            cache[key] = d
        return cache[key]

    return make


@pytest.fixture(params=sorted(TINY))
def preset(request):
    return request.param


def pytest_sessionstart(session):
    """One clear error when the Triton interpreter cannot run the kernels (triton 3.6 with numpy >= 2.4),
    instead of the same TypeError from inside every kernel test."""
    if os.environ.get("TRITON_INTERPRET") != "1":
        return
    try:
        from dayzero.ops.triton.probe import interpreter_problem
    except ImportError:  # no triton: the Triton tests skip themselves
        return
    if (problem := interpreter_problem()) is not None:
        pytest.exit(problem, returncode=1)


def prompt_ids(n: int, seed: int = 1, vocab: int = 512) -> torch.Tensor:
    return torch.randint(2, vocab, (1, n), generator=torch.Generator().manual_seed(seed))
