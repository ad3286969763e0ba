"""One steering evaluation: a set of concepts steered and judged with the AxBench protocol.

Shared by the steering stage (concepts = CONCEPT100 latents, protocol §4) and the selection stage
(concepts = the features a ΔC_k or output-score tier selects, protocol §6), so both report scores
from the same evaluator: seeded instructions per concept, the unsteered answers (on which the
offline judge's calibration, made once per model, reads), every (concept, instruction, factor)
generation in batched cached passes, the judge's three ratings, HM, α* on the selection half and the held-out score.
"""

from __future__ import annotations

import hashlib
import json
import random
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Sequence

import numpy as np

from ..data.instructions import load_instructions, sample_instructions
from ..judges.base import RatingItem
from ..judges.factory import make_judge
from ..judges.offline import format_explanation
from ..models import format_prompt, ids_with_bos
from ..results import CorruptFileError, read_json, write_json
from .axbench import (ConceptScore, SteeringConfig, alpha_stars, concept_scores, harmonic_mean,
                      split_of)
from . import generate as generation
from .intervene import make_hook


@dataclass
class SteeringRun:
    """Every generation with its ratings (``rows``), the per-concept scores, and the costs."""

    rows: list[dict[str, Any]]
    scores: list[ConceptScore]
    unsteered_generations: int
    new_tokens: int
    judge_name: str
    judge_usage: dict[str, Any] = field(default_factory=dict)

    def summary(self, factors: Sequence[float]) -> dict[str, Any]:
        """The scalars a ``result.json`` block records (g is added by the caller)."""
        return {"n_concepts": len(self.scores), "concepts": [s.to_json() for s in self.scores],
                "alpha_star_counts": {str(a): sum(s.alpha_star == a for s in self.scores) for a in factors},
                "mean_hm_by_alpha": {str(a): float(np.mean([r["hm"] for r in self.rows
                                                            if r["alpha"] == a
                                                            and r["split"] == "select"]))
                                     for a in factors} if self.rows else {},
                "generations": len(self.rows) + self.unsteered_generations,
                "new_tokens": self.new_tokens, "judge": self.judge_name,
                "judge_usage": self.judge_usage}


def prompt_ids(tokenizer, instruction: str) -> list[int]:
    """The instruction in the model's prompt format (chat template or ``PLAIN_FORMAT``), as token
    ids starting with the tokenizer's BOS where it has one (as every captured context does)."""
    return ids_with_bos(tokenizer, format_prompt(tokenizer, instruction))


def _dtype_key(dtype: str) -> list[str]:
    """A generation dtype's part of a cache key: none for float32, so keys written before dtypes
    existed stay valid."""
    return [] if dtype == "float32" else [dtype]


def _unsteered_key(model: str, prompt: Sequence[int], cfg) -> str:
    blob = json.dumps([model, list(prompt), cfg.max_new_tokens, cfg.temperature, cfg.seed,
                       *_dtype_key(cfg.dtype)])
    return hashlib.sha256(blob.encode()).hexdigest()[:32]


def unsteered_answers(lm, prompts: Sequence[Sequence[int]], gen_cfg, *, stop_ids, pad_id,
                      cache_dir=None, progress: bool = False) -> list[list[int]]:
    """The unsteered model's greedy answers to ``prompts``, read from / written to ``cache_dir``.

    Why a cache: these answers depend on the model, the prompt and the generation settings only,
    not on the SAE, so the 30 SAEs of a model (steering and selection stages alike) share them
    instead of regenerating ~40 answers each. One small JSON file per answer, keyed by a hash of
    (model, prompt ids, max_new_tokens, temperature, seed, a non-float32 dtype), written
    atomically, so concurrent jobs never see half a file. Sampled answers (temperature > 0)
    depend on their batch and are never cached. A batch-composition change can flip a greedy
    near-tie token, so a cached answer may differ from a fresh one in rare cases; it is always a
    real answer of the same model.
    """
    use_cache = cache_dir is not None and gen_cfg.temperature == 0
    keys = [_unsteered_key(getattr(lm, "name", ""), p, gen_cfg) for p in prompts]
    out: list[list[int] | None] = [None] * len(prompts)
    if use_cache:
        for i, k in enumerate(keys):
            path = Path(cache_dir) / f"{k}.json"
            if path.exists():
                try:
                    out[i] = [int(t) for t in read_json(path)["ids"]]
                except (CorruptFileError, KeyError, TypeError, ValueError):
                    out[i] = None  # unreadable: regenerate and overwrite
    todo = [i for i, o in enumerate(out) if o is None]
    if todo:
        fresh = generation.generate(lm.tl, [prompts[i] for i in todo], gen_cfg, stop_ids=stop_ids,
                         pad_id=pad_id, progress=progress, desc="unsteered")
        for i, ids in zip(todo, fresh):
            out[i] = ids
            if use_cache:
                write_json(Path(cache_dir) / f"{keys[i]}.json", {"ids": ids})
    return [o for o in out if o is not None]


