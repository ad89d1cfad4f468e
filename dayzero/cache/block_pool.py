"""Block pool: free blocks, reference counts and content hashes (plain Python, no tensors).

A block whose reference count drops to zero goes to the back of the free queue but keeps its
hash, so a later request with the same prefix can take it back (prefix caching); allocation takes
from the front, i.e. evicts the least recently freed cached block first.
"""
from __future__ import annotations

from collections import OrderedDict


class NoFreeBlocks(RuntimeError):
    pass


class BlockPool:
    def __init__(self, num_blocks: int, name: str = "pool"):
        if num_blocks <= 0:
            raise ValueError(f"{name}: needs at least one block, got {num_blocks}")
        self.name, self.num_blocks = name, num_blocks
        self.ref = [0] * num_blocks
        self.free_queue: OrderedDict[int, None] = OrderedDict((b, None) for b in range(num_blocks))
        self.hash_of: dict[int, int] = {}
        self.block_of: dict[int, int] = {}

    @property
    def num_free(self) -> int:
        return len(self.free_queue)

    @property
    def usage(self) -> float:
        return 1 - self.num_free / self.num_blocks

    def allocate(self, n: int) -> list[int]:
        if n > self.num_free:
            raise NoFreeBlocks(f"{self.name}: {n} blocks requested, {self.num_free} free")
        out = []
        for _ in range(n):
            b, _ = self.free_queue.popitem(last=False)
            h = self.hash_of.pop(b, None)
            if h is not None and self.block_of.get(h) == b:
                del self.block_of[h]
            self.ref[b] = 1
            out.append(b)
        return out

    def free(self, blocks) -> None:
        for b in blocks:
            if b is None:
                continue
            if self.ref[b] <= 0:
                raise AssertionError(f"{self.name}: block {b} freed twice")
            self.ref[b] -= 1
            if self.ref[b] == 0:
                self.free_queue[b] = None

    def cache(self, block: int, h: int) -> None:
        """Name a full block's content; the first block with a given content keeps the name."""
        if h not in self.block_of and block not in self.hash_of:
            self.block_of[h] = block
            self.hash_of[block] = h

    def lookup(self, h: int) -> int | None:
        return self.block_of.get(h)

    def take(self, block: int) -> None:
        """Add a reference to a cached block (reviving it from the free queue if unused)."""
        if self.ref[block] == 0:
            del self.free_queue[block]
        self.ref[block] += 1

    def reset_cache(self) -> None:
        self.hash_of.clear()
        self.block_of.clear()
