"""dayzero vs llama.cpp on CPUs, side by side on the same DeepSeek-V4 weights (issue 25).

    python -m bench.vs_llamacpp --build                 # once: llama.cpp from the llama-cpp-python sdist
    python -m bench.vs_llamacpp [--quick] [--models builtin,toy,flash2] [--threads 2]
    python -m bench.vs_llamacpp --models flash2 --contexts 8192 --batches "" --no-prefill   # some cases only

llama.cpp is the one vendored in the PyPI sdist of llama-cpp-python 0.3.36, built with cmake
(Release, GGML_NATIVE, OpenMP) into ~/.cache/dayzero/llamacpp (--llamacpp-dir) only with --build;
it is never a dependency of dayzero. `--llamacpp-variant noamx` (with --build and with the runs) is
the same build without AMX (-march=native -mno-amx-*: bin-noamx/), for CPUs with AMX, where the native
build's AMX buffers abort these models unless weight repacking is off (`--llamacpp-repack`).
Checkpoints are written with dayzero's own writer and converted with llama.cpp's own
convert_hf_to_gguf.py:

  builtin  the built-in model (a copy). llama.cpp hard-codes the HCA compression ratio 128; this
           model's is 32, so it runs on a copy of llama.cpp's tools built with exactly three lines
           changed from 128 to 32 (bench/llamacpp_build.py PATCHES). Its weights and GGUF are as converted.
  toy      a tiny random V4 (`dayzero toy --preset flash` with ratios 4 and 128, FP8 + FP4 experts)
  flash2   2 layers with V4-Flash shapes (CSA + HCA, 256 FP4 experts, hidden 4096), vocab 4096

The converter refuses tokenizers it does not know by hash; these are ByteLevel BPE with GPT-2's
regex, so it runs with that look-up answering "gpt-2" (nothing else changed).

Both runtimes run alternating (llama.cpp, then dayzero, per repetition) in this process tree, with
the same thread count, flash attention on in llama.cpp, dayzero without speculation or prefix
caching (llama.cpp's tools use neither). Per model: decode at batch 1 after a 512-token and an 8K
prompt (llama-bench -d), aggregate decode at batches 8 and 32 (128-token prompts, llama-batched-
bench), prefill of 512 tokens (llama-bench -p). Printed: tokens/s, GB/s of weights touched per
decode step (the checkpoint's bytes: every tensor but the embedding and the MTP layers, routed
experts as the expected number touched by the batch), its fraction of the copy bandwidth measured
in the same run (as `dayzero bench` measures it), and dayzero / llama.cpp. Greedy agreement on the
built-in model (64 tokens) is printed. Records: bench/results/vs_llamacpp-<date>.json.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
from bench import llamacpp_build as lc  # noqa: E402

MODELS = ("builtin", "toy", "flash2")
RESULTS = Path(__file__).parent / "results"
GREEDY_PROMPT = "ROMEO:\nBut soft, what light through yonder window breaks?\n"


@dataclass(frozen=True)
class Spec:
    """One checkpoint of the comparison: what dayzero writes and how llama.cpp must run it."""
    name: str
    what: str
    hca_ratio: int = 128  # the llama.cpp build it needs (bin/ or bin-hca<R>/)
    contexts: tuple[int, ...] = (512, 8192)  # batch-1 decode after prompts of these lengths
    batches: tuple[int, ...] = (8, 32)
    greedy: bool = False
    args_changes: dict = field(default_factory=dict)


def specs(quick: bool = False) -> dict[str, Spec]:
    ctx = (512,) if quick else (512, 8192)
    return {
        "builtin": Spec("builtin", "the built-in model (shakespeare), copied", hca_ratio=32,
                        contexts=(512,) if quick else (512, 2048), greedy=True),  # max_position_embeddings 4096
        "toy": Spec("toy", "tiny random V4: toy --preset flash, ratios 4 and 128, fp8",
                    contexts=ctx, args_changes=dict(compress_ratios=(0, 4, 128, 4, 128), n_mtp_layers=1)),
        "flash2": Spec("flash2", "2 layers with V4-Flash shapes (csa+hca, 256 FP4 experts, hidden 4096), vocab 4096",
                       contexts=ctx, batches=(8,) if quick else (8, 32)),
    }


def model_args(spec: Spec):
    """The ModelArgs dayzero writes for `spec` (not for the built-in model, which is copied)."""
    if spec.name == "toy":
        from dayzero.cli import FORMATS
        from dayzero.testing import tiny_args
        return tiny_args("flash", **spec.args_changes).replace(**FORMATS["fp8"])
    if spec.name == "flash2":
        from dayzero.synthetic import flash_slice
        return flash_slice(layer_types=("csa", "hca"), n_routed_experts=256, vocab_size=4096)
    raise ValueError(f"model {spec.name!r} is copied, not written; one of {', '.join(MODELS)}")


def write_checkpoint(spec: Spec, d: Path, log=print) -> Path:
    """Write (once) the official-layout checkpoint of `spec` into `d` with dayzero's writer."""
    import shutil
    import tempfile

    from dayzero.loader.writer import save_state
    if (d / "config.json").is_file():
        return d
    if spec.name == "builtin":
        from dayzero.builtin import builtin_path
        shutil.copytree(builtin_path(), d)
        return d
    from dayzero.testing import tiny_tokenizer
    args = model_args(spec)
    log(f"writing {spec.name} ({spec.what}) to {d}")
    if spec.name == "toy":
        from dayzero.loader.model_io import checkpoint_state
        from dayzero.reference.model import Transformer
        from dayzero.testing import random_state
        dense = args.replace(quant=None, expert_dtype=None, dtype="float32")
        state = checkpoint_state(args, random_state(Transformer(dense), seed=0))
    else:
        from dayzero.synthetic import random_model
        state = random_model(args).state_dict()
    with tempfile.TemporaryDirectory() as tmp:
        tok = Path(tmp) / "tokenizer.json"
        tiny_tokenizer(tok, vocab_size=args.vocab_size)
        save_state(d, state, args.to_hf_dict(), tokenizer_json=tok)
    return d


