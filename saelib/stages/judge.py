"""Stage ``judge``: an LLM judge re-judges a seeded, stratified sample of what the profile's judge
rated, so the book can say how far μ and g depend on the instrument (protocol §3–4).

The paper's judge is gpt-4o-mini; the default here rates with rules (:mod:`saelib.judges.offline`).
This stage runs the ``judge_agreement`` section's back-end (by default the packaged
Qwen2.5-Coder-1.5B through llama.cpp) on

* **steered generations** with AxBench's three rating templates: for ``n_saes`` SAEs spread over
  the architectures, every held-out generation at each concept's α* (what g rests on), then
  generations of every SAE, spread evenly over the factors, up to ``n_generations``;
* **AutoInterp latents** with SAEBench's explanation and detection prompts: ``n_latents`` CONCEPT100
  latents of the same SAEs, on the windows the interp stage stored (explanation windows marked,
  detection windows in the stored order, scored against the stored truth). The LLM also detects
  from the rule judge's explanation of each latent, which tells an explanation that misleads its
  detection from a detection that fails on any explanation; and its answers that name every
  window, none, or exactly the prompt's example are counted (a small model copies the example).

It records agreement per rating kind (exact match, weighted κ, Kendall τ_b, confusion matrix),
agreement on the latents' scores, and for each chosen SAE μ and g under both judges with their rank
correlation across SAEs. The sample is split into two seeded halves (``half`` 0/1) so that a rule
tuned on one half can be reported on the other. The LLM's answers are cached by content hash (in
the judge section's ``cache_dir``, else ``judge-cache/`` in the run folder): a rerun asks nothing
twice. One job per profile; it needs every
SAE's interp and steering blocks.
"""

from __future__ import annotations

import math
import time
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from typing import Any, Sequence

import numpy as np
from tqdm.auto import tqdm

from ..evals.autointerp import detection_score
from ..judges.agreement import JudgeAgreementConfig, agreement_on, judge_agreement
from ..judges.base import MarkedWindow, RatingItem, Ratings
from ..judges.factory import make_judge
from ..judges.prompts import detection_example
from ..models import resolve_hf_source
from ..profiles import Profile
from ..results import CorruptFileError, provenance, read_json, read_jsonl, write_json
from ..stats import kendall_tau_b_p
from ..steering.axbench import harmonic_mean, heldout_at_star
from . import interp, steering
from .layout import JUDGE_RECORD, RESULT, SAEJob, as_profile, sae_dir, sae_jobs
from .records import Record, StaleRecord, read_result, settings_record

NAME = "judge"
#: The LLM's answers, one JSON file per request, under the run folder.
CACHE = "judge-cache"


@dataclass(frozen=True)
class JudgeRecord(Record):
    """``judge.json``: what was sampled, both judges' verdicts on it, agreement and cost."""

    SCHEMA = 2  # 2: latents carry the LLM's detection from the rule explanation, answer kinds

    judge_a: str
    judge_b: str
    n_generations: int
    n_latents: int
    saes: list[str]
    ratings: dict[str, Any]
    ratings_half1: dict[str, Any]
    latents: dict[str, Any]
    per_sae: list[dict[str, Any]]
    seconds_by_sae: dict[str, float]
    tokens_by_sae: dict[str, int]
    rank_correlation: dict[str, Any]
    generations: list[dict[str, Any]]
    latent_items: list[dict[str, Any]]
    unparsable: dict[str, int]
    judge_usage: dict[str, Any]
    settings: dict[str, Any]
    seconds: float
    ratings_per_s: float
    provenance: dict[str, Any]


def _sae_key(job: SAEJob) -> str:
    return f"{job.model}/{job.name}"


