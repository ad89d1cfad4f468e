"""llama.cpp for bench/vs_llamacpp.py: built from the llama-cpp-python sdist into a cache directory
(only when asked), its own convert_hf_to_gguf.py, and its benchmark tools run and parsed.

Never a dependency of dayzero: nothing here is imported by the package, and llama.cpp lives under
~/.cache/dayzero/llamacpp (or --llamacpp-dir).

Layout of the cache directory:
  llama_cpp_python-<version>.tar.gz          the sdist (pip download --no-binary)
  llama_cpp_python-<version>/vendor/llama.cpp   its vendored llama.cpp (source, converter, gguf-py)
  bin/                                        llama-bench, llama-batched-bench, llama-simple, llama-tokenize
  bin-hca<R>/                                 the same tools with the HCA ratio constant set to R (PATCHES)
"""
from __future__ import annotations

import json
import os
import re
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

SDIST_VERSION = "0.3.36"
DEFAULT_DIR = Path.home() / ".cache" / "dayzero" / "llamacpp"
TOOLS = ("llama-bench", "llama-batched-bench", "llama-simple", "llama-tokenize")
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DGGML_OPENMP=ON", "-DBUILD_SHARED_LIBS=OFF",
               "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF", "-DLLAMA_BUILD_TESTS=OFF", "-DLLAMA_BUILD_SERVER=OFF",
               "-DLLAMA_BUILD_APP=OFF")
# llama.cpp's deepseek4 code hard-codes the HCA compression ratio 128 in three places; a model with
# another ratio (the built-in model: 32) runs on a copy of the tools built with these three lines
# changed (and nothing else). (file, line as in the sdist, the same line with ratio R)
PATCHES = (
    ("src/models/deepseek4.cpp", "static constexpr int64_t DSV4_HCA_RATIO  = 128;",
     "static constexpr int64_t DSV4_HCA_RATIO  = {R};"),
    ("src/llama-kv-cache-dsv4.cpp", "static constexpr uint32_t DSV4_HCA_RATIO = 128;",
     "static constexpr uint32_t DSV4_HCA_RATIO = {R};"),
    ("src/models/deepseek4.cpp", "} else if (ratio != 128) {", "} else if (ratio != {R}) {"),
)


# The "noamx" variant: GGML_NATIVE's instruction sets without AMX (-march=native -mno-amx-*), so that
# ggml builds no AMX buffer type. On a Xeon with AMX (2026-12-07) the native build aborted on these
# models with weight repacking on (its AMX buffers hold the Q8_0 linears; see REPACK below) and the
# noamx build runs them with repacking on. Its tools go to bin-noamx/ (bin-hca<R>-noamx/).
VARIANTS = ("native", "noamx")
_NOAMX_ARCH = "-march=native -mno-amx-tile -mno-amx-int8 -mno-amx-bf16"


def cmake_flags(variant: str = "native") -> tuple[str, ...]:
    if variant == "native":
        return CMAKE_FLAGS
    if variant == "noamx":
        return tuple(f for f in CMAKE_FLAGS if f != "-DGGML_NATIVE=ON") + (
            "-DGGML_NATIVE=OFF", f"-DCMAKE_C_FLAGS={_NOAMX_ARCH}", f"-DCMAKE_CXX_FLAGS={_NOAMX_ARCH}")
    raise ValueError(f"llama.cpp build variant {variant!r}: one of {', '.join(VARIANTS)}")


class LlamaCppError(RuntimeError):
    """Something about llama.cpp (not built, a failed build, conversion or run), said plainly."""


def source_dir(root: Path) -> Path:
    return Path(root) / f"llama_cpp_python-{SDIST_VERSION}" / "vendor" / "llama.cpp"


def bin_dir(root: Path, hca_ratio: int = 128, variant: str = "native") -> Path:
    name = "bin" if hca_ratio == 128 else f"bin-hca{hca_ratio}"
    return Path(root) / (name if variant == "native" else f"{name}-{variant}")


