"""Feature absorption on the first-letter task (protocol §3, descriptive; Chanin et al. 2024 as
SAEBench's ``absorption`` eval computes it).

Why: an SAE "absorbs" a feature when the latents that usually carry it (here: "starts with the
letter L") stay silent on some inputs and another latent fires in their place. SAEBench scores it
with a first-letter task; the paper shows it beside AutoInterp in Figs. 5–7.

The steps, with SAEBench's thresholds as defaults:

1. **Words**: single-token words of the model's own vocabulary (a space then ``min_chars``+
   lowercase ASCII letters), a seeded balanced sample over first letters, split train/test.
2. **Prompts**: ``icl_examples`` in-context examples ``" {w} has the first letter: {W}"`` on lines,
   then ``" {word} has the first letter:"``; the residual after the SAE's layer is read at the
   word's token (SAEBench's ``prompt_token_pos`` −6). All prompts are built from token ids, so
   they have equal length and batch without padding. Run once per model
   (``saelib.evals.descriptive``), shared by its SAEs.
3. **Ground-truth probe**: a multinomial logistic regression from that residual to the first
   letter, on the training words; letters whose test F1 is below ``min_probe_f1`` are skipped.
4. **Main latents** per letter (k-sparse probing): latents ranked by the difference of class means
   of their code on the training words; k grows from 1 while a one-vs-rest probe on the top k
   gains more than ``f1_jump`` F1 (SAEBench: 0.03), up to ``max_k``. (SAEBench ranks by the
   weights of an L1 probe; the mean difference is its sparse-probing ranking and needs no
   tuning here.)
5. **Per test word** of a kept letter that the probe classifies correctly, with ``p`` the letter's
   unit probe direction, the probe projection ``x·p`` and each latent's projection
   ``a_j (W_dec[j]·p)`` (exactly its part of the reconstruction along ``p``):

   * *absorption fraction*: 0 if the main latents' projection already reaches ``x·p`` or the top
     ``max_absorbing`` other latents aligned with ``p`` (cos ≥ ``fraction_cos``, positive
     projection) explain less than ``proj_proportion`` of it; 1 if the main latents' projection
     is ≤ 0; otherwise the absorbed share ``min(absorbers, x·p − main) / (that + main)``;
   * *full absorption*: every main latent is silent, the top projecting latent has
     cos ≥ ``full_cos`` with ``p`` and supplies at least ``proj_proportion`` of ``x·p``.

   Scores are averaged over words within a letter, then over letters (SAEBench's
   ``mean_absorption_fraction_score`` and ``mean_full_absorption_score``). Fewer than
   ``min_letters`` scored letters (SAEBench's ``min_feats_for_eval``) marks the result partial.
"""

from __future__ import annotations

import string
from dataclasses import dataclass
from typing import Callable

import numpy as np
import torch
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import f1_score
from tqdm.auto import tqdm

LETTERS = string.ascii_lowercase
TEMPLATE = " has the first letter:"


@dataclass(frozen=True)
class AbsorptionConfig:
    """First-letter absorption parameters (profile section ``descriptive.absorption``)."""

    n_words: int = 780
    min_chars: int = 3
    icl_examples: int = 4
    test_fraction: float = 0.3
    max_k: int = 5
    f1_jump: float = 0.03
    min_probe_f1: float = 0.6
    full_cos: float = 0.025
    fraction_cos: float = 0.1
    proj_proportion: float = 0.4
    max_absorbing: int = 3
    min_letters: int = 10
    batch_size: int = 32
    seed: int = 0

    def validate(self) -> "AbsorptionConfig":
        if self.n_words < 2 * len(LETTERS):
            raise ValueError(f"absorption.n_words must be >= {2 * len(LETTERS)} (two per letter), got {self.n_words}")
        if not 0.0 < self.test_fraction < 1.0:
            raise ValueError(f"absorption.test_fraction must be in (0, 1), got {self.test_fraction}")
        if self.max_k < 1 or self.icl_examples < 0 or self.min_chars < 1 or self.batch_size < 1:
            raise ValueError("absorption.max_k, min_chars and batch_size must be >= 1 and icl_examples >= 0")
        return self


@dataclass(frozen=True)
class AbsorptionData:
    """Per-model inputs shared by all SAEs: the residual at each word's token and its letter."""

    acts_WD: np.ndarray
    letter_W: np.ndarray
    words: tuple[str, ...]
    is_test_W: np.ndarray


def vocab_words(tokenizer, min_chars: int) -> dict[str, int]:
    """Words the vocabulary holds as one token with a leading space: ``{word: token id}``."""
    out: dict[str, int] = {}
    vocab = tokenizer.get_vocab()
    for tid in sorted(vocab.values()):
        text = tokenizer.decode([tid])
        if text.startswith(" ") and len(text) > min_chars:
            word = text[1:]
            if word.isascii() and word.isalpha() and word.islower() and word not in out:
                out[word] = tid
    return out


