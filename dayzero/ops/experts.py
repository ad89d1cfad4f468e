"""Routed-expert weights as `moe_experts` takes them: one stacked tensor [E, ...] per weight and
scale (the Triton kernels index a stack), or a `PerExpert` list of each expert's own tensor where
it lies, memory-mapped from the checkpoint shard (the native CPU kernel reads an address table,
so a CPU run keeps no copy of the experts beside the page cache: a checkpoint larger than RAM
streams the experts a step touches from disk). The twins index either the same way (`w[e]`).
"""
from __future__ import annotations

import torch


class PerExpert:
    """E tensors of one shape and dtype on one device (expert e's weight or scale), not copied.
    `addresses`: int64 [E], the first byte of each (the native kernel's table)."""
    __slots__ = ("tensors", "addresses", "shape", "dtype", "device")

    def __init__(self, tensors):
        tensors = list(tensors)
        if not tensors:
            raise ValueError("PerExpert needs at least one expert's tensor")
        t0 = tensors[0]
        for i, t in enumerate(tensors):
            if t.shape != t0.shape or t.dtype != t0.dtype or t.device != t0.device:
                raise ValueError(f"expert {i}: {t.dtype} {tuple(t.shape)} on {t.device}, expert 0: "
                                 f"{t0.dtype} {tuple(t0.shape)} on {t0.device}")
            if not t.is_contiguous():
                raise ValueError(f"expert {i}: its tensor must be contiguous (read in place)")
        self.tensors, self.shape, self.dtype, self.device = tensors, (len(tensors), *t0.shape), t0.dtype, t0.device
        self.addresses = torch.tensor([t.data_ptr() for t in tensors], dtype=torch.int64)

    def __len__(self) -> int:
        return len(self.tensors)

    def __getitem__(self, e: int) -> torch.Tensor:
        return self.tensors[e]

    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors)

    def __repr__(self) -> str:
        return f"PerExpert({len(self)} x {self.dtype} {tuple(self.shape[1:])} on {self.device})"
