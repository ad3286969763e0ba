"""AutoInterp (protocol §3): counts, scoring rule, truth threshold, liveness, partial results."""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest

from saelib.evals.autointerp import AutoInterpConfig, is_active, run_autointerp, seeded_subset
from saelib.evals.windows import ArrayCodes, Window
from saelib.judges.base import Judge
from saelib.results import read_jsonl, write_jsonl

BOS = 1
N, L, F = 30, 48, 16
CFG = AutoInterpConfig(n_latents=10, n_concepts=4, seed=0)


def make_corpus(seed=0, density=0.15):
    """Each token id names its position (10 + n·L + l), so a fake judge can look activations up."""
    rng = np.random.default_rng(seed)
    tokens = 10 + np.arange(N * L).reshape(N, L)
    tokens[:, 0] = BOS
    mask = rng.random((N, L, F)) < density
    codes = (rng.exponential(size=(N, L, F)) * mask).astype(np.float32)
    return tokens, codes


def decode(t: int) -> str:
    return f"<{t}>"


class FakeJudge(Judge):
    """Records what it is shown; predicts ``predict(latent_acts, windows)``."""

    name = "fake"

    def __init__(self, predict):
        super().__init__()
        self.predict = predict
        self.explained, self.detected = [], []

    def explain(self, windows):
        self.explained.append(list(windows))
        self.usage.requests += 1
        return f"explanation {len(self.explained)}"

    def detect(self, explanation, windows):
        self.detected.append(list(windows))
        self.usage.requests += 1
        return self.predict(windows)

    def rate(self, items):
        raise NotImplementedError("AutoInterp never rates")


def window_positions(mw):
    """Recover (context, position) of each token of a shown window from its decoded ids."""
    ids = [int(t[1:-1]) for t in mw.tokens]
    return [divmod(i - 10, L) if i != BOS else None for i in ids]


def test_config_validate_rejects_bad_values():
    AutoInterpConfig().validate()
    with pytest.raises(ValueError, match="n_latents"):
        AutoInterpConfig(n_latents=0).validate()
    with pytest.raises(ValueError, match="n_concepts"):
        AutoInterpConfig(n_latents=5, n_concepts=6).validate()
    with pytest.raises(ValueError, match="n_top"):
        AutoInterpConfig(n_top=11).validate()
    with pytest.raises(ValueError, match="mark_threshold"):
        AutoInterpConfig(mark_threshold=1.5).validate()
    with pytest.raises(ValueError, match="min_firings"):
        AutoInterpConfig(n_top=2, window_radius=1, n_top_gen=1, n_top_score=1,
                         min_firings=6).validate()


def test_counts_marks_and_unmarked_detection():
    tokens, codes = make_corpus()
    judge = FakeJudge(lambda ws: [])
    res = run_autointerp(ArrayCodes(codes), tokens, decode, judge, CFG, special_ids=[BOS])
    assert len(res.records) == CFG.n_latents == len(judge.explained) == len(judge.detected)
    for rec, shown in zip(res.records, judge.explained):
        roles = [w.role for w in rec.explain_windows]
        assert roles == ["top"] * 10 + ["iw"] * 5
        assert len(shown) == 15
        for w, mw in zip(rec.explain_windows, shown):
            assert mw.marked == tuple(a > 0.01 * rec.max_act for a in w.acts)
            assert mw.acts == w.acts
        assert sorted(w.role for w in rec.score_windows) == sorted(
            ["top"] * 2 + ["iw"] * 2 + ["random"] * 10)
        scored_non_random = {w for w in rec.score_windows if w.role != "random"}
        assert not set(rec.explain_windows) & scored_non_random
        assert rec.note is None
    for shown in judge.detected:
        assert len(shown) == 14 and all(mw.marked == () and mw.acts == () for mw in shown)


