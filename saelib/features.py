"""Feature pages: one steered concept of one SAE, everything the pipeline knows about it in one card
(protocol §3, §4, §6; issue "Steering with the power to decide", item 4).

A reader who doubts a μ or a g wants to see the latent behind it: the windows AutoInterp showed the
judge (activating tokens highlighted), the explanation it wrote and its detection score, what the
model said when the latent was added at the factor the selection half chose (α*), with the
judge's ratings, and where the latent stands in ΔC_k and in the output score among all of the
SAE's latents. Built only from the records the stages wrote (``autointerp.jsonl``,
``steering.jsonl``, ``selection_scores.json``); the tokenizer decodes the windows.
"""

from __future__ import annotations

import html
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import numpy as np

from .results import read_json, read_jsonl
from .steering.axbench import concept_scores, heldout_at_star, steering_score
from .stages import interp, selection, steering
from .stages.layout import SAEJob, as_profile, sae_dir, sae_jobs


@dataclass(frozen=True)
class Window:
    """One context window shown to the judge: its tokens and the latent's activation on each."""

    role: str
    tokens: tuple[str, ...]
    acts: tuple[float, ...]


@dataclass(frozen=True)
class FeatureCard:
    """One steered latent of one SAE (module doc). Ranks are 1 = highest among the SAE's latents;
    ``None`` where the stage that computes the value has not run."""

    sae: str
    latent: int
    explanation: str
    detection_score: float | None
    max_act: float
    windows: tuple[Window, ...]
    alpha_star: float
    heldout_score: float
    select_hm: dict[float, float]
    examples: tuple[dict[str, Any], ...]
    delta_conf: float | None = None
    delta_conf_rank: int | None = None
    output_score_rank: int | None = None
    n_latents: int | None = None
    notes: tuple[str, ...] = field(default_factory=tuple)


def _ranks(values: Sequence[float]) -> np.ndarray:
    """1-based rank of each value, highest first (ties share the better rank's order)."""
    order = np.argsort(-np.asarray(values, dtype=float), kind="stable")
    ranks = np.empty(len(order), dtype=int)
    ranks[order] = np.arange(1, len(order) + 1)
    return ranks


def feature_cards(profile, job: SAEJob, decode: Callable[[list[int]], list[str]],
                  n_windows: int = 4, n_examples: int = 2) -> list[FeatureCard]:
    """A card per steered concept of ``job``'s SAE, best held-out score first. ``decode`` maps
    token ids to their strings (one per id)."""
    profile = as_profile(profile)
    out = sae_dir(profile, job)
    rows = read_jsonl(out / steering.STEER_ROWS)
    scored = {int(r["latent"]): r for r in read_jsonl(out / interp.INTERP_ROWS)}
    sel_path = out / selection.SELECT_SCORES
    sel = read_json(sel_path) if sel_path.exists() else None
    rank_of: dict[int, tuple[float, int, int]] = {}
    if sel is not None:
        dc, os_ = _ranks(sel["delta_conf"]), _ranks(sel["output_score"])
        rank_of = {int(lat): (float(sel["delta_conf"][i]), int(dc[i]), int(os_[i]))
                   for i, lat in enumerate(sel["latent"])}
    cards = []
    at_star = heldout_at_star(rows)
    for cs in sorted(concept_scores(rows), key=lambda c: -c.score):
        row = scored.get(cs.latent, {})
        wins = []
        for w in (row.get("explain_windows") or [])[:n_windows]:
            wins.append(Window(w.get("role", ""), tuple(decode(list(w["token_ids"]))),
                               tuple(float(a) for a in w["acts"])))
        steered = [r for r in at_star if int(r["latent"]) == cs.latent]
        steered.sort(key=lambda r: -float(r["hm"]))
        dc = rank_of.get(cs.latent)
        notes = () if wins else ("no windows recorded for this latent",)
        cards.append(FeatureCard(
            sae=job.name, latent=cs.latent, explanation=str(row.get("explanation", "")),
            detection_score=(float(row["score"]) if row.get("score") is not None else None),
            max_act=float(row.get("max_act", np.nan)), windows=tuple(wins),
            alpha_star=cs.alpha_star, heldout_score=cs.score, select_hm=dict(cs.select_hm),
            examples=tuple({k: r.get(k) for k in ("instruction", "output", "unsteered_output",
                                                  "concept_rating", "instruction_rating",
                                                  "fluency_rating", "hm")}
                           for r in steered[:n_examples]),
            delta_conf=dc[0] if dc else None, delta_conf_rank=dc[1] if dc else None,
            output_score_rank=dc[2] if dc else None,
            n_latents=len(sel["latent"]) if sel is not None else None, notes=notes))
    return cards


