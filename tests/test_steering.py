"""Steering (protocol §4): the intervention, batched cached generation, AxBench scoring, instructions.

Model-level tests use the tiny random HookedTransformer of conftest (3 layers, d_model 32).
"""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch

from saelib.data.instructions import InstructionError, load_instructions, sample_instructions
from saelib.judges.base import Ratings
from saelib.steering.run import steering_concepts
from saelib.steering.axbench import SteeringConfig, concept_scores, harmonic_mean, split_of, steering_score
from saelib.steering.generate import GenerationConfig, generate, generate_batch, mean_logprob
from saelib.steering.intervene import clamp_hook, make_hook, steering_vectors

LAYER = 1
HOOK = f"blocks.{LAYER}.hook_resid_post"


def unit_rows(n: int, d: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(n, d, generator=g)
    return w / w.norm(dim=1, keepdim=True)


def prompts(n: int, seed: int = 0, vocab: int = 97) -> list[list[int]]:
    rng = np.random.default_rng(seed)
    return [rng.integers(1, vocab, size=int(rng.integers(3, 12))).tolist() for _ in range(n)]


# --- the intervention -------------------------------------------------------------------------

def test_add_hook_changes_the_residual_by_exactly_the_vector_everywhere_and_nowhere_else(tiny_tl):
    W_dec_FD = unit_rows(10, 32)
    latents, max_acts, alphas = [3, 7], [2.5, 0.75], [4.0, 10.0]
    tokens_BL = torch.tensor(prompts(2, seed=1)[0][:5] * 2).reshape(2, 5)
    hook = make_hook("add", W_dec_FD=W_dec_FD, latents_B=latents, max_acts_B=max_acts, alphas_B=alphas)
    _, clean = tiny_tl.run_with_cache(tokens_BL)
    with tiny_tl.hooks(fwd_hooks=[(HOOK, hook)]):
        _, steered = tiny_tl.run_with_cache(tokens_BL)
    expected_BD = torch.stack([alphas[b] * max_acts[b] * W_dec_FD[latents[b]] for b in range(2)])
    diff_BLD = steered[HOOK] - clean[HOOK]
    assert torch.allclose(diff_BLD, expected_BD[:, None, :].expand_as(diff_BLD), atol=1e-5)
    for name in [f"blocks.{i}.hook_resid_post" for i in range(LAYER)] + [f"blocks.{LAYER}.hook_resid_mid"]:
        assert torch.equal(steered[name], clean[name]), name  # nothing before the hook moves
    later = f"blocks.{LAYER + 1}.hook_resid_post"
    assert not torch.allclose(steered[later], clean[later])  # and the change propagates


def test_steering_vectors_scale_unit_rows():
    W_dec_FD = unit_rows(4, 6)
    v_BD = steering_vectors(W_dec_FD, [1, 1, 2], [2.0, 2.0, 0.5], [0.0, 3.0, 1.0])
    assert torch.allclose(v_BD.norm(dim=1), torch.tensor([0.0, 6.0, 0.5]), atol=1e-6)
    with pytest.raises(ValueError, match="one entry per row"):
        steering_vectors(W_dec_FD, [1], [1.0, 2.0], [1.0])


def test_clamp_sets_the_latent_code_inside_the_reconstruction():
    torch.manual_seed(0)
    W_enc_DF = torch.randn(6, 4)
    W_dec_FD = unit_rows(4, 6, seed=3)
    encode = lambda x: torch.relu(x @ W_enc_DF)  # noqa: E731
    x_BLD = torch.randn(2, 5, 6)
    hook = clamp_hook(encode, W_dec_FD, [2, 0], [1.5, 0.0])
    y_BLD = hook(x_BLD)
    codes = encode(x_BLD)
    expected = x_BLD.clone()
    expected[0] += (1.5 - codes[0, :, 2])[:, None] * W_dec_FD[2]
    expected[1] += (0.0 - codes[1, :, 0])[:, None] * W_dec_FD[0]
    assert torch.allclose(y_BLD, expected, atol=1e-6)
    # The reconstruction with f's code replaced, plus the untouched error term, is the new input.
    recon = lambda c: c @ W_dec_FD  # noqa: E731
    c_set = codes.clone()
    c_set[0, :, 2] = 1.5
    c_set[1, :, 0] = 0.0
    assert torch.allclose(y_BLD, x_BLD - recon(codes) + recon(c_set), atol=1e-5)
    with pytest.raises(ValueError, match="encode"):
        make_hook("clamp", W_dec_FD=W_dec_FD, latents_B=[0], max_acts_B=[1.0], alphas_B=[1.0])
    with pytest.raises(ValueError, match="unknown steering mode"):
        make_hook("scale", W_dec_FD=W_dec_FD, latents_B=[0], max_acts_B=[1.0], alphas_B=[1.0])


# --- generation -------------------------------------------------------------------------------

def test_last_logits_equal_the_full_forward_at_the_last_position(tiny_tl):
    from saelib.steering.generate import last_logits

    tokens = torch.tensor(prompts(2, seed=3)[0][:4] * 2).reshape(2, 4)
    with torch.no_grad():
        assert torch.allclose(last_logits(tiny_tl, tokens), tiny_tl(tokens)[:, -1], atol=1e-5)


def test_single_prompt_matches_transformer_lens_generate(tiny_tl):
    prompt = prompts(1, seed=2)[0]
    cfg = GenerationConfig(max_new_tokens=10)
    ours = generate_batch(tiny_tl, [prompt], cfg)[0]
    ref = tiny_tl.generate(torch.tensor([prompt]), max_new_tokens=10, do_sample=False,
                           stop_at_eos=False, verbose=False, use_past_kv_cache=False)
    assert ours == ref[0, len(prompt):].tolist()


def test_batched_left_padded_generation_equals_one_at_a_time(tiny_tl):
    ps = prompts(7, seed=4)
    cfg = GenerationConfig(max_new_tokens=12, batch_size=4)
    batched = generate(tiny_tl, ps, cfg)
    single = [generate_batch(tiny_tl, [p], cfg)[0] for p in ps]
    assert batched == single
    assert all(len(o) == 12 for o in batched)


def test_alpha_zero_reproduces_unsteered_generation_token_for_token(tiny_tl):
    ps = prompts(5, seed=5)
    cfg = GenerationConfig(max_new_tokens=10, batch_size=3)
    W_dec_FD = unit_rows(10, 32)
    unsteered = generate(tiny_tl, ps, cfg)

    def hooks(alpha):
        return lambda rows: [(HOOK, make_hook("add", W_dec_FD=W_dec_FD, latents_B=[r for r in rows],
                                              max_acts_B=[3.0] * len(rows),
                                              alphas_B=[alpha] * len(rows)))]

    assert generate(tiny_tl, ps, cfg, hooks_for=hooks(0.0)) == unsteered
    assert generate(tiny_tl, ps, cfg, hooks_for=hooks(50.0)) != unsteered  # the hook is live


def test_rows_stop_at_their_stop_token(tiny_tl):
    ps = prompts(3, seed=6)
    cfg = GenerationConfig(max_new_tokens=10)
    free = generate(tiny_tl, ps, cfg)
    stop = free[0][3]
    stopped = generate(tiny_tl, ps, cfg, stop_ids=[stop], pad_id=0)
    for f, s in zip(free, stopped):
        assert s == (f[:f.index(stop)] if stop in f else f)


def test_sampling_is_seeded(tiny_tl):
    ps = prompts(4, seed=7)
    cfg = GenerationConfig(max_new_tokens=8, temperature=1.0, seed=11)
    sampled = generate(tiny_tl, ps, cfg)
    assert sampled == generate(tiny_tl, ps, cfg)
    # it samples: another seed, and greedy decoding, give other answers
    assert sampled != generate(tiny_tl, ps, GenerationConfig(max_new_tokens=8, temperature=1.0, seed=12))
    assert sampled != generate(tiny_tl, ps, GenerationConfig(max_new_tokens=8))
    with pytest.raises(ValueError, match="max_new_tokens"):
        generate(tiny_tl, ps, GenerationConfig(max_new_tokens=0))


def test_mean_logprob_matches_a_direct_computation(tiny_tl):
    seqs = [[5, 9, 2, 7], [4, 4], [8]]
    got = mean_logprob(tiny_tl, seqs, bos_id=1, batch_size=2)
    for s, value in zip(seqs, got):
        toks = torch.tensor([[1] + s])
        logp = torch.log_softmax(tiny_tl(toks)[0], dim=-1)
        want = float(np.mean([logp[i, toks[0, i + 1]].item() for i in range(len(s))]))
        assert value == pytest.approx(want, abs=1e-4)
    assert mean_logprob(tiny_tl, [[3]], bos_id=None) == [float("-inf")]


# --- AxBench scoring --------------------------------------------------------------------------

@pytest.mark.parametrize("ratings, hm", [
    ((2, 2, 2), 2.0), ((1, 1, 1), 1.0), ((0, 2, 2), 0.0), ((2, 0, 2), 0.0), ((2, 2, 0), 0.0),
    ((1, 2, 2), 3 / (1 + 0.5 + 0.5)), ((1, 1, 2), 3 / 2.5), ((-1, 2, 2), 0.0),
])
def test_harmonic_mean_rule(ratings, hm):
    assert harmonic_mean(Ratings(*ratings)) == pytest.approx(hm)


def rows_for(latent, select_hm, heldout_hm):
    rows = []
    for split, table in (("select", select_hm), ("heldout", heldout_hm)):
        for alpha, hms in table.items():
            rows += [{"latent": latent, "split": split, "alpha": alpha, "hm": h} for h in hms]
    return rows


def test_factor_is_chosen_on_selection_rows_and_scored_on_held_out_rows():
    # Held-out rows favour α = 8, selection rows α = 2: α* must be 2, its held-out mean the score.
    rows = rows_for(0, {2.0: [2, 1.5], 8.0: [1, 0]}, {2.0: [0.5, 0.5], 8.0: [2, 2]})
    rows += rows_for(1, {2.0: [1, 1], 8.0: [1, 1]}, {2.0: [1.2, 0.8], 8.0: [0, 0]})
    (c0, c1) = sorted(concept_scores(rows), key=lambda s: s.latent)
    assert c0.alpha_star == 2.0 and c0.score == pytest.approx(0.5)
    assert c1.alpha_star == 2.0 and c1.score == pytest.approx(1.0)  # a tie goes to the smaller α
    assert steering_score([c0, c1]) == pytest.approx(0.75)
    assert steering_score([]) is None
    # Changing every held-out rating never changes α*.
    flipped = [dict(r, hm=2 - r["hm"]) if r["split"] == "heldout" else r for r in rows]
    assert [s.alpha_star for s in concept_scores(flipped)] == [c.alpha_star for c in concept_scores(rows)]
    with pytest.raises(ValueError, match="no selection rows"):
        concept_scores([r for r in rows if r["split"] == "heldout"])


def test_example_page_shows_every_factor_on_a_selection_instruction_and_held_out_at_alpha_star():
    """As a run writes them: selection instructions at every factor, held-out ones at α* only
    (so a held-out instruction has no smallest or largest factor to show)."""
    import pandas as pd

    from saelib.report import example_generations

    rows = []
    for k, split in ((0, "select"), (1, "select"), (2, "heldout"), (3, "heldout")):
        for alpha in ((1.0, 1.5, 2.0) if split == "select" else (1.5,)):
            rows.append({"latent": 7, "concept": "cats", "instruction_index": k, "split": split,
                         "instruction": f"inst {k}", "alpha": alpha, "output": f"out {k} {alpha:g}",
                         "unsteered_output": f"plain {k}", "concept_rating": 1,
                         "instruction_rating": 2, "fluency_rating": 1, "hm": 1.2})
    table = example_generations(pd.DataFrame(rows), {"concepts": [
        {"latent": 7, "score": 1.2, "alpha_star": 1.5}]}, n_concepts=1)
    assert table["α"].tolist() == ["unsteered", "1", "1.5 (α*)", "2", "1.5 (α*, held out)"]
    assert table["output"].tolist() == ["plain 0", "out 0 1", "out 0 1.5", "out 0 2", "out 2 1.5"]
    assert table["ratings C/I/F"].iloc[1] == "1/2/1" and pd.isna(table["HM"].iloc[0])


def test_split_of_and_config_validation():
    assert [split_of(i, 5) for i in range(10)] == ["select"] * 5 + ["heldout"] * 5
    SteeringConfig().validate()
    for bad, match in [(dict(factors=()), "factors is empty"), (dict(n_select=10), "n_select"),
                       (dict(factors=(1.0, 1.0)), "twice"), (dict(mode="scale"), "mode"),
                       (dict(factors=(-1.0,)), "finite and >= 0"), (dict(n_concepts=0), "n_concepts")]:
        with pytest.raises(ValueError, match=match):
            SteeringConfig(**bad).validate()


def test_profile_rejects_bad_steering_section():
    from saelib.profiles import ProfileError, load_profile, profile_from_dict
    import dataclasses

    base = dataclasses.asdict(load_profile("smoke"))
    base.pop("name")
    with pytest.raises(ProfileError, match="factors is empty"):
        profile_from_dict({**base, "steering": {"factors": []}}, name="bad")
    with pytest.raises(ProfileError, match="unknown key"):
        profile_from_dict({**base, "steering": {"alphas": [1.0]}}, name="bad")


# --- instructions and concepts ----------------------------------------------------------------

def test_packaged_instructions_are_distinct_requests():
    pool = load_instructions("packaged")
    assert len(pool) == 300 and len(set(pool)) == 300
    assert all(len(p) > 10 for p in pool)


def test_instruction_sampling_is_seeded_per_concept_and_split_is_disjoint():
    pool = [f"instruction {i}" for i in range(40)]
    a = sample_instructions(pool, 10, seed=0, concept=5)
    assert a == sample_instructions(pool, 10, seed=0, concept=5)
    assert a != sample_instructions(pool, 10, seed=0, concept=6)
    assert len(set(a)) == 10
    select, heldout = a[:5], a[5:]
    assert not set(select) & set(heldout)
    with pytest.raises(InstructionError, match="only 40"):
        sample_instructions(pool, 41, seed=0, concept=0)


def test_local_instruction_files(tmp_path):
    jl = tmp_path / "i.jsonl"
    jl.write_text("\n".join(json.dumps({"instruction": t}) for t in ["a?", "b?", "a?", " "]))
    assert load_instructions(str(jl)) == ["a?", "b?"]
    txt = tmp_path / "i.txt"
    txt.write_text("one\n\ntwo\n")
    assert load_instructions(str(txt)) == ["one", "two"]
    with pytest.raises(InstructionError, match="no field"):
        load_instructions(str(jl), field="query")
    with pytest.raises(InstructionError, match="neither"):
        load_instructions(str(tmp_path / "missing.jsonl"))
    (tmp_path / "empty.txt").write_text("\n")
    with pytest.raises(InstructionError, match="no instruction"):
        load_instructions(str(tmp_path / "empty.txt"))


def test_steering_concepts_follow_concept100_order_and_need_an_explanation():
    rows = [{"latent": 4, "explanation": "cats", "max_act": 2.0},
            {"latent": 9, "explanation": None, "max_act": 1.0},
            {"latent": 1, "explanation": "dogs", "max_act": 3.0},
            {"latent": 7, "explanation": "never fires", "max_act": 0.0}]
    got = steering_concepts(rows, [9, 1, 7, 4], n=5)
    assert [c["latent"] for c in got] == [1, 4]
    assert [c["latent"] for c in steering_concepts(rows, [9, 1, 7, 4], n=1)] == [1]


def test_unsteered_answers_are_cached_per_prompt_and_equal_fresh_ones(tiny_tl, tmp_path, monkeypatch):
    """The SAEs of one model share the unsteered answers: a second call reads every answer from the
    cache (no generation), a new prompt is generated alone, a corrupt file is regenerated, and
    sampled answers (temperature > 0) are never cached."""
    from types import SimpleNamespace

    import saelib.steering.generate as gen_mod
    from saelib.steering.run import unsteered_answers

    lm = SimpleNamespace(name="tiny", tl=tiny_tl)
    ps = prompts(4, seed=7)
    cfg = GenerationConfig(max_new_tokens=6, batch_size=4)
    fresh = generate(tiny_tl, ps, cfg)
    assert unsteered_answers(lm, ps, cfg, stop_ids=(), pad_id=0, cache_dir=tmp_path) == fresh
    assert len(list(tmp_path.glob("*.json"))) == 4

    calls = []
    real = gen_mod.generate
    monkeypatch.setattr(gen_mod, "generate", lambda tl, p, *a, **k: calls.append(len(p)) or real(tl, p, *a, **k))
    assert unsteered_answers(lm, ps, cfg, stop_ids=(), pad_id=0, cache_dir=tmp_path) == fresh
    assert calls == []
    extra = prompts(1, seed=99)
    sorted(tmp_path.glob("*.json"))[0].write_text("{trunc")
    out = unsteered_answers(lm, ps + extra, cfg, stop_ids=(), pad_id=0, cache_dir=tmp_path)
    assert out == fresh + generate(tiny_tl, extra, cfg) and calls == [2]

    sampled = GenerationConfig(max_new_tokens=6, batch_size=4, temperature=1.0)
    unsteered_answers(lm, ps, sampled, stop_ids=(), pad_id=0, cache_dir=tmp_path / "s")
    assert not (tmp_path / "s").exists()


def test_one_judge_per_model_one_rating_per_generation(tiny_tokenizer, tmp_path, monkeypatch):
    """The judge is calibrated once per model on a fixed seeded set and stored; every SAE's run
    rates with it, so a generation that two runs share (same concept, instruction, factor) gets the
    same ratings whatever else each run steers. Before, each call calibrated on its own concepts'
    unsteered answers: two SAEs (and g_base vs g_sel of one lift) had two judges."""
    import warnings
    from types import SimpleNamespace

    from transformer_lens import HookedTransformer

    import saelib.steering.run as run_mod
    from saelib.judges.factory import JudgeConfig
    from conftest import tiny_config

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", DeprecationWarning)
        tl = HookedTransformer(tiny_config(d_vocab=len(tiny_tokenizer), n_ctx=512))
    tl.eval()
    lm = SimpleNamespace(name="tiny", tl=tl, tokenizer=tiny_tokenizer,
                         hook_name=lambda layer: f"blocks.{layer}.hook_resid_post")
    sae = SimpleNamespace(W_dec=unit_rows(8, 32), encode=None)
    cfg = SteeringConfig(n_concepts=2, n_instructions=2, n_select=1, factors=(0.0, 4.0),
                         max_new_tokens=4, batch_size=8, calibration_instructions=4,
                         calibration_concepts=3)
    judge_cfg = JudgeConfig()
    path = tmp_path / "judge_calibration.json"
    state = run_mod.judge_calibration(lm, cfg, judge_cfg, path, unsteered_cache=tmp_path / "u")
    assert state["thresholds"]["calibrated"] and len(state["unsteered"]) == 4 * 3
    stored = json.loads(path.read_text())
    assert len(stored["instructions"]) == 4 and len(stored["concepts"]) == 3

    def no_generation(*a, **k):
        raise AssertionError("a stored calibration must not generate again")
    monkeypatch.setattr(run_mod, "unsteered_answers", no_generation)
    assert run_mod.judge_calibration(lm, cfg, judge_cfg, path) == state
    monkeypatch.undo()
    other = SteeringConfig(**{**cfg.__dict__, "calibration_concepts": 2})
    assert len(run_mod.judge_calibration(lm, other, judge_cfg, path)["unsteered"]) == 4 * 2

    class Timer:
        def __call__(self, name):
            import contextlib
            return contextlib.nullcontext()

    shared = {"latent": 3, "explanation": 'the tokens "t3"', "max_act": 2.0}
    runs = [run_mod.steer_concepts(lm, sae, LAYER, [shared, extra], cfg, judge_cfg, Timer(),
                                   unsteered_cache=tmp_path / "u", calibration=state)
            for extra in ({"latent": 5, "explanation": 'the tokens "t5"', "max_act": 1.0},
                          {"latent": 6, "explanation": "a very different concept", "max_act": 3.0})]
    keys = ("instruction", "alpha", "output", "concept_rating", "instruction_rating",
            "fluency_rating", "hm")
    rows = [[tuple(r[k] for k in keys) for r in run.rows if r["latent"] == 3] for run in runs]
    assert rows[0] == rows[1] and len(rows[0]) == 1 * 2 + 1  # select at both factors, held out at α*
    for run in runs:  # selection instructions at every factor, held-out ones at α* only
        star = {s.latent: s.alpha_star for s in run.scores}
        held = [r for r in run.rows if r["split"] == "heldout"]
        assert len(held) == 2 and all(r["alpha"] == star[r["latent"]] for r in held)
        assert {r["alpha"] for r in run.rows if r["split"] == "select"} == set(cfg.factors)
