"""AutoInterp: the interpretability score μ(θ) of an SAE (protocol §3, SAEBench's AutoInterp).

Why: μ(θ) is one of the two scores whose rank agreement the paper measures (protocol §1, §5),
and each latent's explanation becomes its concept text for steering (§4), which also needs each
latent's maximum activation m_f. Per scored latent:

1. windows (``saelib.evals.windows``): 12 top, 7 importance-weighted (IW), 10 random;
2. explanation: the judge sees 10 top + 5 IW windows, tokens with activation
   > ``mark_threshold`` × max marked, and writes a short description;
3. detection: 2 top + 2 IW + 10 random windows, shuffled (seeded), unmarked; the judge returns
   the indices it predicts fire. Truth: window max activation > ``mark_threshold`` × max;
   Score(ℓ) = accuracy over the 14 windows;
4. μ(θ) = mean Score over CONCEPT100, a seeded random ``n_concepts`` of the scored latents.

Choices where the protocol is silent (documented in the book):

* live = fires (activation > 0 at a non-special position) more than ``min_firings`` = 15 times on
  the eval corpus: SAEBench's rule (its ``dead_latent_threshold``, "minimum number of required
  activations"), so that a latent scored has its top and importance-weighted windows, and a
  latent that fired once never gets a near-trivial detection score from 0-1 top windows. The
  latents that fire but too rarely are counted in the result (``n_rare``), not scored. A caller's
  ``live_mask`` (e.g. from training) overrides the rule; a latent live by the mask but silent on
  the eval corpus is recorded unscored and makes the result partial.
* which top/IW windows go to explanation vs detection: a seeded random split (as SAEBench).
  A rarely firing latent with k < 12 top windows gives min(2, k // 2) to detection and the rest
  (≤ 10) to explanation; the same for IW; its Score is the accuracy over the windows it has, and
  its record says so in ``note``.
* the explainer sees its top windows in descending order of peak, then its IW windows.
* judge predictions that are not integers in [0, n_windows) are ignored (counted in ``note``).

An SAE with no live latents, or fewer than requested, yields ``partial=True`` with a ``reason``,
never an exception.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from saelib.evals.windows import (
    STREAM_CONCEPTS,
    STREAM_LATENTS,
    STREAM_SPLIT,
    CodesSource,
    LatentWindows,
    Window,
    WindowSpec,
    centre_mask_NL,
    scan_top,
    stream_windows,
)
from saelib.judges.base import Judge, MarkedWindow
from saelib.results import Timer


@dataclass(frozen=True)
class AutoInterpConfig:
    """AutoInterp parameters (protocol §3; one block of the experiment profile).

    ``n_latents`` latents are scored (seeded random among live ones), ``n_concepts`` of them form
    CONCEPT100. Windows: ``n_top``/``n_iw``/``n_random`` sampled per latent, of which the judge's
    explanation uses ``n_top_gen`` + ``n_iw_gen`` and detection ``n_top_score`` + ``n_iw_score``
    + ``n_random_score``; ``window_radius`` tokens each side of the centre.
    ``mark_threshold`` × max activation is both the explainer's highlight and the detection
    truth threshold. ``min_firings``: a latent is live, and scored, when it fires more often
    than this on the eval corpus (SAEBench's ``dead_latent_threshold``, 15).
    ``exclude_sinks``: attention sinks (:func:`saelib.activations.sink_mask`) are treated as
    BOS is, never a centre and counting 0. About 1 in 3,000 tokens, yet on the cpu-pair SAEs
    they held the largest activation of 2–57 % of the live latents (a gated SmolLM2-135M SAE at
    L0 48: 442 of 2,048), whose top windows would otherwise open on a token whose residual is
    ~100x the typical norm rather than on what the latent stands for in ordinary text.
    """

    n_latents: int = 1000
    n_concepts: int = 100
    n_top_gen: int = 10
    n_iw_gen: int = 5
    n_top_score: int = 2
    n_iw_score: int = 2
    n_random_score: int = 10
    window_radius: int = 10
    n_top: int = 12
    n_iw: int = 7
    n_random: int = 10
    mark_threshold: float = 0.01
    seed: int = 0
    min_firings: int = 15
    exclude_sinks: bool = True

    def validate(self) -> None:
        positive = ("n_latents", "n_concepts", "n_top", "n_top_gen")
        non_negative = ("n_iw_gen", "n_top_score", "n_iw_score", "n_random_score",
                        "window_radius", "n_iw", "n_random", "seed", "min_firings")
        for name in positive + non_negative:
            value = getattr(self, name)
            low = 1 if name in positive else 0
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ValueError(f"AutoInterpConfig.{name} must be an int >= {low}, got {value!r}")
        if self.n_concepts > self.n_latents:
            raise ValueError(f"AutoInterpConfig.n_concepts ({self.n_concepts}) must be <= "
                             f"n_latents ({self.n_latents}): CONCEPT100 is drawn from the scored")
        for total, a, b in (("n_top", "n_top_gen", "n_top_score"),
                            ("n_iw", "n_iw_gen", "n_iw_score")):
            if getattr(self, total) < getattr(self, a) + getattr(self, b):
                raise ValueError(f"AutoInterpConfig.{total} ({getattr(self, total)}) must be >= "
                                 f"{a} + {b} ({getattr(self, a)} + {getattr(self, b)})")
        if self.n_random < self.n_random_score:
            raise ValueError(f"AutoInterpConfig.n_random ({self.n_random}) must be >= "
                             f"n_random_score ({self.n_random_score})")
        capacity = self.n_top * (2 * self.window_radius + 1)
        if self.min_firings >= capacity:
            raise ValueError(f"AutoInterpConfig.min_firings ({self.min_firings}) must be below the "
                             f"firings the first pass keeps per latent, n_top·(2·radius+1) = "
                             f"{capacity}")
        if not 0.0 <= float(self.mark_threshold) < 1.0:
            raise ValueError(f"AutoInterpConfig.mark_threshold must be in [0, 1), "
                             f"got {self.mark_threshold!r}")

    def window_spec(self) -> WindowSpec:
        return WindowSpec(radius=self.window_radius, n_top=self.n_top, n_iw=self.n_iw,
                          n_random=self.n_random, seed=self.seed)


@dataclass(frozen=True)
class LatentRecord:
    """One scored latent: its windows by use, the judge's explanation and predictions, Score(ℓ).

    ``score_windows`` are in the shuffled order the judge saw; ``predictions`` index them and
    ``truth[i]`` is whether window i's max activation > mark_threshold × ``max_act``. ``score``
    is None only for a latent that never fires on the eval corpus (then ``note`` says so).
    """

    latent: int
    max_act: float
    explain_windows: tuple[Window, ...]
    score_windows: tuple[Window, ...]
    explanation: str | None
    predictions: tuple[int, ...]
    truth: tuple[bool, ...]
    score: float | None
    in_concept100: bool
    note: str | None = None

    def to_row(self) -> dict[str, Any]:
        """One JSON-ready line (the steering stage reads ``explanation`` and ``max_act``)."""
        return {
            "latent": self.latent,
            "max_act": self.max_act,
            "explanation": self.explanation,
            "score": self.score,
            "in_concept100": self.in_concept100,
            "predictions": list(self.predictions),
            "truth": list(self.truth),
            "note": self.note,
            "explain_windows": [_window_row(w) for w in self.explain_windows],
            "score_windows": [_window_row(w) for w in self.score_windows],
        }


def _window_row(w: Window) -> dict[str, Any]:
    return {"role": w.role, "context": w.context, "centre": w.centre, "start": w.start,
            "end": w.end, "token_ids": list(w.token_ids),
            "acts": [float(f"{a:.4g}") for a in w.acts]}


@dataclass
class AutoInterpResult:
    """μ(θ) and everything behind it (protocol §3).

    ``mu`` is the mean Score over ``concept100`` (None when nothing could be scored);
    ``partial``/``reason`` flag an SAE with no or too few live latents. ``n_rare``: latents that
    fire on the eval corpus, but no more than ``min_firings`` times (not live, not scored).
    ``timings`` in seconds.
    """

    config: AutoInterpConfig
    width: int
    n_live: int
    scored: tuple[int, ...]
    concept100: tuple[int, ...]
    records: list[LatentRecord]
    mu: float | None
    partial: bool
    reason: str | None
    timings: dict[str, float] = field(default_factory=dict)
    judge_name: str = ""
    judge_usage: dict[str, Any] = field(default_factory=dict)
    n_rare: int = 0

    @property
    def mean_score_all(self) -> float | None:
        """Mean Score over every scored latent (descriptive; μ uses CONCEPT100 only)."""
        scores = [r.score for r in self.records if r.score is not None]
        return float(np.mean(scores)) if scores else None

    def to_jsonl_rows(self) -> list[dict[str, Any]]:
        """One row per scored latent, for ``autointerp.jsonl`` (``results.write_jsonl``)."""
        return [r.to_row() for r in self.records]

    def summary(self) -> dict[str, Any]:
        """The scalars for the SAE's ``result.json``."""
        return {
            "mu": self.mu,
            "mean_score_all": self.mean_score_all,
            "width": self.width,
            "n_live": self.n_live,
            "n_rare": self.n_rare,
            "n_scored": len(self.scored),
            "n_concept100": len(self.concept100),
            "concept100": list(self.concept100),
            "partial": self.partial,
            "reason": self.reason,
            "timings_s": dict(self.timings),
            "judge": self.judge_name,
            "judge_usage": dict(self.judge_usage),
            "config": asdict(self.config),
        }


def is_active(window: Window, max_act: float, threshold: float) -> bool:
    """Detection truth (protocol §3): the window's max activation > threshold × latent max."""
    return window.max_act > threshold * max_act


def marked_window(window: Window, decode: Callable[[int], str], max_act: float,
                  threshold: float) -> MarkedWindow:
    """The explainer's view: tokens with activation > threshold × max are marked."""
    return MarkedWindow(tokens=tuple(decode(t) for t in window.token_ids), acts=window.acts,
                        marked=tuple(a > threshold * max_act for a in window.acts))


def unmarked_window(window: Window, decode: Callable[[int], str]) -> MarkedWindow:
    """The detector's view: text only, no activations, no marks."""
    return MarkedWindow(tokens=tuple(decode(t) for t in window.token_ids))


def split_windows(lw: LatentWindows, config: AutoInterpConfig,
                  rng: np.random.Generator) -> tuple[list[Window], list[Window], str | None]:
    """Seeded split into (explanation windows, detection windows before shuffling, note).

    Explanation: ``n_top_gen`` top (descending peak) then ``n_iw_gen`` IW windows. Detection:
    ``n_top_score`` top + ``n_iw_score`` IW + ``n_random_score`` random. With k < requested
    windows of a kind, detection gets min(requested, k // 2) and explanation the rest.
    """
    def split(ws: Sequence[Window], n_gen: int, n_score: int) -> tuple[list[Window], list[Window]]:
        order = rng.permutation(len(ws))
        k_score = min(n_score, len(ws) // 2) if len(ws) < n_gen + n_score else n_score
        score = [ws[i] for i in order[:k_score]]
        gen = [ws[i] for i in sorted(order[k_score:k_score + n_gen])]
        return gen, score

    # Both lists are already in rank order: top by descending peak, IW in sampling order.
    top_gen, top_score = split(lw.top, config.n_top_gen, config.n_top_score)
    iw_gen, iw_score = split(lw.iw, config.n_iw_gen, config.n_iw_score)
    random_score = list(lw.random[:config.n_random_score])
    short = [f"{name} {have}/{want}" for name, have, want in (
        ("top", len(lw.top), config.n_top), ("iw", len(lw.iw), config.n_iw),
        ("random", len(lw.random), config.n_random)) if have < want]
    note = f"fewer windows than requested: {', '.join(short)}" if short else None
    return top_gen + iw_gen, top_score + iw_score + random_score, note


def score_latent(lw: LatentWindows, judge: Judge, decode: Callable[[int], str],
                 config: AutoInterpConfig, in_concept100: bool,
                 timer: Timer | None = None) -> LatentRecord:
    """Explain, detect and score one latent (protocol §3)."""
    timer = timer or Timer()
    rng = np.random.default_rng([config.seed, STREAM_SPLIT, lw.latent])
    explain_ws, score_ws, note = split_windows(lw, config, rng)
    score_ws = [score_ws[i] for i in rng.permutation(len(score_ws))]
    with timer("explain"):
        explanation = judge.explain([marked_window(w, decode, lw.max_act, config.mark_threshold)
                                     for w in explain_ws])
    with timer("detect"):
        raw = judge.detect(explanation, [unmarked_window(w, decode) for w in score_ws])
    predictions = sorted({int(i) for i in raw if _is_index(i, len(score_ws))})
    n_bad = sum(1 for i in raw if not _is_index(i, len(score_ws)))
    if n_bad:
        note = "; ".join(filter(None, [note, f"{n_bad} invalid prediction(s) ignored"]))
    truth = tuple(is_active(w, lw.max_act, config.mark_threshold) for w in score_ws)
    return LatentRecord(latent=lw.latent, max_act=lw.max_act, explain_windows=tuple(explain_ws),
                        score_windows=tuple(score_ws), explanation=explanation,
                        predictions=tuple(predictions), truth=truth,
                        score=detection_score(predictions, truth), in_concept100=in_concept100,
                        note=note)


def detection_score(predicted: Sequence[int], truth: Sequence[bool]) -> float:
    """The detection score (protocol §3): the fraction of detection windows called right, a
    window predicted (its index in ``predicted``) being right when it fires and an unpredicted one
    when it does not."""
    chosen = set(predicted)
    return sum((i in chosen) == t for i, t in enumerate(truth)) / len(truth)


def _is_index(i: Any, n: int) -> bool:
    return isinstance(i, (int, np.integer)) and not isinstance(i, bool) and 0 <= int(i) < n


def seeded_subset(ids: np.ndarray, n: int, seed: int, stream: int) -> np.ndarray:
    """A seeded uniformly random ``n`` of ``ids`` (all if fewer), sorted: the ``n`` with the
    smallest of one random key per latent id, drawn from ``(seed, stream)``.

    Why keys per id rather than ``rng.choice(ids)``: a latent's pick then depends on its own key
    and on the keys of the others in ``ids`` only, so a set that gains or loses a latent keeps the
    rest of its pick. ``choice`` over a set one element shorter draws another sample altogether:
    excluding attention sinks made 25 of 1,341 live latents of one SmolLM2-135M SAE not live, and
    79-94 of CONCEPT100's 100 latents changed on the SAEs whose live set changed. Runs that
    differ in a few latents' liveness are now compared on nearly the same latents."""
    ids = np.asarray(ids, dtype=np.int64)
    if len(ids) <= n:
        return np.sort(ids)
    keys = np.random.default_rng([seed, stream]).random(int(ids.max()) + 1)
    return np.sort(ids[np.argsort(keys[ids], kind="stable")[:n]])


def choose_latents(live_ids: np.ndarray, config: AutoInterpConfig) -> np.ndarray:
    """The scored latents: a seeded random ``n_latents`` of the live ones (all if fewer), sorted."""
    return seeded_subset(live_ids, config.n_latents, config.seed, STREAM_LATENTS)


def choose_concepts(eligible: np.ndarray, config: AutoInterpConfig) -> np.ndarray:
    """CONCEPT100: a seeded random ``n_concepts`` of the scored latents (all if fewer), sorted."""
    return seeded_subset(eligible, config.n_concepts, config.seed, STREAM_CONCEPTS)


def run_autointerp(codes_source: CodesSource, tokens_NL: np.ndarray,
                   decode_token: Callable[[int], str], judge: Judge,
                   config: AutoInterpConfig = AutoInterpConfig(),
                   live_mask: np.ndarray | None = None, *, special_ids: Sequence[int] = (),
                   bos_at_start: bool = True, exclude_NL: np.ndarray | None = None,
                   backend: str = "auto") -> AutoInterpResult:
    """AutoInterp over one SAE: μ(θ) and per-latent records (protocol §3).

    ``codes_source`` yields the SAE's codes over the eval corpus whose token ids are
    ``tokens_NL`` (N contexts × L, BOS at position 0 when ``bos_at_start``); ``special_ids``
    (BOS/PAD/EOS) are never centres and count 0, nor are the positions ``exclude_NL`` marks
    (bool, like ``tokens_NL``; the stage passes the attention sinks). ``decode_token(id) -> str``
    renders tokens for the judge. ``live_mask`` (bool, width) overrides liveness on the eval corpus.
    ``backend`` picks the top-k kernel (``saelib.kernels``).
    """
    config.validate()
    tokens_NL = np.asarray(tokens_NL)
    valid_NL = centre_mask_NL(tokens_NL, special_ids, bos_at_start)
    if exclude_NL is not None:
        exclude_NL = np.asarray(exclude_NL)
        if exclude_NL.shape != valid_NL.shape or exclude_NL.dtype != bool:
            raise ValueError(f"exclude_NL must be a bool array of shape {valid_NL.shape}, got "
                             f"{exclude_NL.dtype} {exclude_NL.shape}")
        valid_NL = valid_NL & ~exclude_NL
    width = int(codes_source.width)
    if live_mask is not None:
        live_mask = np.asarray(live_mask)
        if live_mask.shape != (width,) or live_mask.dtype != bool:
            raise ValueError(f"live_mask must be a bool array of shape ({width},), got "
                             f"{live_mask.dtype} {live_mask.shape}")
    timer = Timer()
    reasons: list[str] = []
    usage_before = asdict(judge.usage)

    with timer("total"):
        with timer("scan_top"):
            top = scan_top(codes_source, valid_NL, config.window_spec(), backend=backend)
        # the first pass keeps n_top·(2r+1) > min_firings values per latent: exact counts here
        n_fires = (top.vals_KF[:config.min_firings + 1] > 0).sum(0).cpu().numpy()
        live = live_mask if live_mask is not None else n_fires > config.min_firings
        n_rare = int(((n_fires > 0) & ~live).sum()) if live_mask is None else 0
        live_ids = np.flatnonzero(live)
        scored = choose_latents(live_ids, config)
        if len(live_ids) == 0:
            reasons.append("the SAE has no live latents on the eval corpus; nothing was scored")
        elif len(live_ids) < config.n_latents:
            reasons.append(f"only {len(live_ids)} live latents, fewer than n_latents="
                           f"{config.n_latents}; all of them were scored")

        with timer("windows"):
            windows = stream_windows(codes_source, tokens_NL, valid_NL, scored.tolist(), top,
                                     config.window_spec())
        silent = [lw.latent for lw in windows if not lw.top]
        if silent:
            reasons.append(f"{len(silent)} latent(s) live by live_mask never fire on the eval "
                           f"corpus and were left unscored (e.g. {silent[:5]})")
        eligible = np.array([lw.latent for lw in windows if lw.top], dtype=np.int64)
        concept100 = choose_concepts(eligible, config)
        if 0 < len(eligible) < config.n_concepts:
            reasons.append(f"only {len(eligible)} scorable latents, fewer than n_concepts="
                           f"{config.n_concepts}; CONCEPT100 holds all of them")
        in_c100 = set(concept100.tolist())

        decode = _cached(decode_token)
        records: list[LatentRecord] = []
        for lw in windows:
            if not lw.top:
                records.append(LatentRecord(
                    latent=lw.latent, max_act=lw.max_act, explain_windows=(), score_windows=(),
                    explanation=None, predictions=(), truth=(), score=None, in_concept100=False,
                    note="never fires on the eval corpus"))
                continue
            records.append(score_latent(lw, judge, decode, config, lw.latent in in_c100, timer))

    c100_scores = [r.score for r in records if r.in_concept100 and r.score is not None]
    mu = float(np.mean(c100_scores)) if c100_scores else None
    usage_after = asdict(judge.usage)
    usage = {k: v - usage_before[k] for k, v in usage_after.items()
             if isinstance(v, (int, float)) and not isinstance(v, bool)}
    return AutoInterpResult(
        config=config, width=width, n_live=int(len(live_ids)), n_rare=n_rare,
        scored=tuple(int(x) for x in scored), concept100=tuple(int(x) for x in concept100),
        records=records, mu=mu, partial=bool(reasons), reason="; ".join(reasons) or None,
        timings=dict(timer.timings), judge_name=getattr(judge, "name", type(judge).__name__),
        judge_usage=usage)


def _cached(decode_token: Callable[[int], str]) -> Callable[[int], str]:
    """Memoise token decoding: a run decodes ~29 · 21 tokens per latent from a small vocabulary."""
    cache: dict[int, str] = {}

    def decode(t: int) -> str:
        s = cache.get(t)
        if s is None:
            s = cache[t] = decode_token(int(t))
        return s

    return decode