def test_excluded_positions_are_never_centres_and_count_zero():
    """A planted sink: every latent's largest activation sits at one position; excluded (as the
    stage excludes attention sinks), no window is centred there and it sets no latent's max."""
    tokens, codes = make_corpus()
    codes[3, 20, :] = 1000.0
    sink = (3, 20)
    kept = run_autointerp(ArrayCodes(codes), tokens, decode, FakeJudge(lambda ws: []), CFG,
                          special_ids=[BOS])
    assert all(sink in {(w.context, w.centre) for w in rec.explain_windows + rec.score_windows}
               and rec.max_act == 1000.0 for rec in kept.records)
    exclude = np.zeros((N, L), dtype=bool)
    exclude[sink] = True
    res = run_autointerp(ArrayCodes(codes), tokens, decode, FakeJudge(lambda ws: []), CFG,
                         special_ids=[BOS], exclude_NL=exclude)
    assert len(res.records) == CFG.n_latents
    for rec in res.records:
        centres = {(w.context, w.centre) for w in rec.explain_windows + rec.score_windows}
        assert sink not in centres and rec.max_act < 1000.0
    with pytest.raises(ValueError, match="exclude_NL"):
        run_autointerp(ArrayCodes(codes), tokens, decode, FakeJudge(lambda ws: []), CFG,
                       special_ids=[BOS], exclude_NL=exclude[:, :-1])


def test_scoring_rule_with_known_predictions():
    tokens, codes = make_corpus()
    # Truth from the test's own activations, not from the library.
    def truth_of(mw, f, max_act):
        acts = [codes[p[0], p[1], f] if p else 0.0 for p in window_positions(mw)]
        return max(acts) > 0.01 * max_act

    oracle_state = {}

    def oracle(ws):
        f, max_act = oracle_state["latent"], oracle_state["max"]
        return [i for i, mw in enumerate(ws) if truth_of(mw, f, max_act)]

    class Oracle(FakeJudge):
        def explain(self, windows):
            # The explanation windows carry acts: learn which latent this is from one token.
            mw = windows[0]
            pos = window_positions(mw)
            j = next(i for i, p in enumerate(pos) if p and mw.acts[i] > 0)
            n, l = pos[j]
            oracle_state["latent"] = int(np.flatnonzero(np.isclose(codes[n, l], mw.acts[j]))[0])
            latent_acts = codes[..., oracle_state["latent"]]
            oracle_state["max"] = float(np.where(tokens == BOS, 0, latent_acts).max())
            return super().explain(windows)

    res = run_autointerp(ArrayCodes(codes), tokens, decode, Oracle(oracle), CFG, special_ids=[BOS])
    assert all(r.score == 1.0 for r in res.records)
    assert res.mu == 1.0

    anti = run_autointerp(ArrayCodes(codes), tokens, decode,
                          Oracle(lambda ws: sorted(set(range(14)) - set(oracle(ws)))), CFG,
                          special_ids=[BOS])
    assert all(r.score == 0.0 for r in anti.records)

    fixed = run_autointerp(ArrayCodes(codes), tokens, decode, FakeJudge(lambda ws: [0, 1, 2]),
                           CFG, special_ids=[BOS])
    for r in fixed.records:
        expected = np.mean([(i in (0, 1, 2)) == t for i, t in enumerate(r.truth)])
        assert r.predictions == (0, 1, 2) and r.score == pytest.approx(expected)
        # top windows are always active; 2 top + 2 IW (IW peaks > 0.01·max here or not) + random
        assert all(t for w, t in zip(r.score_windows, r.truth) if w.role == "top")
    c100 = [r.score for r in fixed.records if r.in_concept100]
    assert fixed.mu == pytest.approx(np.mean(c100)) and len(c100) == CFG.n_concepts


def test_truth_threshold_is_strictly_above_one_percent_of_max():
    w = Window(role="random", context=0, centre=1, start=0, end=3, token_ids=(5, 6, 7),
               acts=(0.0, 1.0, 0.5))
    assert not is_active(w, max_act=100.0, threshold=0.01)        # 1.0 == 0.01 × 100
    assert is_active(w, max_act=99.99, threshold=0.01)
    # End to end: background exactly 1 % of the max is "not firing"; only peaks count.
    tokens, _ = make_corpus()
    acts = np.ones((N, L, 1), np.float32)
    peak_pos = [(n, 24) for n in range(0, N, 2)]
    for n, l in peak_pos:
        acts[n, l, 0] = 100.0
    res = run_autointerp(ArrayCodes(acts), tokens, decode, FakeJudge(lambda ws: []),
                         AutoInterpConfig(n_latents=1, n_concepts=1), special_ids=[BOS])
    (rec,) = res.records
    assert rec.max_act == 100.0
    for w, t in zip(rec.score_windows, rec.truth):
        assert t == any((w.context, p) in peak_pos for p in range(w.start, w.end))
    assert rec.score == pytest.approx(1 - np.mean(rec.truth))