def choose_saes(jobs: Sequence[SAEJob], n: int, seed: int) -> list[SAEJob]:
    """``n`` SAEs spread over the architectures and the models: each (architecture, model)'s
    SAEs in seeded order, then one from each in turn, where the first round takes architecture i
    from model i mod M and later rounds rotate the models (so 6 of a 2 × 5 × 6 grid cover every
    architecture and both models; with one model, the architectures in turn)."""
    cells: dict[tuple[str, str], list[SAEJob]] = {}
    for job in jobs:
        cells.setdefault((job.arch, job.model), []).append(job)
    archs = list(dict.fromkeys(job.arch for job in jobs))
    models = list(dict.fromkeys(job.model for job in jobs))
    groups = [cells[(arch, models[(i + r) % len(models)])] for r in range(len(models))
              for i, arch in enumerate(archs) if (arch, models[(i + r) % len(models)]) in cells]
    return _round_robin(groups, n, np.random.default_rng([seed, 1]))


def _round_robin(groups: Sequence[Sequence[Any]], n: int, rng: np.random.Generator) -> list[Any]:
    """Up to ``n`` items: each group shuffled by ``rng``, then one from each group in turn."""
    queues = [[group[i] for i in rng.permutation(len(group))] for group in groups]
    out: list[Any] = []
    while len(out) < n and any(queues):
        for q in queues:
            if q and len(out) < n:
                out.append(q.pop(0))
    return out


def g_rows(rows: Sequence[dict[str, Any]], block: dict[str, Any]) -> list[dict[str, Any]]:
    """The held-out generations at each concept's α*: the rows the SAE's g averages."""
    return heldout_at_star(rows, {int(c["latent"]): float(c["alpha_star"])
                                  for c in block.get("concepts", [])})


