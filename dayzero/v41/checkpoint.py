"""DeepSeek-V4.1 checkpoints in the official hub layout: the tensor inventory a config implies, and the
writer (`save_v41`) that tests and `dayzero toy --preset v41-flash` use. The reader is v41/loader.py.

Layout: config.json (hub form: `text_config` nested, top-level `quantization_config`), sharded
safetensors with model.safetensors.index.json (loader/checkpoint.py), tokenizer.json. Tensors carry the
official names (`layers.{i}.attn.wq_a.weight`, `.scale` next to a quantised weight; no `model.` prefix)
and the storage of v41/formats.py by role. The storage dtype of the unquantised tensors is config.json's
`torch_dtype` (bfloat16 when absent, as released; float32 also accepted); mHC, sink and router-bias
tensors are always F32.
"""
from __future__ import annotations

import os
from pathlib import Path
from typing import Mapping

import torch

from dayzero.loader.checkpoint import CheckpointError, TensorSpec
from dayzero.loader.formats import quant_fp4
from dayzero.loader.writer import save_state
from dayzero.v41.config import V41Args
from dayzero.v41.formats import quant_fp8_dense, quant_fp8_rows

STORAGE_DTYPES = {"bfloat16": torch.bfloat16, "float32": torch.float32}


def storage_dtype(cfg: dict, source: str = "config.json") -> torch.dtype:
    """The storage dtype of the unquantised tensors: `torch_dtype` (top level, else in `text_config`)."""
    name = cfg.get("torch_dtype", (cfg.get("text_config") or {}).get("torch_dtype", "bfloat16"))
    if name not in STORAGE_DTYPES:
        raise CheckpointError(f"{source}: key `torch_dtype`: {name!r} is not a storage dtype dayzero reads for "
                              f"DeepSeek-V4.1 (one of {', '.join(STORAGE_DTYPES)})")
    return STORAGE_DTYPES[name]


def checkpoint_model(args: V41Args, storage: torch.dtype, drafter: bool = False):
    """The model in checkpoint storage, on the meta device (no memory): its state_dict is the inventory
    (`drafter`: with the DSpark stages `mtp.*`, v41/dspark.py)."""
    from dayzero.v41.model import V41Transformer

    with torch.device("meta"):
        return V41Transformer(args, dtype=storage, drafter=drafter)


def expected_tensors(args: V41Args, storage: torch.dtype = torch.bfloat16, drafter: bool = False
                     ) -> dict[str, TensorSpec]:
    """Every backbone tensor of a V4.1 checkpoint for `args` (`drafter`: and the DSpark stages'): name ->
    (shape, dtype)."""
    return {n: TensorSpec(tuple(t.shape), t.dtype)
            for n, t in checkpoint_model(args, storage, drafter).state_dict().items()}


def checkpoint_state(args: V41Args, dense: Mapping[str, torch.Tensor], storage: torch.dtype = torch.bfloat16
                     ) -> dict[str, torch.Tensor]:
    """Dense tensors by official name (a dense V41Transformer's state) -> the exact tensors of a checkpoint
    for `args`: FP8 32x32 / MXFP4 / FP8 1x32 by role when `args.quant` says so, storage dtypes elsewhere.
    A dense state with `mtp.*` tensors (a V41Transformer built with drafter=True) writes the DSpark stages."""
    expected = checkpoint_model(args, storage, any(n.startswith("mtp.") for n in dense)).state_dict()
    out: dict[str, torch.Tensor] = {}
    for name, want in expected.items():
        if name in out:
            continue  # a scale, written with its quantised weight
        if name not in dense:
            raise ValueError(f"tensor {name!r}: the checkpoint for this config needs it, the dense state lacks it")
        t = dense[name]
        logical = tuple(t.shape)
        if want.dtype in (torch.float8_e4m3fn, torch.int8) and name.endswith(".weight"):
            if name.endswith("engram.embed.weight"):
                q, s = quant_fp8_rows(t)
            elif want.dtype == torch.int8:
                q, s = quant_fp4(t)
            else:
                q, s = quant_fp8_dense(t)
            out[name], out[name[:-len("weight")] + "scale"] = q, s
        else:
            out[name] = t.to(want.dtype)
        if tuple(out[name].shape) != tuple(want.shape):
            raise ValueError(f"tensor {name!r}: dense shape {list(logical)} gives {list(out[name].shape)}, "
                             f"the checkpoint needs {list(want.shape)}")
    extra = sorted(set(dense) - set(expected))
    if extra:
        raise ValueError(f"the dense state has tensors this config does not: {extra[:5]}")
    return {n: out[n] for n in expected}


def save_v41(path: str | os.PathLike, dense: Mapping[str, torch.Tensor], config: dict, *,
             tokenizer_json: str | os.PathLike | None = None, max_shard_bytes: int = 5 * 2**30,
             overwrite: bool = False) -> Path:
    """Write a V4.1 checkpoint in the official hub layout: `config` is the hub config.json (it decides the
    formats: `quantization_config`, `torch_dtype`), `dense` the tensors by official name in any float dtype."""
    args = V41Args.from_dict(config, source="config")
    state = checkpoint_state(args, dense, storage_dtype(config))
    return save_state(path, state, config, tokenizer_json=tokenizer_json, max_shard_bytes=max_shard_bytes,
                      overwrite=overwrite)