# ---- arithmetic ----------------------------------------------------------------------------------
def weight_bytes(tensors: dict[str, int], n_experts: int, k: int, batch: int) -> int:
    """Bytes of weights one decode step of `batch` tokens reads, from {tensor name: bytes} of the
    checkpoint: all but the embedding and MTP layers, routed experts scaled to the expected number
    touched (E * (1 - (1 - k/E)^batch)), as dayzero.scenarios counts them."""
    touched = n_experts * (1 - (1 - k / n_experts) ** batch)
    total = 0.0
    for name, n in tensors.items():
        if name == "embed.weight" or name.startswith("mtp."):
            continue
        total += n * touched / n_experts if ".experts." in name else n
    return int(total)


def checkpoint_tensor_bytes(d: Path) -> dict[str, int]:
    from safetensors import safe_open
    out = {}
    for f in sorted(Path(d).glob("*.safetensors")):
        with safe_open(str(f), "pt") as st:
            for name in st.keys():
                sl = st.get_slice(name)
                n = 1
                for s in sl.get_shape():
                    n *= s
                out[name] = n * _DTYPE_BYTES[sl.get_dtype()]
    return out


_DTYPE_BYTES = {"F32": 4, "BF16": 2, "F16": 2, "F8_E4M3": 1, "F8_E8M0": 1, "I8": 1, "U8": 1, "I64": 8, "I32": 4}


def row(model: str, case: str, ll: float | None, dz: float | None, nbytes: int | None, bandwidth: float,
        tokens_per_step: int = 1) -> dict:
    """One line of the comparison from tokens/s of both: GB/s of weights touched (nbytes per step
    of `tokens_per_step` tokens), its fraction of `bandwidth` (bytes/s) and dayzero / llama.cpp."""
    r = dict(model=model, case=case, llamacpp_tok_s=ll, dayzero_tok_s=dz, ratio=None, weight_bytes=nbytes)
    if ll and dz:
        r["ratio"] = dz / ll
    for who, ts in (("llamacpp", ll), ("dayzero", dz)):
        gbs = None if (ts is None or nbytes is None) else nbytes * ts / tokens_per_step
        r[f"{who}_gb_s"] = None if gbs is None else gbs / 1e9
        r[f"{who}_copy_fraction"] = None if gbs is None else gbs / bandwidth
    return r


