"""The DSpark drafter behind the engine's drafter seam (engine/drafter.py; the module itself:
reference/dspark.py; DeepSeek-V4.1's: v41/dspark.py, through its ServedV41's `dspark_hidden` /
`dspark_draft`), on one rank or many (tensor parallel, TP + EP, DP-attention + EP).

After each step, on the step's cache (before its commits), every rank (`dspark_step`, through the
engine's runner, as the step's forward):
  1. every request that advanced writes its stages' context rows for the positions it computed
     (prefill chunks included), from the target layers' outputs the step's forward kept;
  2. every decoding request drafts a block of k rows after its last computed position c - 1:
     [anchor = its last known token, noise x (k - 1)] at positions c .. c + k - 1;
  3. the Markov head runs left to right over all drafting requests at once, each draft token
     sampled with the request's own sampling noise for that output index (sampling.py), so the
     verification accepts it exactly when the target samples the same token.
Draft length: min(k, what the request's limits leave), cut before the first token whose
cumulative survival (the product of the confidence head's values so far) falls below
`confidence_threshold` (0: never cut). The confidences of the proposed tokens are kept
(`last_confidence`) and handed to the engine's draft policy with the draft (`Request.draft_conf`),
which weighs them against the measured cost of a step with more rows (engine/draft_policy.py).
"""
from __future__ import annotations

import torch

from dayzero.engine.drafter import DraftPlan, draft_room
from dayzero.engine.sampling import sample
from dayzero.reference.dspark import draft_block, main_hidden
from dayzero.reference.seqcache import Batch


class DSparkDrafter:
    """Rank 0's side: which requests draft and how far (`draft_room`), the block each rank then
    computes (`dspark_step`, run by every rank through the engine's runner), and the drafts with
    their confidences handed to the requests."""
    method = "dspark"
    captures = True  # every rank's forward keeps the target layers' outputs (WorkerSpec.capture)

    def __init__(self, model, k: int, confidence_threshold: float = 0.0):
        self.model, self.k, self.threshold = model, k, confidence_threshold
        self.last_confidence: list[list[float]] = []  # per drafting request of the last step

    def propose(self, engine, plan: DraftPlan) -> None:
        blocks = []
        for b in plan.seqs:
            r = plan.reqs[b]
            if n := draft_room(r, self.k):
                blocks.append((b, r.num_computed, r.all_ids[r.num_computed], n, r.params, r.seed,
                               len(r.output_ids)))
        owners = ([engine.dp_owner[r.rid] for r in plan.reqs],) if engine.dp > 1 else ()  # DP: each on its rank
        out = engine.runner.dspark(plan.rows, plan.seqs, plan.starts, plan.lengths, plan.tables, blocks, self.k,
                                   self.threshold, *owners)
        self.last_confidence = []
        for blk, (drafts, conf) in zip(blocks, out):
            r = plan.reqs[blk[0]]
            r.draft, r.draft_conf = drafts, conf  # the draft policy's acceptance probabilities (engine/draft_policy.py)
            self.last_confidence.append(conf)


@torch.no_grad()
def dspark_step(worker, rows: list[int], seqs: list[int], starts: list[int], lengths: list[int],
                tables: list[dict], blocks: list[tuple], k: int, threshold: float, counts: list[int] | None = None
                ) -> list[tuple[list[int], list[float]]]:
    """What every rank runs after a step, on the step's cache (before its commits), with the
    target layers' outputs its forward kept: the context rows of the step's computed positions
    (`rows` of the forward, sequence seqs[i] from starts[i], lengths[i] positions), then one draft
    block per entry of `blocks` = (sequence, first position, anchor token, most tokens to propose,
    sampling params, seed, output index of the first draft) and its Markov loop. Returns each
    block's (draft tokens, their confidences). Tensor parallel: every rank computes every block
    (the stages' collectives), and the same tokens; DP-attention: each rank its own requests' rows
    and blocks, and a rank with no block joins the stages' MoE collectives while another drafts
    (`counts`: every rank's block rows). The step's cache: the eager step's own, or after a
    replayed step (recorded graphs) one over its block tables `tables`."""
    model, dev = worker.model, worker.device
    stages = model.mtp
    cache = worker._last[1] if worker._last is not None else None
    if cache is None and rows:
        cache = worker._eager_cache(tables, [0] * len(tables))
    if rows:
        own = getattr(model, "dspark_hidden", None)  # DeepSeek-V4.1 (v41/served.py): its capture and stages
        hidden = (own(worker.captured) if own else main_hidden(worker.captured, model.args))[torch.tensor(rows, device=dev)]
        st0 = stages[0]
        main_x = st0.main_norm(st0.main_proj(hidden))
        ctx = Batch(starts, lengths, cache, dev, ids=seqs)
        for st in stages:
            st.write_context(main_x, ctx)
    if not blocks:
        if counts is not None and any(counts):  # DP-attention: another rank drafts
            for st in stages:
                st.ffn.idle(model.compute_dtype, dev)
        if cache is not None:
            cache.check()
        return []
    anchors = torch.tensor([blk[2] for blk in blocks], device=dev)
    batch = Batch([blk[1] for blk in blocks], [k] * len(blocks), cache, dev, ids=[blk[0] for blk in blocks])
    own = getattr(model, "dspark_draft", None)
    h, U = own(anchors, batch, k) if own else draft_block(model, stages, anchors, batch, k)
    out = _markov(stages[-1], h, U, anchors, blocks, k, threshold)
    cache.check()
    return out


def _markov(last, h, U, anchors, blocks, k: int, threshold: float) -> list[tuple[list[int], list[float]]]:
    """The Markov head left to right over every block at once: each draft token sampled with its
    request's own noise for that output index (sampling.py), so verification accepts it exactly
    when the target samples the same token; a block stops before the first token whose cumulative
    survival (product of the confidences) is below `threshold`, or where its room ends."""
    prev, drafts, conf = anchors, [[] for _ in blocks], [[] for _ in blocks]
    room = [blk[3] for blk in blocks]
    survival = [1.0] * len(blocks)
    for i in range(k):
        e = last.markov_head.embed(prev)
        logits = (U[:, i] + last.markov_head.bias(e)).cpu()
        c = last.confidence_head(h[:, i], e).cpu()
        toks = []
        for j, (_, _, _, _, params, seed, index) in enumerate(blocks):
            tok = 0
            if i < room[j]:
                survival[j] *= float(c[j])
                if survival[j] < threshold:
                    room[j] = i  # the block ends before this token
                else:
                    tok = sample(logits[j], params, seed, index + i)
                    drafts[j].append(tok)
                    conf[j].append(float(c[j]))
            toks.append(tok)
        prev = torch.tensor(toks, device=anchors.device)
        if all(i + 1 >= n for n in room):
            break
    return list(zip(drafts, conf))
