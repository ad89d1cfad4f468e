"""Indexer distillation (scripts/indexer_distill.py, the `Indexer.capture` hook of the reference)
on a tiny random model: the target is a distribution over usable entries, the KL loss behaves,
training moves only the indexers and lowers the loss, and the hook changes nothing when unset."""
from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

from dayzero.reference.attention import Indexer
from dayzero.reference.model import Transformer
from dayzero.testing import random_state, tiny_args

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "scripts"))
import indexer_distill as idx

SEQ = 48  # 12 entries per CSA layer at ratio 4, top-4: most queries prune


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    m = Transformer(tiny_args("flash", n_mtp_layers=0), numerics="transformers")
    m.load_state_dict(random_state(m, seed=0), strict=True)
    idx.freeze_all_but_indexers(m)  # the capture's scores carry grad to the indexers only
    return m.eval()


def ids(batch: int = 2, seed: int = 1) -> torch.Tensor:
    return torch.randint(2, 512, (batch, SEQ), generator=torch.Generator().manual_seed(seed))


def test_capture_target_is_a_distribution_over_usable_entries(model):
    csa = [i for i, t in enumerate(model.args.layer_types) if t == "csa"]
    with idx.capturing(model) as recs:
        model(ids())
    assert [r["layer"] for r in recs] == csa
    for r in recs:
        p, u, s = r["target"], r["usable"], r["scores"]
        assert p.shape == u.shape == s.shape == (2 * SEQ, SEQ // 4)
        assert not p.requires_grad and s.requires_grad
        rows = u.any(-1)
        assert rows.any() and not rows.all()  # the first 3 positions of each sequence have no entry
        assert torch.allclose(p[rows].sum(-1), torch.ones(int(rows.sum())), atol=1e-5)
        assert (p >= 0).all() and (p[~u] == 0).all()
        assert (p[u] > 0).all()
        assert torch.isfinite(s[u]).all() and torch.isneginf(s[~u]).all()
        # usable: entry i for query at position t iff i < (t + 1) // 4
        pos = r["positions"]
        assert torch.equal(u.sum(-1), (pos + 1) // 4)


def test_target_is_the_dense_attention_on_the_entries(model):
    """The target against a naive per-query softmax over window + every usable entry + sink."""
    with idx.capturing(model) as recs:
        model(ids(1))
    attn = model.layers[recs[0]["layer"]].attn
    p = recs[0]["target"]
    # rebuild the inputs of that attention by a hook on a second forward
    seen = {}

    def hook(mod, args, out):
        seen["x"], seen["batch"] = args[0], args[1]
    h = attn.register_forward_hook(hook)
    state = model.new_state()
    model(ids(1), state=state)
    h.remove()
    x, batch = seen["x"], seen["batch"]
    from dayzero.ops import ref
    inv = attn.inv_freq_cpu
    cos, sin = ref.rope_cos_sin(batch.positions, inv)
    q = attn.wq_b(attn.q_norm(attn.wq_a(x))).unflatten(-1, (attn.n_heads, attn.head_dim))
    q = ref.apply_rope(ref.rms_norm(q, None, attn.eps), cos[:, None], sin[:, None])
    cache = state.caches[0]
    kv = cache.read(attn_layer := recs[0]["layer"], "kv", torch.arange(SEQ))
    ent = cache.read(attn_layer, "ent:attn", torch.arange(SEQ // 4))
    for t in (7, 20, 47):
        n = (t + 1) // 4
        keys = torch.cat([kv[max(0, t - attn.window + 1):t + 1], ent[:n]])
        logits = torch.cat([(q[t] @ keys.T) * attn.head_dim ** -0.5, attn.attn_sink[:, None]], -1)
        w = logits.softmax(-1)[:, -n - 1:-1].sum(0)
        assert torch.allclose(p[t, :n], w / w.sum(), atol=1e-5)
        assert (p[t, n:] == 0).all()


def test_kl_loss_nonnegative_and_zero_at_the_target():
    g = torch.Generator().manual_seed(0)
    n = torch.tensor([0, 1, 3, 8, 8])
    usable = torch.arange(8)[None, :] < n[:, None]
    target = torch.rand(5, 8, generator=g).masked_fill(~usable, 0)
    target = target / target.sum(-1, keepdim=True).clamp(min=1e-30)
    scores = torch.randn(5, 8, generator=g).masked_fill(~usable, float("-inf"))
    kl = idx.kl_rows(scores, target, usable)
    assert kl.shape == (4,) and (kl >= 0).all() and kl[1:].sum() > 0
    assert kl[0].abs() < 1e-6  # a single usable entry: nothing to learn
    exact = torch.log(target.clamp(min=1e-30)).masked_fill(~usable, float("-inf")) + 3.0  # shift-invariant
    assert idx.kl_rows(exact, target, usable).abs().max() < 1e-6
    loss, per = idx.kl_loss([{"layer": 1, "scores": exact, "target": target, "usable": usable}])
    assert loss.abs() < 1e-6 and set(per) == {1}


def test_recall_counts():
    usable = torch.ones(2, 6, dtype=torch.bool)
    usable[1, 2:] = False  # 2 usable entries, k = 3: not a pruning query
    target = torch.tensor([[0.4, 0.3, 0.1, 0.1, 0.05, 0.05], [0.7, 0.3, 0, 0, 0, 0]])
    scores = torch.tensor([[5.0, 0.0, 4.0, 3.0, 2.0, 1.0], [0.0, 1.0, 9, 9, 9, 9]])
    r = idx.recall_counts(scores, target, usable, 3)
    # row 0: target top-3 {0, 1, 2 or 3}, indexer {0, 2, 3} -> 2 hits; row 1: 2 of 2
    assert (r["hits"], r["total"], r["hits_pruning"], r["total_pruning"]) == (4, 5, 2, 3)
    assert r["mass_pruning"] == pytest.approx(0.6) and r["best_mass_pruning"] == pytest.approx(0.8)


def test_warmup_steps_lower_the_loss_and_touch_only_the_indexers():
    torch.manual_seed(0)
    m = Transformer(tiny_args("flash", n_mtp_layers=0), numerics="transformers")
    m.load_state_dict(random_state(m, seed=0), strict=True)
    before = {k: v.clone() for k, v in m.state_dict().items()}
    params = idx.freeze_all_but_indexers(m)
    assert params and all(p.requires_grad for p in params)
    opt = torch.optim.AdamW(params, lr=3e-3, weight_decay=0.0)
    batch = ids(2, seed=3)
    with torch.no_grad(), idx.capturing(m) as recs:
        m(batch)
    start = idx.kl_loss(recs)[0].item()
    losses = [idx.warmup_step(m, opt, params, batch, clip=1.0)[0] for _ in range(8)]
    with torch.no_grad(), idx.capturing(m) as recs:
        m(batch)
    end = idx.kl_loss(recs)[0].item()
    assert losses[0] == pytest.approx(start, rel=1e-5)
    assert end < 0.8 * start, (start, losses, end)
    changed = {k for k, v in m.state_dict().items() if not torch.equal(v, before[k])}
    assert changed and all(".indexer." in k for k in changed)
    moved = {k.rsplit(".", 1)[0] for k in changed}
    for layer in (1, 3):  # both CSA layers, queries, head weights and keys
        pre = f"layers.{layer}.attn.indexer."
        assert {pre + "wq_b", pre + "weights_proj", pre + "compressor.wkv", pre + "compressor.wgate"} <= moved


def test_unset_capture_changes_nothing(model):
    x = ids(2, seed=5)
    with torch.no_grad():
        plain = model(x)
        with idx.capturing(model) as recs:
            captured = model(x)
        after = model(x)
    assert recs and torch.equal(plain, captured) and torch.equal(plain, after)
    assert Indexer.capture is None and all(ix.capture is None for ix in idx.indexers(model))