def fmt_row(r: dict) -> str:
    def f(v, spec):
        return "-" if v is None else format(v, spec)
    return (f"{r['model']:7s} {r['case']:28s} llama.cpp {f(r['llamacpp_tok_s'], '9.1f')} tok/s "
            f"{f(r['llamacpp_gb_s'], '6.2f')} GB/s ({f(r['llamacpp_copy_fraction'] and 100 * r['llamacpp_copy_fraction'], '5.1f')}%)"
            f" | dayzero {f(r['dayzero_tok_s'], '9.1f')} tok/s {f(r['dayzero_gb_s'], '6.2f')} GB/s "
            f"({f(r['dayzero_copy_fraction'] and 100 * r['dayzero_copy_fraction'], '5.1f')}%) | "
            f"dayzero/llama.cpp {f(r['ratio'], '.2f')}x")


# ---- dayzero side --------------------------------------------------------------------------------
def dz_run(llm, prompts: list[list[int]], new_tokens: int) -> tuple[float, float, int]:
    """Run `prompts` together on dayzero's engine (greedy, EOS ignored): seconds until every request
    has its first token (prefill), seconds and tokens of the decode steps after that."""
    from dayzero import SamplingParams
    p = SamplingParams(temperature=0, max_tokens=new_tokens, ignore_eos=True)
    eng = llm.engine
    reqs = [eng.add_request(f"vs-{time.monotonic_ns()}-{i}", ids, p) for i, ids in enumerate(prompts)]
    try:
        t0 = time.perf_counter()
        while not all(r.output_ids for r in reqs):
            eng.step()
        t1 = time.perf_counter()
        n1 = sum(len(r.output_ids) for r in reqs)
        while not all(r.finished for r in reqs):
            eng.step()
        t2 = time.perf_counter()
        n2 = sum(len(r.output_ids) for r in reqs)
    finally:
        for r in reqs:
            eng.abort(r.rid)
    return t1 - t0, t2 - t1, n2 - n1


def random_prompts(n: int, length: int, vocab: int, seed: int) -> list[list[int]]:
    import torch
    g = torch.Generator().manual_seed(seed)
    return torch.randint(4, vocab, (n, length), generator=g).tolist()


