"""The offline judge on hand-made cases where the right answer is obvious.

Uses the real packaged all-MiniLM-L6-v2 (loaded once per module, ~5–10 s on a shared CPU).
"""

from __future__ import annotations

import math

import numpy as np
import pytest

from saelib.judges import JudgeConfig, MarkedWindow, RatingItem, Ratings, make_judge
from saelib.judges.offline import (OfflineJudge, count_term_hits, explanation_terms,
                                   format_explanation, load_embedder, repetition_rate)
from saelib.steering.axbench import harmonic_mean

FLUENT_COOKING = ("Preheat the oven to 180 degrees. Cream the butter and sugar, beat in the "
                  "eggs, fold in the flour and chocolate chips, then bake the cookies for "
                  "twelve minutes.")
OFF_TOPIC = ("The central bank raised interest rates again on Tuesday, and bond markets fell as "
             "investors worried about inflation.")
SPEAKING_INSTR = "How can I improve my public speaking skills?"
SPEAKING_OUT = ("Practise your talk out loud several times, know your material well, slow down, "
                "breathe, and look at the audience while you speak.")


@pytest.fixture(scope="module")
def embed():
    return load_embedder()


@pytest.fixture
def judge(embed):
    return OfflineJudge(JudgeConfig(), embed_fn=embed)


def test_factory_builds_offline_by_default():
    judge = make_judge()
    assert isinstance(judge, OfflineJudge) and judge.name == "offline"


def test_concept_on_vs_off(judge):
    concept = "cooking and baking recipes"
    on, off = judge.rate([RatingItem(concept, "Tell me something.", FLUENT_COOKING),
                          RatingItem(concept, "Tell me something.", OFF_TOPIC)])
    assert on.concept == 2 and off.concept == 0


def test_concept_from_explanation_terms(judge):
    concept = format_explanation(["dog", "puppy"])
    two, one, none = judge.rate([
        RatingItem(concept, "Describe your weekend.", "I walked the dogs and then fed my puppy."),
        RatingItem(concept, "Describe your weekend.", "On Saturday I saw a dog near the lake."),
        RatingItem(concept, "Describe your weekend.", "I read a novel about sailing ships."),
    ])
    assert (two.concept, none.concept) == (2, 0)
    assert one.concept >= 1


def test_instruction_on_vs_off_topic(judge):
    on, off = judge.rate([RatingItem("x", SPEAKING_INSTR, SPEAKING_OUT),
                          RatingItem("x", SPEAKING_INSTR, OFF_TOPIC)])
    assert on.instruction == 2 and off.instruction == 0


def test_fluency_fluent_vs_repeated(judge):
    fluent, repeated, looped = judge.rate([
        RatingItem("x", SPEAKING_INSTR, SPEAKING_OUT),
        RatingItem("x", SPEAKING_INSTR, " the" * 40),
        RatingItem("x", SPEAKING_INSTR, "ArrayList<>();" * 12),
    ])
    assert fluent.fluency == 2 and repeated.fluency == 0 and looped.fluency == 0


def test_fluency_uses_injected_loglik(embed):
    table = {SPEAKING_OUT: -2.0, "Speak slowly, practise and breathe.": -4.5,
             "speak slowly practise breathe mirror.": -9.0}
    judge = OfflineJudge(JudgeConfig(), embed_fn=embed,
                         loglik_fn=lambda texts: [table[t] for t in texts])
    got = judge.rate([RatingItem("x", SPEAKING_INSTR, t) for t in table])
    assert [r.fluency for r in got] == [2, 1, 0]


