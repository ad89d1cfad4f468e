"""transformers' deepseek_v41 (../shared/oracles/transformers_deepseek_v41, run through its shims) as
the independent reference for V4.1 config semantics. Nothing of it is part of dayzero."""
from __future__ import annotations

import importlib
import os
import sys
from pathlib import Path

import pytest

ORACLE_DIR = Path(os.environ.get("DAYZERO_V41_ORACLE",
                                 Path(__file__).resolve().parents[2].parent / "shared" / "oracles"
                                 / "transformers_deepseek_v41"))


def oracle():
    """The oracle's deepseek_v41 package, shims applied (skips, saying where it looked, if it is absent)."""
    if not (ORACLE_DIR / "shims.py").is_file():
        pytest.skip(f"the deepseek_v41 oracle is not at {ORACLE_DIR} (set DAYZERO_V41_ORACLE)")
    if str(ORACLE_DIR) not in sys.path:
        sys.path.insert(0, str(ORACLE_DIR))
    importlib.import_module("shims")
    return importlib.import_module("deepseek_v41")


def oracle_text_config(text: dict):
    kwargs = {k: v for k, v in text.items() if k != "model_type"}
    return oracle().DeepseekV41TextConfig(**kwargs)
