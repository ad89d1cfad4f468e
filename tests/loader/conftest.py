"""Shared by the loader tests: a private copy of a tiny checkpoint to edit, and a shard editor."""
import json
import shutil

import pytest
from safetensors.torch import load_file, save_file


@pytest.fixture
def ckpt(make_ckpt, tmp_path):
    """A copy of the tiny flash FP8/FP4 checkpoint that a test may damage."""
    d = tmp_path / "ckpt"
    shutil.copytree(make_ckpt("flash", "fp8"), d)
    return d


def rewrite_shard(d, tensor, fn):
    """Apply fn(state dict) to the shard holding `tensor`; returns the shard's path."""
    index = json.loads((d / "model.safetensors.index.json").read_text())
    shard = d / index["weight_map"][tensor]
    state = load_file(shard)
    fn(state)
    save_file(state, shard, metadata={"format": "pt"})
    return shard
