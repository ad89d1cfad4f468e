"""The `dayzero` command line, run as a user would (a subprocess of `python -m dayzero`)."""
import json
import subprocess
import sys

import pytest
import torch

from dayzero import LLM, SamplingParams


def dayzero(*args, check=True, env=None):
    r = subprocess.run([sys.executable, "-m", "dayzero", *map(str, args)], capture_output=True, text=True,
                       timeout=300, env=env)
    if check and r.returncode:
        raise AssertionError(f"dayzero {args} failed ({r.returncode}):\n{r.stderr}")
    return r


def test_help_lists_the_commands_that_exist():
    out = dayzero("--help").stdout
    for cmd in ("generate", "serve", "chat", "convert", "toy", "verify", "tune", "bench"):
        assert cmd in out
    gen, serve = dayzero("generate", "--help").stdout, dayzero("serve", "--help").stdout
    assert "--token-ids" in gen
    for flag in ("--ops", "--enforce-eager"):
        assert flag in gen and flag in serve


def test_verify_cli_interpreted_triton_ops(tmp_path):
    """`dayzero verify --interpret --ops triton --ops-only` on a CPU: every kernel checked against its
    twin (all pass), JSON written; the Triton table's batch invariance is checked too and holds
    (issue 20): exit 0, RESULT: PASS."""
    pytest.importorskip("triton", reason="no Triton wheel for this platform")
    out = tmp_path / "v.json"
    r = dayzero("verify", "--interpret", "--ops", "triton", "--ops-only", "--out", out, check=False)
    report = json.loads(out.read_text())
    assert report["ops_table"] == "triton" and "kernel" in r.stdout
    assert all(row["passed"] for row in report["ops"]), r.stdout
    variant = {row["op"] for row in report["invariance_ops"] if not row["invariant"]}
    assert not variant and report["invariance_ops"], r.stdout
    assert r.returncode == 0 and "RESULT: PASS" in r.stdout, r.stdout


def test_toy_then_generate_text_and_ids(tmp_path):
    d = tmp_path / "toy"
    dayzero("toy", d, "--preset", "mixed", "--format", "fp8")
    assert (d / "tokenizer.json").is_file() and (d / "model.safetensors.index.json").is_file()
    r = dayzero("generate", "--model", d, "--prompt", "The quick", "--max-tokens", 5, "--ignore-eos")
    want = LLM(d).generate("The quick", SamplingParams(temperature=0, max_tokens=5, ignore_eos=True))[0]
    assert r.stdout.rstrip("\n") == want.text
    assert "finish_reason=length" in r.stderr
    s = dayzero("generate", "--model", d, "--prompt", "The quick", "--max-tokens", 5, "--ignore-eos", "--stream")
    assert s.stdout.rstrip("\n") == want.text
    (d / "tokenizer.json").unlink()
    ids = dayzero("generate", "--model", d, "--token-ids", "0,5,6", "--max-tokens", 4, "--ignore-eos")
    assert len(ids.stdout.split()) == 4


def test_cli_errors_are_clear(tmp_path):
    r = dayzero("generate", "--model", tmp_path, "--token-ids", "1,2", check=False)
    assert r.returncode == 2 and "no config.json" in r.stderr
    r = dayzero("generate", "--model", tmp_path, "--token-ids", "1,x", check=False)
    assert r.returncode != 0 and "--token-ids" in r.stderr
    dayzero("toy", tmp_path / "t")
    r = dayzero("toy", tmp_path / "t", check=False)
    assert r.returncode == 2 and "already holds checkpoint files" in r.stderr


