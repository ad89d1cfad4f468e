"""Shared bits of the benchmarks: environment record, result files."""
from __future__ import annotations

import json
import platform
import subprocess
import time
from pathlib import Path

import torch

RESULTS = Path(__file__).parent / "results"


def environment() -> dict:
    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                cwd=Path(__file__).parent).stdout.strip()
    except OSError:
        commit = None
    import transformers

    return {"commit": commit, "device": "cpu: " + (platform.processor() or platform.machine()),
            "threads": torch.get_num_threads(), "versions": {"torch": torch.__version__,
                                                              "transformers": transformers.__version__,
                                                              "python": platform.python_version()},
            "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime())}


def append(name: str, records: list[dict]) -> Path:
    RESULTS.mkdir(parents=True, exist_ok=True)
    path = RESULTS / name
    with path.open("a") as f:
        for r in records:
            f.write(json.dumps(r) + "\n")
    return path
