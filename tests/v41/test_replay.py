"""The opt-in bounded-replay prefill of V4.1's decoder layers (dayzero/v41/replay.py): exact when the prompt
fits the window, really skipped (rows counted per layer) and really different otherwise, decode after it,
invariant to chunking and batching, off by default, and its errors."""
from __future__ import annotations

import functools

import pytest
import torch

from bench.v41_replay import SCHEDULES, build
from dayzero.reference.model import ModelState
from dayzero.reference.seqcache import Batch, DenseBatchCache, DenseSeqCache
from dayzero.v41.replay import decoder_layers, replay_start
from tests.v41.ckpt import one_thread  # noqa: F401 (autouse: this module's forwards on one thread)


@functools.lru_cache(maxsize=None)
def _model(name: str, window: int = 4):
    return build(SCHEDULES[name], window)


def _ids(model, n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(0, model.args.vocab_size, (1, n), generator=torch.Generator().manual_seed(seed))


def _rows_seen(model):
    """A dict filled by forward hooks: layer id -> rows each call of that layer saw."""
    seen: dict[int, list[int]] = {}

    def hook(block, inputs, _):
        seen.setdefault(block.layer_id, []).append(inputs[0].shape[0])
    handles = [layer.register_forward_hook(hook) for layer in model.layers]
    return seen, handles


def _decode(model, state, first: torch.Tensor, n: int) -> tuple[list[int], list[torch.Tensor]]:
    toks, logits, nxt = [], [], first
    for _ in range(n):
        toks.append(int(nxt.argmax()))
        nxt = model(torch.tensor([[toks[-1]]]), state)[0, -1]
        logits.append(nxt)
    return toks, logits


def test_decoder_layers_are_those_after_the_last_kv_source():
    m = _model("toy-flash-8")
    assert list(m.args.kv_source_layers) == [2, 5] and list(decoder_layers(m.args)) == [6, 7]
    assert list(decoder_layers(_model("pooled-then-2-decoder").args)) == [4, 5]
    assert replay_start(3, 4) == 0 and replay_start(4, 4) == 0 and replay_start(11, 4) == 7


@pytest.mark.parametrize("name", list(SCHEDULES))
@pytest.mark.parametrize("length", [1, 3, 4])
@torch.no_grad()
def test_exact_bit_for_bit_when_the_prompt_fits_the_window(name, length):
    m = _model(name)
    ids = _ids(m, length, seed=length)
    se, sr = m.new_state(), m.new_state()
    exact, replay = m(ids, se), m(ids, sr, bounded_replay=True)
    assert torch.equal(exact, replay) and sr.replay_from == 0
    te, le = _decode(m, se, exact[0, -1], 6)
    tr, lr = _decode(m, sr, replay[0, -1], 6)
    assert te == tr and all(torch.equal(a, b) for a, b in zip(le, lr))


@pytest.mark.parametrize("name", list(SCHEDULES))
@torch.no_grad()
def test_long_prompt_skips_the_decoder_rows_and_differs_from_exact(name):
    m = _model(name)
    W, L = m.args.window_size, 24
    ids = _ids(m, L, seed=7)
    dec = set(decoder_layers(m.args))
    seen, handles = _rows_seen(m)
    try:
        se, sr = m.new_state(), m.new_state()
        exact = m(ids, se)
        assert all(seen[i] == [L] for i in range(m.args.n_layers))  # off by default: every layer, every token
        seen.clear()
        replay = m(ids, sr, bounded_replay=True)
        assert sr.replay_from == L - W
        for i in range(m.args.n_layers):  # the encoder part runs on every token, the decoder part on the last W
            assert seen[i] == [W if i in dec else L], (i, seen[i])
        seen.clear()
        toks, logits = _decode(m, sr, replay[0, -1], W + 3)  # past the window: no row below the floor is read
        assert all(seen[i] == [1] * (W + 3) for i in range(m.args.n_layers))
    finally:
        for h in handles:
            h.remove()
    assert replay[0, :L - W].isnan().all() and torch.isfinite(replay[0, L - W:]).all()
    # the approximation is real: the kept positions' logits move off the exact ones
    assert (replay[0, -1] - exact[0, -1]).abs().max() > 1e-4
    assert all(torch.isfinite(x).all() for x in logits) and len(toks) == W + 3
    # a replay floor of 0 is the exact prefill
    assert torch.equal(m(ids, m.new_state(), replay_from=0), exact)


@torch.no_grad()
def test_chunked_and_token_by_token_prefill_equal_one_bounded_call():
    m = _model("toy-flash-8")
    L = 21
    ids = _ids(m, L, seed=3)
    floor = replay_start(L, m.args.window_size)
    whole = m(ids, m.new_state(), bounded_replay=True)
    for cuts in ((0, 9, 15, L), (0, floor, L), tuple(range(L + 1))):
        state = m.new_state()
        parts = [m(ids[:, a:b], state, replay_from=floor) for a, b in zip(cuts, cuts[1:])]
        got = torch.cat(parts, 1)
        assert torch.equal(got[0, floor:], whole[0, floor:]), cuts
        assert got[0, :floor].isnan().all()
    # the positions below the floor prefilled exactly first: their decoder rows exist, and are not read
    state = m.new_state()
    m(ids[:, :floor], state)
    assert torch.equal(m(ids[:, floor:], state, replay_from=floor)[0], whole[0, floor:])


@torch.no_grad()
def test_two_sequences_in_one_batch_equal_each_alone():
    """One member's chunk lies wholly below its floor (its decoder rows are all skipped, and it reaches
    further than the other member: the candidate blocks are cut to the kept members' span)."""
    m = _model("pooled-then-2-decoder")
    a, b = _ids(m, 40, seed=1)[0], _ids(m, 20, seed=2)[0]
    floors = [50, replay_start(20, m.args.window_size)]

    def run(members):
        caches = [DenseSeqCache() for _ in members]
        batch = Batch([0] * len(members), [len(t) for t, _ in members], DenseBatchCache(caches), torch.device("cpu"))
        return m.forward_packed(torch.cat([t for t, _ in members]), batch, [f for _, f in members])

    both = run([(a, floors[0]), (b, floors[1])])
    alone_a, alone_b = run([(a, floors[0])]), run([(b, floors[1])])
    assert both[:40].isnan().all() and alone_a.isnan().all()
    assert torch.equal(both[40 + floors[1]:], alone_b[floors[1]:]) and torch.isfinite(alone_b[floors[1]:]).all()
    assert alone_b[:floors[1]].isnan().all() and both[40:40 + floors[1]].isnan().all()


@torch.no_grad()
def test_errors_name_what_is_wrong():
    m = _model("toy-flash-8")
    ids = _ids(m, 10)
    with pytest.raises(ValueError, match="either bounded_replay=True .* or replay_from"):
        m(ids, bounded_replay=True, replay_from=3)
    with pytest.raises(ValueError, match="replay_from is -1"):
        m(ids, replay_from=-1)
    with pytest.raises(ValueError, match="use V41Transformer.new_state"):
        m(ids, ModelState(), bounded_replay=True)
    state = m.new_state()
    m(ids, state, replay_from=6)
    with pytest.raises(ValueError, match="prefilled with replay floor 6; a call asks for 7"):
        m(ids[:, :1], state, bounded_replay=True)
    batch = Batch([0], [10], DenseBatchCache([DenseSeqCache()]), torch.device("cpu"))
    with pytest.raises(ValueError, match="replay_from has 2 entries but the batch has 1 sequences"):
        m.forward_packed(ids[0], batch, [1, 2])
    with pytest.raises(ValueError, match=r"replay_from\[0\] is 1.5"):
        m.forward_packed(ids[0], batch, [1.5])
    from dayzero.reference.seqcache import StaticBatch
    static = StaticBatch(batch.seq, batch.positions, 64, 0, batch.cache, 10)
    with pytest.raises(ValueError, match="StaticBatch .* run bounded-replay prefill eagerly"):
        m.forward_packed(ids[0], static, [4])
