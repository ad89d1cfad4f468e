"""`dayzero` command line: generate | serve | chat | convert | toy | verify | tune | bench.

Input errors (bad flags or values, a missing or broken checkpoint) exit 2 with one line
`dayzero COMMAND: error: ...`, as argparse's own errors do; failures while running exit 1.
"""
from __future__ import annotations

import argparse
import json
import sys

V41_PRESET = "v41-flash"  # a tiny DeepSeek-V4.1 (dayzero/v41/toy.py); formats fp8 (default) and bf16
FORMATS = {
    "fp8": dict(quant="fp8", expert_dtype="fp4", dtype="bfloat16"),  # the hub's instruct layout
    "fp8-base": dict(quant="fp8", expert_dtype="fp8", dtype="bfloat16"),  # Base: FP8 experts, fp32 scales
    "bf16": dict(quant=None, expert_dtype=None, dtype="bfloat16"),
    "fp32": dict(quant=None, expert_dtype=None, dtype="float32"),
}


def _token_ids(text: str) -> list[int]:
    try:
        return [int(t) for t in text.replace(",", " ").split()]
    except ValueError:
        raise ValueError(f"--token-ids: expected integers separated by commas or spaces, got {text!r}") from None


def speculative_config(text: str | None) -> dict | None:
    """--speculative-config's JSON (vLLM's flag): {"method": "dspark" | "mtp", "num_speculative_tokens": k}."""
    if text is None:
        return None
    try:
        cfg = json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"--speculative-config: not JSON ({e}): {text!r}") from None
    from dayzero.engine.drafter import check_speculative_config
    try:
        check_speculative_config(cfg, None)
    except ValueError as e:
        raise ValueError(f"--speculative-config: {e}") from None
    return cfg


def add_speculative_arguments(p) -> None:
    """The speculation flags of generate and serve (vLLM's names; engine/drafter.py)."""
    p.add_argument("--speculative-config", default=None, metavar="JSON",
                   help='speculative decoding, e.g. \'{"method": "dspark", "num_speculative_tokens": 3}\' '
                        '(method "dspark" or "mtp"; num_speculative_tokens 0 turns it off; default: the '
                        "checkpoint's drafter, DSpark where it ships one, else MTP, at its full length; DSpark "
                        'also takes "confidence_threshold": t, cutting a block where its cumulative confidence < t, '
                        'and "model": a DSpark drafter directory or built-in drafter name (shakespeare-dspark) '
                        'loaded onto the target (DeepSeek-V4 only: DeepSeek-V4.1\'s DSpark is its checkpoint\'s own mtp.* '
                        'stages, run on one rank or over ranks; with --v41-bounded-replay its default is off and '
                        'asking for it is an error); '
                        '"draft_policy": "adaptive" (default: per request and step, the number of drafts that '
                        "maximises expected tokens per second from their acceptance probabilities and the measured "
                        'cost of a step, none where drafting does not pay) or "fixed" (every draft the budget holds))')
    p.add_argument("--num-speculative-tokens", type=int, default=None,
                   help="draft tokens per step for the checkpoint's drafter (MTP: 0 or 1; DSpark: up to its "
                        "block size); the same as num_speculative_tokens in --speculative-config")


def add_parallel_arguments(p) -> None:
    """The scale-out flags of generate and serve (vLLM's names; docs/SCALING.md)."""
    p.add_argument("--tensor-parallel-size", "-tp", type=int, default=1,
                   help="split the model over N ranks: N - 1 local processes are started (under torchrun: the "
                        "ranks torchrun started, N = their number); rank 0 schedules and samples")
    p.add_argument("--enable-expert-parallel", action="store_true",
                   help="with --tensor-parallel-size N: routed experts whole, E/N per rank (default: every expert "
                        "split by its inner dim); required by --data-parallel-size")
    p.add_argument("--data-parallel-size", "-dp", type=int, default=1,
                   help="DP-attention + EP over N ranks (with --enable-expert-parallel and --tensor-parallel-size 1): "
                        "each rank runs attention whole on its own requests, routed experts E/N per rank, tokens "
                        "all-gathered to the experts and reduce-scattered back; a request is placed on the rank "
                        "caching its prompt's prefix, within a load balance")
    p.add_argument("--cpu-experts", action="store_true",
                   help="hybrid placement: routed experts stay in host memory (memory-mapped) and run on the CPU's "
                        "native kernels; attention, dense layers and the shared expert run on --device (one GPU + "
                        "a big-RAM host); CUDA graphs off")


