"""Non-finite weights: a cheap check at load time, a full scan for `dayzero verify --weights DIR`.

A NaN or inf in a norm weight, a scale, the router bias or an attention sink turns every output
into NaN, and sampling from NaN logits yields token 0 or whitespace, not an error. So:

- `check_small_finite(state, source)`, called by the loader on the tensors it just read, checks
  every tensor whose name marks it as a norm, bias, attention sink or hyper-connection (`hc_*`)
  parameter, and every other tensor of at most SMALL_NUMEL elements (FP8 block scales included;
  on V4-Flash that is ~0.1% of the bytes), with one device sync; it raises CheckpointError
  naming each bad tensor and its shard.
- `scan_checkpoint(path)` reads every tensor of every shard through a read-only memory map, one
  shard at a time and in chunks, so memory stays flat on checkpoints far larger than RAM, and
  reports every tensor with a non-finite value.

What counts as non-finite, by storage dtype: NaN or +-inf for fp16/bf16/fp32/fp64; the NaN codes
0x7F / 0xFF for float8_e4m3fn (it has no inf); exponent 11111 (inf or NaN) for float8_e5m2; 0xFF
(NaN) for float8_e8m0fnu scales. Integer tensors (FP4 codes packed in int8, hash routing tables)
cannot hold one.
"""
from __future__ import annotations

import json
import mmap
import os
import struct
import time
import warnings
from pathlib import Path
from typing import Callable, Mapping

import torch

from dayzero.loader.checkpoint import INDEX_NAME, SAFETENSORS_DTYPES, SINGLE_NAME, CheckpointError, list_tensors

SMALL_NUMEL = 1 << 16  # tensors of at most this many elements are checked at load time
SMALL_NAMES = ("norm", "bias", "attn_sink", "hc_")  # checked at load time whatever their size
CHUNK_BYTES = 64 * 2**20  # the full scan reads big tensors this much at a time
MAX_LISTED = 8  # tensors named in a load-time error


def nonfinite_count(t: torch.Tensor) -> torch.Tensor:
    """Number of non-finite values of `t` as a 0-dim int64 tensor on t's device (no sync)."""
    if t.dtype in (torch.float8_e4m3fn, torch.float8_e5m2, torch.float8_e8m0fnu):
        b = t.contiguous().view(torch.uint8)
        if t.dtype == torch.float8_e4m3fn:
            bad = (b & 0x7F) == 0x7F
        elif t.dtype == torch.float8_e5m2:
            bad = (b & 0x7C) == 0x7C
        else:
            bad = b == 0xFF
        return bad.sum()
    if t.is_floating_point() or t.is_complex():
        return torch.isfinite(t).logical_not_().sum()
    return torch.zeros((), dtype=torch.int64, device=t.device)


def is_small(name: str, t: torch.Tensor) -> bool:
    return t.numel() <= SMALL_NUMEL or any(s in name for s in SMALL_NAMES)


def _shard_of(source: str) -> Callable[[str], str | None]:
    """name -> shard file, from the checkpoint's index if `source` is a checkpoint directory."""
    d = Path(source)
    try:
        if (d / INDEX_NAME).is_file():
            wm = json.loads((d / INDEX_NAME).read_text()).get("weight_map", {})
            return lambda name: wm.get(name)
        if (d / SINGLE_NAME).is_file():
            return lambda name: SINGLE_NAME
    except (OSError, ValueError):
        pass
    return lambda name: None