def build_command(root: Path, variant: str = "native") -> str:
    return f"python -m bench.vs_llamacpp --build --llamacpp-dir {root}" + (
        "" if variant == "native" else f" --llamacpp-variant {variant}")


def require_built(root: Path, hca_ratio: int = 128, variant: str = "native") -> Path:
    """The directory of the built tools, or a LlamaCppError naming what is missing and the command."""
    root = Path(root)
    if not root.is_dir():
        raise LlamaCppError(f"llama.cpp directory {root} does not exist: build it first with `{build_command(root)}`")
    if not (source_dir(root) / "convert_hf_to_gguf.py").is_file():
        raise LlamaCppError(f"{root} holds no llama.cpp source ({source_dir(root)}/convert_hf_to_gguf.py is missing): "
                            f"build it first with `{build_command(root)}`")
    b = bin_dir(root, hca_ratio, variant)
    missing = [t for t in TOOLS if not (b / t).is_file()]
    if missing:
        what = "" if hca_ratio == 128 else f" (the HCA-ratio-{hca_ratio} copy)"
        raise LlamaCppError(f"llama.cpp tools{what} not built in {b}: missing {', '.join(missing)}; "
                            f"build them with `{build_command(root, variant)}`")
    return b


def _check_toolchain() -> None:
    missing = [t for t in ("cmake", "c++", "cc") if shutil.which(t) is None]
    if missing:
        raise LlamaCppError(f"building llama.cpp needs {', '.join(missing)} on PATH (cmake and a C/C++ compiler): "
                            "install them (e.g. apt-get install cmake build-essential) and run --build again")


def _run(cmd, log, cwd=None, what="command") -> None:
    log("$ " + " ".join(map(str, cmd)))
    p = subprocess.run([str(c) for c in cmd], cwd=cwd, capture_output=True, text=True)
    if p.returncode:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-25:])
        raise LlamaCppError(f"{what} failed (exit {p.returncode}):\n{tail}")


def build(root: Path, jobs: int = 2, hca_ratios=(128, 32), log=print, variant: str = "native") -> Path:
    """Download the sdist, unpack it, configure and build TOOLS (nice -n 10, -j jobs) into
    bin/ and, per extra HCA ratio, a patched copy into bin-hca<R>/ (the source is restored after);
    variant "noamx": into bin-noamx/, bin-hca<R>-noamx/ (cmake_flags)."""
    flags = cmake_flags(variant)
    _check_toolchain()
    root = Path(root)
    root.mkdir(parents=True, exist_ok=True)
    sdist = root / f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
    if not sdist.is_file():
        _run([sys.executable, "-m", "pip", "download", "--no-binary", ":all:", "--no-deps",
              f"llama-cpp-python=={SDIST_VERSION}", "-d", root], log, what="pip download of the llama-cpp-python sdist")
    src = source_dir(root)
    if not (src / "CMakeLists.txt").is_file():
        with tarfile.open(sdist) as tf:
            tf.extractall(root, filter="data")
    build_dir = src / ("build" if variant == "native" else f"build-{variant}")
    _run(["cmake", "-S", src, "-B", build_dir, *flags], log, what="cmake configure")
    for r in hca_ratios:
        _patch(src, r)
        try:
            _run(["nice", "-n", "10", "cmake", "--build", build_dir, "-j", str(jobs), "--target", *TOOLS], log,
                 what=f"cmake build (HCA ratio {r})")
        finally:
            _patch(src, 128)
        out = bin_dir(root, r, variant)
        out.mkdir(exist_ok=True)
        for t in TOOLS:
            shutil.copy2(build_dir / "bin" / t, out / t)
        log(f"built {', '.join(TOOLS)} (HCA ratio {r}, {variant}) into {out}")
    return bin_dir(root, 128, variant)