def _window_html(w: Window) -> str:
    peak = max(w.acts) if w.acts and max(w.acts) > 0 else 1.0
    spans = []
    for tok, act in zip(w.tokens, w.acts):
        text = html.escape(tok).replace("\n", "↵")
        if act > 0:
            alpha = 0.15 + 0.85 * min(act / peak, 1.0)
            spans.append(f'<span title="{act:.2f}" style="background: rgba(255,140,0,{alpha:.2f});'
                         f' border-radius: 2px">{text}</span>')
        else:
            spans.append(text)
    return f'<div style="font-family: monospace; margin: 2px 0"><small>{html.escape(w.role)}</small> ' \
           + "".join(spans) + "</div>"


def card_html(card: FeatureCard) -> str:
    """The card as HTML (for ``IPython.display.HTML``): activations highlighted in orange, their
    values on hover."""
    det = "–" if card.detection_score is None else f"{card.detection_score:.2f}"
    rank = ("ΔC_k not computed" if card.delta_conf_rank is None else
            f"ΔC_k {card.delta_conf:+.3g}: rank {card.delta_conf_rank:,} of {card.n_latents:,}; "
            f"output score rank {card.output_score_rank:,}")
    factors = ", ".join(f"{a:g}: {v:.2f}" for a, v in sorted(card.select_hm.items()))
    parts = ['<div style="border: 1px solid #ccc; border-radius: 6px; padding: 8px; margin: 8px 0">',
             f"<b>{html.escape(card.sae)} · latent {card.latent}</b> — "
             f"<i>{html.escape(card.explanation)}</i><br>",
             f"<small>detection score {det} · max activation {card.max_act:.2f} · "
             f"selection-half HM by factor {{{factors}}} → α* = {card.alpha_star:g} · "
             f"held-out score {card.heldout_score:.2f} · {rank}</small>"]
    parts += [_window_html(w) for w in card.windows]
    for ex in card.examples:
        parts.append(
            "<div style='margin-top: 4px'><small>"
            f"<b>instruction</b> {html.escape(str(ex['instruction']))}<br>"
            f"<b>steered (α*)</b> {html.escape(str(ex['output']))}<br>"
            f"<b>unsteered</b> {html.escape(str(ex['unsteered_output']))}<br>"
            f"ratings concept / instruction / fluency {ex['concept_rating']} / "
            f"{ex['instruction_rating']} / {ex['fluency_rating']}, HM {float(ex['hm']):.2f}"
            "</small></div>")
    parts += [f"<small><i>{html.escape(n)}</i></small>" for n in card.notes]
    parts.append("</div>")
    return "".join(parts)


def featured_saes(profile, per_arch: int = 1) -> list[SAEJob]:
    """The SAEs the book shows feature pages for: per model and architecture, the ``per_arch``
    with the highest g(θ) (ties: the sparser level), among those whose steering has run."""
    profile = as_profile(profile)
    best: dict[tuple[str, str], list[tuple[float, int, SAEJob]]] = {}
    for job in sae_jobs(profile):
        path = sae_dir(profile, job) / steering.STEER_ROWS
        if not path.exists():
            continue
        rows = read_jsonl(path)
        if not rows:
            continue
        g = steering_score(concept_scores(rows))
        best.setdefault((job.model, job.arch), []).append((-(g or 0.0), job.level, job))
    return [j for key in sorted(best) for *_, j in sorted(best[key], key=lambda t: t[:2])[:per_arch]]
