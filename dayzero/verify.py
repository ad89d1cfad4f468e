"""`dayzero verify`: prove that a device computes the same model as the CPU reference.

1. Ops: every op of the device's table against its PyTorch twin on the CPU, on the shared cases
   (dayzero/ops/cases.py, with its variants: the attention over FP8-cache pools), fp32 and bf16;
   error relative to the reference output's max |value|. And batch invariance: every op computes
   a row with the same bits alone and in calls of more rows (dayzero/invariance.py).
2. End to end, in both numerics modes: the model on the device vs the CPU reference model in fp32
   on the same weights, for the built-in model and a V4-Flash-shaped slice with random
   official-format weights: KL(reference || device) of next-token distributions at every position
   of a prompt that crosses every compression boundary (mean, max and each position's in the JSON),
   the logprob error of the reference's top-1 token, top-1 agreement (every flip must be a near
   tie: within TIE_NATS of the reference's top-1 logprob), max logit error, greedy agreement.
3. The engine as `serve` runs it on the device (paged cache, chunked prefill, continuous batching,
   MTP drafts, CUDA graphs where the device has them), greedy on the built-in model: every token it
   emits must be the reference's top-1 given the same prefix or a near tie; again with the FP8 KV
   cache, whose tokens must be those of the first run (numerics="official": lossless storage).
   Batch invariance end to end, both modes: one request alone, in a crowd, and prefilled in
   7-token chunks beside other requests: its tokens and logprobs bit-identical or FAIL.
Prints a report card and writes JSON. Exit status 1 if anything fails.

`dayzero verify --weights DIR` instead scans every tensor of the checkpoint at DIR for NaN / inf
(dayzero/loader/finite.py: shard by shard, memory-mapped, so checkpoints larger than RAM work)
and reports each non-finite tensor; exit status 1 if there is one. Loading checks only the small
tensors (norms, scales, router bias, sinks, hc_*), which is cheap; this check is the complete one.
"""
from __future__ import annotations

import json
import platform
import time
from pathlib import Path

import torch

from dayzero.ops import OP_NAMES, OpTable, cases, for_device, ref
from dayzero.ops.kvfp8 import Fp8Rows

# end-to-end pass criteria: bf16 on a device vs fp32 on the CPU differ by rounding (measured with the
# native CPU kernels in bf16 vs fp32: the built-in model and a V4-Flash slice, official numerics:
# KL mean <= 3e-3, the reference top-1's logprob off by <= 0.17 nats, top-1 flips only where the
# reference ranks the device's choice within 0.14 nats of its own). So: mean KL <= MAX_KL, the
# logprob of the reference's top-1 within MAX_LOGPROB_ERROR nats at every position, and every top-1
# flip a near tie (within TIE_NATS). An op that moves a logprob by 1 nat fails (tests plant one).
MAX_KL, TIE_NATS, MAX_LOGPROB_ERROR = 0.02, 0.25, 0.5
MODES = ("official", "transformers")


def _as_tuple(x):
    return x if isinstance(x, tuple) else (x,)


def _to(obj, device):
    if isinstance(obj, torch.Tensor):
        return obj.to(device)
    if isinstance(obj, Fp8Rows):
        return Fp8Rows(obj.data.to(device), obj.layout)
    if isinstance(obj, (list, tuple)):
        return type(obj)(_to(o, device) for o in obj)
    return obj


def rel_error(got: torch.Tensor, want: torch.Tensor) -> float:
    """max |got - want| / max |want| over finite reference entries; inf if non-finite entries of
    the reference (e.g. -inf scores of missing keys) are not reproduced exactly."""
    got, want = got.detach().float().cpu(), want.detach().float().cpu()
    if got.shape != want.shape:
        return float("inf")
    fin = torch.isfinite(want)
    if not torch.equal(got[~fin], want[~fin]) or not torch.isfinite(got[fin]).all():
        return float("inf")
    if not fin.any():
        return 0.0
    scale = want[fin].abs().max().clamp(min=1e-30)
    return float((got[fin] - want[fin]).abs().max() / scale)


def check_ops(table: OpTable, device: torch.device, sizes=("tiny", "small")) -> list[dict]:
    rows = []
    for case in OP_NAMES + tuple(cases.VARIANTS):
        op = cases.VARIANTS.get(case, case)
        for size in sizes:
            for dtype in (torch.float32, torch.bfloat16):
                args, kw = cases.make(case, size, device, dtype)
                t0 = time.perf_counter()
                got = _as_tuple(getattr(table, op)(*args, **kw))
                if device.type == "cuda":
                    torch.cuda.synchronize(device)
                dt = time.perf_counter() - t0
                want = _as_tuple(getattr(ref, op)(*_to(args, "cpu"), **kw))
                err = max(rel_error(g, w) for g, w in zip(got, want))
                tol = cases.tolerance(op, dtype)
                rows.append(dict(op=op, case=case, size=size, dtype=str(dtype).removeprefix("torch."),
                                 impl="kernel" if op in table.kernels else "twin", rel_error=err,
                                 tolerance=tol, passed=err <= tol, seconds=round(dt, 4)))
    return rows