def test_unscorable_text_with_minus_inf_loglik_rates_zero_instead_of_raising(embed):
    """An empty steered generation (EOS at once) has no token to score: the model's mean
    log-prob is -inf. Found by the default grid: it must rate (0, 0, 0), not stop the stage;
    and calibration ignores such unsteered answers. NaN is still a bug and raises."""
    table = {"": float("-inf"), "Speak slowly, practise and breathe.": -2.0,
             "speak slowly practise breathe mirror.": float("-inf")}
    judge = OfflineJudge(JudgeConfig(), embed_fn=embed, loglik_fn=lambda ts: [table[t] for t in ts])
    judge.calibrate([RatingItem("x", SPEAKING_INSTR, t) for t in table])
    assert judge.thresholds.calibrated and math.isfinite(judge.thresholds.loglik[0])
    got = judge.rate([RatingItem("x", SPEAKING_INSTR, t) for t in table])
    assert got[0] == Ratings(0, 0, 0) and got[2].fluency == 0 and got[1].fluency == 2
    nan = OfflineJudge(JudgeConfig(), embed_fn=embed, loglik_fn=lambda ts: [float("nan")] * len(ts))
    with pytest.raises(ValueError, match="log-probs <= 0"):
        nan.rate([RatingItem("x", "y", "z z")])


def test_empty_or_symbol_output_scores_zero(judge):
    assert judge.rate([RatingItem("cooking", SPEAKING_INSTR, ""),
                       RatingItem("cooking", SPEAKING_INSTR, " \n ...")]) == [Ratings(0, 0, 0)] * 2


def test_rate_is_deterministic(judge, embed):
    items = [RatingItem("cooking", SPEAKING_INSTR, FLUENT_COOKING),
             RatingItem("finance", SPEAKING_INSTR, OFF_TOPIC)]
    assert judge.rate(items) == OfflineJudge(JudgeConfig(), embed_fn=embed).rate(items)


def _win(words: list[str], fire: set[str], act: float = 5.0) -> MarkedWindow:
    acts = tuple(act if w.strip() in fire else 0.0 for w in words)
    return MarkedWindow(tuple(words), acts, tuple(a > 0 for a in acts))


def test_explain_prefers_rare_strongly_firing_tokens():
    filler = [" the", " a", " of", " and", " to", " in"]
    top = [_win(filler[:i % 5 + 1] + [" cat"] + filler, {"cat", "the"}, act=3.0 + i)
           for i in range(10)]
    freq = {" the": 0.06, " a": 0.03, " of": 0.03, " and": 0.03, " to": 0.03, " in": 0.02,
            " cat": 1e-5, " dog": 1e-5}
    judge = OfflineJudge(JudgeConfig(explain_top_k=1), token_freq=freq)
    assert judge.explain(top) == format_explanation(["cat"])
    assert explanation_terms(judge.explain(top)) == ["cat"]
    # Without corpus frequencies the background is the windows themselves: "the", marked in one
    # window but present unmarked in all, ranks below "cat", marked wherever it appears.
    mixed = [_win(filler + [" cat"] + filler, {"cat", "the"} if i == 0 else {"cat"})
             for i in range(10)]
    assert explanation_terms(OfflineJudge(JudgeConfig()).explain(mixed)) == ["cat"]


def test_explain_without_marks_uses_protocol_threshold():
    w = MarkedWindow((" x", " rocket", " y"), (0.0, 4.0, 0.001))
    assert OfflineJudge(JudgeConfig()).explain([w]) == format_explanation(["rocket"])
    assert OfflineJudge(JudgeConfig()).explain([MarkedWindow((" a",), (0.0,))]) == ""


def test_detect_by_explanation_tokens():
    judge = OfflineJudge(JudgeConfig())
    windows = [MarkedWindow((" my", " cat", " sat")), MarkedWindow((" the", " stock", " fell")),
               MarkedWindow((" two", " Cats", "!")), MarkedWindow((" category", " theory"))]
    assert judge.detect(format_explanation(["cat"]), windows) == [0, 2]
    assert judge.detect("This neuron activates on mentions of cats", windows) == [0, 2]
    assert judge.detect("", windows) == []


