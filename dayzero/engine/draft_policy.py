"""How many of its proposed drafts each request verifies in a step (issue 22 item 3).

The drafter proposes up to k tokens per decoding request (engine/drafter.py); with
`speculative_config={"draft_policy": "adaptive"}` (the default) the engine then verifies, per
request and step, the k_i in 0..k that maximises the step's expected tokens per second, from

- acceptance probabilities per drafted position: DSpark's confidence head (its value c_j at
  position j is the probability that draft j is accepted given drafts < j were); for drafters
  without one (MTP) a running estimate per request, an exponential moving average over every
  proposal of that request whose outcome is known, verified or not (the coupled verifier accepts
  a draft iff it equals the token the target produces, so an unverified draft is judged against
  the token the step produced in its place). Draft j of a block survives with probability
  s_j = c_1 ... c_j, so k_i drafts yield 1 + S_i(k_i) = 1 + s_1 + .. + s_k_i tokens in expectation;
- the measured cost of a step: the engine times each step (schedule to commit, the drafter's
  forward included) and keeps an exponential moving average of its wall time per bucket of
  forward rows (`StepCost`; the buckets are those recorded steps are padded to, engine/graphs.py).
  No start-up calibration: the table fills from the steps the engine runs; a bucket's first step
  is not counted (kernel compilation, graph recording, first touch). The table is read as
  non-decreasing in rows (`StepCost.fitted`: the least-squares non-decreasing fit, weighted by
  steps); a bucket below every measured one costs the smallest measured one's cost, and a bucket
  not measured yet is taken to cost what the measured rows below it do, which explores it: the policy tries drafts that
  land there, and after two such steps its own measurement decides. This exploration is bounded
  (two steps per row bucket over the engine's life) and is the only place where a request can be
  slower than without drafts in expectation; without it a step size never run would never be
  measured (at batch 1 the engine would only ever know the cost of one row).

With R0 the step's rows without drafts and K = sum k_i, a request's expected rate is
(1 + S_i(k_i)) / T(R0 + K) against 1 / T(R0) without drafts. The chooser (`choose_lengths`)
maximises the step's sum of expected rates subject to every request of the step keeping at
least its no-draft rate under the table: 1 + S_i(k_i) >= T(R0 + K) / T(R0) for each decoding
request (drafting or not), and T(R0 + K) <= T(R0) while a prefill chunk shares the step (it
produces no token to pay for the slowdown). K = 0 always qualifies, so in expectation under the
measured costs no request is slower than without drafts (outside the exploration above). The
drafter's own forward is not part of the choice: it runs every step while speculation is on (its
context rows are needed for later drafts), whatever lengths are verified. It is weighed for the
engine instead: the drafter's share of each step is timed too (`draft_cost`, per row bucket of
the step), and a moving average of (expected rate of the chosen lengths) / (rate of the step with
no drafts and no drafter: T(R0) less the drafter's share) is kept (`payoff`). After 32 steps with
proposals, an average below 1 turns speculation off for the engine, as low acceptance does
(both only with `speculative_min_acceptance` > 0, the engine's "speculation may turn itself off").

The lengths never change a token: verification keeps exactly the target's tokens, whichever
prefix of the proposal is verified (sampling.verify_block). "fixed" verifies every proposed draft
the budget holds (the behaviour before this policy).
"""
from __future__ import annotations

from dayzero.engine.graphs import bucket_size

EMA = 0.2  # weight of a new step time in its bucket's average
ACCEPT_EMA = 0.25  # weight of a new observation in a request's running acceptance estimate
PRIOR = 0.5  # acceptance assumed before the engine has seen any draft's outcome
PAYOFF_EMA = 0.1  # weight of a step in the moving average of what speculation pays
PAYOFF_STEPS = 32  # steps with proposals before that average may turn speculation off


