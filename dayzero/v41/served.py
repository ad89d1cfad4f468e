"""DeepSeek-V4.1 in the engine (one rank or several, below): `ServedV41` is the seam between the V4.1
reference model (v41/model.py `V41Transformer`, loaded by v41/loader.py `load_v41`) and engine/engine.py +
worker.py.

The engine drives a model through a few attributes and calls (DESIGN.md seam 4); this module gives
V41Transformer exactly those, computing nothing of its own: `forward_packed(ids, Batch)` is the
model's (the paged cache is the Batch's cache, v41/cache.py says which groups it pages), `logits`
is the model's final norm and fp32 head (what `V41Transformer.forward` does), `forward` is the
model's full forward (`LLM.score`). `args` is the engine's view of the config (`EngineView`).

Ranks: tensor parallel (`tensor_parallel_size`) with or without expert parallel
(`enable_expert_parallel`), or DP-attention + EP (`data_parallel_size` with `enable_expert_parallel`),
runs the model's layout (distributed/layout.py, v41/model.py): each rank a ServedV41 over its slice, the
collectives installed by `set_comm`, driven by distributed/runtime.py and distributed/dp.py as V4 (a DP
rank with no requests joins the MoE layers' collectives: `idle`). Hybrid placement (`cpu_experts`): the
routed experts loaded into host memory (`load_served(..., cpu_experts=True)`) and run on the CPU's op
table (engine/worker.py `host_table`, `host_experts` here), as V4.

Speculation: V4.1's DSpark (v41/dspark.py) through the engine's drafter seam, with V4's options
(`num_speculative_tokens`, `speculative_config` method "dspark", confidence_threshold, draft_policy) and V4's
default (on, k = dspark_block_size, when the checkpoint has stages; k = 0 turns it off): `spec_of` decides
before loading whether the stages `mtp.*` are loaded (`load_served(..., drafter=True)`, every rank its slices
of them). On one rank and over the ranks above (TP, TP + EP, DP-attention + EP: engine/dspark_drafter.py on
every rank, as V4's); with bounded replay the default is off and asking for it is refused by name.

What is refused, by name, before anything runs (`check_engine_args`, also from `LLM`):
a separate drafter (`speculative_config` "model": V4.1's drafter is the checkpoint's own stages), method "mtp"
(V4.1 has no MTP module; the engine's `resolve` says so), kv_cache_dtype "fp8" (V4's packed format; V4.1 takes "qat", v41/kvpack.py), `numerics="official"` (only
transformers' semantics are built for V4.1);
recorded steps (CUDA graphs, trace) are off (`graphs_unsupported`).
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

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
    n_mtp_layers: int = 0  # V4.1 has no MTP module (its mtp.* are DSpark stages)
    dspark_stages: int = 0  # the DSpark stages loaded (0: the drafter is off)
    dspark_block_size: int = 0


def engine_view(v: V41Args, eos_token_id: int, stages: int) -> EngineView:
    return EngineView(v.vocab_size, v.window_size, v.max_seq_len, tuple(v.compress_ratios), v.n_layers, eos_token_id,
                      0, stages, v.dspark_block_size if stages else 0)


def spec_of(args: V41Args, eargs) -> tuple[str | None, int]:
    """(method, k) that an engine over this V4.1 config runs (engine/drafter.py `resolve`, on the config's
    stages): V4's options and default, on one rank or over tensor / expert / data parallel ranks; with
    bounded replay speculation is not built: off by default, refused by name when asked for."""
    from dayzero.engine.drafter import resolve

    spec = eargs.speculative_config or {}
    k = spec.get("num_speculative_tokens", eargs.num_speculative_tokens)
    if getattr(eargs, "v41_bounded_replay", False):
        if spec.get("method") is not None or k:
            raise ValueError("speculative decoding on DeepSeek-V4.1 with v41_bounded_replay=True is not built (its "
                             "DSpark drafter reads the target layers of the exact prefill); drop speculative_config / "
                             f"num_speculative_tokens {NOT_BUILT}")
        return None, 0
    return resolve(engine_view(args, 1, args.n_mtp_layers), eargs.speculative_config, eargs.num_speculative_tokens)


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
    if (eargs.speculative_config or {}).get("model") is not None:
        raise ValueError("speculative_config.model: DeepSeek-V4.1's DSpark drafter is the checkpoint's own mtp.* "
                         f"stages; a separate drafter is not built for V4.1 (drop 'model') {NOT_BUILT}")
    if getattr(eargs, "v41_bounded_replay", False) and eargs.data_parallel_size > 1:
        raise ValueError(f"v41_bounded_replay=True with data_parallel_size={eargs.data_parallel_size}: bounded replay "
                         f"under DP-attention is not built (each rank would need its requests' floors); use one rank or "
                         f"tensor parallel ranks {NOT_BUILT}")
    if eargs.kv_cache_dtype == "fp8":
        raise ValueError(f"kv_cache_dtype='fp8': DeepSeek-V4.1's cache has no packed FP8 rows of V4's format (FP8 "
                         f"nope + bf16 rope dims); use 'qat' (its rows in their QAT formats, lossless) or 'auto'")


class ServedV41(nn.Module):
    """A V41Transformer (or one rank's slice of it) as engine/worker.py drives a model; `mtp`: its DSpark
    stages when loaded with the drafter (engine/dspark_drafter.py drives them through `dspark_hidden` and
    `dspark_draft`), else none."""
    fp32_compressor_rows = True  # the pooled sources' "c:rows" are fp32, as the compressor computes them
    prepares_weights = False  # no kept copies for V4.1: FP8 32x32 linears run the table's fp8_linear (the CPU
    # kernel reads them in place) or, with the twins, dequantise per call
    graphs_unsupported = "DeepSeek-V4.1: recorded steps (CUDA graphs, trace) are not built for its forward"

    def __init__(self, model, eos_token_id: int = 1):
        super().__init__()
        self.model = model
        v: V41Args = model.args
        self.v41, self.numerics, self.compute_dtype = v, model.numerics, model.compute_dtype
        self.args = engine_view(v, eos_token_id, len(self.mtp))

    @property
    def mtp(self):
        return self.model.mtp if hasattr(self.model, "mtp") else ()

    @property
    def layout(self) -> Layout:
        return self.model.layout

    @property
    def group_comm(self):
        return self.model.group_comm

    def set_comm(self, comm) -> None:
        self.model.set_comm(comm)

    def check_engine_args(self, eargs) -> None:
        check_engine_args(eargs)
        if self.mtp:
            spec_of(self.v41, eargs)  # the drafter's own refusals (bounded replay)

    def cache_groups(self, block_size: int, with_mtp: bool = False, kv_cache_dtype: str = "auto"):
        assert not with_mtp or self.mtp, "speculation without the DSpark stages loaded (load_served(drafter=True))"
        return cache.v41_cache_groups(self.v41, block_size, kv_cache_dtype, len(self.mtp) if with_mtp else 0)

    def fixed_bytes_per_sequence(self, with_mtp: bool = False, kv_cache_dtype: str = "auto") -> int:
        return cache.fixed_bytes_per_sequence(self.v41, self.compute_dtype, kv_cache_dtype,
                                              len(self.mtp) if with_mtp else 0)

    def set_ops(self, table) -> None:
        from dayzero.reference.model import Transformer
        Transformer.set_ops(self, table)  # every UsesOps module's table, the FP4 experts grouped

    def forward_packed(self, input_ids: torch.Tensor, batch, captured=None, replay_from=None) -> torch.Tensor:
        """replay_from: each sequence's bounded-replay floor (engine option v41_bounded_replay; rows below
        a floor are NaN, v41/replay.py); None: the exact forward. captured: a dict that gets the DSpark
        target layers' entry streams (v41/model.py)."""
        return self.model.forward_packed(input_ids, batch, replay_from, captured)

    def dspark_hidden(self, captured: dict) -> torch.Tensor:
        """The DSpark capture of a forward, [N, T * dim] (v41/dspark.py `main_hidden`)."""
        from dayzero.v41.dspark import main_hidden
        return main_hidden(captured, self.v41)

    def dspark_draft(self, anchors: torch.Tensor, batch, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The draft blocks after `anchors` (v41/dspark.py `draft_block`): (h [n, k, dim], U [n, k, vocab])."""
        from dayzero.v41.dspark import draft_block
        return draft_block(self.model, self.mtp, anchors, batch, k)

    def head_weight(self) -> torch.Tensor:
        return self.model.head.weight

    def logits(self, X: torch.Tensor, head: torch.Tensor) -> torch.Tensor:
        """fp32 logits of final streams X (collapsed), as V41Transformer.forward computes them (over
        ranks: this rank's vocabulary slice of `head`, the slices all-gathered)."""
        return self.model.head_comm.all_gather(ref.fp32_linear(self.model.norm(X), head), -1)

    def forward(self, input_ids: torch.Tensor, state=None) -> torch.Tensor:
        return self.model(input_ids, state)

    def idle(self, mtp: bool = False) -> None:
        """DP-attention: a rank with no requests this step joins every MoE layer's collectives."""
        assert not mtp, "V4.1 has no MTP module (its DSpark stages join the collectives in dspark_step)"
        self.model.idle()

    def host_experts(self, table) -> int:
        """Hybrid placement (`cpu_experts`): every MoE layer's routed experts run on `table` (the
        host's op table) over weights in host memory (`load_served(..., cpu_experts=True)`), as V4's
        `Transformer.host_experts`. Returns the number of MoE layers placed."""
        from dayzero.reference.model import Transformer
        return Transformer.host_experts(self, table)


def is_v41_dir(path: str | Path) -> bool:
    """Whether `path` holds a DeepSeek-V4.1 config.json (False where there is none to read)."""
    import json

    from dayzero.v41.config import is_v41_config
    try:
        return is_v41_config(json.loads((Path(path) / "config.json").read_text()))
    except (OSError, ValueError):
        return False


def load_served(path: str | Path, dtype: torch.dtype | None, device: torch.device,
                progress: bool | None = None, layout: Layout = Layout(), cpu_experts: bool = False,
                drafter: bool = False) -> ServedV41:
    """The V4.1 checkpoint at `path` (this rank's slices under `layout`) loaded strictly (v41/loader.py,
    its tokenizer bound for Engram), ready for the engine. dtype None: fp32 on CPUs, bf16 elsewhere (as V4).
    `cpu_experts`: the routed experts stay in host memory (hybrid placement, engine/worker.py `host_table`).
    `drafter`: the DSpark stages `mtp.*` loaded too (strictly), for speculation (`spec_of`)."""
    import json

    from dayzero.loader.model_io import default_compute_dtype
    from dayzero.v41.loader import load_v41
    model = load_v41(path, dtype=dtype or default_compute_dtype(device), device=device, progress=progress,
                     layout=layout, cpu_experts=cpu_experts, drafter=drafter)
    return ServedV41(model, eos_of(json.loads((Path(path) / "config.json").read_text())))
