"""The engine <-> drafter seam (DESIGN.md seam 5): a drafter proposes up to k tokens per decoding
request after each step; the next step verifies them in the same forward as every other token
(engine.py, sampling.verify_block) and keeps what the target would have produced anyway.

Rollback is by recomputation: every cache row is addressed by (sequence, position), a step writes
the rows of its positions (drafted ones included) and reads only rows at or before each query's
position, and `num_computed` advances over accepted positions only. A rejected position's window
row, compressor row, compressed entry or indexer key is therefore never read before the next
step rewrites it with the accepted token's (seqcache.py); the drafter's own rows (MTP's window,
DSpark's per-stage context rows) are written for accepted positions only.

Drafters: `MTPDrafter` (the checkpoint's one MTP module, k = 1) and `DSparkDrafter`
(engine/dspark_drafter.py: the three-stage block drafter of V4-Flash-0731 / -DSpark, k <= its
block size). `speculative_config={"method": "mtp" | "dspark", "num_speculative_tokens": k}`
chooses; the default follows the checkpoint (DSpark when it ships one, else MTP when it has an
MTP module, else none); k = 0 turns speculation off. DSpark also takes "confidence_threshold" t
(dayzero's key, default 0: every request drafts its full k): a request's block stops before the
first draft token whose cumulative survival (product of the confidence head's values) is below t.
"model": a DSpark drafter shipped in a directory of its own (or a built-in drafter name such as
"shakespeare-dspark"), loaded onto the target at start by every rank under its layout
(loader/drafter_dir.py, `load_model(..., drafter=)`).
"draft_policy": "adaptive" (default) | "fixed": how many of the proposed drafts each request
verifies per step (engine/draft_policy.py: from the acceptance probabilities and the measured
cost of a step; "fixed": all the budget holds).
"""
from __future__ import annotations

import os
from dataclasses import dataclass

from dayzero.config import ModelArgs
from dayzero.engine.request import Request
from dayzero.engine.sampling import sample

METHODS = ("mtp", "dspark")
KEYS = ("method", "num_speculative_tokens", "confidence_threshold", "draft_policy", "model")
POLICIES = ("adaptive", "fixed")  # engine/draft_policy.py


def check_speculative_config(cfg, num_speculative_tokens) -> None:
    """Shape errors of the two spellings, before any model is read."""
    if num_speculative_tokens is not None and (not isinstance(num_speculative_tokens, int)
                                               or isinstance(num_speculative_tokens, bool)
                                               or num_speculative_tokens < 0):
        raise ValueError(f"num_speculative_tokens: must be a non-negative integer, got {num_speculative_tokens!r}")
    if cfg is None:
        return
    if not isinstance(cfg, dict):
        raise ValueError(f"speculative_config: must be a dict like {{'method': 'dspark', "
                         f"'num_speculative_tokens': 3}}, got {cfg!r}")
    unknown = sorted(set(cfg) - set(KEYS))
    if unknown:
        raise ValueError(f"speculative_config: unknown key(s) {unknown}; known: {list(KEYS)}")
    if cfg.get("method") is not None and cfg["method"] not in METHODS:
        raise ValueError(f"speculative_config.method: must be one of {list(METHODS)}, got {cfg['method']!r}")
    k = cfg.get("num_speculative_tokens")
    if k is not None and (not isinstance(k, int) or isinstance(k, bool) or k < 0):
        raise ValueError(f"speculative_config.num_speculative_tokens: must be a non-negative integer, got {k!r}")
    t = cfg.get("confidence_threshold", 0.0)
    if not isinstance(t, (int, float)) or isinstance(t, bool) or not 0 <= t < 1:
        raise ValueError(f"speculative_config.confidence_threshold: must be a number in [0, 1), got {t!r}")
    if t and cfg.get("method") == "mtp":
        raise ValueError("speculative_config.confidence_threshold: only DSpark has a confidence head, not 'mtp'")
    if cfg.get("draft_policy", "adaptive") not in POLICIES:
        raise ValueError(f"speculative_config.draft_policy: must be one of {list(POLICIES)}, "
                         f"got {cfg['draft_policy']!r}")
    check_drafter_model(cfg)
    if (k is not None and num_speculative_tokens is not None and k != num_speculative_tokens):
        raise ValueError(f"num_speculative_tokens={num_speculative_tokens} disagrees with "
                         f"speculative_config.num_speculative_tokens={k}: give one")


