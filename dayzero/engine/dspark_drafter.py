"""The DSpark drafter behind the engine's drafter seam (engine/drafter.py; the module itself:
reference/dspark.py). One rank only (the engine refuses DSpark with tensor_parallel_size > 1).

After each step, on the step's cache (before its commits):
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
    method = "dspark"

    def __init__(self, model, k: int, confidence_threshold: float = 0.0):
        self.model, self.k, self.threshold = model, k, confidence_threshold
        self.last_confidence: list[list[float]] = []  # per drafting request of the last step

    def attach(self, worker) -> None:
        worker.capture = True  # the step's forward keeps the target layers' outputs

    @torch.no_grad()
    def propose(self, engine, plan: DraftPlan) -> None:
        worker, model = engine.worker, self.model
        stages, dev = model.mtp, worker.device
        _, cache = worker._last
        hidden = main_hidden(worker.captured, model.args)[torch.tensor(plan.rows, device=dev)]
        st0 = stages[0]
        main_x = st0.main_norm(st0.main_proj(hidden))
        ctx = Batch(plan.starts, plan.lengths, cache, dev, ids=plan.seqs)
        for st in stages:
            st.write_context(main_x, ctx)
        drafting = [(b, n) for b in plan.seqs if (n := draft_room(plan.reqs[b], self.k))]
        self.last_confidence = []
        if drafting:
            self._draft(plan, drafting, cache, dev)
        cache.check()

    def _draft(self, plan: DraftPlan, drafting: list[tuple[int, int]], cache, dev) -> None:
        k, stages = self.k, self.model.mtp
        reqs = [plan.reqs[b] for b, _ in drafting]
        anchors = torch.tensor([r.all_ids[r.num_computed] for r in reqs], device=dev)
        batch = Batch([r.num_computed for r in reqs], [k] * len(reqs), cache, dev, ids=[b for b, _ in drafting])
        h, U = draft_block(self.model, stages, anchors, batch, k)
        last = stages[-1]
        prev, drafts, conf = anchors, [[] for _ in reqs], [[] for _ in reqs]
        room = [n for _, n in drafting]  # tokens each request may still propose
        survival = [1.0] * len(reqs)
        for i in range(k):
            e = last.markov_head.embed(prev)
            logits = (U[:, i] + last.markov_head.bias(e)).cpu()
            c = last.confidence_head(h[:, i], e).cpu()
            toks = []
            for j, r in enumerate(reqs):
                tok = 0
                if i < room[j]:
                    survival[j] *= float(c[j])
                    if survival[j] < self.threshold:
                        room[j] = i  # the block ends before this token
                    else:
                        tok = sample(logits[j], r.params, r.seed, len(r.output_ids) + i)
                        drafts[j].append(tok)
                        conf[j].append(float(c[j]))
                toks.append(tok)
            prev = torch.tensor(toks, device=dev)
            if all(i + 1 >= n for n in room):
                break
        for r, d, cs in zip(reqs, drafts, conf):
            r.draft, r.draft_conf = d, cs  # the draft policy's acceptance probabilities (engine/draft_policy.py)
        self.last_confidence = conf