def _model_metrics(ref_model, dev_model, prompt: list[int], device: torch.device, new_tokens: int) -> dict:
    ids = torch.tensor([prompt])
    with torch.no_grad():
        want = ref_model(ids)[0].float()
        got = dev_model(ids.to(device))[0].float().cpu()
    lp_w, lp_g = want.log_softmax(-1), got.log_softmax(-1)
    kl = (lp_w.exp() * (lp_w - lp_g)).sum(-1)
    top = lp_w.argmax(-1, keepdim=True)
    choice = got.argmax(-1, keepdim=True)
    top1 = (top[:, 0] == choice[:, 0]).float().mean().item()
    gap = (lp_w.gather(-1, top) - lp_w.gather(-1, choice))[:, 0]  # nats the reference puts between them
    lp_err = (lp_w.gather(-1, top) - lp_g.gather(-1, top)).abs()[:, 0]
    greedy = []
    for model, dev in ((ref_model, torch.device("cpu")), (dev_model, device)):
        state, seq = model.new_state(), list(prompt)
        with torch.no_grad():
            logits = model(torch.tensor([seq], device=dev), state)[0, -1]
            out = []
            for _ in range(new_tokens):
                out.append(int(logits.argmax()))
                logits = model(torch.tensor([[out[-1]]], device=dev), state)[0, -1]
        greedy.append(out)
    same = next((i for i, (a, b) in enumerate(zip(*greedy)) if a != b), new_tokens)
    worst, err = float(gap.max()), float(lp_err.max())
    return dict(positions=len(prompt), top1_agreement=top1, worst_flip_nats=worst, logprob_error=err,
                logprob_error_position=int(lp_err.argmax()), kl_mean=float(kl.mean()), kl_max=float(kl.max()),
                kl_max_position=int(kl.argmax()), kl_per_position=[round(float(v), 8) for v in kl],
                max_logit_error=rel_error(got, want), greedy_identical_prefix=same, greedy_tokens=new_tokens,
                passed=worst <= TIE_NATS and err <= MAX_LOGPROB_ERROR and float(kl.mean()) <= MAX_KL)


def check_builtin(device: torch.device, choice: str | None, numerics: str, new_tokens: int = 16) -> dict:
    from dayzero.builtin import builtin_path
    from dayzero.loader.model_io import load_model
    from dayzero.tokenizer import Tokenizer
    path = builtin_path()
    ref_model = load_model(path, numerics=numerics, dtype=torch.float32, device="cpu", progress=False)
    dev_model = load_model(path, numerics=numerics, device=device, progress=False)
    dev_model.set_ops(for_device(device, choice))
    text = ("KING LEAR:\nAttend the lords of France and Burgundy, Gloucester.\n\nGLOUCESTER:\n"
            "I shall, my liege.\n\nKING LEAR:\nMeantime we shall express our darker purpose.\n")
    prompt = Tokenizer(path / "tokenizer.json").encode(text)
    return dict(model="builtin (shakespeare)", numerics=numerics,
                **_model_metrics(ref_model, dev_model, prompt, device, new_tokens))


def check_flash_slice(device: torch.device, choice: str | None, numerics: str, experts: int,
                      prompt_len: int = 260, new_tokens: int = 4) -> dict:
    from dayzero.synthetic import flash_slice, random_model
    args = flash_slice(n_routed_experts=experts)
    dev_model = random_model(args, device=device, numerics=numerics)
    ref_model = random_model(args, device=device, numerics=numerics, compute_dtype=torch.float32)
    ref_model = ref_model.to("cpu")  # the same weights (same seed), computed on the CPU in fp32
    dev_model.set_ops(for_device(device, choice))
    prompt = torch.randint(0, args.vocab_size, (prompt_len,), generator=torch.Generator().manual_seed(1)).tolist()
    return dict(model=f"V4-Flash slice (csa + hca layers, {experts} experts, random FP8/FP4)", numerics=numerics,
                **_model_metrics(ref_model, dev_model, prompt, device, new_tokens))


