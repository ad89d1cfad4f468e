"""The offline API (DESIGN.md "Public API contract"): `LLM(...).generate(...)` and `.score(...)`.

`generate` runs on the engine (paged hybrid cache, continuous batching, chunked prefill, prefix
caching, MTP drafts); `score` is one full forward of the reference model on the same weights.
"""
from __future__ import annotations

import atexit
import itertools
import os
import sys
from dataclasses import dataclass, field, fields
from pathlib import Path
from typing import Sequence

import torch

from dayzero.builtin import BUILTIN_NAME, BUILTIN_NAMES, builtin_path
from dayzero.engine.engine import Engine, EngineArgs
from dayzero.engine.request import Request
from dayzero.engine.sampling import SamplingParams
from dayzero.distributed import runtime
from dayzero.distributed.layout import Layout
from dayzero.loader.model_io import load_model, read_args
from dayzero.tokenizer import Tokenizer
from dayzero.v41.loader import read_v41_args
from dayzero.v41.replay import refuse_v41_options
from dayzero.v41.served import check_engine_args, is_v41_dir, load_served, spec_of

_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16,
           "fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class GenerationOutput:
    prompt_token_ids: list[int]
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    logprobs: list[dict[int, float]] | None = None
    finish_reason: str | None = None  # "stop" (EOS, stop token or string), "length" or "abort"
    prompt: str | None = None
    error: str | None = None

    @classmethod
    def of(cls, r: Request) -> "GenerationOutput":
        return cls(prompt_token_ids=list(r.prompt_ids), token_ids=list(r.output_ids), text=r.text,
                   logprobs=None if r.logprobs is None else list(r.logprobs), finish_reason=r.finish_reason,
                   prompt=r.prompt, error=r.error)


def resolve_dtype(dtype) -> torch.dtype | None:
    if dtype is None or isinstance(dtype, torch.dtype):
        return dtype
    if isinstance(dtype, str) and dtype.lower() in _DTYPES:
        return _DTYPES[dtype.lower()]
    raise ValueError(f"dtype: expected one of {sorted(_DTYPES)} or a torch.dtype, got {dtype!r}")


def resolve_model(model: str | os.PathLike | None) -> Path:
    """None or a built-in model's name -> its directory inside the package; else the given path."""
    if model is None or (isinstance(model, str) and model in BUILTIN_NAMES and not Path(model).exists()):
        return builtin_path(model or BUILTIN_NAME)
    return Path(model)


def resolve_drafter(drafter) -> Path | None:
    """speculative_config "model": a DSpark drafter directory, or a built-in drafter's name -> its
    directory inside the package (loader/drafter_dir.py); None: the checkpoint's own drafter."""
    from dayzero.builtin import DRAFTER_NAMES, drafter_path
    if drafter is None:
        return None
    if isinstance(drafter, str) and drafter in DRAFTER_NAMES and not Path(drafter).exists():
        return drafter_path(drafter)
    return Path(drafter)


def resolve_device(device) -> torch.device:
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise ValueError(f"device: not a device name: {device!r}") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device: {device!r} requested but CUDA is not available here")
    return dev


