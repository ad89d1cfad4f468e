"""Load a DeepSeek-V4.1 checkpoint in the official hub layout into the reference model, strictly.

`load_v41(path)`: config.json is read with `V41Args` (a bad or inconsistent config is a CheckpointError
naming the file and key); the inventory the config implies (v41/checkpoint.py: names, shapes, storage
dtypes, the `.scale` tensors of FP8 32x32 / MXFP4 / FP8-row weights) must equal the checkpoint's,
tensor by tensor (loader/checkpoint.py: missing, unexpected, shape or dtype mismatches, each with its
shard; bad index; truncated or corrupt shards). Quantised weights stay quantised in the model (FP8 dense
linears dequantise per call, the experts run V4's FP4 path); unquantised float tensors become the
compute dtype.

Engram tables (`layers.{i}.engram.embed.weight` / `.scale`, ~98 GB each in the release) are never
copied: they stay the shard's memory map, on the host whatever `device` is, and the forward reads only
the rows a batch's n-gram hashes address (v41/engram.py EngramTable).

Recognised and not loaded: the vision tower and aligner (`vision.*`, `aligner.*`, `image_start`,
`image_end`, `image_newline`: dayzero runs V4.1 on text only) and, unless `drafter=True` (speculation on),
the DSpark stages (`mtp.*`). With `drafter=True` the stages are loaded strictly as the rest (v41/dspark.py;
the confidence head may be stored BF16 or F32: the sources disagree, v41/presets.py). Every other tensor
must be one the config implies.
"""
from __future__ import annotations

import os
import re
from pathlib import Path

import torch

from dayzero.distributed.layout import Layout
from dayzero.loader.checkpoint import CheckpointError, TensorSpec, list_tensors, load_state, read_config
from dayzero.loader.finite import check_small_finite
from dayzero.loader.model_io import is_routed_expert
from dayzero.v41.checkpoint import expected_tensors, storage_dtype
from dayzero.v41.config import V41Args

_NOT_LOADED = re.compile(r"^(vision\.|aligner\.|image_(start|end|newline)$|mtp\.\d+\.)")
_ENGRAM_TABLE = re.compile(r"^layers\.\d+\.engram\.embed\.(weight|scale)$")


def not_loaded(name: str) -> bool:
    """A checkpoint tensor dayzero recognises and leaves unread: vision tower, aligner, image delimiters
    (text only) and the DSpark stages `mtp.*` (read only with the drafter on: `drafter_not_loaded`)."""
    return bool(_NOT_LOADED.match(name))


def drafter_not_loaded(name: str) -> bool:
    """With the DSpark drafter on: everything `not_loaded` leaves unread but the stages."""
    return not_loaded(name) and not name.startswith("mtp.")


def is_engram_table(name: str) -> bool:
    return bool(_ENGRAM_TABLE.match(name))