def fill_by_factor(pool: Sequence[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """Up to ``n`` rows of ``pool``, spread evenly over the steering factors (seeded)."""
    by_alpha: dict[float, list[dict[str, Any]]] = {}
    for r in pool:
        by_alpha.setdefault(float(r["alpha"]), []).append(r)
    groups = [group for _, group in sorted(by_alpha.items())]
    return _round_robin(groups, n, np.random.default_rng([seed, 2]))


def choose_latents(rows: Sequence[dict[str, Any]], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` scored CONCEPT100 latents with windows to show (seeded), in latent order."""
    eligible = [r for r in rows if r.get("in_concept100") and r.get("score") is not None
                and r.get("explain_windows") and r.get("score_windows")]
    rng = np.random.default_rng([seed, 3])
    idx = sorted(rng.choice(len(eligible), size=min(n, len(eligible)), replace=False).tolist())
    return [eligible[i] for i in idx]


def _windows(rows: Sequence[dict[str, Any]], decode, mark_threshold: float | None,
             max_act: float) -> list[MarkedWindow]:
    out = []
    for w in rows:
        tokens = tuple(decode(t) for t in w["token_ids"])
        if mark_threshold is None:
            out.append(MarkedWindow(tokens=tokens))
        else:
            acts = tuple(float(a) for a in w["acts"])
            out.append(MarkedWindow(tokens=tokens, acts=acts,
                                    marked=tuple(a > mark_threshold * max_act for a in acts)))
    return out


def _rank(xs: Sequence[float], ys: Sequence[float]) -> dict[str, Any]:
    pairs = [(x, y) for x, y in zip(xs, ys) if x is not None and y is not None
             and not (math.isnan(x) or math.isnan(y))]
    tau, p = kendall_tau_b_p([q[0] for q in pairs], [q[1] for q in pairs])
    if math.isnan(tau):
        return {"n": len(pairs), "kendall_tau_b": None, "p_value": None}
    return {"n": len(pairs), "kendall_tau_b": tau, "p_value": p}


def _halves(n: int, seed: int) -> np.ndarray:
    """A seeded 0/1 label per item, half of each."""
    labels = np.arange(n) % 2
    return np.random.default_rng([seed, 4]).permutation(labels)


def settings(profile: Profile) -> tuple[JudgeAgreementConfig, Any]:
    _, judge_cfg = steering.settings(profile)
    return profile.section("judge_agreement"), judge_cfg


def _llm_config(profile: Profile, cfg: JudgeAgreementConfig, judge_cfg):
    return replace(judge_cfg, backend=cfg.backend, max_tokens_rating=cfg.max_tokens,
                   llama_threads=cfg.threads,
                   cache_dir=judge_cfg.cache_dir or str(profile.run_root() / CACHE),
                   local_model=resolve_hf_source(cfg.local_model) if cfg.backend == "local"
                   else judge_cfg.local_model)


def judge_name(cfg: JudgeAgreementConfig, judge_cfg) -> str:
    if cfg.backend == "llama":
        return "llama (Qwen2.5-Coder-1.5B Q4_K_M)" if judge_cfg.llama_model == "packaged" \
            else f"llama ({judge_cfg.llama_model})"
    if cfg.backend == "local":
        return f"local ({cfg.local_model})"
    return f"openai ({judge_cfg.model})"


def done(profile: Profile) -> bool:
    """The record exists and was made with the current settings from the current SAE records."""
    profile = as_profile(profile)
    out = profile.run_root() / JUDGE_RECORD
    if not out.exists():
        return False
    try:
        old = JudgeRecord.from_json(read_json(out))
    except (StaleRecord, CorruptFileError):
        return False
    cfg, judge_cfg = settings(profile)
    return old.settings == settings_record(judge_agreement=cfg, judge=judge_cfg,
                                           inputs=_inputs(profile))


def _inputs(profile: Profile) -> dict[str, str]:
    """Each SAE's steering and interp row-file digests: the record is stale when one changes."""
    out = {}
    for job in sae_jobs(profile):
        result = read_result(sae_dir(profile, job) / RESULT) or {}
        for block in (steering.NAME, interp.NAME):
            files = (result.get(block) or {}).get("files_sha256") or {}
            for name, digest in sorted(files.items()):
                out[f"{_sae_key(job)}/{name}"] = digest
    return out


class _Cost:
    """The LLM's seconds and tokens, attributed to the SAE whose items it was judging."""

    def __init__(self, llm) -> None:
        self.llm = llm
        self.seconds: dict[str, float] = {}
        self.tokens: dict[str, int] = {}

    @contextmanager
    def on(self, sae: str):
        t0 = time.perf_counter()
        k0 = self.llm.usage.prompt_tokens + self.llm.usage.completion_tokens
        try:
            yield
        finally:
            self.seconds[sae] = self.seconds.get(sae, 0.0) + time.perf_counter() - t0
            self.tokens[sae] = (self.tokens.get(sae, 0) + self.llm.usage.prompt_tokens
                                + self.llm.usage.completion_tokens - k0)


def _steered(profile: Profile) -> tuple[dict[SAEJob, list[dict[str, Any]]], dict[SAEJob, dict[str, Any]]]:
    """Every SAE's steering rows (tagged with the SAE) and its ``result.json``, where both exist."""
    steered, results = {}, {}
    for job in sae_jobs(profile):
        result = read_result(sae_dir(profile, job) / RESULT) or {}
        path = sae_dir(profile, job) / steering.STEER_ROWS
        if path.exists() and result.get(steering.NAME):
            steered[job] = [{**r, "sae": _sae_key(job)} for r in read_jsonl(path)]
            results[job] = result
    return steered, results


def sample_generations(steered: dict[SAEJob, list[dict[str, Any]]], results: dict[SAEJob, dict[str, Any]],
                       cfg: JudgeAgreementConfig) -> tuple[list[SAEJob], list[dict[str, Any]]]:
    """The chosen SAEs and the generations: their g rows first, then the rest by factor.

    Each chosen SAE gives the g rows of whole concepts (its g under both judges is a mean over
    concepts), in its concepts' order, up to an equal share of half of ``n_generations`` (at least
    one concept each), so that every chosen SAE has a g under both judges and the other half of
    the sample spreads over the factors."""
    chosen = choose_saes(list(steered), cfg.n_saes, cfg.seed)
    share = (cfg.n_generations // 2) // max(1, len(chosen))
    core = []
    for job in chosen:
        by_concept: dict[int, list[dict[str, Any]]] = {}
        for r in g_rows(steered[job], results[job][steering.NAME]):
            by_concept.setdefault(int(r["latent"]), []).append(r)
        mine: list[dict[str, Any]] = []
        for rows in by_concept.values():
            if mine and len(mine) + len(rows) > share:
                break
            mine += rows
        core += mine
    core = core[:cfg.n_generations]
    taken = {id(r) for r in core}
    rest = [r for rows in steered.values() for r in rows if id(r) not in taken]
    return chosen, core + fill_by_factor(rest, cfg.n_generations - len(core), cfg.seed)


def sample_latents(profile: Profile, chosen: Sequence[SAEJob], n: int, seed: int) -> list[dict[str, Any]]:
    """``n`` CONCEPT100 latents, as evenly as possible from the chosen SAEs' AutoInterp rows."""
    if n == 0 or not chosen:
        return []
    each = math.ceil(n / len(chosen))
    rows: list[dict[str, Any]] = []
    for job in chosen:
        path = sae_dir(profile, job) / interp.INTERP_ROWS
        if path.exists():
            rows += [{**r, "sae": _sae_key(job)} for r in choose_latents(read_jsonl(path), each, seed)]
    return rows[:n]


def _rate(llm, sample: Sequence[dict[str, Any]], cost: _Cost, progress: bool) -> list[Ratings]:
    """The LLM's ratings of the sample, SAE by SAE (so each SAE's cost is its own)."""
    by_sae: dict[str, list[int]] = {}
    for i in sorted(range(len(sample)), key=lambda i: sample[i]["sae"]):
        by_sae.setdefault(sample[i]["sae"], []).append(i)
    rated: dict[int, Ratings] = {}
    with tqdm(total=len(sample), desc="LLM judge: generations", unit="gen", disable=not progress) as bar:
        for sae, idx in by_sae.items():
            with cost.on(sae):
                for start in range(0, len(idx), 8):
                    part = idx[start:start + 8]
                    got = llm.rate([RatingItem(sample[i]["concept"], sample[i]["instruction"],
                                               sample[i]["output"]) for i in part])
                    rated.update(zip(part, got))
                    bar.update(len(part))
    return [rated[i] for i in range(len(sample))]


def _judge_latents(profile: Profile, llm, rows: Sequence[dict[str, Any]], cost: _Cost,
                   progress: bool) -> list[dict[str, Any]]:
    """The LLM explains each latent from its stored marked windows and detects on its stored
    detection windows; the score is the fraction of windows it calls right (protocol §3). It
    also detects from the rule judge's explanation (``llm_score_given_rule_explanation``)."""
    if not rows:
        return []
    from transformers import AutoTokenizer  # lazily: only when latents are judged

    mark = profile.section("interp").mark_threshold
    tokenizers: dict[str, Any] = {}
    items = []
    for r in tqdm(rows, desc="LLM judge: latents", unit="latent", disable=not progress):
        model = r["sae"].split("/")[0]
        if model not in tokenizers:
            tokenizers[model] = AutoTokenizer.from_pretrained(resolve_hf_source(model))
        tok = tokenizers[model]

        def decode(t: int, tok=tok) -> str:
            return tok.decode([t])

        with cost.on(r["sae"]):
            explanation = llm.explain(_windows(r["explain_windows"], decode, mark, float(r["max_act"])))
            score_windows = _windows(r["score_windows"], decode, None, 0.0)
            predicted, given_rule = (set(p) for p in llm.detect_many(
                [(explanation, score_windows), (r["explanation"], score_windows)]))
        truth = [bool(t) for t in r["truth"]]
        items.append({"sae": r["sae"], "latent": r["latent"],
                      "rule_explanation": r["explanation"], "llm_explanation": explanation,
                      "rule_score": float(r["score"]),
                      "llm_score": detection_score(predicted, truth),
                      "rule_predictions": list(r["predictions"]),
                      "llm_predictions": sorted(predicted),
                      "llm_score_given_rule_explanation": detection_score(given_rule, truth),
                      "llm_predictions_given_rule_explanation": sorted(given_rule),
                      "truth": truth})
    return items


def _per_sae(chosen: Sequence[SAEJob], results: dict[SAEJob, dict[str, Any]],
             sample: Sequence[dict[str, Any]], hm_a: Sequence[float], hm_b: Sequence[float],
             latent_items: Sequence[dict[str, Any]], cost: _Cost) -> list[dict[str, Any]]:
    """μ and g of each chosen SAE under both judges, on the same latents and generations."""
    out = []
    for job in chosen:
        key, block = _sae_key(job), results[job][steering.NAME]
        g_ids = {id(r) for r in g_rows([r for r in sample if r["sae"] == key], block)}
        g_idx = [i for i, r in enumerate(sample) if id(r) in g_ids]
        lat = [it for it in latent_items if it["sae"] == key]
        out.append({
            "sae": key, "arch": job.arch, "level": job.level,
            "mu": (results[job].get("interp") or {}).get("mu"), "g": block.get("g"),
            "g_rule": _concept_mean(sample, g_idx, hm_a), "g_llm": _concept_mean(sample, g_idx, hm_b),
            "n_generations": len(g_idx),
            "mu_rule": float(np.mean([it["rule_score"] for it in lat])) if lat else None,
            "mu_llm": float(np.mean([it["llm_score"] for it in lat])) if lat else None,
            "n_latents": len(lat), "llm_seconds": cost.seconds.get(key, 0.0),
            "llm_tokens": cost.tokens.get(key, 0)})
    return out


def run(profile: Profile | str, progress: bool = True) -> JudgeRecord | None:
    """(Or, when current, return the recorded) LLM judge on the sample; None when the section
    asks for nothing or no SAE has steering rows yet."""
    profile = as_profile(profile)
    cfg, judge_cfg = settings(profile)
    if cfg.n_generations == 0 and cfg.n_latents == 0:
        return None
    settings_now = settings_record(judge_agreement=cfg, judge=judge_cfg, inputs=_inputs(profile))
    out = profile.run_root() / JUDGE_RECORD
    if out.exists():
        try:
            old = JudgeRecord.from_json(read_json(out))
            if old.settings == settings_now:
                return old
        except (StaleRecord, CorruptFileError):
            pass  # another schema or unreadable: judge again (the answer cache keeps it cheap)
    steered, results = _steered(profile)
    if not steered:
        return None
    chosen, sample = sample_generations(steered, results, cfg)
    latent_rows = sample_latents(profile, chosen, cfg.n_latents, cfg.seed)

    t0 = time.perf_counter()
    llm = make_judge(_llm_config(profile, cfg, judge_cfg))
    load_s = time.perf_counter() - t0
    cost = _Cost(llm)
    try:
        t1 = time.perf_counter()
        theirs = _rate(llm, sample, cost, progress)
        rate_s = time.perf_counter() - t1
        latent_items = _judge_latents(profile, llm, latent_rows, cost, progress)
        latent_s = time.perf_counter() - t1 - rate_s
    finally:
        if hasattr(llm, "close"):
            llm.close()
    ours = [Ratings(r["concept_rating"], r["instruction_rating"], r["fluency_rating"]) for r in sample]

    name_a, name_b = judge_cfg.backend, judge_name(cfg, judge_cfg)
    halves = _halves(len(sample), cfg.seed)
    half1 = [i for i in range(len(sample)) if halves[i] == 1]
    report_half1 = judge_agreement([ours[i] for i in half1], [theirs[i] for i in half1],
                                   name_a, name_b) if len(half1) >= 2 else None
    hm_a = [harmonic_mean(r) for r in ours]
    hm_b = [harmonic_mean(r) for r in theirs]
    per_sae = _per_sae(chosen, results, sample, hm_a, hm_b, latent_items, cost)
    usage = asdict(llm.usage)
    record = JudgeRecord(
        judge_a=name_a, judge_b=name_b, n_generations=len(sample), n_latents=len(latent_items),
        saes=[_sae_key(j) for j in chosen],
        ratings={**judge_agreement(ours, theirs, name_a, name_b).to_dict()["per_kind"],
                 "hm": _hm_agreement(hm_a, hm_b)},
        ratings_half1=report_half1.to_dict()["per_kind"] if report_half1 else {},
        latents=_latent_agreement(latent_items),
        per_sae=per_sae, seconds_by_sae=cost.seconds, tokens_by_sae=cost.tokens,
        rank_correlation={"mu": _rank([p["mu_rule"] for p in per_sae], [p["mu_llm"] for p in per_sae]),
                          "g": _rank([p["g_rule"] for p in per_sae], [p["g_llm"] for p in per_sae])},
        generations=[{"sae": r["sae"], "latent": r["latent"], "alpha": r["alpha"],
                      "split": r["split"], "instruction_index": r["instruction_index"],
                      "half": int(h), "concept": r["concept"], "instruction": r["instruction"],
                      "output": r["output"], "rule": [a.concept, a.instruction, a.fluency],
                      "llm": [b.concept, b.instruction, b.fluency]}
                     for r, h, a, b in zip(sample, halves, ours, theirs)],
        latent_items=latent_items,
        unparsable={k: int(usage["extra"].get(k, 0))
                    for k in ("unparsable_ratings", "unparsable_detections")},
        judge_usage=usage, settings=settings_now,
        seconds=load_s + rate_s + latent_s,
        ratings_per_s=3 * len(sample) / max(rate_s, 1e-9),
        provenance=provenance(settings_now, cfg.seed,
                              {"load": load_s, "rate": rate_s, "latents": latent_s},
                              profile=profile.name))
    write_json(out, record.to_json())
    return record


def _concept_mean(sample, idx: Sequence[int], hm: Sequence[float]) -> float | None:
    """g over the given held-out rows: the mean over concepts of their mean HM."""
    by_latent: dict[int, list[float]] = {}
    for i in idx:
        by_latent.setdefault(int(sample[i]["latent"]), []).append(hm[i])
    return float(np.mean([np.mean(v) for v in by_latent.values()])) if by_latent else None


def _hm_agreement(a: Sequence[float], b: Sequence[float]) -> dict[str, Any]:
    return {"n": len(a), "mean_a": float(np.mean(a)) if a else None,
            "mean_b": float(np.mean(b)) if b else None,
            "both_zero": int(sum(x == 0 and y == 0 for x, y in zip(a, b))),
            "both_positive": int(sum(x > 0 and y > 0 for x, y in zip(a, b))), **_rank(a, b)}


def answer_kinds(items: Sequence[dict[str, Any]], key: str) -> dict[str, int]:
    """How many detection answers (``items[i][key]``, 0-based window indices) name every window,
    none, or exactly the prompt's example (:func:`~saelib.judges.prompts.detection_example`):
    answers that ignore the text, whatever the explanation."""
    out = {"every_window": 0, "no_window": 0, "the_prompts_example": 0}
    for it in items:
        n, got = len(it["truth"]), sorted(set(it[key]))
        out["every_window"] += int(len(got) == n)
        out["no_window"] += int(not got)
        out["the_prompts_example"] += int(got == [i - 1 for i in detection_example(n)])
    return out


def _latent_agreement(items: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """Scores and per-window detections of the two judges on the same latents; the LLM's score
    when it detects from the rule explanation; the kinds of answer that ignore the text; and
    what a constant answer scores (every window fires, or none)."""
    if not items:
        return {"n": 0}
    rule = [it["rule_score"] for it in items]
    llm = [it["llm_score"] for it in items]
    calls_a = [int(i in set(it["rule_predictions"])) for it in items for i in range(len(it["truth"]))]
    calls_b = [int(i in set(it["llm_predictions"])) for it in items for i in range(len(it["truth"]))]
    windows = agreement_on(calls_a, calls_b, "detection")
    fired = [float(np.mean(it["truth"])) for it in items]
    return {"n": len(items), "mean_rule_score": float(np.mean(rule)),
            "mean_llm_score": float(np.mean(llm)),
            "mean_llm_score_given_rule_explanation":
                float(np.mean([it["llm_score_given_rule_explanation"] for it in items])),
            "constant_answer_score": {"every_window": float(np.mean(fired)),
                                      "no_window": float(1 - np.mean(fired))},
            "answers": {"rule": answer_kinds(items, "rule_predictions"),
                        "llm": answer_kinds(items, "llm_predictions"),
                        "llm_given_rule_explanation":
                            answer_kinds(items, "llm_predictions_given_rule_explanation")},
            "score": _rank(rule, llm),
            "detection": {"n_windows": windows.n, "exact_match": windows.exact_match,
                          "kappa": windows.weighted_kappa,
                          "confusion": [row[:2] for row in windows.confusion[:2]]}}
