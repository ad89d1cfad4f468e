"""Native paged-cache lookups (ops/cpu/lookup.c) leave engine steps bit for bit as they were: the
built-in model's decode with windows closing and prefix-cache hits (protected prefixes) gives the
same logits, step by step, as the same engine on the cache's PyTorch lookups."""
import torch

from dayzero import LLM, SamplingParams
from dayzero.cache import paged


def _run(prompts, monkeypatch, use_native: bool):
    with monkeypatch.context() as m:
        if not use_native:
            m.setattr(paged.native, "available", lambda: False)
        llm = LLM(device="cpu", ops="cpu", num_speculative_tokens=0, kv_cache_memory_bytes=64 << 20,
                  enable_prefix_caching=True)
        eng = llm.engine
        seen, forward, caches = [], eng.worker.forward, []
        setup = paged.PagedBatchCache._setup

        def keep(*a, **k):
            out = forward(*a, **k)
            seen.append(out)
            return out

        def note(self, *a, **k):
            setup(self, *a, **k)
            caches.append((self._native, self.protect is not None))

        eng.worker.forward = keep
        m.setattr(paged.PagedBatchCache, "_setup", note)
        params = SamplingParams(temperature=0.0, max_tokens=40, ignore_eos=True)  # past position 64: HCA closes
        first = [o.token_ids for o in llm.generate(prompts[:1], params)]
        rest = [o.token_ids for o in llm.generate(prompts, params)]  # shares the first prompt's prefix
    return first + rest, seen, caches


def test_native_lookups_keep_every_step_bit_identical(monkeypatch):
    g = torch.Generator().manual_seed(11)
    head = torch.randint(4, 200, (48,), generator=g).tolist()
    prompts = [head + torch.randint(4, 200, (n,), generator=g).tolist() for n in (4, 9, 17)]
    a, fast, fast_caches = _run(prompts, monkeypatch, True)
    b, slow, slow_caches = _run(prompts, monkeypatch, False)
    assert any(n for n, _ in fast_caches) and not any(n for n, _ in slow_caches)
    assert any(p for _, p in fast_caches)  # prefix hits: some steps protect a prefix
    assert a == b
    assert len(fast) == len(slow) >= 80
    for x, y in zip(fast, slow):
        assert x.shape == y.shape and torch.equal(x.view(torch.int32), y.view(torch.int32))