# the built-in model is a plain-text model sampled as docs/BUILTIN.md samples it; greedy decoding
# of a 13M-parameter model loops
BUILTIN_SAMPLING = {"temperature": 0.8, "top_p": 0.95}


def check_ops(ops: str | None, device) -> None:
    """--ops triton where Triton cannot run: an input error before any loading (was a traceback)."""
    if ops == "triton":
        from dayzero.engine.llm import resolve_device
        from dayzero.ops import triton_usable

        dev = resolve_device(device)
        if not triton_usable(dev):
            raise ValueError(f"--ops triton: Triton cannot run on {dev} (no triton, or a CPU); "
                             f"use --ops cpu or --ops ref there")


def is_builtin(model) -> bool:
    from dayzero.builtin import BUILTIN_NAMES, builtin_path
    from dayzero.engine.llm import resolve_model

    return resolve_model(model).resolve() in {builtin_path(n).resolve() for n in BUILTIN_NAMES}


def cmd_generate(a: argparse.Namespace) -> int:
    from dayzero import LLM, SamplingParams

    if (a.prompt is None) == (a.token_ids is None):
        raise ValueError("give exactly one of --prompt or --token-ids")
    prompt = a.prompt if a.prompt is not None else _token_ids(a.token_ids)
    if not prompt:  # as the server: an empty prompt is refused, not generated from
        raise ValueError(f"{'--prompt' if a.prompt is not None else '--token-ids'}: must not be empty")
    if a.max_tokens < 1:
        raise ValueError(f"--max-tokens: must be positive, got {a.max_tokens}")
    check_ops(a.ops, a.device)
    defaults = BUILTIN_SAMPLING if is_builtin(a.model) else {"temperature": 0.0, "top_p": 1.0}
    params = SamplingParams(temperature=defaults["temperature"] if a.temperature is None else a.temperature,
                            top_p=defaults["top_p"] if a.top_p is None else a.top_p, top_k=a.top_k,
                            min_p=a.min_p, max_tokens=a.max_tokens, seed=a.seed, stop=a.stop or None,
                            ignore_eos=a.ignore_eos)
    llm = LLM(a.model, device=a.device, dtype=a.dtype, numerics=a.numerics,
              max_num_batched_tokens=a.max_num_batched_tokens, enable_prefix_caching=not a.no_prefix_caching,
              num_speculative_tokens=a.num_speculative_tokens, kv_cache_memory_bytes=a.kv_cache_memory_bytes,
              speculative_config=speculative_config(a.speculative_config),
              ops=a.ops, enforce_eager=a.enforce_eager, kv_cache_dtype=a.kv_cache_dtype,
              tensor_parallel_size=a.tensor_parallel_size, enable_expert_parallel=a.enable_expert_parallel,
              data_parallel_size=a.data_parallel_size, cpu_experts=a.cpu_experts,
              v41_bounded_replay=a.v41_bounded_replay)
    try:
        # as the server: prompt + --max-tokens must fit the context (was silently capped)
        context = min(llm.args.max_seq_len, llm.engine.max_tokens)
        n = len(prompt) if isinstance(prompt, list) else len(llm.tokenizer.encode(prompt)) if llm.tokenizer else 0
        if n + a.max_tokens > context:
            raise ValueError(f"--max-tokens: {a.max_tokens} tokens after a {n}-token prompt exceed this model's "
                             f"{context}-token context (at most {max(context - n, 0)})")
        return _generate(llm, prompt, params, a)
    finally:
        llm.close()


def _generate(llm, prompt, params, a) -> int:
    show_ids = llm.tokenizer is None
    if a.stream:
        printed = 0
        out = None
        for tok, out in llm.stream(prompt, params):
            if show_ids:
                print(tok, end=" ", flush=True)
            else:
                print(out.text[printed:], end="", flush=True)
                printed = len(out.text)
        print()
    else:
        out = llm.generate([prompt], params)[0]
        print(" ".join(map(str, out.token_ids)) if show_ids else out.text)
    st = llm.engine.stats()
    mtp = (f", {st['spec_method']} acceptance {st['spec_acceptance']:.0%} of {st['spec_draft_tokens']} draft tokens, "
           f"{st['spec_mean_accepted_length']:.2f} accepted a step{'' if st['spec_enabled'] else ' (turned off)'}"
           if st["spec_draft_tokens"] else "")
    if st["spec_proposal_steps"]:
        mtp += (f", {st['spec_draft_policy']} draft length {st['spec_mean_draft_length']:.2f} "
                f"of {st['spec_num_speculative_tokens']}")
    print(f"[{len(out.token_ids)} tokens, finish_reason={out.finish_reason}{mtp}]", file=sys.stderr)
    return 0


