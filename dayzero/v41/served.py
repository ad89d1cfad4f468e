"""DeepSeek-V4.1 in the engine (one rank): `ServedV41` is the seam between the V4.1 reference model
(v41/model.py `V41Transformer`, loaded by v41/loader.py `load_v41`) and engine/engine.py + worker.py.

The engine drives a model through a few attributes and calls (DESIGN.md seam 4); this module gives
V41Transformer exactly those, computing nothing of its own: `forward_packed(ids, Batch)` is the
model's (the paged cache is the Batch's cache, v41/cache.py says which groups it pages), `logits`
is the model's final norm and fp32 head (what `V41Transformer.forward` does), `forward` is the
model's full forward (`LLM.score`). `args` is the engine's view of the config (`EngineView`).

What is refused, by name, before anything runs (`check_engine_args`, also from `LLM`):
speculation (V4.1's DSpark stages `mtp.*` are not loaded: the drafter is not built for V4.1),
tensor / expert / data parallel layouts and hybrid expert placement (V4.1's layers are built for one
rank), kv_cache_dtype "fp8" (no packed V4.1 rows), `numerics="official"` (only transformers'
semantics are built for V4.1); recorded steps (CUDA graphs, trace) are off (`graphs_unsupported`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from dayzero.distributed.comm import SINGLE
from dayzero.distributed.layout import Layout
from dayzero.ops import ref
from dayzero.v41 import cache
from dayzero.v41.config import V41Args

NOT_BUILT = "(docs/V41.md, issue 23)"


@dataclass(frozen=True)
class EngineView:
    """The config fields the engine reads, for a V4.1 model (it reads no other)."""
    vocab_size: int
    window_size: int
    max_seq_len: int
    compress_ratios: tuple[int, ...]
    n_layers: int
    eos_token_id: int
    n_mtp_layers: int = 0  # V4.1's DSpark stages (mtp.*) are not loaded: the engine has no drafter for it
    dspark_stages: int = 0
    dspark_block_size: int = 0


def eos_of(cfg: dict) -> int:
    """The end-of-sequence id of a V4.1 hub config (top level, then `text_config`; a list: its
    first), 1 where neither has one (as V4's ModelArgs)."""
    for where in (cfg, cfg.get("text_config") or {}):
        x = where.get("eos_token_id")
        if x is not None:
            return int(x[0] if isinstance(x, list) else x)
    return 1


def check_engine_args(eargs, numerics: str | None = None) -> None:
    """Refuse, by option and value, what the engine cannot do with a V4.1 model yet."""
    if numerics not in (None, "transformers"):
        raise ValueError(f"numerics={numerics!r}: DeepSeek-V4.1 runs with numerics='transformers' only (what "
                         f"transformers' deepseek_v41 computes, its fake-quant points included); the official "
                         f"mode's extra simulation is not built for V4.1 {NOT_BUILT}")
    for name in ("tensor_parallel_size", "data_parallel_size"):
        if getattr(eargs, name) != 1:
            raise ValueError(f"{name}={getattr(eargs, name)}: DeepSeek-V4.1 runs on one rank only; its tensor, "
                             f"expert and data parallel layouts are not built {NOT_BUILT}")
    for name, why in (("enable_expert_parallel", "expert parallel layouts are not built for V4.1"),
                      ("cpu_experts", "hybrid expert placement is not built for V4.1")):
        if getattr(eargs, name):
            raise ValueError(f"{name}=True: {why} {NOT_BUILT}")
    spec = eargs.speculative_config or {}
    k = spec.get("num_speculative_tokens", eargs.num_speculative_tokens)
    if spec.get("method") is not None or spec.get("model") is not None or k:
        raise ValueError("speculative decoding on DeepSeek-V4.1 is not built: its DSpark drafter (the mtp.* stages, "
                         f"not loaded) has no engine path yet; drop speculative_config / num_speculative_tokens "
                         f"{NOT_BUILT}")
    if eargs.kv_cache_dtype != "auto":
        raise ValueError(f"kv_cache_dtype={eargs.kv_cache_dtype!r}: DeepSeek-V4.1's cache has no packed FP8 rows "
                         f"yet (its window and compressed entries are kept in the compute dtype); use 'auto' "
                         f"{NOT_BUILT}")


class ServedV41(nn.Module):
    """A V41Transformer as engine/worker.py drives a model (one rank, no drafter)."""
    layout = Layout()  # one rank
    group_comm = SINGLE
    mtp = ()
    fp32_compressor_rows = True  # the pooled sources' "c:rows" are fp32, as the compressor computes them
    prepares_weights = False  # FP8 32x32 linears dequantise per call (no kept copies for V4.1 yet)
    graphs_unsupported = "DeepSeek-V4.1: recorded steps (CUDA graphs, trace) are not built for its forward"

    def __init__(self, model, eos_token_id: int = 1):
        super().__init__()
        self.model = model
        v: V41Args = model.args
        self.v41, self.numerics, self.compute_dtype = v, model.numerics, model.compute_dtype
        self.args = EngineView(v.vocab_size, v.window_size, v.max_seq_len, tuple(v.compress_ratios), v.n_layers,
                               eos_token_id)

    def check_engine_args(self, eargs) -> None:
        check_engine_args(eargs)

    def cache_groups(self, block_size: int, with_mtp: bool = False, kv_cache_dtype: str = "auto"):
        assert not with_mtp, "no drafter for V4.1 (check_engine_args)"
        return cache.v41_cache_groups(self.v41, block_size, kv_cache_dtype)

    def fixed_bytes_per_sequence(self, with_mtp: bool = False, kv_cache_dtype: str = "auto") -> int:
        return cache.fixed_bytes_per_sequence(self.v41, self.compute_dtype)

    def set_ops(self, table) -> None:
        from dayzero.reference.model import Transformer
        Transformer.set_ops(self, table)  # every UsesOps module's table, the FP4 experts grouped

    def forward_packed(self, input_ids: torch.Tensor, batch, captured=None, replay_from=None) -> torch.Tensor:
        """replay_from: each sequence's bounded-replay floor (engine option v41_bounded_replay; rows below
        a floor are NaN, v41/replay.py); None: the exact forward."""
        if captured is not None:
            raise ValueError("DeepSeek-V4.1 has no DSpark capture (its drafter is not built)")
        return self.model.forward_packed(input_ids, batch, replay_from)

    def head_weight(self) -> torch.Tensor:
        return self.model.head.weight

    def logits(self, X: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """fp32 logits of final streams X (collapsed), as V41Transformer.forward computes them."""
        return ref.fp32_linear(self.model.norm(X), head)

    def forward(self, input_ids: torch.Tensor, state=None) -> torch.Tensor:
        return self.model(input_ids, state)

    def idle(self, mtp: bool = False) -> None:
        raise RuntimeError("DeepSeek-V4.1 runs on one rank: no rank is ever idle")


def is_v41_dir(path: str | Path) -> bool:
    """Whether `path` holds a DeepSeek-V4.1 config.json (False where there is none to read)."""
    import json

    from dayzero.v41.config import is_v41_config
    try:
        return is_v41_config(json.loads((Path(path) / "config.json").read_text()))
    except (OSError, ValueError):
        return False


def load_served(path: str | Path, dtype: torch.dtype | None, device: torch.device,
                progress: bool | None = None) -> ServedV41:
    """The V4.1 checkpoint at `path` loaded strictly (v41/loader.py, its tokenizer bound for Engram),
    ready for the engine. dtype None: fp32 on CPUs, bf16 elsewhere (as V4)."""
    import json

    from dayzero.loader.model_io import default_compute_dtype
    from dayzero.v41.loader import load_v41
    model = load_v41(path, dtype=dtype or default_compute_dtype(device), device=device, progress=progress)
    return ServedV41(model, eos_of(json.loads((Path(path) / "config.json").read_text())))
