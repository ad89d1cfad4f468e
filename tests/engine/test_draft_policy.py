"""The draft-length chooser (engine/draft_policy.py) on its own: given acceptance probabilities and
a step-cost table, the lengths that maximise the step's expected tokens per second without making
any request slower than no drafts; and the cost table it reads."""
import itertools

import pytest

from dayzero.engine.draft_policy import PAYOFF_STEPS, DraftPolicy, StepCost, choose_lengths, survival
from dayzero.engine.graphs import bucket_size
from dayzero.engine.request import Request
from dayzero.engine.sampling import SamplingParams
from dayzero.engine.scheduler import Scheduled


def table(costs: dict) -> StepCost:
    """A StepCost holding exactly `costs` (row bucket -> seconds), as measured."""
    c = StepCost()
    for rows, t in costs.items():
        c.observe(rows, 99.0)  # a bucket's first step is warm-up: not counted
        c.observe(rows, t)
    assert c.table() == costs
    return c


def brute_force(probs, base, cost, prefill=False):
    """Every allocation: the best step rate among those where no request is slower than with no drafts."""
    t0 = cost(base)
    best, best_rate = [0] * len(probs), len(probs) / t0
    for ks in itertools.product(*[range(len(p) + 1) for p in probs]):
        t = cost(base + sum(ks))
        gains = [1 + sum(survival(p)[:k]) for p, k in zip(probs, ks)]
        if any(g / t < 1 / t0 - 1e-12 for g in gains) or (prefill and t > t0):
            continue
        rate = sum(gains) / t
        if rate > best_rate * (1 + 1e-9) or (abs(rate - best_rate) <= best_rate * 1e-9 and sum(ks) < sum(best)):
            best, best_rate = list(ks), rate
    return best, best_rate


def rate(probs, ks, base, cost):
    return sum(1 + sum(survival(p)[:k]) for p, k in zip(probs, ks)) / cost(base + sum(ks))


def test_one_request_takes_the_length_with_the_best_rate():
    conf = [0.9, 0.8, 0.5, 0.1]  # survival 0.9, 0.72, 0.36, 0.036
    cost = table({1: 1.0, 2: 1.1, 4: 1.3, 5: 1.5})
    # k=1: 1.9/1.1 = 1.73; k=3 (rows 4): 2.98/1.3 = 2.29; k=4 (rows 5): 3.02/1.5 = 2.01
    assert choose_lengths([conf], 1, cost) == [3]
    assert choose_lengths([conf[:1]], 1, cost) == [1]


def test_a_cost_table_where_drafting_never_pays_gives_zero():
    linear = table({1: 1.0, 2: 2.0, 4: 4.0, 5: 5.0, 6: 6.0, 8: 8.0})  # each row costs a step
    assert choose_lengths([[0.95] * 5], 1, linear) == [0]
    assert choose_lengths([[0.99] * 3, [0.99] * 3], 2, linear) == [0, 0]
    # flat: drafts are free, every one with a chance of acceptance is verified
    flat = table({1: 1.0, 2: 1.0, 4: 1.0, 8: 1.0, 16: 1.0})
    assert choose_lengths([[0.3] * 5, [0.2, 0.0, 0.9]], 2, flat) == [5, 1]


def test_no_request_is_made_slower():
    cost = table({2: 1.0, 4: 1.2, 5: 1.3, 6: 1.4})
    # request B has nothing to verify: any draft of A slows B's step (1.2x), so none is chosen
    assert choose_lengths([[0.95, 0.95], []], 2, cost) == [0, 0]
    # B with one draft of confidence 0.3 pays for a 1.3x step (1 + 0.3 >= 1.3), not for 1.4x
    probs = [[0.95, 0.95], [0.3]]
    assert choose_lengths(probs, 2, cost) == [2, 1] == brute_force(probs, 2, cost)[0]
    # a prefill chunk in the step produces no token to pay for a slower step
    assert choose_lengths(probs, 2, cost, prefill=True) == [0, 0]
    assert choose_lengths(probs, 2, table({2: 1.0, 4: 1.0, 5: 1.3, 6: 1.4}), prefill=True) == [2, 0]  # rows 4: free


@pytest.mark.parametrize("seed", range(40))
def test_the_chooser_matches_every_allocation_tried(seed):
    import random
    rng = random.Random(seed)
    n = rng.randint(1, 3)
    probs = [[rng.choice([0.0, 0.1, 0.5, 0.8, 0.95, 1.0]) for _ in range(rng.randint(0, 4))] for _ in range(n)]
    base = n + rng.choice([0, 0, 3])
    slope = rng.choice([0.0, 0.02, 0.1, 0.3, 1.0])
    cost = table({b: 1.0 + slope * b + rng.random() * 0.05 for b in sorted({bucket_size(r) for r in range(1, 20)})})
    prefill = base > n
    got = choose_lengths(probs, base, cost, prefill)
    want, want_rate = brute_force(probs, base, cost, prefill)
    assert rate(probs, got, base, cost) == pytest.approx(want_rate, rel=1e-9)
    t0, t = cost(base), cost(base + sum(got))
    assert all((1 + sum(survival(p)[:k])) / t >= 1 / t0 - 1e-12 for p, k in zip(probs, got))


