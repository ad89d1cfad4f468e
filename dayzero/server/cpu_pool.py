"""The server's worker threads for per-request CPU work (parsing, rendering, tokenization,
detokenization of long outputs), in two lanes so small requests never wait behind large ones."""
from __future__ import annotations

import asyncio
from concurrent.futures import ThreadPoolExecutor

LARGE_BODY_BYTES = 64 * 2**10  # request bodies above this are parsed and tokenized in the large lane
LARGE_OUTPUT_IDS = 4096  # detokenizing an output longer than this is large-lane work
INLINE_OUTPUT_IDS = 256  # a stream shapes its chunks on the loop while its output is this short (~0.1 ms)


class CpuPool:
    """Two bounded lanes of worker threads for per-request CPU work, so the event loop stays free.

    Small jobs (bodies up to LARGE_BODY_BYTES, outputs up to LARGE_OUTPUT_IDS) never queue behind
    large ones: clients posting megabyte prompts can occupy at most the large lane's threads. The
    queue in front of the lanes is bounded by the server's in-flight limit, since a request holds
    its slot from before its body is read. The tokenizer releases the GIL (tokenizer.py); the pure
    Python parts (JSON, rendering) share it with the loop at the interpreter's switch interval."""

    def __init__(self, workers: int):
        self.small = ThreadPoolExecutor(workers, thread_name_prefix="dayzero-cpu")
        self.large = ThreadPoolExecutor(workers, thread_name_prefix="dayzero-cpu-large")

    async def run(self, fn, *args, large: bool = False):
        return await asyncio.get_running_loop().run_in_executor(self.large if large else self.small, fn, *args)

    def shutdown(self) -> None:
        for ex in (self.small, self.large):
            ex.shutdown(wait=False, cancel_futures=True)