def check_engine(device: torch.device, choice: str | None, numerics: str, new_tokens: int = 24,
                 kv_cache_dtype: str = "auto") -> dict:
    """Greedy continuations of three prompts from the engine on the device (batched together,
    prefilled in 32-token chunks), each scored by the CPU fp32 reference over the prompt and the
    engine's own tokens: top-1 agreement along that trajectory and the worst flip."""
    from dayzero import LLM, SamplingParams
    from dayzero.builtin import builtin_path
    from dayzero.loader.model_io import load_model
    llm = LLM(device=device, ops=choice, numerics=numerics, max_num_batched_tokens=32, kv_cache_dtype=kv_cache_dtype)
    ref_model = load_model(builtin_path(), numerics=numerics, dtype=torch.float32, device="cpu", progress=False)
    texts = ["KING LEAR:\nAttend the lords of France and Burgundy, Gloucester.\n",
             "ROMEO:\nBut, soft! what light through yonder window breaks?\n", "First Citizen:\n"]
    outs = llm.generate(texts, SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True))
    agree, worst = [], 0.0
    for o in outs:
        seq = list(o.prompt_token_ids) + list(o.token_ids)
        with torch.no_grad():
            logits = ref_model(torch.tensor([seq]))[0, len(o.prompt_token_ids) - 1:-1].float()
        tok = torch.tensor(o.token_ids)[:, None]
        agree += (logits.argmax(-1) == tok[:, 0]).tolist()
        lp = logits.log_softmax(-1)
        worst = max(worst, float((lp.amax(-1) - lp.gather(-1, tok)[:, 0]).max()))  # nats below the top-1
    stats = llm.engine.stats()
    label = "" if kv_cache_dtype == "auto" else f", {kv_cache_dtype} KV cache"
    return dict(model=f"engine (builtin, greedy, 3 prompts batched{label})", kind="engine", numerics=numerics,
                tokens=len(agree), top1_agreement=sum(agree) / len(agree), worst_flip_nats=worst, graphs=stats["graphs"],
                mtp_acceptance=stats["spec_acceptance"], kv_cache_dtype=kv_cache_dtype,
                token_ids=[list(o.token_ids) for o in outs], passed=worst <= TIE_NATS)


def run(device: str | torch.device | None = None, choice: str | None = None, numerics: str = "both",
        slice_experts: int | None = None, out: str | None = None, skip_models: bool = False,
        sizes: tuple[str, ...] | None = None, table: OpTable | None = None) -> dict:
    """numerics: "official", "transformers" or "both" (the end-to-end checks in each; the engine's
    token check runs in official numerics, where FP8 rounding makes it strictest). sizes: op case
    sizes (default tiny + small; tiny only under the interpreter). table: check this op table
    instead of the device's (for testing the harness itself)."""
    from dayzero import invariance
    if numerics not in MODES + ("both",):
        raise ValueError(f"numerics must be one of {', '.join(MODES + ('both',))}, got {numerics!r}")
    modes = MODES if numerics == "both" else (numerics,)
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    table = table or for_device(device, choice)
    interpreted = device.type == "cpu" and table.kernels and table.name == "triton"
    sizes = sizes or (("tiny",) if interpreted else ("tiny", "small"))
    report = dict(device=torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor()
                  or device.type, device_type=device.type, ops_table=table.name, kernels=list(table.kernels),
                  numerics=list(modes), versions=_versions())
    report["ops"] = check_ops(table, device, sizes)
    report["invariance_ops"] = invariance.op_rows(table, device, sizes)
    report["models"] = []
    if not skip_models:
        for mode in modes:
            report["models"].append(check_builtin(device, choice, mode))
            report["models"].append(check_flash_slice(device, choice, mode, slice_experts
                                                      or (256 if device.type == "cuda" else 16)))
        engine_mode = "official" if "official" in modes else modes[0]
        auto = check_engine(device, choice, engine_mode)
        report["models"].append(auto)
        # the FP8 cache: under official numerics its rows are rounded so before they are stored,
        # so the engine must emit exactly the tokens of the compute-dtype cache
        fp8 = check_engine(device, choice, engine_mode, kv_cache_dtype="fp8")
        if engine_mode == "official":
            fp8["same_tokens_as_auto"] = fp8["token_ids"] == auto["token_ids"]
            fp8["passed"] = fp8["passed"] and fp8["same_tokens_as_auto"]
        report["models"].append(fp8)
        for mode in modes:
            report["models"].append(invariance.engine(device, choice, mode))
    report["passed"] = all(r["passed"] for r in report["ops"] + report["models"]) and all(
        r["invariant"] for r in report["invariance_ops"])
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1))
    return report


def _versions() -> dict:
    v = dict(torch=torch.__version__, python=platform.python_version())
    try:
        import triton
        v["triton"] = triton.__version__
    except ImportError:
        v["triton"] = None
    return v


