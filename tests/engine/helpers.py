"""Shared by the engine tests: requests arriving while others run."""

from dayzero.engine.draft_policy import StepCost

# every proposed draft verified (what tests of the verification path need; engine/draft_policy.py)
FIXED = {"draft_policy": "fixed"}


def staggered(engine, prompts, params, every: int = 2) -> list:
    """Add two requests every `every` steps (mixed arrival: prefill chunks beside decodes), run
    to completion; returns the requests in arrival order."""
    reqs, pending, step = [], list(enumerate(prompts)), 0
    while pending or engine.has_unfinished():
        if pending and step % every == 0:
            for _ in range(2):
                if pending:
                    i, p = pending.pop(0)
                    reqs.append(engine.add_request(f"r{i}", p, params))
        engine.step()
        step += 1
    return reqs


class OracleDrafter:
    """A drafter that knows the answers (the tokens speculation-free decoding gives): `right`
    proposes the next k of them (every one accepted), else k tokens that are all wrong at the
    first position (every block rejected at its first token)."""
    method = "oracle"

    def __init__(self, answers: dict, k: int, right: bool = True, vocab: int = 500):
        self.answers, self.k, self.right, self.vocab = answers, k, right, vocab

    def propose(self, engine, plan) -> None:
        from dayzero.engine.drafter import draft_room
        for b in plan.seqs:
            r = plan.reqs[b]
            n = draft_room(r, self.k)
            if n:
                want = self.answers[r.rid][len(r.output_ids):len(r.output_ids) + n]
                r.draft = list(want) if self.right else [(want[0] + 1) % self.vocab] + list(want[1:])


class FrozenCost(StepCost):
    """A step-cost table fixed by the test (the engine's measurements are not added to it): per
    row bucket, or (bucketed False) exactly per row, so that no row is free."""

    def __init__(self, fixed: float, per_row: float, bucketed: bool = True):
        super().__init__()
        self.fixed, self.per_row, self.bucketed = fixed, per_row, bucketed
        self.ema = {b: fixed + per_row * b for b in (1, 2, 4, 5, 6, 7, 8, 10, 12, 14, 16, 20, 24, 28, 32, 40, 48)}

    def observe(self, rows, seconds):
        pass

    def __call__(self, rows):
        return super().__call__(rows) if self.bucketed else self.fixed + self.per_row * rows


def chosen_lengths(engine) -> list[int]:
    """Every draft length the engine's policy chooses from here on (requests with a proposal)."""
    seen: list[int] = []
    cut = engine.policy.cut

    def recording(batch):
        cut(batch)
        seen.extend(s.num_draft for s in batch if s.request.draft)

    engine.policy.cut = recording
    return seen


def recorded_drafts(llm) -> dict:
    """{prompt: [(output tokens so far, the draft proposed then), ...]} of every draft the engine's
    DSpark drafter proposes from here on."""
    seen: dict = {}
    propose = llm.engine.drafter.propose

    def recording(engine, plan):
        propose(engine, plan)
        for b in plan.seqs:
            r = plan.reqs[b]
            if r.draft:
                seen.setdefault(tuple(r.prompt_ids), []).append((len(r.output_ids), tuple(r.draft)))

    llm.engine.drafter.propose = recording
    return seen


def drafts_alike_alone_batched_and_after_hits(ckpt, spec: dict, prompts: list, params, min_drafts: int) -> None:
    """The DSpark drafts themselves (not only the tokens) are the same for each prompt run alone, batched in
    7-token chunks with staggered arrivals, and again after prefix-cache hits (asserted to happen); at least
    `min_drafts` drafts are compared."""
    from dayzero import LLM
    alone = LLM(ckpt, **spec)
    want = recorded_drafts(alone)
    for p in prompts:
        alone.generate([p], params)
    batched = LLM(ckpt, max_num_batched_tokens=7, **spec)
    got = recorded_drafts(batched)
    staggered(batched.engine, prompts, params)
    assert got == want and sum(len(v) for v in want.values()) >= min_drafts
    got.clear()
    hits = batched.engine.kv.hits
    batched.generate(prompts, params)
    assert batched.engine.kv.hits > hits and got == want