def _patch(src: Path, ratio: int) -> None:
    """Set the three HCA-ratio lines of PATCHES to `ratio` (128: the sdist as shipped)."""
    for rel, orig, new in PATCHES:
        f = src / rel
        text = f.read_text()
        pat = re.escape(orig).replace("128", r"\d+")
        text2, n = re.subn(pat, new.replace("{R}", str(ratio)), text, count=1)
        if n != 1:
            raise LlamaCppError(f"{f}: the line {orig!r} was not found (another llama.cpp version?)")
        if text2 != text:
            f.write_text(text2)


# ---- conversion --------------------------------------------------------------------------------
# The built-in and toy tokenizers are ByteLevel BPE with GPT-2's regex; the converter knows
# pre-tokenizers by a hash of known models' tokenizers and refuses others. The bench runs it with
# that look-up answering "gpt-2" (and nothing else changed), only for such tokenizers.
_CONVERT = """
import sys
sys.path.insert(0, {src!r})
import convert_hf_to_gguf as c
from conversion import base
if {gpt2}:
    base.TextModel.get_vocab_base_pre = lambda self, tokenizer: "gpt-2"
sys.argv = ["convert_hf_to_gguf.py", {hf!r}, "--outfile", {out!r}]
c.main()
"""


def gpt2_pretokenizer(hf_dir: Path) -> bool:
    tok = Path(hf_dir) / "tokenizer.json"
    if not tok.is_file():
        return False
    pre = json.loads(tok.read_text()).get("pre_tokenizer") or {}
    return pre.get("type") == "ByteLevel" and pre.get("use_regex", True)


def convert(root: Path, hf_dir: Path, out: Path, python: str = sys.executable, log=print) -> Path:
    """convert_hf_to_gguf.py from the sdist on `hf_dir` -> `out` (kept if newer than the checkpoint)."""
    src = source_dir(root)
    if not (src / "convert_hf_to_gguf.py").is_file():
        raise LlamaCppError(f"no convert_hf_to_gguf.py in {src}: build first with `{build_command(root)}`")
    out = Path(out)
    newest = max(p.stat().st_mtime for p in Path(hf_dir).iterdir())
    if out.is_file() and out.stat().st_mtime > newest:
        return out
    code = _CONVERT.format(src=str(src), gpt2=gpt2_pretokenizer(hf_dir), hf=str(hf_dir), out=str(out))
    log(f"converting {hf_dir} -> {out} with llama.cpp's convert_hf_to_gguf.py")
    env = dict(os.environ, PYTHONPATH=str(src / "gguf-py"))
    p = subprocess.run([python, "-c", code], capture_output=True, text=True, env=env)
    if p.returncode or not out.is_file():
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-20:])
        raise LlamaCppError(f"convert_hf_to_gguf.py failed on {hf_dir} (exit {p.returncode}):\n{tail}")
    return out


# ---- runs --------------------------------------------------------------------------------------
# llama.cpp's weight repacking (its CPU "extra buffer types": interleaved layouts, AMX tiles), on by
# default in its tools. On a Xeon with AMX (2026-12-07) llama-bench aborted on the Flash-shaped model
# with it on (a ggml assertion: GGML_ASSERT(*cur_backend_id != -1) in sched_reserve; with -n 1,
# GGML_ASSERT(i01 >= 0 && i01 < ne01) in ops.cpp) and ran with it off; vs_llamacpp then measures with it
# off and records so (`set_repack`).
REPACK = {"on": True}
REPACK_ABORT = "GGML_ASSERT"


def set_repack(on: bool) -> None:
    REPACK["on"] = bool(on)


def _tool(bdir: Path, name: str, args, timeout: float = 1800, stderr: list | None = None) -> str:
    cmd = [str(bdir / name), *map(str, args)]
    if name == "llama-bench":
        cmd += ["--repack", "1" if REPACK["on"] else "0"]
    env = dict(os.environ, LLAMA_ARG_REPACK="1" if REPACK["on"] else "0")  # the common-args tools
    p = subprocess.run(cmd, capture_output=True, encoding="utf-8", errors="replace", timeout=timeout, env=env)
    if stderr is not None:
        stderr.append(p.stderr)
    if p.returncode:
        tail = "\n".join((p.stdout + p.stderr).strip().splitlines()[-15:])
        raise LlamaCppError(f"{' '.join(cmd)} failed (exit {p.returncode}):\n{tail}")
    return p.stdout