def test_step_cost_table():
    c = StepCost(alpha=0.5)
    assert not c
    c.observe(3, 50.0)  # bucket 4's first step: warm-up, not counted
    assert not c and c.steps == {4: 1}
    c.observe(4, 2.0)
    c.observe(3, 4.0)
    assert c.table() == {4: 3.0}
    assert c(1) == 3.0  # below the smallest measured bucket: its cost
    assert c(8) == 3.0  # not measured: what the rows below cost (the policy explores it)
    for _ in range(2):
        c.observe(16, 7.0)
    assert c(8) == 3.0 and c(16) == 7.0 and c(20) == 7.0
    for _ in range(2):
        c.observe(32, 5.0)  # noise: a larger bucket measured faster
    # read as non-decreasing in rows: the two inverted buckets pooled (least squares), not the max
    assert c(16) == c(32) == c(64) == 6.0 and c(8) == 3.0
    for _ in range(3):
        c.observe(32, 5.0)  # more steps against one: the pool leans to bucket 32's measurement,
    # weighted by its steps up to the moving average's effective sample size (3 at weight 0.5)
    assert c(16) == c(32) == pytest.approx((7.0 + 3 * 5.0) / 4) and c(4) == 3.0


def request(draft, conf=None):
    r = Request("r", [1, 2, 3], SamplingParams(temperature=0.0))
    r.draft, r.draft_conf = list(draft), conf
    return r


def test_running_acceptance_estimate_from_every_outcome():
    pol = DraftPolicy("adaptive")
    r = request([5, 6, 7])
    assert pol.probabilities(r) == [0.5] * 3  # nothing seen yet: the prior
    pol.observe(r, [5, 6, 7], [5, 9])  # draft 1 right, draft 2 wrong (draft 3 not judged)
    assert (pol.seen, pol.seen_accepted) == (2, 1)
    assert r.accept_rate == pytest.approx(0.75)
    other = request([4])
    assert pol.probabilities(other) == [0.5]  # the engine's observed rate for a request with none of its own
    pol.observe(other, [4], [8])  # an unverified draft, judged against the token produced in its place
    assert other.accept_rate == 0.0 and pol.probabilities(request([1, 1])) == [pytest.approx(1 / 3)] * 2
    assert pol.probabilities(request([5, 6], conf=[0.9, 0.4])) == [0.9, 0.4]  # a confidence head wins


def test_an_unmeasured_bucket_is_explored_then_its_measurement_decides():
    c = table({1: 1.0})
    assert choose_lengths([[0.5, 0.5]], 1, c) == [2]  # rows 3 (bucket 4) not measured: taken as 1.0, tried
    c.observe(3, 9.0)
    c.observe(3, 3.0)  # measured: a step of 3-4 rows costs 3x
    assert choose_lengths([[0.5, 0.5]], 1, c) == [1]  # rows 2 still not measured: tried
    c.observe(2, 9.0)
    c.observe(2, 2.0)
    assert choose_lengths([[0.5, 0.5]], 1, c) == [0]  # 1.5 tokens for 2x the time: no drafts


@pytest.mark.parametrize("drafter_share, pays", [(0.1, True), (0.5, False)])
def test_what_speculation_pays_counts_the_drafters_own_time(drafter_share, pays):
    """A step of 1 row costs 1.0 with the drafter in it, of 2 rows 1.05; at acceptance 0.5 one
    draft yields 1.5 tokens a step. Without the drafter a 1-row step would cost 1 - its share:
    0.9 (speculation pays, 1.5 / 1.05 > 1 / 0.9) or 0.5 (it does not: 1.43 < 2 tokens per second)."""
    pol = DraftPolicy("adaptive")
    pol.cost, pol.draft_cost = table({1: 1.0, 2: 1.05}), table({1: drafter_share, 2: drafter_share})
    for step in range(PAYOFF_STEPS):
        assert pol.pays()  # not before PAYOFF_STEPS steps
        r = request([7])
        r.num_computed = r.num_tokens - 1  # decoding
        s = Scheduled(r, 2, 1)
        pol.cut([s])
        assert (s.num_new, s.num_draft) == (2, 1)  # the step's choice: one draft (rows are cheap)
    want = (1.5 / 1.05) / (1 / (1 - drafter_share))
    assert pol.payoff == pytest.approx(want) and pol.pays() is pays