def test_dead_latents_excluded():
    tokens, codes = make_corpus()
    codes[..., [2, 5, 9]] = 0.0
    codes[:, 0, 7] = 50.0       # latent 7 fires only on BOS: dead too
    codes[:, 1:, 7] = 0.0
    res = run_autointerp(ArrayCodes(codes), tokens, decode, FakeJudge(lambda ws: []),
                         replace(CFG, n_latents=F), special_ids=[BOS])
    assert res.n_live == F - 4
    assert set(res.scored) == set(range(F)) - {2, 5, 7, 9}
    assert res.partial and "only 12 live latents" in res.reason


def test_no_live_latents_is_partial_not_a_crash():
    tokens, _ = make_corpus()
    judge = FakeJudge(lambda ws: [])
    res = run_autointerp(ArrayCodes(np.zeros((N, L, F), np.float32)), tokens, decode, judge, CFG,
                         special_ids=[BOS])
    assert res.partial and "no live latents" in res.reason
    assert res.mu is None and res.records == [] and res.n_live == 0 and judge.explained == []
    assert res.summary()["mu"] is None


def test_fewer_live_than_requested_scores_all_and_flags():
    tokens, codes = make_corpus()
    res = run_autointerp(ArrayCodes(codes), tokens, decode, FakeJudge(lambda ws: []),
                         AutoInterpConfig(n_latents=50, n_concepts=40), special_ids=[BOS])
    assert res.partial and res.scored == tuple(range(F))
    assert "fewer than n_latents=50" in res.reason and "fewer than n_concepts=40" in res.reason
    assert len(res.concept100) == F


def test_live_mask_latent_silent_on_eval_corpus():
    tokens, codes = make_corpus()
    codes[..., 3] = 0.0
    live = np.ones(F, bool)
    res = run_autointerp(ArrayCodes(codes), tokens, decode, FakeJudge(lambda ws: []),
                         replace(CFG, n_latents=F, n_concepts=F - 1), live_mask=live,
                         special_ids=[BOS])
    rec3 = next(r for r in res.records if r.latent == 3)
    assert rec3.score is None and not rec3.in_concept100 and "never fires" in rec3.note
    assert res.partial and "never fire on the eval corpus" in res.reason
    assert 3 not in res.concept100 and len(res.concept100) == F - 1
    with pytest.raises(ValueError, match="live_mask"):
        run_autointerp(ArrayCodes(codes), tokens, decode, FakeJudge(lambda ws: []), CFG,
                       live_mask=np.ones(F + 1, bool))


def test_seeded_subset_keeps_its_pick_when_the_set_loses_or_gains_a_latent():
    ids = np.arange(0, 4000, 3)
    pick = seeded_subset(ids, 100, seed=0, stream=1)
    assert len(pick) == 100 and len(set(pick)) == 100 and set(pick) <= set(ids)
    assert np.all(np.diff(pick) > 0)
    assert np.array_equal(pick, seeded_subset(ids[::-1], 100, seed=0, stream=1))
    others = np.setdiff1d(ids, pick)
    assert np.array_equal(seeded_subset(np.setdiff1d(ids, others[:25]), 100, 0, 1), pick)
    lost = seeded_subset(np.setdiff1d(ids, pick[:1]), 100, 0, 1)
    assert len(np.intersect1d(lost, pick)) == 99
    assert len(np.intersect1d(seeded_subset(ids, 100, 1, 1), pick)) < 30
    assert len(np.intersect1d(seeded_subset(ids, 100, 0, 2), pick)) < 30
    assert np.array_equal(seeded_subset(ids[:50], 100, 0, 1), ids[:50])
    # uniform: over many seeds, every id is picked about n/len(ids) of the time
    counts = np.zeros(4000)
    for s in range(300):
        counts[seeded_subset(ids, 100, s, 1)] += 1
    assert counts[ids].min() >= 5 and counts[ids].max() <= 45  # expected 22.5, sd 4.6


