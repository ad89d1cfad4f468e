"""`dayzero convert`: a directory written by transformers' DeepseekV4ForCausalLM.save_pretrained
(HF tensor names, stacked experts, no MTP) -> the official hub layout."""
from __future__ import annotations

import os
import shutil
from pathlib import Path


from dayzero.config import ModelArgs
from dayzero.loader.checkpoint import CheckpointError, TensorSpec, list_tensors, load_state, read_config
from dayzero.loader.hf_names import hf_to_official
from dayzero.loader.model_io import checkpoint_state
from dayzero.loader.writer import save_state


def convert_hf(src: str | os.PathLike, dst: str | os.PathLike, fmt: dict | None = None, *,
               max_shard_bytes: int = 5 * 2**30, overwrite: bool = False) -> Path:
    """fmt: ModelArgs changes for the output formats, e.g. {"quant": "fp8", "expert_dtype": "fp4",
    "dtype": "bfloat16"}; default bf16 dense. transformers has no MTP module, so the output
    declares num_nextn_predict_layers = 0."""
    src = Path(src)
    cfg = read_config(src)
    if cfg.get("quantization_config"):
        raise CheckpointError(f"{src}/config.json: quantized transformers checkpoints are not supported; "
                              "save the model in bf16 or fp32 first")
    try:
        args = ModelArgs.from_dict(cfg, source=str(src / "config.json"))
    except ValueError as e:
        raise CheckpointError(str(e)) from None
    infos = list_tensors(src)
    state = load_state(src, {n: TensorSpec(i.shape, i.dtype) for n, i in infos.items()})
    try:
        dense = {n: (t.float() if t.is_floating_point() else t) for n, t in hf_to_official(state).items()}
    except KeyError as e:
        raise CheckpointError(f"{src}: {e.args[0]}") from None
    target = args.replace(n_mtp_layers=0, dspark_stages=0,  # transformers has no MTP / DSpark modules
                          **(fmt or {"quant": None, "expert_dtype": None, "dtype": "bfloat16"}))
    try:
        out_state = checkpoint_state(target, dense)
    except ValueError as e:
        raise CheckpointError(f"{src}: {e}") from None
    out = save_state(dst, out_state, target.to_hf_dict(), max_shard_bytes=max_shard_bytes, overwrite=overwrite)
    for extra in ("tokenizer.json", "tokenizer_config.json", "generation_config.json"):
        if (src / extra).is_file():
            shutil.copyfile(src / extra, out / extra)
    return out