def test_calibration_follows_documented_rules(embed):
    unsteered = [
        RatingItem("cooking", SPEAKING_INSTR, SPEAKING_OUT),
        RatingItem("cooking", "Explain how photosynthesis works.",
                   "Plants use sunlight, water and carbon dioxide to make glucose and oxygen."),
        RatingItem("cooking", "Give tips for saving money on groceries.",
                   "Make a shopping list, buy store brands and compare unit prices."),
    ]
    lls = {it.output: v for it, v in zip(unsteered, (-2.0, -2.2, -2.6))}
    judge = OfflineJudge(JudgeConfig(), embed_fn=embed, loglik_fn=lambda ts: [lls[t] for t in ts])
    judge.calibrate(unsteered)
    th = judge.thresholds
    assert th.calibrated and judge.usage.extra["calibrated"]
    rep = th.calibration
    on, off = rep["instruction_on_median"], rep["instruction_off_median"]
    assert on > off + 0.3
    assert th.instruction_sim == pytest.approx((off + 0.2 * (on - off), off + 0.4 * (on - off)))
    assert th.concept_sim[0] >= 0.25 and th.concept_sim[1] - th.concept_sim[0] >= 0.20 - 1e-9
    assert th.repetition == (0.25, 0.50)
    m, s = -2.2, 0.5   # MAD·1.4826 = 0.30 is below the 0.5-nat floor
    assert th.loglik == pytest.approx((m - 3 * s, m - 6 * s))
    # The unsteered outputs themselves come out on-instruction and fluent.
    assert all(r.instruction == 2 and r.fluency == 2 for r in judge.rate(unsteered))


def test_calibration_marks_common_terms_as_background(embed):
    concept = format_explanation(["world", "zebra"])
    unsteered = [RatingItem(concept, "Say hi.", f"hello world number {i}") for i in range(4)]
    judge = OfflineJudge(JudgeConfig(), embed_fn=embed)
    assert judge.concept_terms(concept) == ["world", "zebra"]
    judge.calibrate(unsteered)
    assert judge.concept_terms(concept) == ["zebra"]
    assert judge.concept_terms(format_explanation(["the", "zebras"])) == ["zebras"]


def test_looping_unsteered_model_cannot_make_loops_fluent(embed):
    unsteered = [RatingItem("x", "Say hi.", "hi" + " there" * 30) for _ in range(3)]
    judge = OfflineJudge(JudgeConfig(), embed_fn=embed)
    judge.calibrate(unsteered)
    r1, r0 = judge.thresholds.repetition
    assert (r1, r0) == (0.5, 0.75)
    assert judge.rate([RatingItem("x", "Say hi.", " the" * 40)])[0].fluency == 0


def test_text_helpers():
    assert repetition_rate("The quick brown fox jumps over the lazy dog.") == 0.0
    assert repetition_rate(" the" * 20) == pytest.approx(1 - 1 / 18)
    # A loop glued into one word piece is caught by the character 8-grams.
    assert repetition_rate("WLWDWDWDWDWDWDWDWDWDWDWDWDWDWDWD") > 0.8
    assert repetition_rate("Plants turn sunlight, water and carbon dioxide into sugar and oxygen.") == 0.0
    assert count_term_hits("Two cats, a cat and a category.", ["cat"]) == 2
    assert count_term_hits("x := 1; y := 2", [":="]) == 2
    assert explanation_terms('the tokens "\\u00e9t\\u00e9", " Dog"') == ["été", "dog"]


def test_bad_inputs_raise_clear_errors(embed):
    judge = OfflineJudge(JudgeConfig(), embed_fn=embed)
    with pytest.raises(ValueError, match="3 tokens but 2 activations"):
        judge.explain([MarkedWindow((" a", " b", " c"), (1.0, 2.0))])
    with pytest.raises(ValueError, match="at least one window"):
        judge.explain([])
    with pytest.raises(ValueError, match="finite and >= 0"):
        OfflineJudge(JudgeConfig(), token_freq={" a": -1.0})
    bad = OfflineJudge(JudgeConfig(), embed_fn=embed, loglik_fn=lambda ts: [0.5] * len(ts))
    with pytest.raises(ValueError, match="log-probs <= 0"):
        bad.rate([RatingItem("x", "y", "z z")])
    with pytest.raises(ValueError, match="at least one unsteered"):
        judge.calibrate([])
    with pytest.raises(ValueError, match="judge.repetition"):
        JudgeConfig(repetition=(0.6, 0.2)).validate()
    with pytest.raises(ValueError, match="judge.local_model"):
        JudgeConfig(backend="local").validate()