class StepCost:
    """Wall time of an engine step as a function of its forward rows: a moving average per row
    bucket (graphs.bucket_size: 1, 2, 4, 5, 6, 7, 8, 10, ...)."""

    def __init__(self, alpha: float = EMA):
        self.alpha = alpha
        self.ema: dict[int, float] = {}
        self.steps: dict[int, int] = {}  # steps seen per bucket (the first is not counted)
        self._fit: dict[int, float] | None = None

    def observe(self, rows: int, seconds: float) -> None:
        b = bucket_size(rows)
        n = self.steps.get(b, 0)
        self.steps[b] = n + 1
        if n == 0:
            return  # warm-up: compilation, graph recording, first touch of its buffers
        e = self.ema.get(b)
        self.ema[b] = seconds if e is None else e + self.alpha * (seconds - e)
        self._fit = None

    def __bool__(self) -> bool:
        return bool(self.ema)

    def __call__(self, rows: int) -> float:
        """Estimated seconds of a step with `rows` forward rows (needs one measured bucket)."""
        b = bucket_size(rows)
        fit = self.fitted()
        below = [t for bb, t in fit.items() if bb <= b]
        # a bucket below every measured one costs the smallest's; one not measured yet, what the
        # measured rows below it cost (so the policy explores it)
        return below[-1] if below else fit[min(fit)]

    def fitted(self) -> dict[int, float]:
        """The measured buckets' costs made non-decreasing in rows (noise can invert two buckets):
        the least-squares non-decreasing fit (pool adjacent violators), each bucket weighted by its
        counted steps (at most the moving average's effective sample size), so one noisy bucket
        is averaged with its neighbours rather than raising every larger one."""
        if self._fit is not None:
            return self._fit
        blocks: list[list[float]] = []  # [value, weight, number of buckets]
        keys = sorted(self.ema)
        for b in keys:
            blocks.append([self.ema[b], float(min(self.steps.get(b, 2) - 1, (2 - self.alpha) / self.alpha)), 1])
            while len(blocks) > 1 and blocks[-2][0] > blocks[-1][0]:
                v2, w2, n2 = blocks.pop()
                v1, w1, n1 = blocks[-1]
                blocks[-1] = [(v1 * w1 + v2 * w2) / (w1 + w2), w1 + w2, n1 + n2]
        values = [v for v, _, n in blocks for _ in range(n)]
        self._fit = dict(zip(keys, values))
        return self._fit

    def table(self) -> dict[int, float]:
        return dict(sorted(self.ema.items()))


def survival(probs: list[float]) -> list[float]:
    """s_j = p_1 ... p_j: the probability that drafts 1..j are all accepted."""
    out, s = [], 1.0
    for p in probs:
        s *= min(max(float(p), 0.0), 1.0)
        out.append(s)
    return out


def choose_lengths(probs: list[list[float]], base_rows: int, cost, prefill: bool = False) -> list[int]:
    """Draft lengths k_i (0 .. len(probs[i])) for the decoding requests of one step.

    probs[i]: request i's acceptance probability per proposed position (draft j given drafts < j
    accepted; empty: nothing proposed); base_rows: the step's rows without drafts (R0); cost:
    rows -> seconds (`StepCost`); prefill: a prefill chunk shares the step. See the module doc
    for the objective and the constraint. Ties go to fewer drafts."""
    n = len(probs)
    zero = [0] * n
    gains = [survival(p) for p in probs]  # marginal expected tokens of each request's j-th draft
    k_max = sum(len(g) for g in gains)
    if not k_max or not n:
        return zero
    t0 = cost(base_rows)
    best_rate, best = n / t0, zero
    # T is constant within a row bucket and the gains are >= 0, so the best K of a bucket is its
    # largest: only those (and K = k_max) are candidates
    order = sorted(((g, j, i) for i, gs in enumerate(gains) for j, g in enumerate(gs) if g > 0),
                   key=lambda x: (-x[0], x[1], x[2]))
    cands = [K for K in range(1, k_max + 1)
             if K == k_max or bucket_size(base_rows + K) != bucket_size(base_rows + K + 1)]
    for K in cands:
        t = cost(base_rows + K)
        rho = t / t0  # how much slower the step is than without drafts
        if prefill and rho > 1:
            continue
        ks = []
        for gs in gains:  # the fewest drafts that keep this request at its no-draft rate
            m, s = 0, 1.0
            while s < rho and m < len(gs):
                s += gs[m]
                m += 1
            if s < rho:
                break
            ks.append(m)
        if len(ks) < n or sum(ks) > K:
            continue
        room = K - sum(ks)
        for _, j, i in order:  # then the largest gains left (prefix-closed: each request's are non-increasing)
            if not room:
                break
            if j == ks[i]:
                ks[i] += 1
                room -= 1
        tokens = n + sum(sum(gs[:k]) for gs, k in zip(gains, ks))
        rate = tokens / cost(base_rows + sum(ks))  # fewer than K where the gains ran out: no slower
        if rate > best_rate * (1 + 1e-9):
            best_rate, best = rate, ks
    return best