def check_drafter_model(cfg: dict) -> None:
    """speculative_config "model": a DSpark drafter directory (or built-in drafter name) to load onto
    the target (loader/drafter_dir.py); only DSpark ships as a separate drafter."""
    m = cfg.get("model")
    if m is None:
        return
    if not isinstance(m, (str, os.PathLike)) or not str(m):
        raise ValueError(f"speculative_config.model: must be a DSpark drafter directory or a built-in drafter "
                         f"name, got {m!r}")
    if cfg.get("method", "dspark") != "dspark":
        raise ValueError(f"speculative_config.model: a separate drafter is a DSpark drafter; method "
                         f"{cfg['method']!r} drafts with the checkpoint's own MTP module (drop 'model')")


def resolve(args: ModelArgs, cfg: dict | None, num_speculative_tokens: int | None) -> tuple[str | None, int]:
    """(method or None, k) for this checkpoint. Errors name the option and what the checkpoint has."""
    check_speculative_config(cfg, num_speculative_tokens)
    cfg = cfg or {}
    k = cfg.get("num_speculative_tokens", num_speculative_tokens)
    has = {"dspark": args.dspark_stages > 0, "mtp": args.n_mtp_layers > 0}
    method = cfg.get("method")
    if method is None:
        method = "dspark" if has["dspark"] else "mtp" if has["mtp"] else None
        if method is None:
            if k:
                raise ValueError(f"num_speculative_tokens={k}: this checkpoint has neither an MTP module nor a "
                                 "DSpark drafter to draft with")
            return None, 0
    elif not has[method]:
        what = ("DSpark drafter (config keys dspark_*)" if method == "dspark"
                else "MTP module (num_nextn_predict_layers >= 1; a DSpark checkpoint's mtp.* is its drafter)")
        raise ValueError(f"speculative_config.method={method!r}: this checkpoint has no {what}; "
                         f"it has {', '.join(m for m in METHODS if has[m]) or 'no drafter'}")
    limit = 1 if method == "mtp" else args.dspark_block_size
    if k is None:
        k = limit
    if k > limit:
        why = ("the checkpoint's one MTP module drafts one token" if method == "mtp" else
               f"DSpark was trained on blocks of dspark_block_size={limit}; longer blocks are out of distribution")
        raise ValueError(f"num_speculative_tokens={k} with method {method!r}: at most {limit} ({why})")
    return (method, k) if k else (None, 0)


def make_drafter(engine):
    """The engine's drafter for its resolved method (None: no speculation), on one rank or many."""
    cfg = engine.eargs.speculative_config or {}
    if engine.spec_method == "mtp":
        return MTPDrafter(engine.spec_k)
    if engine.spec_method == "dspark":
        from dayzero.engine.dspark_drafter import DSparkDrafter
        return DSparkDrafter(engine.model, engine.spec_k, cfg.get("confidence_threshold", 0.0))
    return None


def draft_room(r: Request, k: int) -> int:
    """How many draft tokens a request can use this step: 0 unless it is decoding (its last known
    token is the only one not computed), and no more than its max_tokens / context leave. 0
    for a request with a logits processor (constrained decoding): its mask at a drafted row must
    follow the drafts before it, and the processor only advances over tokens already output."""
    if r.finished or r.num_computed != r.num_tokens - 1 or r.params.logits_processor is not None:
        return 0
    return max(0, min(k, r.params.max_tokens - len(r.output_ids) - 1, r.max_len - r.num_tokens - 1))


@dataclass
class DraftPlan:
    """What the step computed, per request that advanced: request index b of the step, its first
    position `start` and `length` positions computed (accepted) this step, their rows in the step's
    packed forward, and the token after each of those positions (MTP's input)."""
    seqs: list[int]
    starts: list[int]
    lengths: list[int]
    rows: list[int]
    next_ids: list[int]
    reqs: list[Request]  # every request of the step, indexed by b
    tables: list[dict]  # the step's block tables (before its commits)


class MTPDrafter:
    """The checkpoint's MTP module: one token, from the final streams at each computed position and
    the token after it (its window row for position p is stored at p + 1)."""
    method = "mtp"

    def __init__(self, k: int = 1):
        self.k = k

    def propose(self, engine, plan: DraftPlan) -> None:
        owners = ([engine.dp_owner[r.rid] for r in plan.reqs],) if engine.dp > 1 else ()  # DP: each on its rank
        logits = engine.runner.draft(plan.rows, plan.seqs, plan.starts, plan.lengths, plan.next_ids, plan.tables,
                                     *owners)
        for b, lg in zip(plan.seqs, logits):
            r = plan.reqs[b]
            if draft_room(r, self.k):
                r.draft = [sample(lg, r.params, r.seed, len(r.output_ids))]  # the target's noise for that token
