"""Strict reader of checkpoints in the official hub layout.

A checkpoint directory holds config.json and either model.safetensors.index.json
({"metadata": {...}, "weight_map": {tensor name: shard file}}) with its shards, or one
model.safetensors. A safetensors file is: 8-byte little-endian header length N, N bytes of
JSON header {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
then the data; offsets are relative to the start of the data (byte 8 + N).
"""

from __future__ import annotations

import json
import math
import os
import struct
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Collection, Mapping, NamedTuple

import torch
from safetensors import SafetensorError, safe_open

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"
CONFIG_NAME = "config.json"

SAFETENSORS_DTYPES: dict[str, torch.dtype] = {
    "BOOL": torch.bool,
    "U8": torch.uint8,
    "I8": torch.int8,
    "I16": torch.int16,
    "I32": torch.int32,
    "I64": torch.int64,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F32": torch.float32,
    "F64": torch.float64,
    "F8_E4M3": torch.float8_e4m3fn,
    "F8_E5M2": torch.float8_e5m2,
    "F8_E8M0": torch.float8_e8m0fnu,
}

_MAX_HEADER = 100 * 2**20
_MAX_LINES = 20
_AUTO_PROGRESS_BYTES = 2**30


class CheckpointError(ValueError):
    """A checkpoint directory, file or tensor does not match what the loader requires."""


@dataclass(frozen=True)
class TensorSpec:
    shape: tuple[int, ...]
    dtype: torch.dtype


class TensorInfo(NamedTuple):
    file: str
    shape: tuple[int, ...]
    dtype: torch.dtype


def _lines(title: str, items: list[str]) -> str:
    shown = items[:_MAX_LINES]
    more = len(items) - len(shown)
    tail = [f"  ... and {more} more"] if more > 0 else []
    return "\n".join([title, *(f"  {s}" for s in shown), *tail])


def _directory(path: str | os.PathLike) -> Path:
    p = Path(path)
    if not p.exists():
        raise CheckpointError(f"checkpoint path {p} does not exist")
    if not p.is_dir():
        raise CheckpointError(f"checkpoint path {p} is not a directory")
    return p