def test_convert_from_transformers_save_pretrained(tmp_path, make_ckpt):
    transformers = pytest.importorskip("transformers")
    src = make_ckpt("pro", "fp32", mtp=0)
    hf = transformers.DeepseekV4ForCausalLM.from_pretrained(src, dtype=torch.float32).eval()
    hf.save_pretrained(tmp_path / "hf")
    for fmt in ("fp32", "fp8"):
        out = tmp_path / f"official-{fmt}"
        dayzero("convert", tmp_path / "hf", out, "--format", fmt)
        llm = LLM(out, numerics="transformers")
        assert llm.args.n_mtp_layers == 0 and (llm.args.quant == "fp8") == (fmt == "fp8")
        ids = torch.arange(2, 60)[None]
        with torch.no_grad():
            ref = hf(ids, use_cache=False).logits[0]
        err = ((llm.score(ids[0].tolist()) - ref).abs().max() / ref.abs().max()).item()
        assert err < (1e-4 if fmt == "fp32" else 0.5), (fmt, err)
    r = dayzero("convert", tmp_path / "nothing", tmp_path / "x", check=False)
    assert r.returncode == 2 and "does not exist" in r.stderr


# ---- what a newcomer hit (issue 21) ---------------------------------------------------------------

def test_input_errors_exit_2_in_one_style(tmp_path):
    for args, words in [(("generate", "--prompt", ""), "--prompt: must not be empty"),
                        (("generate", "--token-ids", ""), "--token-ids: must not be empty"),
                        (("generate", "--prompt", "KING", "--max-tokens", 100000000), "--max-tokens: 100000000"),
                        (("toy", tmp_path / "t", "--preset", "nope"), "--preset: unknown preset"),
                        (("serve", "--max-model-len", 0), "--max-model-len: must be positive")]:
        r = dayzero(*args, check=False)
        cmd = args[0]
        assert r.returncode == 2, (args, r.stderr)
        assert f"dayzero {cmd}: error: {words}" in r.stderr, (args, r.stderr)
        assert "Traceback" not in r.stderr
        if "--max-tokens" in words:
            assert "4096-token context" in r.stderr  # the server's rule: prompt + max tokens must fit


@pytest.mark.skipif(torch.cuda.is_available(), reason="Triton runs on this machine's GPU")
def test_ops_triton_on_a_cpu_is_an_input_error():
    import os

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # as a user's shell
    r = dayzero("generate", "--prompt", "KING", "--ops", "triton", "--device", "cpu", check=False, env=env)
    assert r.returncode == 2 and "dayzero generate: error: --ops triton: Triton cannot run on cpu" in r.stderr
    assert "Traceback" not in r.stderr


def test_builtin_generate_samples_as_docs_builtin_says():
    r = dayzero("generate", "--prompt", "KING LEAR:", "--max-tokens", 12, "--seed", 0, "--device", "cpu")
    want = LLM(device="cpu").generate("KING LEAR:", SamplingParams(temperature=0.8, top_p=0.95, seed=0,
                                                                   max_tokens=12))[0]
    assert r.stdout.rstrip("\n") == want.text
    help_text = " ".join(dayzero("generate", "--help").stdout.split())
    assert "plain-text model" in help_text and "0.8 for the built-in model" in help_text
    assert "not an instruct model" in " ".join(dayzero("serve", "--help").stdout.split())


def test_serve_reports_a_port_in_use_without_claiming_to_serve():
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        port = s.getsockname()[1]
        r = dayzero("serve", "--port", port, "--device", "cpu", check=False)
    assert r.returncode == 1 and f"cannot listen on 127.0.0.1:{port}" in r.stderr
    assert "serving" not in r.stderr and "Traceback" not in r.stderr


def test_architecture_tree_lists_every_module():
    from pathlib import Path

    root = Path(__file__).resolve().parents[1]
    tree = (root / "docs" / "ARCHITECTURE.md").read_text()
    pkg = root / "dayzero"
    missing = [p.name for p in sorted(pkg.glob("*.py")) if p.name not in ("__init__.py", "__main__.py")
               and p.name not in tree]
    missing += [p.name + "/" for p in sorted(pkg.iterdir()) if p.is_dir() and not p.name.startswith("__")
                and p.name + "/" not in tree]
    missing += [p.name for p in sorted((pkg / "server").glob("*.py")) if p.name != "__init__.py"
                and p.name not in tree]
    assert not missing, f"docs/ARCHITECTURE.md does not list {missing}"
