"""Load a reference model from an official-layout checkpoint; save any model in that layout.

The model's own `state_dict()` (built on the meta device, no memory) is the expected inventory:
names, shapes and storage dtypes, so loading is strict by construction.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from dayzero.config import ModelArgs
from dayzero.distributed.layout import Layout
from dayzero.loader.checkpoint import CheckpointError, TensorSpec, load_state, read_config
from dayzero.loader.finite import check_small_finite
from dayzero.loader.writer import quantize_state, save_state
from dayzero.reference.attention import Compressor
from dayzero.reference.layers import Linear
from dayzero.reference.model import Transformer


def default_compute_dtype(device: torch.device) -> torch.dtype:
    """fp32 on CPU (bf16 matmuls there are slow and not what accelerators do), bf16 elsewhere."""
    return torch.float32 if device.type == "cpu" else torch.bfloat16


def expected_tensors(args: ModelArgs) -> dict[str, TensorSpec]:
    with torch.device("meta"):
        model = Transformer(args)
    return {n: TensorSpec(tuple(t.shape), t.dtype) for n, t in model.state_dict().items()}


def read_args(path: str | os.PathLike) -> ModelArgs:
    """The ModelArgs of the checkpoint at `path` (CheckpointError naming the file if invalid)."""
    cfg = read_config(path)
    try:
        return ModelArgs.from_dict(cfg, source=str(Path(path) / "config.json"))
    except ValueError as e:
        raise CheckpointError(str(e)) from None


def load_model(path: str | os.PathLike, numerics: str = "official", dtype: torch.dtype | None = None,
               device: str | torch.device = "cpu", progress: bool | None = None,
               layout: Layout = Layout(), cpu_experts: bool = False,
               drafter: str | os.PathLike | None = None) -> Transformer:
    """Build the reference model for the checkpoint at `path` and load it strictly; with a
    tensor-parallel `layout`, only this rank's tensors and slices are read (distributed/layout.py),
    after the whole checkpoint's inventory is checked against the headers. `cpu_experts`: the
    routed experts stay in host memory, as mapped, whatever `device` is (hybrid placement: the
    worker runs them on the CPU op table, `Transformer.host_experts`). `drafter`: a DSpark drafter
    directory (loader/drafter_dir.py) whose `mtp.*` stages replace the target's own `mtp.*`, read
    from there under the same layout."""
    device = torch.device(device)
    if drafter is not None:
        from dayzero.loader.drafter_dir import drafter_args
        args = drafter_args(path, drafter)
    else:
        args = read_args(path)
    dtype = dtype or default_compute_dtype(device)
    with torch.device("meta"):
        model = Transformer(args, numerics=numerics, compute_dtype=dtype, layout=layout)
        whole = model if layout.whole else Transformer(args, numerics=numerics, compute_dtype=dtype)
    expected = {n: TensorSpec(tuple(t.shape), t.dtype) for n, t in whole.state_dict().items()}
    local = model.state_dict()
    slices = {}
    for name, dim in model.shard_plan().items():
        n = local[name].shape[dim]
        if expected[name].shape[dim] != n * layout.tp:  # layout.check rules this out; a guard for new splits
            raise CheckpointError(f"tensor {name!r}: dim {dim} of {list(expected[name].shape)} does not split into "
                                  f"{layout.tp} slices of {n}")
        r = layout.rank % layout.tp  # this rank's place among the tensor-parallel ranks
        slices[name] = (dim, r * n, (r + 1) * n)
    host = is_routed_expert if cpu_experts else (lambda name: False)
    stage = lambda n: n.startswith("mtp.")  # noqa: E731
    everything, nothing = (lambda n: True), (lambda n: False)
    # (directory, its tensors, what it may hold beside them): with a drafter directory the backbone
    # comes from the target (its own mtp.*, an MTP module, is not read) and the stages from the drafter
    parts = ([(path, everything, nothing)] if drafter is None else
             [(path, lambda n: not stage(n), stage), (drafter, stage, nothing)])
    state = {}
    for src, mine, ignore in parts:
        part = load_state(src, {n: t for n, t in expected.items() if mine(n)}, device=device, progress=progress,
                          only={n for n in local if mine(n)}, slices={n: v for n, v in slices.items() if mine(n)},
                          host=host, ignore=ignore)
        check_small_finite(part, str(src))
        state.update(part)
    model.load_state_dict(state, strict=True, assign=True)
    return model.eval()


def is_routed_expert(name: str) -> bool:
    """Whether checkpoint tensor `name` belongs to a routed expert (`layers.3.ffn.experts.17.w1.weight`,
    the MTP / DSpark blocks' `mtp.0.ffn.experts.*` too); the shared expert is `ffn.shared_experts`."""
    return ".ffn.experts." in name


def dense_state(model: Transformer) -> dict[str, torch.Tensor]:
    """Every tensor of `model` in fp32 (quantised linears dequantised), official names."""
    out = {}
    quantized = {name for name, m in model.named_modules() if isinstance(m, Linear) and m.fmt != "dense"}
    for name, t in model.state_dict().items():
        prefix = name.rsplit(".", 1)[0]
        if prefix in quantized:
            if name.endswith(".weight"):
                out[name] = model.get_submodule(prefix).dequant(torch.float32)
            continue
        out[name] = t.float() if t.is_floating_point() else t
    return out


def checkpoint_state(args: ModelArgs, dense: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """Dense fp32 tensors -> the exact tensors of an official checkpoint for `args`: FP8 block /
    FP4 expert quantisation with E8M0 scales where `args` says so, storage dtypes elsewhere."""
    with torch.device("meta"):
        target = Transformer(args)
    plan = {f"{name}.weight": m.fmt for name, m in target.named_modules()
            if isinstance(m, Linear) and m.fmt != "dense"}
    state = quantize_state(dense, plan)
    expected = target.state_dict()
    if set(state) != set(expected):
        missing, extra = sorted(set(expected) - set(state)), sorted(set(state) - set(expected))
        raise ValueError(f"state does not match the model: missing {missing[:5]}, unexpected {extra[:5]}")
    out = {}
    for name, want in expected.items():
        t = state[name]
        if tuple(t.shape) != tuple(want.shape):
            raise ValueError(f"tensor {name}: shape {tuple(t.shape)}, model needs {tuple(want.shape)}")
        out[name] = t.to(want.dtype) if t.dtype != want.dtype else t
    return out


def save_model(path: str | os.PathLike, model: Transformer, args: ModelArgs | None = None, *,
               tokenizer_json: str | os.PathLike | None = None, max_shard_bytes: int = 5 * 2**30,
               overwrite: bool = False) -> Path:
    """Write `model` in the official hub layout, in the formats of `args` (default: its own).
    Use `args=model.args.replace(quant="fp8", expert_dtype="fp4", dtype="bfloat16")` for the
    hub's FP8 + FP4 layout, or `quant=None, dtype="float32"` for a dense fp32 copy."""
    args = args or model.args
    state = checkpoint_state(args, dense_state(model))
    return save_state(path, state, args.to_hf_dict(), tokenizer_json=tokenizer_json,
                      max_shard_bytes=max_shard_bytes, overwrite=overwrite)


def keep_dequantized(model: Transformer, max_bytes: int = 4 * 2**30, dense_only: bool = False,
                     fp32_kernel: bool = False, host_experts: bool = False) -> bool:
    """Keep dequantised copies of every linear in the compute dtype, and an fp32 copy of the LM
    head (it runs in fp32), when they total at most `max_bytes` (small models on devices without
    FP8/FP4 kernels); returns whether it did. dense_only: only the dense linears whose storage
    dtype differs from the compute dtype (devices whose kernels read FP8/FP4 directly).
    fp32_kernel: the op table's fp32_linear reads bf16 weights itself: no fp32 copies of the head
    and compressor projections, nor of the dense linears its forward hands to it in fp32 (no copy
    the op table does not read: Linear.copy_is_read). host_experts: leave the routed experts as
    they are (hybrid placement: the host's table reads them, no copies in host memory)."""
    dt = model.compute_dtype
    skip = set()
    if host_experts:
        skip = {id(m) for name, m in model.named_modules() if ".ffn.experts." in f"{name}."}
    linears = [m for m in model.modules() if isinstance(m, Linear) and (not dense_only or m.fmt == "dense")
               and m.copy_is_read(dt, fp32_kernel) and m is not model.head  # the head: keep_head_fp32
               and id(m) not in skip]
    size = torch.tensor([], dtype=dt).element_size()
    total = sum(m.in_features * m.out_features * size for m in linears)
    total += 0 if fp32_kernel else model.head.weight.numel() * 4
    if total > max_bytes:
        return False
    for m in linears:
        m.keep_dequantized(dt)
    model.keep_head_fp32(not fp32_kernel)
    for m in model.modules():
        if isinstance(m, Compressor):
            m.fuse_projections(None if fp32_kernel else torch.float32)
    return True
