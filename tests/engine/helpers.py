"""Shared by the engine tests: requests arriving while others run."""


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
