"""Batch invariance checks (issue 20), shared by `dayzero verify` and the tests: a request's result
must not depend on what else the engine computes beside it.

- `op_rows`: every op of a table computes a row with the same bits alone and in calls of more rows
  (shapes from ops/cases.py; rows 1, n - 1, blocks of 5 and 17 and n - 2 of n = 41, 200 for the
  MoE so that experts get the many-rows paths).
- `engine`: one request's tokens and logprobs through the engine alone, in a crowd of other
  requests (its prompt also a prefix-cache hit there), and prefilled in 7-token chunks among
  staggered arrivals without prefix caching: bit-identical or the check fails.
"""
from __future__ import annotations

import torch

from dayzero.ops import OP_NAMES, OpTable, cases

BLOCKS = lambda n: ((0, 1), (n - 1, n), (3, 8), (2, 2 + 17), (1, n - 1))  # noqa: E731  (17, n - 2: many-rows paths)


def _rows(obj, n: int, a: int, b: int):
    """obj with rows a:b of every tensor whose first dim is the op's n rows."""
    if isinstance(obj, torch.Tensor):
        return obj[a:b] if obj.dim() and obj.shape[0] == n else obj
    if isinstance(obj, (list, tuple)):
        return type(obj)(_rows(o, n, a, b) for o in obj)
    return obj


def _rows_of(obj, a: int, b: int):
    return obj[a:b] if isinstance(obj, torch.Tensor) else obj


def op_rows(table: OpTable, device: torch.device, sizes=("tiny", "small"),
            dtypes=(torch.float32, torch.bfloat16)) -> list[dict]:
    """One record per (op case, size, dtype): `invariant` (bool) and the blocks of rows whose
    result differs from the same rows inside the whole call."""
    out = []
    for case in OP_NAMES + tuple(cases.VARIANTS):
        op = cases.VARIANTS.get(case, case)
        fn = getattr(table, op)
        for size in sizes:
            n = 200 if case == "moe_experts" and size == "small" else 41
            for dtype in dtypes:
                args, kw = cases.make(case, size, device, dtype, N=n)
                whole = fn(*args, **kw)
                whole = whole if isinstance(whole, tuple) else (whole,)
                bad = []
                for a, b in BLOCKS(n):
                    part = fn(*_rows(args, n, a, b), **kw)
                    part = part if isinstance(part, tuple) else (part,)
                    if not all(torch.equal(_rows_of(w, a, b), p) for w, p in zip(whole, part)):
                        bad.append(f"{a}:{b}")
                out.append(dict(op=op, case=case, size=size, rows=n, dtype=str(dtype).removeprefix("torch."),
                                invariant=not bad, differing_blocks=bad))
    return out


def engine(device: torch.device, choice: str | None, numerics: str, new_tokens: int = 12, path=None) -> dict:
    """The built-in model (or the checkpoint at `path`), greedy with logprobs: one request alone,
    among 7 others, and chunked among staggered arrivals. passed: all three bit-identical."""
    from dayzero import LLM, SamplingParams
    target = "KING LEAR:\nAttend the lords of France and Burgundy, Gloucester.\n"
    others = ["ROMEO:\nBut, soft! what light through yonder window breaks?\n", "First Citizen:\n",
              "HAMLET:\nTo be, or not to be, that is the question:\n", "JULIET:\nO Romeo, Romeo!\n",
              "KING LEAR:\nAttend the lords", "MACBETH:\nIs this a dagger which I see before me,\n",
              "PORTIA:\nThe quality of mercy is not strain'd,\n"]
    p = SamplingParams(temperature=0.0, max_tokens=new_tokens, ignore_eos=True, logprobs=2)
    opts = dict(device=device, ops=choice, numerics=numerics, num_speculative_tokens=0)

    def result(o) -> tuple:
        return o.token_ids, o.logprobs

    llm = LLM(path, **opts)
    alone = result(llm.generate([target], p)[0])
    crowd = result(llm.generate(others[:3] + [target] + others[3:], p)[3])  # also a prefix-cache hit
    chunked_llm = LLM(path, max_num_batched_tokens=7, enable_prefix_caching=False, **opts)
    e = chunked_llm.engine
    reqs, pending, step = [], list(enumerate(others[:4] + [target] + others[4:])), 0
    while pending or e.has_unfinished():  # two arrivals every other step: chunks beside decodes
        if pending and step % 2 == 0:
            for _ in range(2):
                if pending:
                    i, text = pending.pop(0)
                    reqs.append(e.add_request(f"inv{i}", chunked_llm.tokenizer.encode(text), p, text))
        e.step()
        step += 1
    late = next(r for r in reqs if r.rid == "inv4")
    chunked = (list(late.output_ids), list(late.logprobs))

    def first_difference(a, b):
        for i, (x, y) in enumerate(zip(zip(*a), zip(*b))):
            if x != y:
                return i
        return None if a == b else min(len(a[0]), len(b[0]))

    crowd_diff, chunk_diff = first_difference(alone, crowd), first_difference(alone, chunked)
    return dict(model="engine batch invariance (builtin, greedy + logprobs)", kind="invariance", numerics=numerics,
                ops=llm.engine.ops.name, tokens=len(alone[0]), crowd_identical=crowd_diff is None,
                chunked_identical=chunk_diff is None, crowd_first_difference=crowd_diff,
                chunked_first_difference=chunk_diff, passed=crowd_diff is None and chunk_diff is None)
