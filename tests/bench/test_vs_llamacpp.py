"""bench/vs_llamacpp.py without llama.cpp: arguments, checkpoint specs, the GB/s and ratio arithmetic,
the HCA-ratio patch, and the errors when llama.cpp is not built."""
from __future__ import annotations

import pytest
import torch

from bench import llamacpp_build as lc
from bench import vs_llamacpp as v


def test_arguments():
    a = v.parse_args(["--llamacpp-dir", "/nowhere"])
    assert a.models == list(v.MODELS) and a.threads == 2 and a.reps == 3 and a.new_tokens == 32
    assert str(a.work_dir) == "/nowhere/models"
    q = v.parse_args(["--quick", "--models", "flash2", "--threads", "1"])
    assert q.quick and q.reps == 1 and q.new_tokens == 16 and q.models == ["flash2"] and q.threads == 1
    with pytest.raises(SystemExit):
        v.parse_args(["--models", "builtin,llama"])
    with pytest.raises(SystemExit):
        v.parse_args(["--threads", "0"])


def test_specs():
    full, quick = v.specs(), v.specs(quick=True)
    assert full["flash2"].contexts == (512, 8192) and full["flash2"].batches == (8, 32)
    assert quick["flash2"].contexts == (512,) and quick["flash2"].batches == (8,)
    assert full["builtin"].hca_ratio == 32 and full["builtin"].greedy  # its HCA ratio; llama.cpp's is 128
    assert max(full["builtin"].contexts) < 4096  # the built-in model's max_position_embeddings
    toy = v.model_args(full["toy"])
    assert toy.compress_ratios == (0, 4, 128, 4, 128) and toy.quant == "fp8" and toy.expert_dtype == "fp4"
    with pytest.raises(ValueError, match="copied"):
        v.model_args(full["builtin"])


