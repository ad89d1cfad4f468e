"""The built-in model: a small DeepSeek-V4 trained on Shakespeare, shipped inside the package in
the official hub layout (FP8 e4m3 linears with E8M0 128x128 scales, FP4 e2m1 routed experts with
E8M0 per-32 scales, BF16/F32 dense tensors, config.json, tokenizer.json).

How it was trained, its config and measurements: docs/BUILTIN.md; the training script:
scripts/train_builtin.py.
"""
from __future__ import annotations

from pathlib import Path

BUILTIN_NAME = "shakespeare"
_HERE = Path(__file__).resolve().parent
BUILTIN_NAMES = (BUILTIN_NAME,)
# DSpark drafters shipped for a built-in model, in a directory of their own (the DSpark tensors mtp.0..2
# and config; the backbone is read from the target): speculative_config={"model": name} (docs/BUILTIN.md)
DRAFTER_NAMES = ("shakespeare-dspark",)


def builtin_path(name: str = BUILTIN_NAME) -> Path:
    """The directory of the built-in model `name` (an official-layout checkpoint)."""
    if name not in BUILTIN_NAMES:
        raise ValueError(f"unknown built-in model {name!r}; known: {', '.join(BUILTIN_NAMES)}")
    return _HERE / name


def drafter_path(name: str) -> Path:
    """The directory of the built-in DSpark drafter `name` (loader/drafter_dir.py)."""
    if name not in DRAFTER_NAMES:
        raise ValueError(f"unknown built-in drafter {name!r}; known: {', '.join(DRAFTER_NAMES)}")
    return _HERE / name