def test_seeded_choice_of_latents_and_concepts():
    tokens, codes = make_corpus()
    run = lambda seed: run_autointerp(ArrayCodes(codes), tokens, decode,  # noqa: E731
                                      FakeJudge(lambda ws: [1]), replace(CFG, seed=seed),
                                      special_ids=[BOS])
    a, b, c = run(0), run(0), run(1)
    assert a.scored == b.scored and a.concept100 == b.concept100 and a.mu == b.mu
    assert [r.score_windows for r in a.records] == [r.score_windows for r in b.records]
    assert set(a.concept100) <= set(a.scored) and len(a.scored) == CFG.n_latents
    assert (a.scored, a.concept100) != (c.scored, c.concept100)
    assert not a.partial and a.reason is None


def test_invalid_predictions_ignored_and_noted():
    tokens, codes = make_corpus()
    res = run_autointerp(ArrayCodes(codes), tokens, decode,
                         FakeJudge(lambda ws: [-1, 99, "3", True, 0, 0]),
                         replace(CFG, n_latents=2, n_concepts=1), special_ids=[BOS])
    for r in res.records:
        assert r.predictions == (0,) and "4 invalid prediction(s)" in r.note


def test_jsonl_rows_round_trip(tmp_path):
    tokens, codes = make_corpus()
    res = run_autointerp(ArrayCodes(codes), tokens, decode, FakeJudge(lambda ws: [0]), CFG,
                         special_ids=[BOS])
    path = write_jsonl(tmp_path / "autointerp.jsonl", res.to_jsonl_rows())
    rows = read_jsonl(path)
    assert [r["latent"] for r in rows] == list(res.scored)
    for row, rec in zip(rows, res.records):
        assert row["max_act"] == pytest.approx(rec.max_act)
        assert row["explanation"] == rec.explanation and row["score"] == rec.score
        assert len(row["explain_windows"]) == 15 and len(row["score_windows"]) == 14
    s = res.summary()
    assert s["n_scored"] == CFG.n_latents and s["judge_usage"]["requests"] == 2 * CFG.n_latents
    assert set(s["timings_s"]) >= {"total", "scan_top", "windows", "explain", "detect"}


def test_rare_latent_splits_its_few_windows_and_says_so():
    tokens, _ = make_corpus()
    acts = np.zeros((N, L, 1), np.float32)
    acts[3, 20, 0], acts[7, 30, 0], acts[12, 5, 0] = 2.0, 5.0, 1.0
    res = run_autointerp(ArrayCodes(acts), tokens, decode, FakeJudge(lambda ws: []),
                         AutoInterpConfig(n_latents=1, n_concepts=1, min_firings=0),
                         special_ids=[BOS])
    (rec,) = res.records
    # 3 top windows: min(2, 3 // 2) = 1 to detection, 2 to explanation; no IW candidates.
    assert [w.role for w in rec.explain_windows] == ["top", "top"]
    assert sorted(w.role for w in rec.score_windows) == ["random"] * 10 + ["top"]
    assert "top 3/12" in rec.note and "iw 0/7" in rec.note
    assert rec.score == pytest.approx(np.mean([not t for t in rec.truth]))


def test_latents_firing_15_times_or_fewer_are_not_live_and_are_counted():
    """SAEBench's rule: a latent must fire more than ``min_firings`` (15) times on the eval
    corpus to be scored; rarer ones are counted in ``n_rare``, never given a score."""
    tokens, _ = make_corpus()
    acts = np.zeros((N, L, 3), np.float32)
    rng = np.random.default_rng(0)
    for latent, n in ((0, 3), (1, 15), (2, 16)):
        flat = rng.choice(np.arange(N * L).reshape(N, L)[:, 1:].ravel(), size=n, replace=False)
        acts.reshape(N * L, 3)[flat, latent] = rng.uniform(1, 2, size=n)
    res = run_autointerp(ArrayCodes(acts), tokens, decode, FakeJudge(lambda ws: []),
                         AutoInterpConfig(n_latents=3, n_concepts=1), special_ids=[BOS])
    assert res.scored == (2,) and res.n_live == 1 and res.n_rare == 2
    assert res.summary()["n_rare"] == 2 and res.partial