def read_v41_args(path: str | os.PathLike) -> tuple[V41Args, torch.dtype]:
    """(V41Args, storage dtype) of the checkpoint at `path`; CheckpointError naming the file otherwise."""
    cfg = read_config(path)
    source = str(Path(path) / "config.json")
    try:
        return V41Args.from_dict(cfg, source=source), storage_dtype(cfg, source)
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def load_v41(path: str | os.PathLike, dtype: torch.dtype = torch.float32, device: str | torch.device = "cpu",
             progress: bool | None = None, layout: Layout = Layout(), cpu_experts: bool = False,
             drafter: bool = False):
    """The V41Transformer of the checkpoint at `path` (compute `dtype`, on `device`), loaded strictly, its
    Engram tables memory-mapped, the tokenizer.json bound for Engram. With a tensor / expert parallel
    `layout` (distributed/layout.py) only this rank's tensors and slices are read from the mapped shards,
    after the whole checkpoint's inventory is checked against the headers (as V4's loader/model_io.py).
    `cpu_experts`: the routed experts (`ffn.experts.*`) stay in host memory whatever `device` is (hybrid
    placement, as V4's `load_model(..., cpu_experts=True)`). `drafter`: also build and load the DSpark
    stages `mtp.*` (v41/dspark.py), strictly; a config without stages is a named error."""
    from dayzero.v41.model import V41Transformer

    args, storage = read_v41_args(path)
    tokenizer = None
    if args.engram_layer_ids:
        file = Path(path) / "tokenizer.json"
        if not file.is_file():
            raise CheckpointError(f"{path}: the config has Engram layers {list(args.engram_layer_ids)}, whose n-gram "
                                  f"hashes come from the tokenizer, but there is no tokenizer.json")
        from tokenizers import Tokenizer
        tokenizer = Tokenizer.from_file(str(file))
    _check_quantisation(path, args)
    if drafter and not args.n_mtp_layers:
        raise CheckpointError(f"{Path(path) / 'config.json'}: speculation asks for the DSpark drafter, but "
                              f"`num_nextn_predict_layers` is 0 (no mtp.* stages): drop num_speculative_tokens")
    with torch.device("meta"):
        model = V41Transformer(args, dtype=dtype, layout=layout, drafter=drafter)
    params = model.state_dict()
    expected = expected_tensors(args, storage, drafter)
    if drafter:  # the confidence head's storage is in doubt (v41/presets.py): BF16 or F32 read
        from dayzero.v41.presets import CONFIDENCE_DTYPES
        conf = f"mtp.{args.n_mtp_layers - 1}.confidence_head.proj.weight"
        got = list_tensors(path).get(conf)
        if got is not None and got.dtype in CONFIDENCE_DTYPES:
            expected[conf] = TensorSpec(expected[conf].shape, got.dtype)
    slices = {}
    for name, dim in model.shard_plan().items():
        n = params[name].shape[dim]
        if expected[name].shape[dim] != n * layout.tp:  # layout.check rules this out; a guard for new splits
            raise CheckpointError(f"tensor {name!r}: dim {dim} of {list(expected[name].shape)} does not split into "
                                  f"{layout.tp} slices of {n}")
        r = layout.rank % layout.tp
        slices[name] = (dim, r * n, (r + 1) * n)
    host = (lambda n: is_engram_table(n) or is_routed_expert(n)) if cpu_experts else is_engram_table
    try:
        state = load_state(path, expected, device=device, ignore=drafter_not_loaded if drafter else not_loaded,
                           progress=progress, host=host, only=None if layout.whole else set(params), slices=slices)
    except CheckpointError as e:
        if drafter and "mtp." in str(e):
            raise CheckpointError(f"{e}\nhint: speculation is on, so the DSpark stages mtp.* are read strictly; "
                                  f"num_speculative_tokens=0 runs without them") from None
        raise
    check_small_finite(state, str(path))
    for name, t in state.items():
        # storage -> compute dtype for unquantised floats; quantised weights and the tables stay as read
        if t.dtype != params[name].dtype and not is_engram_table(name):
            state[name] = t.to(params[name].dtype)
    model.load_state_dict(state, strict=True, assign=True)
    if tokenizer is not None:
        try:
            model.bind_tokenizer(tokenizer)
        except ValueError as e:
            raise CheckpointError(f"{Path(path) / 'tokenizer.json'}: {e}") from None
    return model.eval()


def _check_quantisation(path, args: V41Args) -> None:
    """config.json's quantisation against the tensors (headers only), as one named error rather than a
    list of every scale tensor: a quantised checkpoint has `.scale` tensors beside its linears."""
    infos = list_tensors(path)
    scales = sorted(n for n in infos if n.endswith(".scale") and not is_engram_table(n) and not not_loaded(n))
    source = Path(path) / "config.json"
    if args.quant is None and scales:
        raise CheckpointError(f"{source} has no `quantization_config`, so every weight should be dense, but the "
                              f"checkpoint stores quantised weights with scales (e.g. {scales[0]!r} in "
                              f"{infos[scales[0]].file}): add the release's quantization_config (fp8, "
                              f"weight_block_size [32, 32], expert_dtype fp4)")
    if args.quant is not None and not scales:
        some = next((n for n in sorted(infos) if n.endswith("attn.wq_a.weight")), None)
        raise CheckpointError(f"{source}: `quantization_config` says FP8 weights with scales, but the checkpoint has "
                              f"no `.scale` tensors" + (f" ({some!r} is {infos[some].dtype})" if some else "")
                              + ": it is a dense checkpoint; remove quantization_config")
