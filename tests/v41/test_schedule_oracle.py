"""dayzero.v41's per-layer descriptors against what transformers' deepseek_v41 derives from the same
config: its config object, the modules its model builds per layer, and, in a forward pass, which
layer's compressed KV, top-k and candidate blocks each layer actually reads."""
from __future__ import annotations

import pytest
import torch

from dayzero.config_keys import ConfigError
from dayzero.v41 import V41Args
from tests.v41.oracle import oracle, oracle_text_config
from tests.v41.tiny import SCHEDULES, flash_hub, hub, text_config


def _ours(text: dict) -> V41Args:
    return V41Args.from_dict(hub(text))


def _oracle_model(text: dict):
    o = oracle()
    torch.manual_seed(0)
    return o.DeepseekV41ForCausalLM(o.DeepseekV41Config(text_config=oracle_text_config(text))).eval()


@pytest.mark.parametrize("name,ratios,kv,index,cand", SCHEDULES, ids=[s[0] for s in SCHEDULES])
def test_descriptors_equal_the_oracles_modules(name, ratios, kv, index, cand):
    text = text_config(ratios, kv, index, cand)
    layers = _ours(text).layers
    cfg = oracle_text_config(text)
    assert cfg.compress_ratios[:len(ratios)] == ratios
    assert cfg.layer_types == ["shared_compressed_attention" if l.is_kv_source else "sliding_attention"
                               for l in layers]
    model = _oracle_model(text)
    for l, block in zip(layers, model.model.layers, strict=True):
        a = block.attn
        assert a.compress_ratio == l.compress_ratio and a.rope_layer_type == l.rope, l
        assert a.is_kv_source == l.is_kv_source and (a.compressor is not None) == l.is_kv_source, l
        assert (a.compressor is not None and a.compressor.wgate is not None) == l.pooled, l
        assert a.is_index_source == l.is_index_source and (a.indexer is not None) == l.is_index_source, l
        if a.indexer is not None:
            assert a.indexer.owns_k == l.is_kv_source, l
            assert a.indexer.is_candidate_source == l.publishes_candidates, l
            assert a.indexer.uses_candidates == (l.candidate_source is not None), l
        else:
            assert not l.publishes_candidates and l.candidate_source is None, l
        assert block.engram is None and not l.engram


@pytest.mark.parametrize("name,ratios,kv,index,cand", SCHEDULES, ids=[s[0] for s in SCHEDULES])
def test_sources_equal_what_the_oracles_forward_reads(name, ratios, kv, index, cand):
    """Each layer's KV source, index source and candidate source as the oracle's forward pass
    resolves them: the layer that first put the object a layer reads into the per-forward state."""
    text = text_config(ratios, kv, index, cand)
    layers = _ours(text).layers
    model = _oracle_model(text)
    publisher: dict[int, int] = {}
    held, seen = [], {}  # held keeps every object alive, so an id is never reused in this pass

    def hook(i):
        def after(module, args, kwargs, output):
            shared = kwargs["shared"]
            got = {}
            for key in ("compress_kv", "topk_bias", "candidates"):
                obj = shared.get(key)
                if obj is not None:
                    held.append(obj)
                    publisher.setdefault(id(obj), i)
                    got[key] = publisher[id(obj)]
            seen[i] = got
        return after

    handles = [b.attn.register_forward_hook(hook(i), with_kwargs=True) for i, b in enumerate(model.model.layers)]
    ids = torch.randint(0, text["vocab_size"], (1, 16), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        model(input_ids=ids, use_cache=True)
    for h in handles:
        h.remove()
    for l in layers:
        got = seen[l.layer_id]
        if l.sliding_only:
            continue  # reads no compressed state (what `shared` holds then belongs to other layers)
        assert got.get("compress_kv") == l.kv_source, (l, got)
        assert got.get("topk_bias") == l.index_source, (l, got)
        if l.publishes_candidates:
            assert got["candidates"] == l.layer_id
        if l.candidate_source is not None:
            assert got["candidates"] == l.candidate_source


def test_the_released_schedule_equals_the_oracles_reading_of_it():
    text = flash_hub()["text_config"]
    cfg = oracle_text_config(text)
    ours = V41Args.from_dict(flash_hub())
    assert cfg.layer_types == ["shared_compressed_attention" if l.is_kv_source else "sliding_attention"
                               for l in ours.layers]
    assert (cfg.compress_ratios[:40], cfg.candidate_source_layer_id) == (list(ours.compress_ratios), 20)
    assert (cfg.engram_layer_ids, cfg.dspark_target_layer_ids) == ([1, 14], [37, 38, 39])


# schedule faults: (change, dayzero's message, does the oracle's config reject it too)
FAULTS = [
    (dict(kv_source_layer_ids=[0, 4]), r"`text_config.kv_source_layer_ids`: layer 0 is a source but its "
                                       r"`text_config.compress_ratios` entry is 0", True),
    (dict(index_source_layer_ids=[0, 1, 4]), r"`text_config.index_source_layer_ids`: layer 0 is a source", True),
    (dict(kv_source_layer_ids=[2, 4], index_source_layer_ids=[2, 4]),
     r"`text_config.kv_source_layer_ids`: layer 1 has compress ratio 2 but no KV source at or before it", True),
    (dict(kv_source_layer_ids=[1, 9]), r"`text_config.kv_source_layer_ids`: entry 1 is 9, not a backbone layer "
                                       r"id in \[0, 6\)", True),
    (dict(candidate_source_layer_id=2), r"`text_config.candidate_source_layer_id`: layer 2 is not an index "
                                        r"source", True),
    # stricter than the oracle: its forward would read one group's state with another's shapes or positions
    (dict(index_source_layer_ids=[1, 3, 5], candidate_source_layer_id=5),
     r"`text_config.index_source_layer_ids`: layer 4 is a KV source but "
                                             r"not an index source", False),
    (dict(kv_source_layer_ids=[1]), r"`text_config.compress_ratios`: layer 4 has ratio 1 but reads the "
                                    r"compressed KV of layer 1, whose ratio is 2", False),
    (dict(candidate_source_layer_id=3), r"`text_config.candidate_source_layer_id`: layer 3's candidate blocks "
                                        r"index its own KV group, but KV source layer 4 follows it", False),
    (dict(compress_ratios=[0, 2, 2, 4, 1, 1]), r"`text_config.compress_ratios`: layer 3 has ratio 4 \(V4.1 "
                                               r"allows 0, 1, 2\)", False),
    (dict(kv_source_layer_ids=[4, 1]), r"`text_config.kv_source_layer_ids`: must be strictly increasing layer "
                                       r"ids; entry 1 is layer 1 after layer 4", False),
]


@pytest.mark.parametrize("change,message,oracle_rejects", FAULTS)
def test_schedule_faults_are_named_and_the_oracle_agrees_where_it_checks(change, message, oracle_rejects):
    text = text_config(*SCHEDULES[0][1:], **change)
    with pytest.raises(ConfigError, match=message):
        _ours(text)
    if oracle_rejects:
        with pytest.raises(ValueError):
            oracle_text_config(text)
    else:
        oracle_text_config(text)  # accepted there: the rule is dayzero's (see dayzero/v41/schedule.py)
