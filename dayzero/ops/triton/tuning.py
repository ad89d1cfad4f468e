"""Launch configurations per device: the table `dayzero tune` writes and kernels read.

A kernel module declares its tunables in `TUNABLES` (name -> Tunable). Launchers call
`config(name, key, default)` with a shape key (e.g. "D512-H64"); the table is a JSON file named by
device and triton version, so a new device or triton release starts from the defaults.

File: $DAYZERO_CACHE_DIR/tune/<device-slug>-triton<version>.json (default ~/.cache/dayzero), content
{"device": name, "triton": version, "configs": {kernel: {shape key: {param: value}}}}.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import os
import re
from pathlib import Path
from typing import Callable

import torch


@dataclasses.dataclass(frozen=True)
class Tunable:
    """space: candidate configs (dicts of launch parameters, first = default); cases(device) ->
    [(shape key, run(config) -> output tensor)] on representative shapes for that device."""
    space: tuple[dict, ...]
    cases: Callable[[torch.device], list[tuple[str, Callable[[dict], torch.Tensor]]]]


def device_name(device: torch.device) -> str:
    if device.type == "cuda" and torch.cuda.is_available():
        return torch.cuda.get_device_name(device)
    return f"{device.type}-interpreter" if os.environ.get("TRITON_INTERPRET") == "1" else device.type


@functools.lru_cache(maxsize=None)
def table_path(device: torch.device) -> Path:
    """The tuning file for `device` (cached: launchers look configs up on every call)."""
    import triton
    root = Path(os.environ.get("DAYZERO_CACHE_DIR") or Path.home() / ".cache" / "dayzero")
    slug = re.sub(r"[^A-Za-z0-9]+", "-", device_name(device)).strip("-").lower()
    return root / "tune" / f"{slug}-triton{triton.__version__}.json"


@functools.lru_cache(maxsize=None)
def _load(path: str) -> dict:
    p = Path(path)
    if not p.exists():
        return {}
    try:
        data = json.loads(p.read_text())
        return data["configs"]
    except (ValueError, KeyError, TypeError) as e:
        raise RuntimeError(f"{p}: not a dayzero tuning table ({e}); delete it or rerun `dayzero tune`") from e


def config(name: str, key: str, default: dict, device: torch.device) -> dict:
    """The tuned config of kernel `name` for shape `key` on `device`, else `default`."""
    found = _load(str(table_path(device))).get(name, {}).get(key)
    return {**default, **found} if found else default


def save(device: torch.device, configs: dict) -> Path:
    import triton
    path = table_path(device)
    path.parent.mkdir(parents=True, exist_ok=True)
    old = _load(str(path)) if path.exists() else {}
    merged = {k: {**old.get(k, {}), **v} for k, v in {**old, **configs}.items()}
    path.write_text(json.dumps({"device": device_name(device), "triton": triton.__version__,
                                "configs": merged}, indent=1, sort_keys=True))
    _load.cache_clear()
    return path
