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