def cmd_convert(a: argparse.Namespace) -> int:
    from dayzero.loader.convert import convert_hf

    out = convert_hf(a.src, a.dst, fmt=FORMATS[a.format], max_shard_bytes=int(a.max_shard_gb * 2**30),
                     overwrite=a.overwrite)
    print(f"wrote {out}")
    return 0


def cmd_toy(a: argparse.Namespace) -> int:
    from dayzero.loader.model_io import checkpoint_state
    from dayzero.loader.writer import save_state
    from dayzero.reference.model import Transformer
    import tempfile
    from pathlib import Path

    from dayzero.testing import DSPARK_TINY, TINY, random_state, tiny_args, tiny_tokenizer

    if a.preset == V41_PRESET:
        from dayzero.v41.toy import write_toy

        write_toy(a.dir, seed=a.seed, fmt=a.format, overwrite=a.overwrite)
        print(f"wrote a random-weight tiny DeepSeek-V4.1 ({a.preset}, {a.format}, with a toy tokenizer) to {a.dir}; "
              f"run it with `dayzero generate --model {a.dir}` or `dayzero serve --model {a.dir}` (docs/V41.md)")
        return 0
    if a.preset not in TINY and a.preset not in DSPARK_TINY:
        raise ValueError(f"--preset: unknown preset {a.preset!r} "
                         f"(one of {', '.join([*TINY, *DSPARK_TINY, V41_PRESET])})")
    args = tiny_args(a.preset) if a.preset in DSPARK_TINY else tiny_args(a.preset, n_mtp_layers=1)
    state = random_state(Transformer(args), seed=a.seed)
    target = args.replace(**FORMATS[a.format])
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tokenizer.json"
        tiny_tokenizer(tok, vocab_size=args.vocab_size)
        save_state(a.dir, checkpoint_state(target, state), target.to_hf_dict(), overwrite=a.overwrite,
                   tokenizer_json=tok)
    print(f"wrote a random-weight tiny DeepSeek-V4 ({a.preset}, {a.format}, with a toy tokenizer) to {a.dir}")
    return 0


def cmd_serve(a: argparse.Namespace) -> int:
    from dayzero.server.serve import serve

    check_ops(a.ops, a.device)
    return serve(a)


def cmd_chat(a: argparse.Namespace) -> int:
    from dayzero.server.client import chat_main

    return chat_main(a)


def _interpreter(a: argparse.Namespace) -> None:
    if getattr(a, "interpret", False):  # must precede the first import of a Triton kernel module
        import os
        os.environ["TRITON_INTERPRET"] = "1"


def cmd_verify(a: argparse.Namespace) -> int:
    if a.weights:
        from dayzero import verify
        report = verify.run_weights(a.weights, out=a.out)
        print(verify.weights_card(report))
        return 0 if report["passed"] else 1
    _interpreter(a)
    from dayzero import verify
    report = verify.run(device=a.device, choice=a.ops, numerics=a.numerics, slice_experts=a.slice_experts,
                        out=a.out, skip_models=a.ops_only)
    print(verify.card(report))
    if a.out:
        print(f"report written to {a.out}")
    return 0 if report["passed"] else 1


def cmd_tune(a: argparse.Namespace) -> int:
    _interpreter(a)
    from dayzero import tune
    tune.run(device=a.device, kernels=a.kernel)
    return 0