def _loglik_fn(lm, config: SteeringConfig, pad_id: int):
    """Texts → the unsteered model's mean per-token log-prob (the offline judge's fluency rule),
    on the generation's engine and dtype."""
    tok = lm.tokenizer
    return lambda texts: generation.mean_logprob(
        lm.tl, [tok(t, add_special_tokens=False)["input_ids"] for t in texts], tok.bos_token_id,
        batch_size=config.batch_size, pad_id=pad_id, engine_name=config.engine,
        dtype=config.dtype)


def stop_and_pad(tok) -> tuple[list[int], int]:
    stop_ids = sorted({int(i) for i in (tok.eos_token_id, tok.pad_token_id) if i is not None})
    pad_id = int(tok.pad_token_id if tok.pad_token_id is not None else stop_ids[0] if stop_ids else 0)
    return stop_ids, pad_id


def calibration_concepts(tokenizer, n: int, seed: int) -> list[str]:
    """``n`` seeded vocabulary entries of the model's tokenizer (ASCII letters and digits, not all
    digits, >= 2 characters), each in the offline judge's explanation format: stand-in concepts
    that no steering put in an answer."""
    vocab = tokenizer.get_vocab()
    words = sorted({w for w in (tokenizer.decode([i]).strip().lower() for i in vocab.values())
                    if len(w) >= 2 and w.isascii() and w.isalnum() and not w.isdigit()})
    if not words:
        raise ValueError("the tokenizer has no word-like entry to calibrate the judge on")
    rng = random.Random(int.from_bytes(hashlib.sha256(f"{seed}:judge".encode()).digest()[:8],
                                       "little"))
    return [format_explanation([w]) for w in rng.sample(words, min(n, len(words)))]


def judge_calibration(lm, config: SteeringConfig, judge_cfg, path, *, unsteered_cache=None,
                      progress: bool = False) -> dict | None:
    """The judge's calibration for this model, made once and stored at ``path`` (JSON).

    Why once per model: calibrating on each call's own unsteered answers gave every SAE, and
    g_base and g_sel of one lift, a judge of its own. Here the set is fixed: a seeded
    ``calibration_instructions`` instructions (their unsteered answers, from the shared cache)
    crossed with ``calibration_concepts`` seeded vocabulary words. A stored calibration made
    with other settings (model, judge, generation, the log-likelihood's engine and dtype, set
    sizes) is recomputed. None for judges that do not calibrate.
    """
    tok = lm.tokenizer
    stop_ids, pad_id = stop_and_pad(tok)
    key = json.loads(json.dumps({
        "model": getattr(lm, "name", ""), "judge": asdict(judge_cfg),
        "generation": [config.max_new_tokens, config.temperature, config.seed,
                       *_dtype_key(config.dtype)],
        "source": [config.instruction_source, config.instruction_field],
        "loglik": [config.engine, config.dtype],
        "sizes": [config.calibration_instructions, config.calibration_concepts]}))
    path = Path(path) if path is not None else None
    if path is not None and path.exists():
        try:
            stored = read_json(path)
            if stored.get("key") == key:
                return stored["state"]
        except CorruptFileError:
            pass  # unreadable: recompute and overwrite
    judge = make_judge(judge_cfg, loglik_fn=_loglik_fn(lm, config, pad_id))
    pool = load_instructions(config.instruction_source, config.instruction_field)
    instructions = sample_instructions(pool, min(config.calibration_instructions, len(pool)),
                                       config.seed, -1)
    concepts = calibration_concepts(tok, config.calibration_concepts, config.seed)
    gen_cfg = generation_config(config)
    ids = unsteered_answers(lm, [prompt_ids(tok, i) for i in instructions], gen_cfg,
                            stop_ids=stop_ids, pad_id=pad_id, cache_dir=unsteered_cache,
                            progress=progress)
    answers = [tok.decode(a, skip_special_tokens=True) for a in ids]
    judge.calibrate([RatingItem(c, i, a) for i, a in zip(instructions, answers) for c in concepts])
    state = judge.calibration_state()
    state = json.loads(json.dumps(state))  # as it reads back from the file (tuples as lists)
    if state is not None and path is not None:
        write_json(path, {"key": key, "state": state, "instructions": instructions,
                          "concepts": concepts})
    return state


def generation_config(config: SteeringConfig) -> generation.GenerationConfig:
    """The generation settings of a steering section (every generation of a run uses them)."""
    return generation.GenerationConfig(config.max_new_tokens, config.temperature, config.seed,
                                       config.batch_size, config.engine, config.dtype)