def check_small_finite(state: Mapping[str, torch.Tensor], source: str) -> int:
    """Raise CheckpointError if a small tensor of `state` (see the module doc) holds NaN or inf,
    naming the tensors (and their shard files when `source` is the checkpoint directory).
    Returns the number of tensors checked. One host sync per device, whatever the tensor count."""
    names = [n for n, t in state.items() if isinstance(t, torch.Tensor) and is_small(n, t)]
    if not names:
        return 0
    by_device: dict[torch.device, list[str]] = {}
    for n in names:
        by_device.setdefault(state[n].device, []).append(n)
    bad: list[tuple[str, int]] = []
    for group in by_device.values():
        counts = torch.stack([nonfinite_count(state[n]) for n in group]).cpu()
        if bool(counts.any()):
            bad += [(n, int(c)) for n, c in zip(group, counts.tolist()) if c]
    if bad:
        shard = _shard_of(source)
        listed = []
        for n, c in bad[:MAX_LISTED]:
            t = state[n]
            where = f" in {shard(n)}" if shard(n) else ""
            listed.append(f"tensor {n!r}{where} ({str(t.dtype).removeprefix('torch.')} {list(t.shape)}): "
                          f"{c} of {t.numel()} values are NaN or inf")
        more = f"; and {len(bad) - MAX_LISTED} more" if len(bad) > MAX_LISTED else ""
        raise CheckpointError(f"{source}: non-finite weights, the checkpoint is corrupt: " + "; ".join(listed)
                              + more + f". `dayzero verify --weights {source}` scans every tensor")
    return len(names)


# ---- the full scan ----------------------------------------------------------------------------------

def _header(file: Path) -> tuple[int, dict]:
    with open(file, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


def _scan_tensor(buf, start: int, dtype: torch.dtype, numel: int) -> int:
    """Non-finite values of `numel` elements of `dtype` at byte `start` of `buf`, CHUNK_BYTES at a time."""
    size = torch.empty((), dtype=dtype).element_size()
    step = max(1, CHUNK_BYTES // size)
    total = 0
    for i in range(0, numel, step):
        n = min(step, numel - i)
        t = torch.frombuffer(buf, dtype=dtype, count=n, offset=start + i * size)
        total += int(nonfinite_count(t))
    return total


def scan_checkpoint(path: str | os.PathLike, progress: Callable[[str], None] | None = None) -> dict:
    """Every tensor of the checkpoint at `path`, shard by shard through read-only memory maps:
    a report {path, shards, tensors, bytes, seconds, non_finite: [{name, file, dtype, shape,
    count, numel}], passed}. The checkpoint's structure is checked first (list_tensors)."""
    d = Path(path)
    t0 = time.perf_counter()
    inventory = list_tensors(d)  # CheckpointError naming the file if index and headers disagree
    files = sorted({info.file for info in inventory.values()})
    report: dict = dict(path=str(d), shards=len(files), tensors=0, bytes=0, non_finite=[])
    for k, name in enumerate(files):
        file = d / name
        data_start, header = _header(file)
        entries = sorted(((n, h) for n, h in header.items() if n != "__metadata__"),
                         key=lambda nh: nh[1]["data_offsets"][0])
        with open(file, "rb") as f, warnings.catch_warnings():
            warnings.simplefilter("ignore")  # frombuffer warns that a read-only map is not writable
            if os.fstat(f.fileno()).st_size == 0:
                continue
            with mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ) as buf:
                for tname, h in entries:
                    dtype = SAFETENSORS_DTYPES[h["dtype"]]
                    begin, end = h["data_offsets"]
                    numel = 1
                    for s in h["shape"]:
                        numel *= s
                    report["tensors"] += 1
                    report["bytes"] += end - begin
                    if numel == 0 or not (dtype.is_floating_point or dtype.is_complex):
                        continue
                    c = _scan_tensor(buf, data_start + begin, dtype, numel)
                    if c:
                        report["non_finite"].append(dict(name=tname, file=name, dtype=h["dtype"], shape=h["shape"],
                                                         count=c, numel=numel))
                        if progress:
                            progress(f"{name}: {tname} ({h['dtype']} {h['shape']}): {c} of {numel} values "
                                     "are NaN or inf")
        if progress:
            progress(f"[{k + 1}/{len(files)}] {name}: scanned")
    report["seconds"] = round(time.perf_counter() - t0, 3)
    report["passed"] = not report["non_finite"]
    return report
