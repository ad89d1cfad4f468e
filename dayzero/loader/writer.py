"""Write checkpoints in the official hub layout, and quantize a state dict for them."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Mapping

import torch
from safetensors.torch import save_file

from .checkpoint import CONFIG_NAME, INDEX_NAME
from .formats import FP4_BLOCK, quant_fp4, quant_fp8_block

QUANT_KINDS = ("fp8", "fp8_f32", "fp4")


def _shard_name(i: int, n: int) -> str:
    return f"model-{i:05d}-of-{n:05d}.safetensors"


def _existing_weights(d: Path) -> list[Path]:
    return sorted(p for p in d.iterdir() if p.name.endswith(".safetensors") or p.name == INDEX_NAME)


def save_state(
    path: str | os.PathLike,
    tensors: Mapping[str, torch.Tensor],
    config: dict,
    *,
    max_shard_bytes: int = 5 * 2**30,
    tokenizer_json: str | os.PathLike | None = None,
    overwrite: bool = False,
) -> Path:
    """Write config.json, model-0000i-of-0000N.safetensors shards and the index to `path`.

    Tensors go in sorted-name order, packed greedily: a shard is closed when the next tensor
    would take it past max_shard_bytes (a larger tensor gets a shard of its own). The index is
    {"metadata": {"total_size": data bytes}, "weight_map": {name: shard file}}. Refuses a
    directory that already holds safetensors files or an index unless overwrite=True, which
    removes them first. Returns the directory.
    """
    d = Path(path)
    if d.exists() and not d.is_dir():
        raise NotADirectoryError(f"{d} exists and is not a directory")
    d.mkdir(parents=True, exist_ok=True)
    old = _existing_weights(d)
    if old and not overwrite:
        raise FileExistsError(f"{d} already holds checkpoint files ({old[0].name}, ...)")
    for name, t in tensors.items():
        if not isinstance(name, str) or not isinstance(t, torch.Tensor):
            raise TypeError(f"state entries must be str -> Tensor, got {name!r}: {type(t)}")
    if max_shard_bytes <= 0:
        raise ValueError(f"max_shard_bytes must be positive, got {max_shard_bytes}")
    for p in old:
        p.unlink()

    names = sorted(tensors)
    shards: list[list[str]] = []
    used = 0
    for name in names:
        nbytes = tensors[name].numel() * tensors[name].element_size()
        if not shards or (used + nbytes > max_shard_bytes and used > 0):
            shards.append([])
            used = 0
        shards[-1].append(name)
        used += nbytes

    weight_map: dict[str, str] = {}
    total = 0
    for i, group in enumerate(shards, start=1):
        file = _shard_name(i, len(shards))
        part = {n: tensors[n].detach().to("cpu", copy=True).contiguous() for n in group}
        save_file(part, str(d / file), metadata={"format": "pt"})
        os.chmod(d / file, 0o644)  # safetensors creates files private to the owner; checkpoints are shared data
        for n, t in part.items():
            weight_map[n] = file
            total += t.numel() * t.element_size()
        del part

    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (d / INDEX_NAME).write_text(json.dumps(index, indent=2) + "\n", encoding="utf-8")
    (d / CONFIG_NAME).write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
    if tokenizer_json is not None:
        shutil.copyfile(tokenizer_json, d / "tokenizer.json")
    return d


def quantize_state(state: Mapping[str, torch.Tensor], plan: Mapping[str, str]) -> dict:
    """Quantize the `<prefix>.weight` tensors named in `plan`, adding `<prefix>.scale`.

    plan values: "fp8" (float8_e4m3fn + float8_e8m0fnu scale per 128x128 block), "fp8_f32"
    (same with float32 scales, as Base checkpoints store experts), "fp4" (int8 packed
    [out, in/2] + float8_e8m0fnu scale [out, in/32]). Other tensors pass through unchanged;
    order is kept, each scale right after its weight.
    """
    for name, kind in plan.items():
        if kind not in QUANT_KINDS:
            raise ValueError(f"{name!r}: unknown quantization {kind!r} (one of {QUANT_KINDS})")
        if not name.endswith(".weight"):
            raise ValueError(f"{name!r}: only '<prefix>.weight' tensors can be quantized")
        if name not in state:
            raise ValueError(f"{name!r}: planned for {kind} but not in the state")
        t = state[name]
        if t.dim() != 2 or not t.is_floating_point():
            raise ValueError(
                f"{name!r}: {kind} needs a 2-D float tensor, got {t.dtype} {list(t.shape)}"
            )
        if kind == "fp4" and t.shape[1] % FP4_BLOCK:
            raise ValueError(
                f"{name!r}: fp4 needs an input width that is a multiple of {FP4_BLOCK}, "
                f"got {t.shape[1]}"
            )
        scale_name = name[: -len("weight")] + "scale"
        if scale_name in state:
            raise ValueError(f"{name!r}: {scale_name!r} already exists in the state")

    out: dict[str, torch.Tensor] = {}
    for name, t in state.items():
        kind = plan.get(name)
        if kind is None:
            out[name] = t
            continue
        if kind == "fp4":
            q, s = quant_fp4(t)
        else:
            q, s = quant_fp8_block(
                t, scale_dtype=torch.float32 if kind == "fp8_f32" else torch.float8_e8m0fnu
            )
        out[name] = q
        out[name[: -len("weight")] + "scale"] = s
    return out