def test_embeddings_are_unit_norm(embed):
    e = embed(["a cat", "the stock market"])
    assert e.shape == (2, 384)
    assert np.allclose(np.linalg.norm(e, axis=1), 1.0, atol=1e-5)


# --- the labelled adversarial set ---------------------------------------------------------------

def adversarial_set() -> list[dict]:
    """35 steered-looking outputs with the ratings a careful LLM judge gives (AxBench's three
    templates), in ``tests/data/judge_adversarial.jsonl``: per concept (two quoted-token concepts,
    one free-text, one more quoted) a natural on-concept answer, concept words inserted, appended
    and looped, synonyms only, a single passing mention, on-concept but off-instruction text,
    fluent unrelated text, an on-instruction answer without the concept; and broken grammar."""
    import json
    from pathlib import Path

    path = Path(__file__).parent / "data" / "judge_adversarial.jsonl"
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def test_rule_judge_does_not_reward_pasted_concept_words_and_meets_the_labels(embed):
    """Measured before the stuffing and sentence rules (uncalibrated defaults): exact agreement
    concept 0.51, instruction 0.94, fluency 0.77, and "cat cat" inserted into a fluent answer
    rated HM 2.0. After: 0.89 / 0.94 / 0.94; the misses are synonyms rated 1 where the labels
    say 2, and broken grammar, which only the likelihood rule (an LM, not used here) sees."""
    rows = adversarial_set()
    assert len(rows) == 35
    judge = OfflineJudge(JudgeConfig(), embed_fn=embed)
    got = judge.rate([RatingItem(r["concept"], r["instruction"], r["output"]) for r in rows])
    got_CR = np.array([[g.concept, g.instruction, g.fluency] for g in got])
    want_CR = np.array([r["labels"] for r in rows])
    exact_R = (got_CR == want_CR).mean(0)
    within_R = (np.abs(got_CR - want_CR) <= 1).mean(0)
    print(f"adversarial set: exact concept/instruction/fluency {exact_R.round(3).tolist()}, "
          f"within one {within_R.round(3).tolist()}")
    assert exact_R[0] >= 0.85 and exact_R[1] >= 0.90 and exact_R[2] >= 0.90
    assert within_R.min() >= 0.94
    for r, g in zip(rows, got):
        if r["kind"] in ("inserted", "appended", "looped"):
            assert g.concept <= 1 and g.fluency <= 1, (r["output"], g)
            assert harmonic_mean(g) < 1.5
        if r["kind"] == "synonym":
            assert g.concept >= 1, (r["output"], g)
        if r["kind"] in ("unrelated", "no_concept"):
            assert g.concept == 0, (r["output"], g)


def test_stuffed_runs_need_a_repeated_word(embed):
    from saelib.judges.offline import concept_use

    terms = ["ocean", "sea", "marine", "life"]
    use = concept_use("Marine life is rich. The ocean ocean sea is deep.", terms)
    assert (use.natural, use.stuffed_words, use.n_words) == (2, 3, 10)
    assert use.clean == "Marine life is rich. The is deep."
    assert concept_use("cat, cats and dogs", ["cat"]).stuffed_words == 2


def test_each_distinct_text_is_embedded_once_per_rating_call(embed):
    """An output is its own first piece when nothing is cut out of it: one encoder call embeds
    outputs and pieces, each distinct text once (before, every such output was embedded twice)."""
    seen: list[str] = []

    def counting(texts):
        seen.extend(texts)
        return embed(texts)

    items = [RatingItem("cooking", SPEAKING_INSTR, FLUENT_COOKING),
             RatingItem("finance", SPEAKING_INSTR, OFF_TOPIC),
             RatingItem("speaking", SPEAKING_INSTR, SPEAKING_OUT)]
    ratings = OfflineJudge(JudgeConfig(), embed_fn=counting).rate(items)
    assert len(seen) == len(set(seen))
    assert {FLUENT_COOKING, OFF_TOPIC, SPEAKING_OUT} <= set(seen)
    assert ratings[2].instruction > ratings[1].instruction  # on-topic answer vs off-topic one