class DraftPolicy:
    """The engine's chooser: cuts each scheduled request's drafts to the chosen length before the
    step's forward (`cut`), learns each request's acceptance (`observe`) and the step costs
    (`cost.observe`), and counts what it chose."""

    def __init__(self, mode: str):
        self.mode = mode
        self.cost = StepCost()
        self.proposals = 0  # (request, step) pairs scheduled with a proposal to verify
        self.chosen = 0  # draft tokens chosen for verification (after the budget's cut)
        self.seen = self.seen_accepted = 0  # draft outcomes observed (verified or not), accepted ones
        self.draft_cost = StepCost()  # the drafter's share of a step's time, per row bucket of the step
        # moving average of the chosen lengths' expected rate over the rate with no drafter at all
        self.payoff: float | None = None
        self.payoff_steps, self.min_steps = 0, PAYOFF_STEPS

    def probabilities(self, r) -> list[float]:
        """Acceptance probability per proposed position: the drafter's confidences when it has
        them (DSpark), else the request's running estimate (the engine's observed rate before the
        request has one of its own)."""
        if r.draft_conf is not None and len(r.draft_conf) >= len(r.draft):
            return list(r.draft_conf[:len(r.draft)])
        p = r.accept_rate
        if p is None:
            p = self.seen_accepted / self.seen if self.seen else PRIOR
        return [p] * len(r.draft)

    def cut(self, batch) -> None:
        """Set each scheduled request's num_draft (and num_new) to its chosen length."""
        drafting = [s for s in batch if s.num_draft]
        if not drafting:
            return
        if self.mode == "adaptive":
            if self.cost:
                decoding = [s for s in batch if s.num_draft or s.request.num_computed == s.request.num_tokens - 1]
                prefill = len(decoding) < len(batch)
                probs = [self.probabilities(s.request)[:s.num_draft] for s in decoding]
                base = sum(s.num_new - s.num_draft for s in batch)
                ks = choose_lengths(probs, base, self.cost, prefill)
                self._weigh(probs, ks, base)
            else:  # nothing measured yet: no drafts (the steps without them fill the table)
                decoding, ks = drafting, [0] * len(drafting)
            for s, k in zip(decoding, ks):
                s.num_new -= s.num_draft - k
                s.num_draft = k
        self.proposals += len(drafting)
        self.chosen += sum(s.num_draft for s in drafting)

    def _weigh(self, probs: list[list[float]], ks: list[int], base: int) -> None:
        """What the chosen lengths pay against no speculation at all: their expected rate (the
        measured step, drafter included) over the rate of a step with no drafts and no drafter
        (the measured step less the drafter's measured share)."""
        t_none = self.cost(base) - (self.draft_cost(base) if self.draft_cost else 0.0)
        if t_none <= 0:
            return
        n = len(probs)
        tokens = n + sum(sum(survival(p)[:k]) for p, k in zip(probs, ks))
        x = (tokens / self.cost(base + sum(ks))) / (n / t_none)
        self.payoff = x if self.payoff is None else self.payoff + PAYOFF_EMA * (x - self.payoff)
        self.payoff_steps += 1

    def pays(self) -> bool:
        """False once the moving average says speculation, drafter included, is slower than none."""
        return self.payoff_steps < self.min_steps or self.payoff >= 1.0

    def observe(self, r, draft: list[int], toks: list[int]) -> None:
        """The outcome of each proposed draft whose token the step produced (verified or not): the
        request's running acceptance estimate."""
        for d, t in zip(draft, toks):
            ok = float(d == t)
            self.seen += 1
            self.seen_accepted += int(ok)
            r.accept_rate = ok if r.accept_rate is None else r.accept_rate + ACCEPT_EMA * (ok - r.accept_rate)
            if not ok:
                break

    def stats(self) -> dict:
        return {
            "spec_draft_policy": self.mode,
            "spec_proposal_steps": self.proposals,
            "spec_mean_draft_length": self.chosen / self.proposals if self.proposals else None,
            "spec_step_cost_seconds": self.cost.table(),  # row bucket -> moving average of a step's wall time
            "spec_drafter_cost_seconds": self.draft_cost.table(),  # the drafter's share of it
            "spec_payoff": self.payoff,
        }