def test_flash_shaped_checkpoint():
    """The issue's "2 layers with V4-Flash shapes (256 FP4 experts, 4096 hidden, vocab 4096)": its
    tensors (built on the meta device) and the ~508 MB a decoded token touches."""
    from dayzero.reference.model import Transformer
    args = v.model_args(v.specs()["flash2"])
    assert (args.n_layers, args.dim, args.n_routed_experts, args.vocab_size) == (2, 4096, 256, 4096)
    assert args.layer_types == ("csa", "hca") and args.compress_ratios == (4, 128)
    with torch.device("meta"):
        sd = Transformer(args).state_dict()
    w1 = sd["layers.0.ffn.experts.0.w1.weight"]
    assert w1.dtype == torch.int8 and tuple(w1.shape) == (2048, 2048)  # FP4 nibbles, packed 2 per byte
    assert tuple(sd["layers.0.ffn.experts.0.w1.scale"].shape) == (2048, 4096 // 32)
    assert sd["layers.0.attn.wq_b.weight"].dtype == torch.float8_e4m3fn
    sizes = {n: t.numel() * t.element_size() for n, t in sd.items()}
    assert 480e6 < v.weight_bytes(sizes, 256, 6, 1) < 540e6


def test_weight_bytes_and_ratio_arithmetic():
    sizes = {"embed.weight": 1000, "head.weight": 100, "layers.0.ffn.experts.0.w1.weight": 40,
             "layers.0.ffn.experts.1.w1.weight": 40, "mtp.0.x.weight": 7}
    # 2 experts, top-1: batch 1 touches 1 of 2 (half the expert bytes), batch 2 touches 1.5
    assert v.weight_bytes(sizes, 2, 1, 1) == 100 + 40
    assert v.weight_bytes(sizes, 2, 1, 2) == 100 + 60
    r = v.row("flash2", "decode b1", ll=50.0, dz=25.0, nbytes=500_000_000, bandwidth=25e9)
    assert r["ratio"] == pytest.approx(0.5)
    assert r["llamacpp_gb_s"] == pytest.approx(25.0) and r["llamacpp_copy_fraction"] == pytest.approx(1.0)
    assert r["dayzero_gb_s"] == pytest.approx(12.5) and r["dayzero_copy_fraction"] == pytest.approx(0.5)
    b8 = v.row("flash2", "decode b8", ll=80.0, dz=100.0, nbytes=2_000_000_000, bandwidth=25e9, tokens_per_step=8)
    assert b8["ratio"] == pytest.approx(1.25) and b8["dayzero_gb_s"] == pytest.approx(25.0)
    pre = v.row("toy", "prefill 512", ll=1000.0, dz=None, nbytes=None, bandwidth=25e9)
    assert pre["ratio"] is None and pre["llamacpp_gb_s"] is None
    assert "dayzero/llama.cpp 1.25x" in v.fmt_row(b8) and "-" in v.fmt_row(pre)


def test_missing_llamacpp(tmp_path, capsys):
    missing = tmp_path / "nope"
    with pytest.raises(lc.LlamaCppError, match="--build --llamacpp-dir"):
        lc.require_built(missing)
    (lc.source_dir(tmp_path)).mkdir(parents=True)
    (lc.source_dir(tmp_path) / "convert_hf_to_gguf.py").write_text("")
    with pytest.raises(lc.LlamaCppError, match="HCA-ratio-32 copy.*missing llama-bench"):
        lc.require_built(tmp_path, 32)
    assert v.main(["--llamacpp-dir", str(missing), "--models", "toy"]) == 2
    err = capsys.readouterr().err
    assert "does not exist" in err and "python -m bench.vs_llamacpp --build" in err
    with pytest.raises(lc.LlamaCppError, match="no convert_hf_to_gguf.py"):
        lc.convert(missing, tmp_path, tmp_path / "x.gguf")


def test_hca_patch(tmp_path):
    """The three lines llama.cpp needs changed for another HCA ratio, and back to the sdist's."""
    src = tmp_path
    (src / "src" / "models").mkdir(parents=True)
    model = "x;\nstatic constexpr int64_t DSV4_HCA_RATIO  = 128;\n  } else if (ratio != 128) {\n y = 128;\n"
    kv = "static constexpr uint32_t DSV4_HCA_RATIO = 128;\nz = 128;\n"
    (src / "src/models/deepseek4.cpp").write_text(model)
    (src / "src/llama-kv-cache-dsv4.cpp").write_text(kv)
    lc._patch(src, 32)
    m = (src / "src/models/deepseek4.cpp").read_text()
    assert "DSV4_HCA_RATIO  = 32;" in m and "ratio != 32)" in m and "y = 128;" in m
    assert (src / "src/llama-kv-cache-dsv4.cpp").read_text() == kv.replace("= 128;\nz", "= 32;\nz")
    lc._patch(src, 128)
    assert (src / "src/models/deepseek4.cpp").read_text() == model
    (src / "src/llama-kv-cache-dsv4.cpp").write_text("nothing here\n")
    with pytest.raises(lc.LlamaCppError, match="not found"):
        lc._patch(src, 32)


def test_tokenizer_check():
    from dayzero.builtin import builtin_path
    assert lc.gpt2_pretokenizer(builtin_path())
    assert not lc.gpt2_pretokenizer(builtin_path().parent)  # no tokenizer.json


def test_agreeing_tokens():
    words = {0: "A", 1: " b", 2: " c", 3: " d"}
    decode = lambda ids: "".join(words[i] for i in ids)  # noqa: E731
    assert v.agreeing_tokens(decode, [0], [1, 2, 3], "A b c d") == 3
    assert v.agreeing_tokens(decode, [0], [1, 3, 2], "A b c d") == 1
    assert v.agreeing_tokens(decode, [0], [2], "A b") == 0


def test_case_overrides():
    a = v.parse_args(["--contexts", "8192", "--batches", "32", "--no-prefill"])
    assert a.contexts == (8192,) and a.batches == (32,) and a.no_prefill
    assert v.parse_args(["--batches", ""]).batches == ()  # no batched cases
    assert v.parse_args([]).contexts is None
    for bad in ("8k", "0", "-5"):
        with pytest.raises(SystemExit):
            v.parse_args(["--contexts", bad])


def test_repack_choice_and_flags(monkeypatch, tmp_path):
    """auto: repacking on unless the probe aborts on ggml's backend assertion (then off, recorded);
    other failures are not swallowed; the flag reaches llama-bench (--repack) and the common-args
    tools (LLAMA_ARG_REPACK)."""
    import subprocess
    import types

    seen = []

    def run(cmd, **kw):
        seen.append((cmd, kw["env"].get("LLAMA_ARG_REPACK")))
        abort = "--repack" in cmd and cmd[cmd.index("--repack") + 1] == "1" and mode["abort"]
        return types.SimpleNamespace(returncode=-6 if abort else 0, stderr=lc.REPACK_ABORT if abort else "",
                                     stdout="" if abort else '[{"avg_ts": 12.5}]')

    mode = {"abort": False}
    monkeypatch.setattr(subprocess, "run", run)
    gguf = tmp_path / "m.gguf"
    assert lc.pick_repack("auto", tmp_path, gguf, 2) is True and lc.REPACK["on"]
    assert seen[-1][0][-2:] == ["--repack", "1"] and seen[-1][1] == "1"
    mode["abort"] = True
    assert lc.pick_repack("auto", tmp_path, gguf, 2, log=lambda m: None) is False and not lc.REPACK["on"]
    assert lc.bench_tokens(tmp_path, gguf, 2, gen=4) == 12.5 and seen[-1][0][-2:] == ["--repack", "0"]
    assert seen[-1][1] == "0"
    assert lc.pick_repack("on", tmp_path, gguf, 2) is True and lc.REPACK["on"]
    monkeypatch.setattr(lc, "bench_tokens", lambda *a, **k: (_ for _ in ()).throw(lc.LlamaCppError("other failure")))
    with pytest.raises(lc.LlamaCppError, match="other failure"):
        lc.pick_repack("auto", tmp_path, gguf, 2)
    lc.set_repack(True)


def test_noamx_variant(tmp_path):
    """The noamx build: GGML_NATIVE's flags with native off and -march=native without AMX, its own
    bin directories, and require_built / the runs naming the variant's build command."""
    flags = lc.cmake_flags("noamx")
    assert "-DGGML_NATIVE=ON" not in flags and "-DGGML_NATIVE=OFF" in flags
    assert "-DCMAKE_CXX_FLAGS=-march=native -mno-amx-tile -mno-amx-int8 -mno-amx-bf16" in flags
    assert set(lc.CMAKE_FLAGS) - {"-DGGML_NATIVE=ON"} <= set(flags) and lc.cmake_flags() == lc.CMAKE_FLAGS
    assert lc.bin_dir(tmp_path, 128, "noamx").name == "bin-noamx" and lc.bin_dir(tmp_path, 32, "noamx").name == "bin-hca32-noamx"
    with pytest.raises(ValueError, match="native, noamx"):
        lc.cmake_flags("amx")
    src = lc.source_dir(tmp_path)
    src.mkdir(parents=True)
    (src / "convert_hf_to_gguf.py").write_text("")
    with pytest.raises(lc.LlamaCppError, match="bin-noamx.*--llamacpp-variant noamx"):
        lc.require_built(tmp_path, 128, "noamx")
    assert v.parse_args(["--llamacpp-variant", "noamx"]).llamacpp_variant == "noamx"