class LLM:
    """tensor_parallel_size=N > 1 (or data_parallel_size=N > 1 with enable_expert_parallel:
    DP-attention + EP): the model is split over N ranks (distributed/layout.py); this
    process is rank 0 and starts the other N - 1 on this host, or, under torchrun, joins the ranks
    torchrun started (there `LLM(...)` returns on rank 0 only: the other ranks follow rank 0's
    steps and exit the process when it closes). `close()` stops the other ranks.

    numerics: "official" (default for DeepSeek-V4) or "transformers". A DeepSeek-V4.1 checkpoint
    (config.json model_type deepseek_v41) runs with "transformers" numerics only, on one rank or over
    tensor (and expert) parallel ranks, local or torchrun's (v41/served.py names what it refuses:
    a separate drafter, speculation with bounded replay, FP8 cache, "official"; DP-attention + EP, hybrid
    experts and its DSpark speculation over ranks run as for V4);
    `v41_bounded_replay=True` opts its prefills into bounded replay (docs/V41.md; refused for V4)."""

    def __init__(self, model: str | os.PathLike | None = None, device=None, dtype=None,
                 numerics: str | None = None, **engine_options):
        known = {f.name for f in fields(EngineArgs)}
        unknown = sorted(set(engine_options) - known)
        if unknown:
            raise TypeError(f"LLM: unknown engine option(s) {unknown}; known: {sorted(known)}")
        eargs = EngineArgs(**engine_options)
        path = resolve_model(model)
        self.device = resolve_device(device)
        dt = resolve_dtype(dtype)
        tp, ep, dp = eargs.tensor_parallel_size, eargs.enable_expert_parallel, eargs.data_parallel_size
        drafter = resolve_drafter((eargs.speculative_config or {}).get("model"))  # a DSpark drafter of its own
        self.group = None
        v41 = is_v41_dir(path)  # DeepSeek-V4.1: numerics "transformers", TP / TP + EP (v41/served.py)
        v41_drafter = False
        if v41:
            check_engine_args(eargs, numerics)
            v41_drafter = spec_of(read_v41_args(path)[0], eargs)[0] == "dspark"  # load its DSpark stages
        else:
            refuse_v41_options(eargs)  # before loading: v41_bounded_replay names a V4.1-only option
        numerics = "transformers" if v41 else numerics or "official"
        if tp * dp > 1 or runtime.torchrun_env() is not None:
            # an impossible layout fails before any rank starts
            Layout(tp, 0, ep, dp).check(read_v41_args(path)[0] if v41 else read_args(path))
            if v41_drafter:  # V4.1's DSpark stages have their own expert bank (v41/dspark.py)
                from dayzero.v41.dspark import check_layout
                check_layout(read_v41_args(path)[0], Layout(tp, 0, ep, dp))
            load = {"path": str(Path(path).resolve()), "numerics": numerics, "ep": ep, "tp": tp, "dp": dp,
                    "cpu_experts": eargs.cpu_experts, "drafter": None if drafter is None else str(drafter.resolve()),
                    "dtype": None if dt is None else str(dt).removeprefix("torch."), "v41": v41,
                    "v41_drafter": v41_drafter}
            self.group = runtime.join(tp * dp, self.device, load)
        rank = self.group.rank if self.group else 0
        try:
            dev = self.group.device if self.group else self.device
            if v41:
                self.model = load_served(path, dt, dev, progress=None if rank == 0 else False,
                                         layout=Layout(tp, rank, ep, dp), cpu_experts=eargs.cpu_experts,
                                         drafter=v41_drafter)
            else:
                self.model = load_model(path, numerics=numerics, dtype=dt, device=dev,
                                        progress=None if rank == 0 else False, layout=Layout(tp, rank, ep, dp),
                                        cpu_experts=eargs.cpu_experts, drafter=drafter)
            if self.group is not None:
                self.model.set_comm(self.group.comm)
                if rank != 0:  # torchrun: this process follows rank 0's steps, then exits
                    self.group.follow(self.model)
                    raise SystemExit(0)
            self._start(path, eargs, self.model, dev)
        except BaseException:
            self.close()
            raise
        if self.group is not None:
            atexit.register(self.close)

    def _start(self, path: Path, eargs: EngineArgs, model, device=None) -> None:
        self.model, self.args = model, model.args
        tok_file = path / "tokenizer.json"
        self.tokenizer = Tokenizer(tok_file) if tok_file.is_file() else None
        self.engine = Engine(model, eargs, device or self.device, self.tokenizer, ranks=self.group,
                             prepare_weights=True)
        print(self.engine.memory_line(), file=sys.stderr)
        self._ids = itertools.count()

    def close(self) -> None:
        """Stop the other ranks (tensor_parallel_size > 1); nothing to do for one rank."""
        group = getattr(self, "group", None)
        if group is not None and not group.closed:
            group.close()

    def __enter__(self) -> "LLM":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    # ---- inputs ------------------------------------------------------------------------------
    def _token_ids(self, prompt) -> tuple[list[int], str | None]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("this checkpoint ships no tokenizer.json: pass prompts as lists of token ids")
            return self.tokenizer.encode(prompt), prompt
        ids = list(prompt)
        if not ids:
            raise ValueError("empty prompt: at least one token is needed")
        for t in ids:
            if isinstance(t, bool) or not isinstance(t, int) or not 0 <= t < self.args.vocab_size:
                raise ValueError(f"prompt token {t!r} is not an id in [0, {self.args.vocab_size})")
        return ids, None

    def _decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(ids) if self.tokenizer is not None else ""

    # ---- API ---------------------------------------------------------------------------------
    @torch.no_grad()
    def score(self, token_ids: Sequence[int]) -> torch.Tensor:
        """Next-token logits at every position of one sequence: [len, vocab] fp32 (one full forward;
        always the exact prefill, also with v41_bounded_replay, whose dropped rows have no logits)."""
        ids, _ = self._token_ids(token_ids)
        return self.engine.runner.score(ids)

    def generate(self, prompts, sampling_params: SamplingParams | Sequence[SamplingParams] | None = None,
                 ) -> list[GenerationOutput]:
        if isinstance(prompts, str) or (isinstance(prompts, (list, tuple)) and prompts
                                        and isinstance(prompts[0], int)):
            prompts = [prompts]
        params = sampling_params or SamplingParams()
        if isinstance(params, SamplingParams):
            params = [params] * len(prompts)
        if len(params) != len(prompts):
            raise ValueError(f"{len(params)} SamplingParams for {len(prompts)} prompts")
        encoded = [self._token_ids(p) for p in prompts]  # validate all before running any
        for ids, _ in encoded:
            if len(ids) >= self.args.max_seq_len:
                raise ValueError(f"prompt of {len(ids)} tokens leaves no room in the "
                                 f"{self.args.max_seq_len}-token context")
        reqs = [self.engine.add_request(f"gen-{next(self._ids)}", ids, p, text)
                for (ids, text), p in zip(encoded, params)]
        try:
            while any(not r.finished for r in reqs):
                self.engine.step()
        finally:
            for r in reqs:
                self.engine.abort(r.rid)
        return [GenerationOutput.of(r) for r in reqs]

    def stream(self, prompt, params: SamplingParams | None = None):
        """Yield (token_id, GenerationOutput so far) as each token is produced."""
        ids, text = self._token_ids(prompt)
        req = self.engine.add_request(f"stream-{next(self._ids)}", ids, params or SamplingParams(), text)
        sent = 0
        try:
            while not req.finished or sent < len(req.output_ids):
                if sent == len(req.output_ids):
                    self.engine.step()
                while sent < len(req.output_ids):
                    sent += 1
                    out = GenerationOutput.of(req)
                    if not req.finished or sent < len(req.output_ids):
                        out.token_ids = out.token_ids[:sent]
                        out.text = self._decode(out.token_ids)
                    yield req.output_ids[sent - 1], out
        finally:
            self.engine.abort(req.rid)
