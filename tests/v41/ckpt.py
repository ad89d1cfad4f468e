"""Tiny quantised DeepSeek-V4.1 checkpoints written by dayzero's V4.1 writer, for the loader tests, and
an editor that rewrites one consistently (shards + index) after changing its tensors."""
from __future__ import annotations

import atexit
import functools
import json
import shutil
import tempfile
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from dayzero.loader.writer import save_state
from dayzero.testing import random_state
from dayzero.v41 import V41Args
from dayzero.v41.checkpoint import save_v41
from dayzero.v41.model import V41Transformer
from dayzero.v41.toy import QUANTIZATION
from tests.v41.tiny import hub

@pytest.fixture(autouse=True, scope="module")
def one_thread():
    """The loader tests' modules run their small forwards on one thread (imported by name: autouse there)."""
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


UNQUANTISED = dict(head_dim=40, index_head_dim=24, index_n_heads=16)  # fake-quant points off (test_model_oracle)


def v41_config(text: dict, quantised: bool = True, **top) -> dict:
    cfg = hub(text, torch_dtype="bfloat16", **top)
    if quantised:
        cfg["quantization_config"] = dict(QUANTIZATION)
    return cfg


def write(path: Path, cfg: dict, tokenizer_json=None, seed: int = 0) -> Path:
    dense = V41Transformer(V41Args.from_dict(cfg).replace(quant=None, expert_dtype=None))
    return save_v41(path, random_state(dense, seed=seed), cfg, tokenizer_json=tokenizer_json, max_shard_bytes=2**18)


@functools.lru_cache(maxsize=None)
def cached(name: str, cfg_json: str, tokenizer_json: str | None) -> Path:
    """One checkpoint per (name, config) for the session; tests that damage one copy it first."""
    path = Path(tempfile.mkdtemp(prefix=f"v41ckpt-{name}-"))
    atexit.register(shutil.rmtree, path, ignore_errors=True)
    return write(path, json.loads(cfg_json), tokenizer_json)


def read_all(d: Path) -> dict:
    index = json.loads((d / "model.safetensors.index.json").read_text())
    out = {}
    for shard in sorted(set(index["weight_map"].values())):
        out.update(load_file(d / shard))
    return out


def rewrite(d: Path, fn, config: dict | None = None) -> None:
    """Apply fn(tensors) to every tensor of the checkpoint and write it back, index consistent."""
    tensors = read_all(d)
    fn(tensors)
    cfg = config if config is not None else json.loads((d / "config.json").read_text())
    save_state(d, tensors, cfg, max_shard_bytes=2**18, overwrite=True)