def steer_concepts(lm, sae, layer: int, concepts: Sequence[dict[str, Any]], config: SteeringConfig,
                   judge_cfg, timer, progress: bool = False, unsteered_cache=None,
                   calibration=None) -> SteeringRun:
    """Steer and judge ``concepts`` (dicts with ``latent``, ``explanation``, ``max_act``) on the
    loaded model ``lm`` with ``sae``'s decoder at ``layer`` (protocol §4). ``unsteered_cache``: a
    folder shared by the SAEs of one model for the unsteered answers (:func:`unsteered_answers`).
    ``calibration``: the model's judge calibration (:func:`judge_calibration`), the same for every
    SAE; None rates with the judge's uncalibrated defaults."""
    tok = lm.tokenizer
    W_dec_FD = sae.W_dec.detach()
    hook_name = lm.hook_name(layer)
    stop_ids, pad_id = stop_and_pad(tok)
    gen_cfg = generation_config(config)
    pool = load_instructions(config.instruction_source, config.instruction_field)
    instructions = {c["latent"]: sample_instructions(pool, config.n_instructions,
                                                     config.seed, c["latent"]) for c in concepts}
    distinct = sorted({i for v in instructions.values() for i in v})
    prompt_of = {i: prompt_ids(tok, i) for i in distinct}
    with timer("generate_unsteered"):
        base_ids = unsteered_answers(lm, [prompt_of[i] for i in distinct], gen_cfg,
                                     stop_ids=stop_ids, pad_id=pad_id, cache_dir=unsteered_cache,
                                     progress=progress)
    unsteered = {i: tok.decode(ids, skip_special_tokens=True) for i, ids in zip(distinct, base_ids)}

    judge = make_judge(judge_cfg, loglik_fn=_loglik_fn(lm, config, pad_id))
    judge.load_calibration(calibration)

    def steer_and_rate(plan: list[tuple[dict[str, Any], int, str, float]], desc: str) -> list[dict]:
        def hooks_for(rows: list[int]):
            return [(hook_name, make_hook(config.mode, W_dec_FD=W_dec_FD,
                                          latents_B=[plan[r][0]["latent"] for r in rows],
                                          max_acts_B=[plan[r][0]["max_act"] for r in rows],
                                          alphas_B=[plan[r][3] for r in rows], encode=sae.encode))]

        with timer("generate_steered"):
            ids = generation.generate(lm.tl, [prompt_of[p[2]] for p in plan], gen_cfg,
                                      hooks_for=hooks_for, stop_ids=stop_ids, pad_id=pad_id,
                                      progress=progress, desc=desc)
        outputs = [tok.decode(i, skip_special_tokens=True) for i in ids]
        with timer("judge"):
            ratings = judge.rate([RatingItem(p[0]["explanation"], p[2], o)
                                  for p, o in zip(plan, outputs)])
        return [{"latent": c["latent"], "concept": c["explanation"], "max_act": c["max_act"],
                 "instruction_index": k, "split": split_of(k, config.n_select),
                 "instruction": inst, "alpha": alpha, "output": text, "new_tokens": len(i),
                 "unsteered_output": unsteered[inst], "concept_rating": r.concept,
                 "instruction_rating": r.instruction, "fluency_rating": r.fluency,
                 "hm": harmonic_mean(r)}
                for (c, k, inst, alpha), i, text, r in zip(plan, ids, outputs, ratings)]

    # Selection instructions at every factor choose α*; held-out ones are then steered at α* only.
    rows = steer_and_rate([(c, k, inst, alpha) for c in concepts
                           for k, inst in enumerate(instructions[c["latent"]][:config.n_select])
                           for alpha in config.factors], "steered (select)")
    star = alpha_stars(rows)
    rows += steer_and_rate([(c, k, inst, star[c["latent"]]) for c in concepts
                            for k, inst in enumerate(instructions[c["latent"]])
                            if k >= config.n_select], "steered (held out)")
    return SteeringRun(rows, concept_scores(rows) if rows else [], len(distinct),
                       sum(r["new_tokens"] for r in rows) + sum(len(i) for i in base_ids),
                       judge.name, asdict(judge.usage))


def steering_concepts(rows: list[dict[str, Any]], concept100: list[int], n: int) -> list[dict[str, Any]]:
    """The first ``n`` CONCEPT100 latents that have an explanation: each one's AutoInterp row
    (``latent``, ``explanation``, ``max_act``) is a concept (protocol §4). CONCEPT100 is a seeded
    random set listed by latent id, so its first ``n`` are a random ``n`` of it."""
    by_latent = {int(r["latent"]): r for r in rows}
    usable = [by_latent[f] for f in concept100
              if f in by_latent and by_latent[f].get("explanation") and by_latent[f]["max_act"] > 0]
    return usable[:n]