def _read_json(file: Path) -> object:
    try:
        return json.loads(file.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{file}: invalid JSON ({e})") from e
    except (OSError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{file}: cannot read ({e})") from e


def read_config(path: str | os.PathLike) -> dict:
    """The checkpoint's config.json as a dict."""
    d = _directory(path)
    file = d / CONFIG_NAME
    if not file.is_file():
        raise CheckpointError(f"{d} has no {CONFIG_NAME}")
    cfg = _read_json(file)
    if not isinstance(cfg, dict):
        raise CheckpointError(f"{file}: expected a JSON object, got {type(cfg).__name__}")
    return cfg


def read_header(file: Path) -> dict[str, TensorInfo]:
    """Tensor names -> TensorInfo from one safetensors file's header, checked against its size."""
    try:
        size = file.stat().st_size
        with open(file, "rb") as f:
            head = f.read(8)
            if len(head) < 8:
                raise CheckpointError(f"{file}: truncated safetensors file ({size} bytes)")
            (n,) = struct.unpack("<Q", head)
            if n > _MAX_HEADER or 8 + n > size:
                raise CheckpointError(
                    f"{file}: corrupt safetensors header (claims {n} header bytes, "
                    f"file has {size})"
                )
            raw = f.read(n)
    except OSError as e:
        raise CheckpointError(f"{file}: cannot read ({e})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise CheckpointError(f"{file}: corrupt safetensors header ({e})") from e
    if not isinstance(header, dict):
        raise CheckpointError(f"{file}: corrupt safetensors header (not a JSON object)")
    out: dict[str, TensorInfo] = {}
    data_end = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        try:
            dtype_name, shape, (begin, end) = entry["dtype"], entry["shape"], entry["data_offsets"]
            shape = tuple(int(s) for s in shape)
            begin, end = int(begin), int(end)
        except (KeyError, TypeError, ValueError) as e:
            raise CheckpointError(f"{file}: corrupt header entry for tensor {name!r}") from e
        dtype = SAFETENSORS_DTYPES.get(dtype_name)
        if dtype is None:
            raise CheckpointError(f"{file}: tensor {name!r} has unsupported dtype {dtype_name!r}")
        nbytes = math.prod(shape) * dtype.itemsize
        if min(shape, default=0) < 0 or begin < 0 or end - begin != nbytes:
            raise CheckpointError(
                f"{file}: corrupt header entry for tensor {name!r} (shape {list(shape)} "
                f"{dtype_name} needs {nbytes} bytes, offsets [{begin}, {end}])"
            )
        data_end = max(data_end, end)
        out[name] = TensorInfo(file.name, shape, dtype)
    if size < 8 + n + data_end:
        raise CheckpointError(
            f"{file}: truncated safetensors file ({size} bytes, header needs {8 + n + data_end})"
        )
    return out


def _weight_map(d: Path) -> dict[str, str]:
    index = d / INDEX_NAME
    if not index.is_file():
        if (d / SINGLE_NAME).is_file():
            return {name: SINGLE_NAME for name in read_header(d / SINGLE_NAME)}
        raise CheckpointError(
            f"{d} is not a checkpoint: neither {INDEX_NAME} nor {SINGLE_NAME} found"
        )
    data = _read_json(index)
    wm = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(wm, dict):
        raise CheckpointError(f"{index}: missing or invalid 'weight_map'")
    for name, file in wm.items():
        if not isinstance(file, str) or not file or Path(file).name != file:
            raise CheckpointError(f"{index}: tensor {name!r} maps to invalid file {file!r}")
    return wm


def list_tensors(path: str | os.PathLike) -> dict[str, TensorInfo]:
    """Every tensor of a checkpoint: name -> TensorInfo(file, shape, dtype); reads headers only.

    The index and the shard headers must agree exactly: each tensor the index lists is in the
    shard it names, and each tensor in a shard is listed in the index for that shard.
    """
    d = _directory(path)
    wm = _weight_map(d)
    by_file: dict[str, list[str]] = {}
    for name, file in wm.items():
        by_file.setdefault(file, []).append(name)
    problems: list[str] = []
    out: dict[str, TensorInfo] = {}
    for file in sorted(by_file):
        shard = d / file
        if not shard.is_file():
            names = by_file[file]
            raise CheckpointError(
                f"{d / INDEX_NAME} names missing shard {file} (for {len(names)} tensors, "
                f"e.g. {names[0]!r})"
            )
        header = read_header(shard)
        for name in by_file[file]:
            if name in header:
                out[name] = header[name]
            else:
                problems.append(f"{name!r}: index maps it to {file}, which does not contain it")
        for name in header:
            if wm.get(name) != file:
                where = f"index maps it to {wm[name]}" if name in wm else "not in the index"
                problems.append(f"{name!r}: present in {file} but {where}")
    if problems:
        raise CheckpointError(_lines(f"{d}: index and shards disagree:", problems))
    return out


def _check(d: Path, infos: dict[str, TensorInfo], expected: Mapping[str, TensorSpec], ignore):
    missing = [f"{n!r}: expected {_spec(s)}, not in the checkpoint"
               for n, s in expected.items() if n not in infos]
    unexpected = [f"{n!r} in {i.file}: {_spec(i)}, not expected"
                  for n, i in infos.items() if n not in expected and not ignore(n)]
    mismatched = []
    for n, s in expected.items():
        i = infos.get(n)
        if i is None:
            continue
        if tuple(i.shape) != tuple(s.shape):
            mismatched.append(f"{n!r} in {i.file}: shape expected {list(s.shape)}, "
                              f"found {list(i.shape)}")
        if i.dtype != s.dtype:
            mismatched.append(f"{n!r} in {i.file}: dtype expected {_dt(s.dtype)}, "
                              f"found {_dt(i.dtype)}")
    kinds = [("missing tensors", missing), ("unexpected tensors", unexpected),
             ("shape/dtype mismatches", mismatched)]
    found = [(k, v) for k, v in kinds if v]
    if not found:
        return
    title, items = found[0]
    msg = _lines(f"{d}: {len(items)} {title}:", items)
    others = ", ".join(f"{len(v)} {k}" for k, v in found[1:])
    hint = ""
    dspark = ("mtp.0.main_proj.weight", "mtp.2.markov_head.markov_w1.weight")
    if any(n in infos and n not in expected for n in dspark):
        hint = (f"\n  hint: the checkpoint's mtp.* is a DSpark drafter ({dspark[0]!r}), but config.json has no "
                "dspark_* keys (dspark_block_size, dspark_noise_token_id, dspark_target_layer_ids, "
                "dspark_markov_rank), so it was read as an MTP module")
    elif infos and all(n.startswith("mtp.") for n in infos) and "embed.weight" in expected:
        hint = ("\n  hint: the directory holds only mtp.* tensors, a DSpark drafter shipped on its own: load it "
                "onto its target with speculative_config={'method': 'dspark', 'model': <this directory>}")
    elif any(n.startswith("mtp.0.e_proj") for n in infos) and "mtp.0.main_proj.weight" in expected:
        hint = ("\n  hint: config.json has dspark_* keys, but the checkpoint's mtp.* is an MTP module "
                "('mtp.0.e_proj.weight'), not a DSpark drafter")
    raise CheckpointError(msg + (f"\n  (also {others})" if others else "") + hint)


def _dt(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def _spec(s) -> str:
    return f"{_dt(s.dtype)} {list(s.shape)}"


def load_state(
    path: str | os.PathLike,
    expected: Mapping[str, TensorSpec],
    *,
    device: str | torch.device = "cpu",
    ignore: Callable[[str], bool] = lambda name: False,
    progress: bool | None = None,
    only: Collection[str] | None = None,
    slices: Mapping[str, tuple[int, int, int]] | None = None,
    host: Callable[[str], bool] = lambda name: False,
) -> dict[str, torch.Tensor]:
    """Load exactly the tensors in `expected` from a checkpoint directory, strictly.

    Every expected tensor must be present with equal shape and dtype, and every checkpoint
    tensor must be expected unless ignore(name) is true (ignored tensors are not loaded).
    Shards are read one at a time, memory-mapped, each tensor moved to `device`. progress:
    tqdm bar over bytes; None shows it when the tensors to load exceed 1 GiB.

    One rank of a parallel layout: `only` loads just those of the expected tensors (the rest are
    checked against the headers, not read) and `slices` {name: (dim, start, stop)} reads only
    that range of a tensor from its mapped shard (the rest of it is never read).

    `host(name)` true: that tensor stays on the CPU, as mapped, whatever `device` is (the routed
    experts under hybrid placement, `cpu_experts`).
    """
    d = _directory(path)
    infos = list_tensors(d)
    _check(d, infos, expected, ignore)
    slices = dict(slices or {})
    only = None if only is None else set(only)
    wanted = [n for n in expected if only is None or n in only]
    for name, (dim, start, stop) in slices.items():
        shape = infos[name].shape if name in infos else None
        if name not in expected or (only is not None and name not in only) or shape is None or not (0 <= dim < len(shape) and 0 <= start < stop <= shape[dim]):
            raise CheckpointError(f"tensor {name!r}: cannot read slice [{start}:{stop}] of dim {dim} from "
                                  f"{_spec(infos[name]) if name in infos else 'a tensor the checkpoint lacks'}")

    def nbytes(n):
        shape = list(infos[n].shape)
        if n in slices:
            dim, start, stop = slices[n]
            shape[dim] = stop - start
        return math.prod(shape) * infos[n].dtype.itemsize
    by_file: dict[str, list[str]] = {}
    for name in wanted:
        by_file.setdefault(infos[name].file, []).append(name)
    total = sum(nbytes(n) for n in wanted)
    if progress is None:
        progress = total > _AUTO_PROGRESS_BYTES
    bar = None
    if progress:
        from tqdm import tqdm

        bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {d.name}")
    device = torch.device(device)
    out: dict[str, torch.Tensor] = {}
    try:
        for file in sorted(by_file):
            shard = d / file
            name = None
            try:
                with safe_open(str(shard), framework="pt", device="cpu") as f:
                    for name in by_file[file]:
                        if name in slices:
                            dim, start, stop = slices[name]
                            t = f.get_slice(name)[(slice(None),) * dim + (slice(start, stop),)]
                        else:
                            t = f.get_tensor(name)
                        if device.type != "cpu" and not host(name):
                            t = t.to(device)
                        out[name] = t
                        if bar is not None:
                            bar.update(t.numel() * t.element_size())
            except (SafetensorError, OSError, RuntimeError) as e:
                what = f"tensor {name!r} from {shard}" if name else str(shard)
                raise CheckpointError(f"reading {what} failed: {e}") from e
    finally:
        if bar is not None:
            bar.close()
    out = {name: out[name] for name in wanted}
    for name, t in out.items():
        shape = list(infos[name].shape)
        if name in slices:
            dim, start, stop = slices[name]
            shape[dim] = stop - start
        if t.dtype != infos[name].dtype or list(t.shape) != shape:
            raise CheckpointError(
                f"tensor {name!r} from {d / infos[name].file} read as {_dt(t.dtype)} "
                f"{list(t.shape)}, header says {_spec(infos[name])}"
                + (f" (slice {slices[name]})" if name in slices else "")
            )
    return out