def pick_repack(choice: str, bdir: Path, gguf: Path, threads: int, log=print) -> bool:
    """Whether llama.cpp's tools run with weight repacking for this model (set_repack): "on" / "off"
    as asked; "auto": on unless a two-token llama-bench aborts on a ggml assertion with it on and runs with it off."""
    if choice != "auto":
        set_repack(choice == "on")
        return choice == "on"
    set_repack(True)
    try:
        bench_tokens(bdir, gguf, threads, gen=2)
        return True
    except LlamaCppError as e:
        if REPACK_ABORT not in str(e):
            raise
        first = next((ln for ln in str(e).splitlines() if REPACK_ABORT in ln), "")
    set_repack(False)
    bench_tokens(bdir, gguf, threads, gen=2)  # the same probe must run without repacking (else its error stands)
    log(f"llama.cpp aborted with weight repacking on ({first.strip()}) on {gguf.name}: measuring it with "
        "--repack 0 / LLAMA_ARG_REPACK=0 (recorded as llamacpp_repack false)")
    return False


def bench_tokens(bdir: Path, gguf: Path, threads: int, prompt: int = 0, gen: int = 0, depth: int = 0) -> float:
    """llama-bench tokens/s: prompt>0 and gen=0: prefill of `prompt` tokens; gen>0: decode of `gen`
    tokens after `depth` tokens in the cache. One repetition (the caller alternates and repeats)."""
    out = _tool(bdir, "llama-bench", ["-m", gguf, "-t", threads, "-fa", "1", "-p", prompt, "-n", gen, "-d", depth,
                                      "-r", 1, "-o", "json"])
    recs = json.loads(out[out.index("["):])
    return float(recs[0]["avg_ts"])


def batched_decode(bdir: Path, gguf: Path, threads: int, batch: int, prompt: int, gen: int, tries: int = 3) -> dict:
    """llama-batched-bench: `batch` sequences of `prompt` random tokens, then `gen` decode steps;
    returns its jsonl record (speed_tg: aggregate decode tokens/s). It sometimes exits 0 having printed
    nothing at all (measured: 1 call in 6 on the built-in model, 2026-12-07): such a call is run again,
    up to `tries` calls in all."""
    ctx = -(-batch * (prompt + gen) // 2048) * 2048  # llama.cpp rounds n_ctx; a multiple of 2048 (and of 8, 32) stays
    for _ in range(tries):
        err: list[str] = []
        out = _tool(bdir, "llama-batched-bench", ["-m", gguf, "-t", threads, "-fa", "on", "-c", ctx, "-b", 2048,
                                                  "-ub", 512, "-np", batch, "-npp", prompt, "-ntg", gen, "-npl", batch,
                                                  "--output-format", "jsonl"], stderr=err)
        lines = [json.loads(ln) for ln in out.splitlines() if ln.startswith("{")]
        if lines:
            return lines[-1]
    tail = "\n".join((out + err[0]).strip().splitlines()[-15:])
    raise LlamaCppError(f"llama-batched-bench (batch {batch}, n_ctx {ctx}) printed no result line in {tries} calls:\n{tail}")


def tokenize(bdir: Path, gguf: Path, text: str) -> list[int]:
    out = _tool(bdir, "llama-tokenize", ["-m", gguf, "-p", text, "--ids", "--log-disable"])
    return [int(x) for x in re.findall(r"-?\d+", out.strip().splitlines()[-1])]


def greedy_text(bdir: Path, gguf: Path, prompt: str, n: int) -> str:
    """llama-simple's greedy continuation of `prompt` (its printed text, the prompt first)."""
    return _tool(bdir, "llama-simple", ["-m", gguf, "-n", n, prompt])
