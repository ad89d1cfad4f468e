"""The shipped DSpark drafter of the built-in model (dayzero/builtin/shakespeare-dspark, trained by
scripts/train_dspark.py): it loads strictly onto the built-in target, the engine's greedy tokens with it
equal those without speculation (batched and alone), it is accepted on held-out text (a real property
of the shipped weights), and broken drafter directories fail naming what is wrong."""
import json
import shutil

import pytest
import torch
from safetensors.torch import load_file

from dayzero import LLM, SamplingParams
from dayzero.builtin import builtin_path, drafter_path
from dayzero.loader.checkpoint import CheckpointError
from dayzero.loader.model_io import load_model
from dayzero.loader.writer import save_state
from dayzero.reference.dspark import DSparkStage

DRAFTER = "shakespeare-dspark"
SPEC = {"method": "dspark", "model": DRAFTER, "draft_policy": "fixed"}  # every draft verified
GREEDY = SamplingParams(temperature=0.0, max_tokens=24, ignore_eos=True)
# held-out text (The Two Gentlemen of Verona, Timon of Athens: neither model nor drafter trained on them)
HELDOUT = ["VALENTINE:\nWelcome, dear Proteus! Mistress, I beseech you\nConfirm his welcome with some special "
           "favour.\n\n",
           "TIMON:\nIs't true? can't be?\n\nFLAVIUS:\nThey answer, in a joint and corporate voice,\n",
           "SILVIA:\nToo low a mistress for so high a servant.\n\n"]


@pytest.fixture(scope="module")
def llms():
    none = LLM(device="cpu", speculative_config={"num_speculative_tokens": 0})
    dspark = LLM(device="cpu", speculative_config=SPEC, speculative_min_acceptance=0.0)
    return none, dspark


def test_shipped_drafter_loads_strictly_in_the_official_layout():
    d = drafter_path(DRAFTER)
    cfg = json.loads((d / "config.json").read_text())
    assert cfg["num_nextn_predict_layers"] == 1 and 1 <= cfg["dspark_block_size"] <= 5  # as 0731's root config
    m = load_model(builtin_path(), drafter=d)
    a = m.args
    assert a.dspark_stages == 3 and a.n_mtp_layers == 0 and len(m.mtp) == 3
    assert all(isinstance(s, DSparkStage) for s in m.mtp)
    sd = m.state_dict()
    assert sd["mtp.0.main_proj.weight"].shape == (a.dim, len(a.dspark_target_layer_ids) * a.dim)
    assert sd["mtp.0.main_proj.weight"].dtype == torch.float8_e4m3fn and "mtp.0.main_proj.scale" in sd
    assert sd["mtp.2.markov_head.markov_w1.weight"].shape == (a.vocab_size, a.dspark_markov_rank)
    assert sd["mtp.2.confidence_head.proj.weight"].dtype == torch.float32
    shipped = load_file(d / "model-00001-of-00001.safetensors")
    assert set(shipped) == {n for n in sd if n.startswith("mtp.")}  # the drafter's tensors, nothing else


def test_greedy_tokens_with_the_drafter_equal_no_speculation(llms):
    none, dspark = llms
    assert (dspark.engine.spec_method, dspark.engine.spec_k) == ("dspark", dspark.args.dspark_block_size)
    batched = [o.token_ids for o in dspark.generate(HELDOUT, GREEDY)]
    assert batched == [o.token_ids for o in none.generate(HELDOUT, GREEDY)]
    alone = [dspark.generate([p], GREEDY)[0].token_ids for p in HELDOUT]
    assert alone == batched


def test_drafter_is_accepted_on_heldout_text(llms):
    _, dspark = llms
    e = dspark.engine
    before = dict(e.stats())
    dspark.generate(HELDOUT[:1], SamplingParams(temperature=0.0, max_tokens=48, ignore_eos=True))
    st = e.stats()
    steps = st["spec_verify_steps"] - before["spec_verify_steps"]
    accepted = st["spec_accepted_tokens"] - before["spec_accepted_tokens"]
    assert steps > 0
    # more than one draft token accepted per verifying step on average (MTP-1 can give at most 1)
    assert accepted / steps > 1.0, (accepted, steps)


def _copy(tmp_path, edit_state=None, edit_cfg=None):
    src, d = drafter_path(DRAFTER), tmp_path / "drafter"
    state = load_file(src / "model-00001-of-00001.safetensors")
    cfg = json.loads((src / "config.json").read_text())
    if edit_state:
        edit_state(state)
    if edit_cfg:
        edit_cfg(cfg)
    save_state(d, state, cfg)
    return d


@pytest.mark.parametrize("edit_state, edit_cfg, match", [
    (lambda s: s.pop("mtp.1.attn.wkv.weight"), None, r"missing tensors:\n.*'mtp\.1\.attn\.wkv\.weight'"),
    (lambda s: s.update({"mtp.3.norm.weight": torch.ones(4)}), None, r"unexpected tensors:\n.*'mtp\.3\.norm\.weight'"),
    (lambda s: s.update({"mtp.2.markov_head.markov_w2.weight": s["mtp.2.markov_head.markov_w2.weight"][:, :8]}),
     None, r"'mtp\.2\.markov_head\.markov_w2\.weight' in .*shape expected"),
    (None, lambda c: c.update({"rms_norm_eps": 1e-5}), r"disagrees with the target.*\n.*`rms_norm_eps`: drafter 1e-05"),
    (None, lambda c: [c.pop(k) for k in list(c) if k.startswith("dspark_")], r"no dspark_\* keys"),
])
def test_bad_drafter_directories_fail_naming_what_is_wrong(tmp_path, edit_state, edit_cfg, match):
    d = _copy(tmp_path, edit_state, edit_cfg)
    with pytest.raises(CheckpointError, match=match):
        load_model(builtin_path(), drafter=d)


def test_bad_drafter_options_fail_naming_the_option(tmp_path):
    with pytest.raises(CheckpointError, match="speculative_config.model: .* is not a directory"):
        LLM(device="cpu", speculative_config={"method": "dspark", "model": str(tmp_path / "nowhere")})
    with pytest.raises(ValueError, match="speculative_config.model: a separate drafter is a DSpark drafter"):
        LLM(device="cpu", speculative_config={"method": "mtp", "model": DRAFTER})
    with pytest.raises(CheckpointError, match=r"(?s)missing tensors.*'embed\.weight'.*hint: the directory holds only "
                                              r"mtp\.\* tensors"):
        LLM(drafter_path(DRAFTER), device="cpu")  # the drafter directory is not a model by itself
    with pytest.raises(ValueError, match="speculative_config.model: must be"):
        LLM(device="cpu", speculative_config={"model": 3})