def card(report: dict) -> str:
    modes = report["numerics"] if isinstance(report["numerics"], list) else [report["numerics"]]
    lines = [f"dayzero verify: {report['device']} ({report['device_type']}), ops table {report['ops_table']}, "
             f"numerics {' + '.join(modes)}", "", f"{'op':26s} {'size':6s} {'dtype':9s} {'impl':7s} "
             f"{'rel err':>10s} {'tol':>8s}  result"]
    for r in report["ops"]:
        lines.append(f"{r.get('case', r['op']):26s} {r['size']:6s} {r['dtype']:9s} {r['impl']:7s} {r['rel_error']:10.2e} "
                     f"{r['tolerance']:8.1e}  {'PASS' if r['passed'] else 'FAIL'}")
    inv = report.get("invariance_ops", [])
    if inv:
        bad = [r for r in inv if not r["invariant"]]
        lines += ["", f"batch invariance of the ops (a row alone vs in calls of {inv[0]['rows']} rows, bit for bit): "
                      + (f"{len(inv)} cases: PASS" if not bad else "FAIL")]
        lines += [f"  {r['case']:24s} {r['size']:6s} {r['dtype']:9s} rows {', '.join(r['differing_blocks'])} differ: FAIL"
                  for r in bad]
    for m in report["models"]:
        mode = f" [{m['numerics']}]" if m.get("numerics") else ""
        if m.get("kind") == "invariance":
            lines += ["", f"{m['model']}{mode}, ops {m['ops']}: {m['tokens']} tokens alone vs in a crowd "
                          f"{'identical' if m['crowd_identical'] else 'DIFFER at ' + str(m['crowd_first_difference'])}, "
                          f"vs chunked {'identical' if m['chunked_identical'] else 'DIFFER at ' + str(m['chunked_first_difference'])}"
                          f": {'PASS' if m['passed'] else 'FAIL'}"]
            continue
        if m.get("kind") == "engine":
            graphs = m["graphs"]
            used = (f"{graphs['recorded']} graphs recorded, {graphs['replays']} replays" if "recorded" in graphs
                    else f"no graphs ({graphs['off']})")
            same = ("" if "same_tokens_as_auto" not in m else
                    f", tokens {'identical to' if m['same_tokens_as_auto'] else 'DIFFER from'} the auto cache's")
            lines += ["", f"{m['model']}{mode}: {m['tokens']} tokens, top-1 agreement {m['top1_agreement']:.3f}, worst "
                          f"flip {m['worst_flip_nats']:.3f} nats (<= {TIE_NATS}), {used}{same}: "
                          f"{'PASS' if m['passed'] else 'FAIL'}"]
            continue
        lines += ["", f"{m['model']}{mode}: {m['positions']} positions: KL mean {m['kl_mean']:.2e} (<= {MAX_KL}) "
                      f"max {m['kl_max']:.2e} (position {m['kl_max_position']}), top-1 logprob error "
                      f"{m['logprob_error']:.3f} nats (<= {MAX_LOGPROB_ERROR}; position {m['logprob_error_position']}), "
                      f"top-1 agreement {m['top1_agreement']:.3f}, worst flip {m['worst_flip_nats']:.3f} nats "
                      f"(<= {TIE_NATS}), max logit error {m['max_logit_error']:.2e}, greedy identical for "
                      f"{m['greedy_identical_prefix']}/{m['greedy_tokens']} tokens: {'PASS' if m['passed'] else 'FAIL'}"]
    lines += ["", "RESULT: " + ("PASS" if report["passed"] else "FAIL")]
    return "\n".join(lines)


def run_weights(path: str | Path, out: str | None = None, quiet: bool = False) -> dict:
    """`dayzero verify --weights DIR`: the full non-finite scan of a checkpoint (loader/finite.py)."""
    from dayzero.loader.finite import scan_checkpoint
    report = scan_checkpoint(path, progress=None if quiet else lambda line: print(line, flush=True))
    report["versions"] = _versions()
    if out:
        Path(out).parent.mkdir(parents=True, exist_ok=True)
        Path(out).write_text(json.dumps(report, indent=1))
    return report


def weights_card(report: dict) -> str:
    lines = [f"dayzero verify --weights {report['path']}: {report['tensors']} tensors in {report['shards']} "
             f"shard(s), {report['bytes'] / 2**30:.2f} GiB scanned in {report['seconds']:.1f} s"]
    for r in report["non_finite"]:
        lines.append(f"  NON-FINITE {r['name']} ({r['dtype']} {r['shape']}) in {r['file']}: "
                     f"{r['count']} of {r['numel']} values are NaN or inf")
    lines.append("RESULT: " + ("PASS (every value is finite)" if report["passed"] else
                               f"FAIL ({len(report['non_finite'])} tensor(s) with NaN or inf)"))
    return "\n".join(lines)