def sample_words(words: dict[str, int], n: int, seed: int) -> list[str]:
    """A seeded sample of about ``n`` words, as balanced over first letters as the vocabulary allows."""
    rng = np.random.default_rng(seed)
    by_letter = {c: sorted(w for w in words if w[0] == c) for c in LETTERS}
    quota = max(1, n // len(LETTERS))
    picked: list[str] = []
    for c in LETTERS:
        pool = by_letter[c]
        picked.extend(rng.choice(pool, size=min(quota, len(pool)), replace=False).tolist())
    return picked


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def build_prompts(tokenizer, words: list[str], vocab: dict[str, int], icl_pool: list[str],
                  n_icl: int, seed: int) -> tuple[np.ndarray, int]:
    """Token ids ``[W, T]`` of every prompt and the (shared) position of the target word."""
    rng = np.random.default_rng(seed + 1)
    tmpl = _ids(tokenizer, TEMPLATE)
    newline = _ids(tokenizer, "\n")
    letter_ids = {c: _ids(tokenizer, " " + c.upper()) for c in LETTERS}
    bos = [tokenizer.bos_token_id] if tokenizer.bos_token_id is not None else []
    rows = []
    for word in words:
        examples = rng.choice([w for w in icl_pool if w != word], size=n_icl, replace=False)
        ids = list(bos)
        for ex in examples:
            ids += [vocab[ex]] + tmpl + letter_ids[ex[0]] + newline
        rows.append(ids + [vocab[word]] + tmpl)
    lengths = {len(r) for r in rows}
    if len(lengths) != 1:
        raise ValueError(f"first-letter prompts differ in length {sorted(lengths)}: a letter or the "
                         "template does not tokenise to fixed-length ids for this tokenizer")
    word_pos = len(rows[0]) - len(tmpl) - 1
    return np.asarray(rows, dtype=np.int64), word_pos


def build_data(residual: Callable[[torch.Tensor], torch.Tensor], tokenizer,
               config: AbsorptionConfig, progress: bool = False) -> AbsorptionData:
    """Run every prompt to the layer (``residual(tokens_BT) -> [B, T, D]``) and keep the word's
    residual. The in-context examples come from vocabulary words outside the sample."""
    vocab = vocab_words(tokenizer, config.min_chars)
    words = sample_words(vocab, config.n_words, config.seed)
    rest = sorted(set(vocab) - set(words))
    icl_pool = rest if len(rest) > config.icl_examples else sorted(vocab)
    tokens_WT, pos = build_prompts(tokenizer, words, vocab, icl_pool, config.icl_examples, config.seed)
    acts = []
    for lo in tqdm(range(0, len(words), config.batch_size), desc="absorption prompts",
                   disable=not progress):
        with torch.no_grad():
            out = residual(torch.as_tensor(tokens_WT[lo:lo + config.batch_size]))
        acts.append(out[:, pos].float().cpu().numpy())
    rng = np.random.default_rng(config.seed + 2)
    is_test = np.zeros(len(words), dtype=bool)
    letter = np.array([LETTERS.index(w[0]) for w in words])
    for c in range(len(LETTERS)):
        idx = rng.permutation(np.flatnonzero(letter == c))
        n_test = int(round(len(idx) * config.test_fraction))
        is_test[idx[:n_test]] = True
    return AbsorptionData(np.concatenate(acts), letter, tuple(words), is_test)


@dataclass(frozen=True)
class LetterProbe:
    """Unit probe direction per letter ``[C, D]`` and the probe's test F1 per letter."""

    dirs_CD: np.ndarray
    f1_C: np.ndarray
    pred_W: np.ndarray


def fit_letter_probe(data: AbsorptionData, seed: int = 0) -> LetterProbe:
    """The ground-truth multinomial probe (SAEBench trains a linear probe on the same task)."""
    train = ~data.is_test_W
    X = data.acts_WD.astype(np.float64)
    scale = X[train].std() or 1.0
    clf = LogisticRegression(max_iter=2000, random_state=seed, C=1.0)
    clf.fit(X[train] / scale, data.letter_W[train])
    pred = clf.predict(X / scale)
    W = np.zeros((len(LETTERS), X.shape[1]))
    W[clf.classes_] = clf.coef_
    norms = np.linalg.norm(W, axis=1, keepdims=True)
    dirs = np.divide(W, norms, out=np.zeros_like(W), where=norms > 0)
    f1 = f1_score(data.letter_W[data.is_test_W], pred[data.is_test_W], labels=range(len(LETTERS)),
                  average=None, zero_division=0.0)
    return LetterProbe(dirs.astype(np.float32), np.asarray(f1), pred)


def main_latents(codes_WF: np.ndarray, letter_W: np.ndarray, train_W: np.ndarray, letter: int,
                 config: AbsorptionConfig) -> list[int]:
    """The letter's main latents: top-k by class-mean difference, k grown while F1 jumps."""
    X, y = codes_WF[train_W], (letter_W[train_W] == letter).astype(int)
    if y.sum() == 0 or y.sum() == len(y):
        return []
    diff = X[y == 1].mean(0) - X[y == 0].mean(0)
    order = [int(i) for i in np.argsort(-diff, kind="stable") if diff[i] > 0][: config.max_k]
    best_f1, chosen = -1.0, []
    for k in range(1, len(order) + 1):
        cols = order[:k]
        clf = LogisticRegression(max_iter=1000, class_weight="balanced").fit(X[:, cols], y)
        f1 = f1_score(y, clf.predict(X[:, cols]), zero_division=0.0)
        if k > 1 and f1 - best_f1 < config.f1_jump:
            break
        best_f1, chosen = f1, cols
    return chosen


def word_scores(x_D: np.ndarray, codes_F: np.ndarray, contrib_F: np.ndarray, cos_F: np.ndarray,
                p_D: np.ndarray, mains: list[int], config: AbsorptionConfig) -> tuple[float, bool]:
    """(absorption fraction, full absorption) of one word; ``contrib_F`` = a_j (W_dec[j]·p)."""
    proj = float(x_D @ p_D)
    main_proj = float(contrib_F[mains].sum()) if mains else 0.0
    others = np.ones(len(codes_F), dtype=bool)
    others[mains] = False
    cand = contrib_F[others & (cos_F >= config.fraction_cos) & (contrib_F > 0)]
    top = float(np.sort(cand)[::-1][: config.max_absorbing].sum()) if cand.size else 0.0
    if proj <= 0 or main_proj >= proj or top / proj < config.proj_proportion:
        fraction = 0.0
    elif main_proj <= 0:
        fraction = 1.0
    else:
        absorbed = min(top, proj - main_proj)
        fraction = float(np.clip(absorbed / (absorbed + main_proj), 0.0, 1.0))
    j = int(np.argmax(contrib_F))
    full = bool(proj > 0 and all(codes_F[m] <= 1e-8 for m in mains) and cos_F[j] >= config.full_cos
                and contrib_F[j] / proj >= config.proj_proportion)
    return fraction, full


@dataclass(frozen=True)
class AbsorptionResult:
    mean_absorption_fraction: float | None
    mean_full_absorption: float | None
    n_letters: int
    n_words: int
    probe_test_f1: float
    per_letter: dict[str, dict]
    partial: bool
    reason: str | None

    def to_record(self) -> dict:
        return {k: getattr(self, k) for k in self.__dataclass_fields__}


def score(data: AbsorptionData, probe: LetterProbe, encode: Callable[[torch.Tensor], torch.Tensor],
          W_dec_FD: np.ndarray, config: AbsorptionConfig) -> AbsorptionResult:
    """Absorption of one SAE (``encode`` raw residual → code, ``W_dec_FD`` raw-space decoder)."""
    with torch.no_grad():
        codes = encode(torch.as_tensor(data.acts_WD, dtype=torch.float32)).float().numpy()
    train = ~data.is_test_W
    dec_norm = np.linalg.norm(W_dec_FD, axis=1)
    per_letter: dict[str, dict] = {}
    for c, letter in enumerate(LETTERS):
        if probe.f1_C[c] < config.min_probe_f1:
            continue
        words = np.flatnonzero(data.is_test_W & (data.letter_W == c) & (probe.pred_W == c))
        if not len(words):
            continue
        mains = main_latents(codes, data.letter_W, train, c, config)
        p = probe.dirs_CD[c]
        along = W_dec_FD @ p
        cos = along / np.maximum(dec_norm, 1e-12)
        fr, full = zip(*(word_scores(data.acts_WD[w], codes[w], codes[w] * along, cos, p, mains, config)
                         for w in words))
        per_letter[letter] = {"main_latents": mains, "n_words": int(len(words)),
                              "absorption_fraction": float(np.mean(fr)),
                              "full_absorption": float(np.mean(full))}
    mean_f1 = float(np.mean(probe.f1_C))
    if not per_letter:
        return AbsorptionResult(None, None, 0, 0, mean_f1, {}, True,
                                f"no letter's probe reached test F1 {config.min_probe_f1} with a "
                                "correctly classified test word: the model's residual at this layer "
                                "does not carry first letters linearly enough to score absorption")
    return AbsorptionResult(
        mean_absorption_fraction=float(np.mean([v["absorption_fraction"] for v in per_letter.values()])),
        mean_full_absorption=float(np.mean([v["full_absorption"] for v in per_letter.values()])),
        n_letters=len(per_letter), n_words=sum(v["n_words"] for v in per_letter.values()),
        probe_test_f1=mean_f1, per_letter=per_letter,
        partial=len(per_letter) < config.min_letters,
        reason=(None if len(per_letter) >= config.min_letters else
                f"only {len(per_letter)} letters scored, {config.min_letters} wanted (SAEBench's "
                f"min_feats_for_eval); the others' probe test F1 < {config.min_probe_f1} or they "
                "had no correctly classified test word"))