def cmd_bench(a: argparse.Namespace) -> int:
    _interpreter(a)
    from dayzero import bench
    bench.run(size=a.size, device=a.device, choice=a.ops, scenarios=tuple(a.scenario or bench.SCENARIOS),
              out_dir=a.out_dir, baseline=not a.no_baseline)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="dayzero", description="A faithful, portable DeepSeek-V4 runtime.")
    sub = p.add_subparsers(dest="command", required=True)

    g = sub.add_parser("generate", help="generate text or token ids from a checkpoint",
                       description="Continue a prompt. The built-in model (no --model) is a small plain-text "
                                   "model trained on Shakespeare, not an instruct model: give it text to continue.")
    g.add_argument("--model", default=None,
                   help="checkpoint directory in the official hub layout (default: the built-in model)")
    g.add_argument("--prompt", help="prompt text (needs the checkpoint's tokenizer.json)")
    g.add_argument("--token-ids", help="prompt as token ids, e.g. '0,17,42'")
    g.add_argument("--max-tokens", type=int, default=32, help="prompt + this must fit the model's context")
    g.add_argument("--temperature", type=float, default=None,
                   help="0 = greedy; default: 0.8 for the built-in model (docs/BUILTIN.md), else 0 (greedy)")
    g.add_argument("--top-p", type=float, default=None, help="default: 0.95 for the built-in model, else 1")
    g.add_argument("--top-k", type=int, default=-1)
    g.add_argument("--min-p", type=float, default=0.0)
    g.add_argument("--seed", type=int, default=None)
    g.add_argument("--stop", action="append", help="stop string (repeatable)")
    g.add_argument("--ignore-eos", action="store_true")
    g.add_argument("--numerics", choices=["official", "transformers"], default=None,
                   help="official (the default for DeepSeek-V4) or transformers (DeepSeek-V4.1's only mode, "
                        "its default)")
    g.add_argument("--device", default=None, help="cpu, cuda, cuda:1, ... (default: cuda if available)")
    g.add_argument("--dtype", default=None, help="compute dtype: float32 or bfloat16")
    g.add_argument("--ops", choices=["triton", "cpu", "ref"], default=None,
                   help="kernels: triton, cpu (native C kernels) or ref (the PyTorch twins); default: "
                        "triton on GPUs, cpu on CPUs where it builds, else ref")
    g.add_argument("--enforce-eager", action="store_true",
                   help="never replay decode steps from CUDA graphs (default: graphs on CUDA GPUs)")
    g.add_argument("--v41-bounded-replay", action="store_true",
                   help="DeepSeek-V4.1 only: bounded-replay prefill, an approximation (its decoder layers run on each "
                        "prompt's last window tokens; docs/V41.md); off: the exact prefill")
    g.add_argument("--kv-cache-dtype", choices=["auto", "fp8", "qat"], default="auto",
                   help="auto: cache rows in the compute dtype; fp8 (DeepSeek-V4): K=V rows stored as FP8 (blocks "
                        "of 64, power-of-two scales) + rope dims, 584 instead of 1024 bytes a V4 row; lossless "
                        "with --numerics official, which rounds them so anyway; qat (DeepSeek-V4.1): window rows, "
                        "compressed entries and indexer keys in the formats its QAT fake-quantisers produce (FP8, "
                        "FP4), lossless: 890 instead of 3,200 bytes a token for V4.1-Flash")
    add_parallel_arguments(g)
    g.add_argument("--stream", action="store_true", help="print tokens as they are produced")
    g.add_argument("--max-num-batched-tokens", type=int, default=1024, help="tokens per engine step (prefill chunk)")
    g.add_argument("--no-prefix-caching", action="store_true")
    add_speculative_arguments(g)
    g.add_argument("--kv-cache-memory-bytes", type=int, default=None,
                   help="KV cache budget per rank (default: the memory free after the weights, less a margin, "
                        "shared by the local CPU ranks; engine/capacity.py)")
    g.set_defaults(func=cmd_generate)

    from dayzero.server import client as chat_client, serve as serve_mod

    s = sub.add_parser("serve", help="HTTP server: OpenAI /v1/completions, /v1/chat/completions, /v1/responses "
                                     "and Anthropic /v1/messages",
                       description="Serve a checkpoint over HTTP. Chat requests use DeepSeek's own prompt format "
                                   "through deepseek-recipe. The built-in model (no --model) is a plain-text "
                                   "Shakespeare model, not an instruct model: its chat replies continue the "
                                   "rendered conversation as text (no thinking by default, 256 tokens, T=0.8).")
    serve_mod.add_arguments(s)
    s.set_defaults(func=cmd_serve)

    ch = sub.add_parser("chat", help="terminal chat client for a running `dayzero serve`",
                        description="Chat with a served model. The built-in model is a plain-text Shakespeare "
                                    "model, not an instruct model: expect verse, not answers.")
    chat_client.add_arguments(ch)
    ch.set_defaults(func=cmd_chat)

    c = sub.add_parser("convert", help="convert a transformers-saved DeepseekV4 directory to the official layout")
    c.add_argument("src", help="directory written by DeepseekV4ForCausalLM.save_pretrained")
    c.add_argument("dst", help="output directory")
    c.add_argument("--format", choices=sorted(FORMATS), default="bf16",
                   help="fp8 = the hub's FP8 weights + FP4 experts with E8M0 scales; fp8-base = FP8 experts "
                        "with fp32 scales; bf16/fp32 = dense")
    c.add_argument("--max-shard-gb", type=float, default=5.0)
    c.add_argument("--overwrite", action="store_true", help="replace checkpoint files already in dst")
    c.set_defaults(func=cmd_convert)

    t = sub.add_parser("toy", help="write a small random-weight DeepSeek-V4 (or, --preset v41-flash, V4.1) checkpoint "
                                   "(for trying things out)")
    t.add_argument("dir")
    t.add_argument("--preset", default="flash", help="flash (SWA+CSA+HCA, hash MoE, MTP), pro (HCA first), mixed, "
                        "flash-0731 (flash with DeepSeek's three-stage DSpark drafter in mtp.*, as V4-Flash-0731), "
                        "v41-flash (a tiny DeepSeek-V4.1 with Engram in the official V4.1 layout; fp8 or bf16 only; "
                        "generate / serve run it on one rank or over --tensor-parallel-size ranks: docs/V41.md)")
    t.add_argument("--format", choices=sorted(FORMATS), default="fp8")
    t.add_argument("--seed", type=int, default=0)
    t.add_argument("--overwrite", action="store_true")
    t.set_defaults(func=cmd_toy)

    v = sub.add_parser("verify", help="check every op and the engine on this device against the CPU reference")
    v.add_argument("--device", default=None, help="device to verify (default: cuda if available, else cpu)")
    v.add_argument("--ops", choices=["triton", "cpu", "ref"], default=None, help="op table (default: by device)")
    v.add_argument("--numerics", choices=["official", "transformers", "both"], default="both",
                   help="numerics mode(s) of the end-to-end checks (default: both)")
    v.add_argument("--slice-experts", type=int, default=None,
                   help="routed experts of the V4-Flash slice (default: 256 on a GPU, 16 on the CPU)")
    v.add_argument("--ops-only", action="store_true", help="skip the end-to-end model checks")
    v.add_argument("--weights", metavar="DIR", default=None,
                   help="instead: scan every tensor of the checkpoint at DIR for NaN/inf (shard by shard, "
                        "memory-mapped); exit 1 if any")
    v.add_argument("--out", default="verify.json", help="JSON report path ('' to skip)")
    v.add_argument("--interpret", action="store_true", help="run Triton kernels in the interpreter (CPU)")
    v.set_defaults(func=cmd_verify)

    tu = sub.add_parser("tune", help="autotune the Triton kernels for this device and cache the configs")
    tu.add_argument("--device", default=None)
    tu.add_argument("--kernel", action="append", help="only this kernel (repeatable)")
    tu.add_argument("--interpret", action="store_true", help="run Triton kernels in the interpreter (CPU)")
    tu.set_defaults(func=cmd_tune)

    b = sub.add_parser("bench", help="scenarios S1-S7 on V4-Flash shapes vs roofline and baselines")
    b.add_argument("--size", choices=["flash", "small"], default=None,
                   help="flash = real per-layer shapes (GPU); small = CPU-sized (default: by device)")
    b.add_argument("--device", default=None)
    b.add_argument("--ops", choices=["triton", "cpu", "ref"], default=None, help="op table (default: by device)")
    b.add_argument("--scenario", action="append", choices=["S1", "S2", "S3", "S4", "S5", "S6", "S7"],
                   help="run only this scenario (repeatable)")
    b.add_argument("--out-dir", default="bench/results", help="where bench.jsonl and the chart go")
    b.add_argument("--no-baseline", action="store_true", help="skip transformers' model (S4 baseline)")
    b.add_argument("--interpret", action="store_true", help="run Triton kernels in the interpreter (CPU)")
    b.set_defaults(func=cmd_bench)
    return p


def main(argv: list[str] | None = None) -> int:
    a = build_parser().parse_args(argv)
    try:
        return a.func(a)
    except (ValueError, FileExistsError) as e:
        print(f"dayzero {a.command}: error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