# ---- driver --------------------------------------------------------------------------------------
def parse_args(argv=None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(prog="python -m bench.vs_llamacpp", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--build", action="store_true", help="download the sdist and build llama.cpp's tools, then exit")
    ap.add_argument("--llamacpp-dir", type=Path, default=lc.DEFAULT_DIR,
                    help=f"llama.cpp cache directory (default {lc.DEFAULT_DIR})")
    ap.add_argument("--jobs", type=int, default=2, help="build jobs (default 2)")
    ap.add_argument("--models", default=",".join(MODELS), help=f"comma-separated, of {', '.join(MODELS)}")
    ap.add_argument("--work-dir", type=Path, default=None,
                    help="checkpoints and GGUFs (default <llamacpp-dir>/models; kept between runs)")
    ap.add_argument("--threads", type=int, default=2, help="threads for both runtimes (default 2)")
    ap.add_argument("--reps", type=int, default=None, help="alternating repetitions (default 3, --quick 1)")
    ap.add_argument("--new-tokens", type=int, default=None, help="decode tokens per measurement (default 32, --quick 16)")
    ap.add_argument("--kv-cache-gb", type=float, default=2.0,
                    help="dayzero's cache budget (default 2 GiB: these runs need far less than the free memory)")
    ap.add_argument("--quick", action="store_true", help="one repetition, 512 context only, batch 8 only on flash2")
    ap.add_argument("--contexts", default=None,
                    help="batch-1 decode contexts, comma-separated, for every model (default per model: 512,8192; "
                         "the built-in model 512,2048)")
    ap.add_argument("--batches", default=None, help="decode batch sizes, comma-separated (default 8,32)")
    ap.add_argument("--no-prefill", action="store_true", help="skip the 512-token prefill case")
    ap.add_argument("--llamacpp-variant", choices=lc.VARIANTS, default="native",
                    help="which llama.cpp build --build makes and the runs use: native (GGML_NATIVE, bin/) or noamx "
                         "(-march=native without AMX, bin-noamx/: on a CPU with AMX the native build's AMX buffers "
                         "abort these models with repacking on)")
    ap.add_argument("--llamacpp-repack", choices=("auto", "on", "off"), default="auto",
                    help="llama.cpp's weight repacking (its CPU extra buffer types; on by default in its tools). "
                         "auto: on, unless a two-token probe per model aborts on a ggml assertion with it on and runs with it off (seen on a "
                         "Xeon with AMX); then off for that model, printed and recorded per row")
    ap.add_argument("--out", type=Path, default=RESULTS, help="directory of the JSON record (default bench/results)")
    a = ap.parse_args(argv)
    bad = [m for m in a.models.split(",") if m not in MODELS]
    if bad or not a.models:
        ap.error(f"--models: unknown model(s) {bad} (choose from {', '.join(MODELS)})")
    a.models = a.models.split(",")
    if a.threads < 1:
        ap.error(f"--threads: must be >= 1, got {a.threads}")
    for name in ("contexts", "batches"):
        val = getattr(a, name)
        if val is not None:
            try:
                nums = tuple(int(x) for x in val.split(",") if x)
            except ValueError:
                nums = ()
            if any(n < 1 for n in nums):
                nums = ()
            if not nums and val != "":
                ap.error(f"--{name}: expected positive integers separated by commas, got {val!r}")
            setattr(a, name, nums)
    a.reps = a.reps or (1 if a.quick else 3)
    a.new_tokens = a.new_tokens or (16 if a.quick else 32)
    a.work_dir = a.work_dir or a.llamacpp_dir / "models"
    return a


def main(argv=None) -> int:
    a = parse_args(argv)
    try:
        if a.build:
            lc.build(a.llamacpp_dir, jobs=a.jobs, variant=a.llamacpp_variant)
            return 0
        return run(a)
    except lc.LlamaCppError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def run(a: argparse.Namespace, log=print) -> int:
    all_specs = specs(a.quick)
    chosen = [all_specs[m] for m in a.models]
    if a.contexts is not None or a.batches is not None:
        from dataclasses import replace
        chosen = [replace(s, contexts=s.contexts if a.contexts is None else a.contexts,
                          batches=s.batches if a.batches is None else a.batches) for s in chosen]
    bins = {s.hca_ratio: lc.require_built(a.llamacpp_dir, s.hca_ratio, a.llamacpp_variant)
            for s in chosen}  # fail before any work

    import torch

    from dayzero import LLM
    from dayzero.scenarios import peaks
    torch.set_num_threads(a.threads)
    bw = peaks(torch.device("cpu"))["bandwidth"]
    log(f"copy bandwidth {bw / 1e9:.1f} GB/s (as `dayzero bench` measures it); {a.threads} threads; "
        f"{a.reps} alternating repetition(s)")
    rows, greedy = [], {}
    for s in chosen:
        d = write_checkpoint(s, a.work_dir / s.name, log)
        gguf = lc.convert(a.llamacpp_dir, d, a.work_dir / f"{s.name}.gguf", log=log)
        b = bins[s.hca_ratio]
        repack = lc.pick_repack(a.llamacpp_repack, b, gguf, a.threads, log)
        tensors = checkpoint_tensor_bytes(d)
        cfg = json.loads((d / "config.json").read_text())
        E, k, vocab = cfg["n_routed_experts"], cfg["num_experts_per_tok"], cfg["vocab_size"]
        llm = LLM(str(d), device="cpu", num_speculative_tokens=0, enable_prefix_caching=False,
                  kv_cache_memory_bytes=int(a.kv_cache_gb * 2**30))
        dz_run(llm, random_prompts(1, 16, vocab, 99), 4)  # warm-up (kernel builds, first-call costs)
        meas: dict[str, tuple[list, list]] = {}
        n = a.new_tokens

        def both(case, ll_fn, dz_fn):
            m = meas.setdefault(case, ([], []))
            m[0].append(ll_fn())
            m[1].append(dz_fn())

        for rep in range(a.reps):
            for c in s.contexts:
                both(f"decode b1 after {c}", lambda: lc.bench_tokens(b, gguf, a.threads, gen=n, depth=c),
                     lambda: (lambda r: r[2] / r[1])(dz_run(llm, random_prompts(1, c, vocab, rep), n)))
            for B in s.batches:
                both(f"decode b{B} (128-tok prompts)",
                     lambda: lc.batched_decode(b, gguf, a.threads, B, 128, n)["speed_tg"],
                     lambda: (lambda r: r[2] / r[1])(dz_run(llm, random_prompts(B, 128, vocab, rep), n)))
            if not a.no_prefill:
                both("prefill 512", lambda: lc.bench_tokens(b, gguf, a.threads, prompt=512),
                     lambda: 512 / dz_run(llm, random_prompts(1, 512, vocab, rep), 1)[0])
        for case, (ll, dz) in meas.items():
            B = int(case.split()[1][1:]) if case.startswith("decode") else None
            nbytes = weight_bytes(tensors, E, k, B) if B else None
            r = row(s.name, case, statistics.median(ll), statistics.median(dz), nbytes, bw, tokens_per_step=B or 1)
            r.update(llamacpp_all=ll, dayzero_all=dz, llamacpp_repack=repack)
            rows.append(r)
            log(fmt_row(r))
        if s.greedy:
            try:
                greedy = greedy_agreement(llm, b, gguf, 64, log)
            except lc.LlamaCppError as e:  # llama-simple has no repacking switch: it aborts where repacking does
                first = next((ln for ln in str(e).splitlines() if lc.REPACK_ABORT in ln), str(e).splitlines()[0])
                greedy = dict(model=s.name, error=first.strip())
                log(f"greedy agreement not measured: llama-simple failed ({first.strip()})")
        del llm
    record = dict(date=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()), threads=a.threads, reps=a.reps,
                  quick=a.quick, new_tokens=a.new_tokens, copy_bandwidth=bw, llamacpp=f"llama-cpp-python {lc.SDIST_VERSION} sdist",
                  llamacpp_variant=a.llamacpp_variant, llamacpp_cmake=list(lc.cmake_flags(a.llamacpp_variant)),
                  hca_patch=[p[0] + ": " + p[1] for p in lc.PATCHES], rows=rows, greedy=greedy,
                  environment=_environment())
    a.out.mkdir(parents=True, exist_ok=True)
    path = a.out / f"vs_llamacpp-{time.strftime('%Y%m%d-%H%M%S')}{'-quick' if a.quick else ''}.json"
    path.write_text(json.dumps(record, indent=1) + "\n")
    log(f"wrote {path}")
    return 0


def greedy_agreement(llm, bdir: Path, gguf: Path, n: int, log=print) -> dict:
    """64 greedy tokens from both on GREEDY_PROMPT: the prompt's token ids from both tokenizers and
    the continuation texts, compared."""
    from dayzero import SamplingParams
    ids = llm.tokenizer.encode(GREEDY_PROMPT)
    ll_ids = lc.tokenize(bdir, gguf, GREEDY_PROMPT)
    out = llm.generate([ids], SamplingParams(temperature=0, max_tokens=n))[0]
    dz_text = llm.tokenizer.decode(ids + out.token_ids)
    ll_text = lc.greedy_text(bdir, gguf, GREEDY_PROMPT, n)
    norm = (lambda t: t.replace("<｜begin▁of▁sentence｜>", "").strip())
    same = norm(dz_text) == norm(ll_text)
    agree = agreeing_tokens(llm.tokenizer.decode, ids, out.token_ids, norm(ll_text))
    r = dict(agreeing_tokens=agree, prompt=GREEDY_PROMPT, prompt_ids_dayzero=ids, prompt_ids_llamacpp=ll_ids, prompt_ids_agree=ids == ll_ids,
             dayzero_tokens=out.token_ids, dayzero_text=dz_text, llamacpp_text=ll_text, texts_agree=same)
    log(f"greedy ({n} tokens, built-in model): prompt ids {'agree' if ids == ll_ids else 'DIFFER'}, "
        f"continuations {'AGREE' if same else 'DIFFER'}: the first {agree} of dayzero's {len(out.token_ids)} "
        "tokens spell the start of llama.cpp's text")
    if not same:
        log(f"  dayzero:   {norm(dz_text)!r}\n  llama.cpp: {norm(ll_text)!r}")
    return r


def agreeing_tokens(decode, prompt_ids: list[int], out_ids: list[int], other_text: str) -> int:
    """How many of `out_ids` (in order) decode, after the prompt, to a prefix of `other_text`."""
    n = 0
    for i in range(1, len(out_ids) + 1):
        if not other_text.startswith(decode(prompt_ids + out_ids[:i]).replace("<｜begin▁of▁sentence｜>", "").lstrip()):
            break
        n = i
    return n


def _environment() -> dict:
    try:
        from bench.common import environment
        return environment()
    except Exception as e:  # the record stays useful without it
        return {"error": repr(e)}


if __name__ == "__main__":
    raise SystemExit(main())
