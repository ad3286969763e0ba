"""Tables the book shows, built from the run's records: the SAEs' ``result.json`` files and the
row files they name (``steering.jsonl``, ``selection_scores.json``), ``judge.json`` and
``grid.json``; never from a model. Figures live in :mod:`saelib.plots`."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from safetensors import safe_open

from . import paper, power, stages
from .grid import build_jobs, recorded_job_seconds
from .paper import TABLE2, improvement_over_output_score
from .stats import rank_agreement as tau_by_axis
from .profiles import PAPER_ARCHITECTURES
from .results import read_json
from .stages.analysis import SAEResult, sae_results
from .stages.records import BlockRecord
from .stages.layout import GRID_RECORD, SAE_WEIGHTS, as_profile, sae_dir, sae_jobs

#: Column order of the per-SAE table (also the downloadable CSV).
COLUMNS = ["model", "arch", "level", "target_l0", "sparsity_value", "l0", "explained_variance",
           "explained_variance_excl_sinks", "mse", "dead_fraction", "ce_loss_recovered", "kl_score",
           "sink_tokens", "sink_variance_share", "train_tokens", "train_seconds", "peak_rss_mb",
           "disk_mb"]

#: Core columns an SAE trained before they were recorded lacks (NaN in the table): the held-out
#: figures without attention sinks (:func:`saelib.sae.metrics.sink_mask`).
SINK_COLUMNS = {"explained_variance_excl_sinks": "explained_variance_excl_sinks",
                "sink_tokens": "n_sinks", "sink_variance_share": "sink_variance_share"}

#: Columns from the later stages, by record field of :class:`~saelib.stages.analysis.SAEResult`,
#: added when at least one SAE has them: AutoInterp μ(θ) and live latents (protocol §3), steering
#: g(θ) (protocol §4).
STAGE_COLUMNS = {"interp": ["mu", "n_live"], "steering": ["g"]}

#: SAEBench's descriptive metrics (protocol §3, Figs. 5–7), from the ``descriptive`` block:
#: column → key, or (key, sub-key) for the probing means.
DESCRIPTIVE_COLUMNS = {"dense_fraction": "dense_fraction", "absorption_fraction": "absorption_fraction",
                       "full_absorption": "full_absorption",
                       **{f"{who}_top_{k}_acc": ("probing", f"{who}_top_{k}_test_accuracy")
                          for who in ("sae", "llm") for k in (1, 2, 5)},
                       "sae_acc": ("probing", "sae_test_accuracy"),
                       "llm_acc": ("probing", "llm_test_accuracy")}


def _descriptive(block) -> dict:
    return {col: block[key[0]].get(key[1]) if isinstance(key, tuple) else block[key]
            for col, key in DESCRIPTIVE_COLUMNS.items()}


#: Selection columns (protocol §6), from the ``selection`` block, by the way the tier was picked:
#: ``paper`` (best held-out tier) and ``honest`` (chosen on the selection half).
SELECTION_COLUMNS = {f"{way}_{key}": (way, key) for way in ("paper", "honest")
                     for key in ("tier", "g_delta_conf", "g_output_score", "lift_pct",
                                 "lift_output_score_pct")}


def _sae_row(r: SAEResult) -> dict:
    """One SAE's row of :func:`sae_table`."""
    t, core, train = r.train, r.train.core, r.train.train
    row = {"model": t.model_label, "arch": t.arch, "level": t.level, "target_l0": t.target_l0,
           "sparsity_value": t.sparsity_value, "l0": core["l0"],
           "explained_variance": core["explained_variance"], "mse": core["mse"],
           **{col: core.get(key) for col, key in SINK_COLUMNS.items()},
           "dead_fraction": core["dead_fraction"], "ce_loss_recovered": core.get("ce_loss_recovered"),
           "kl_score": core.get("kl_score"), "train_tokens": train["tokens_seen"],
           "train_seconds": train["seconds"], "peak_rss_mb": train["peak_rss_mb"],
           "disk_mb": train["disk_bytes"] / 1e6}
    for block, cols in STAGE_COLUMNS.items():
        record = getattr(r, block)
        if record is not None:
            row.update({k: record[k] for k in cols})
    if r.selection is not None:
        row.update({col: getattr(r.selection, way)[key]
                    for col, (way, key) in SELECTION_COLUMNS.items()
                    if getattr(r.selection, way) is not None})
    if r.descriptive is not None:
        row.update(_descriptive(r.descriptive))
    return row


def sae_table(profile) -> pd.DataFrame:
    """One row per trained SAE of the profile, plus ``STAGE_COLUMNS`` (μ(θ), live latents, g(θ))
    for the stages that have run for some SAE (empty for the others)."""
    profile = as_profile(profile)
    rows = [_sae_row(r) for r in sae_results(profile)]
    if not rows:
        raise FileNotFoundError(f"profile {profile.name!r}: no result.json under {profile.run_root()}; "
                                f"run `python -m saelib.grid --profile {profile.name}` first")
    extra = [k for k in [*(k for cols in STAGE_COLUMNS.values() for k in cols), *SELECTION_COLUMNS,
                         *DESCRIPTIVE_COLUMNS]
             if any(k in row for row in rows)]
    df = pd.DataFrame(rows, columns=COLUMNS + extra)
    if "n_live" in df:
        df["n_live"] = df["n_live"].astype("Int64")
    for col in [*SINK_COLUMNS, *DESCRIPTIVE_COLUMNS]:  # None (not recorded / not defined) → NaN
        if col in df:
            df[col] = pd.to_numeric(df[col]).astype(float)
    for col in SELECTION_COLUMNS:  # an undefined lift is None in JSON: NaN here, "–" in tables
        if col in df and not col.endswith("_tier"):
            df[col] = pd.to_numeric(df[col]).astype(float)
    order = {a: i for i, a in enumerate(PAPER_ARCHITECTURES)}
    return df.sort_values(["model", "level", "arch"], key=lambda s: s.map(order) if s.name == "arch" else s,
                          ignore_index=True)


def write_csv(table: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    table.to_csv(path, index=False)
    return path


def sink_statement(table: pd.DataFrame) -> str:
    """Per model, how many held-out tokens are attention sinks, their share of the variance, and
    the median explained variance with and without them (markdown; empty when no SAE recorded
    them). Every SAE of a model is measured on the same held-out sample, so one count per model."""
    lines = []
    for model, sub in table.groupby("model", sort=False):
        sub = sub[sub["explained_variance_excl_sinks"].notna()]
        if sub.empty:
            continue
        n, share = int(sub["sink_tokens"].iloc[0]), float(sub["sink_variance_share"].iloc[0])
        lines.append(f"- **{model}**: {n} held-out token{'s' * (n != 1)} "
                     f"{'are attention sinks' if n != 1 else 'is an attention sink'}, holding "
                     f"{share:.0%} of the variance; median explained variance over the SAEs "
                     f"{sub['explained_variance'].median():.3f} with them, "
                     f"{sub['explained_variance_excl_sinks'].median():.3f} without.")
    return "\n".join(lines)


def display_table(table: pd.DataFrame):
    """The per-SAE table, rounded for reading."""
    return table.style.format(precision=4).hide(axis="index")


def l0_table(table: pd.DataFrame) -> pd.DataFrame:
    """Target vs realised L0 per (model, level, architecture), with the ±25 % band check (issue: the
    grid must land every SAE within ±25 % of its target)."""
    out = table[["model", "arch", "level", "target_l0", "sparsity_value", "l0"]].copy()
    out["ratio"] = out["l0"] / out["target_l0"]
    out["within ±25 %"] = out["ratio"].between(0.75, 1.25)
    return out


def example_generations(rows: pd.DataFrame, steering: dict, n_concepts: int = 3) -> pd.DataFrame:
    """The book's example page (protocol §4): for the ``n_concepts`` best-scoring concepts, their
    first selection instruction answered unsteered and at every factor (the selection half is
    steered at each; α* marked), then their first held-out instruction at α* (held-out answers
    exist at α* only, and g averages them), with the ratings ``concept/instruction/fluency`` and
    HM. ``rows`` is the SAE's ``steering.jsonl``, ``steering`` its ``result.json`` block."""
    best = sorted(steering["concepts"], key=lambda c: (-c["score"], c["latent"]))[:n_concepts]
    out = []

    def row(r, label: str) -> dict:
        return {"concept": r["concept"], "α": label, "instruction": r["instruction"],
                "output": r["output"],
                "ratings C/I/F": f"{r['concept_rating']}/{r['instruction_rating']}/{r['fluency_rating']}",
                "HM": round(float(r["hm"]), 3)}

    for c in best:
        mine = rows[rows["latent"] == c["latent"]]
        star = float(c["alpha_star"])
        for split in ("select", "heldout"):
            part = mine[mine["split"] == split]
            if part.empty:
                continue
            first = part[part["instruction_index"] == part["instruction_index"].min()]
            first = first.sort_values("alpha")
            if split == "select":
                base = first.iloc[0]
                out.append({"concept": base["concept"], "α": "unsteered",
                            "instruction": base["instruction"], "output": base["unsteered_output"],
                            "ratings C/I/F": "–", "HM": None})
                for _, r in first.iterrows():
                    out.append(row(r, f"{r['alpha']:g}" + (" (α*)" if r["alpha"] == star else "")))
            else:
                for _, r in first[first["alpha"] == star].iterrows():
                    out.append(row(r, f"{star:g} (α*, held out)"))
    return pd.DataFrame(out, columns=["concept", "α", "instruction", "output", "ratings C/I/F", "HM"])


def agreement_table(agreement, paper_table):
    """An :class:`~saelib.stats.AgreementTable` in the paper's layout (group, n, pairs, τ_b, p, CI)
    with the paper's value beside ours where it reports one: the pooled τ_b with its BCa interval,
    the four Ψ, and the per-model τ_b of a model whose label is the paper's (the paper profiles'
    models; the CPU profiles' are others). One column per paper version where versions differ
    (:attr:`saelib.paper.PaperTauTable.other_versions`)."""
    frame = agreement.to_frame()
    paper_psi = {"Ψ_A": paper_table.psi_a, "Ψ_B": paper_table.psi_b, "Ψ_C": paper_table.psi_c,
                 "Ψ": paper_table.psi}

    def paper_value(axis: str, group: str) -> float | None:
        if axis == "pooled" and group == "all":
            return paper_table.pooled
        if axis == "model":
            return paper_table.per_model.get(group)
        return paper_psi.get(group) if axis == "psi" else None

    pooled = [a == "pooled" and g == "all" for a, g in zip(frame["axis"], frame["group"])]
    frame[f"paper τ_b ({paper_table.source})"] = [
        paper_value(a, g) for a, g in zip(frame["axis"], frame["group"])]
    low, high = paper_table.pooled_ci
    frame[f"paper CI ({paper_table.source})"] = [f"[{low:.4f}, {high:.4f}]" if p else None
                                                 for p in pooled]
    cols = ["axis", "group", "n", "pairs", "tau_b", "p", "ci_low", "ci_high",
            f"paper τ_b ({paper_table.source})", f"paper CI ({paper_table.source})"]
    for source, values in paper_table.other_versions.items():
        frame[f"paper τ_b ({source})"] = [
            values.get("pooled") if g == "all" and a == "pooled"
            else values.get("psi") if g == "Ψ" else None
            for a, g in zip(frame["axis"], frame["group"])]
        cols.append(f"paper τ_b ({source})")
    cols.append("reason")
    return frame[cols].style.format(precision=4, na_rep="–").hide(axis="index")


def delta_conf_scores(profile) -> pd.DataFrame:
    """Every feature's ΔC_k and output score, one row per (SAE, latent), from the SAEs'
    ``selection_scores.json`` (protocol §6; the paper's Fig. 3 pools them per model)."""
    profile = as_profile(profile)
    frames = []
    for r in sae_results(profile):
        t = r.train
        if r.selection is not None:
            scores = stages.selection.scores(profile, t.model, t.arch, t.level)
            scores[["model", "arch", "level"]] = t.model_label, t.arch, t.level
            frames.append(scores)
    return pd.concat(frames, ignore_index=True) if frames else pd.DataFrame(
        columns=["latent", "delta_conf", "c_k", "output_score", "model", "arch", "level"])


def steering_by_method(table: pd.DataFrame, way: str = "paper") -> pd.DataFrame:
    """The paper's Table 2: mean steering score per model with no selection (g), the
    output-score baseline and ΔC_k (tier picked ``way``), the lifts, and the two readings of
    "ΔC_k over the output score" (:func:`saelib.paper.improvement_over_output_score`) for each
    model whose denominators are positive (empty for the others). SAEs without a selection result
    are left out (their count shown)."""
    cols = {"g": "no selection", f"{way}_g_output_score": "output score",
            f"{way}_g_delta_conf": "ΔC_k"}
    if not set(cols) <= set(table):
        raise ValueError("no SAE has a selection result yet: run the selection jobs of the grid")
    done = table.dropna(subset=list(cols))
    means = done.groupby("model")[list(cols)].mean().rename(columns=cols)
    means["SAEs"] = done.groupby("model").size()
    defined = means[(means["no selection"] > 0) & (means["output score"] > 0)]
    if len(defined):
        imp = improvement_over_output_score(defined["no selection"].to_dict(),
                                            defined["output score"].to_dict(),
                                            defined["ΔC_k"].to_dict())
        means["lift ΔC_k (%)"] = pd.Series(dict(imp.lift_delta_ck_pct))
        means["lift output score (%)"] = pd.Series(dict(imp.lift_output_score_pct))
        means["ΔC_k vs output score (relative %)"] = pd.Series(dict(imp.relative_gain_pct))
    return _with_mean_row(means.reset_index())


#: The mean row's label in Table 2's layout.
MEAN_ROW = "mean over models"


def _with_mean_row(frame: pd.DataFrame) -> pd.DataFrame:
    """Table 2 with the difference of lifts per model and a last row of unweighted means over
    models: its lift difference (pp) is the abstract's 52.52 reading and its relative % the
    ≈ 30.3 one (:class:`saelib.paper.ImprovementFigures`). A column some model lacks has no mean
    (a mean over the other models would read as one over all)."""
    frame = frame.copy()
    if {"lift ΔC_k (%)", "lift output score (%)"} <= set(frame):
        frame["lift ΔC_k − lift output score (pp)"] = (frame["lift ΔC_k (%)"]
                                                      - frame["lift output score (%)"])
    if len(frame) < 2:
        return frame
    mean = frame.drop(columns=["model"]).mean(numeric_only=True, skipna=False)
    if "SAEs" in frame:
        mean["SAEs"] = frame["SAEs"].sum()
    return pd.concat([frame, pd.DataFrame([{"model": MEAN_ROW, **mean.to_dict()}])],
                     ignore_index=True)


def paper_table2() -> pd.DataFrame:
    """The paper's Table 2 in the same layout, for the book to show beside ours."""
    t = TABLE2
    imp = improvement_over_output_score(t.no_selection, t.output_score, t.delta_ck)
    return _with_mean_row(pd.DataFrame({
        "model": list(t.no_selection), "no selection": list(t.no_selection.values()),
        "output score": list(t.output_score.values()), "ΔC_k": list(t.delta_ck.values()),
        "lift ΔC_k (%)": list(t.lift_delta_ck_pct.values()),
        "lift output score (%)": list(imp.lift_output_score_pct.values()),
        "ΔC_k vs output score (relative %)": list(imp.relative_gain_pct.values())}))


# ---------------------------------------------------------------------------------------------
# Appendix tables (protocol §7): parameter shapes, costs and runtimes, environment

#: Seconds inside the train stage, from its record's timings: (column, timing keys).
TRAIN_SECONDS = (("calibrate", ("calibrate",)), ("train", ("train",)),
                 ("core metrics", ("heldout_metrics", "lm_metrics")))
#: The later stages' blocks of result.json, in the pipeline's order (from the stage table).
BLOCKS = tuple(rec.BLOCK for st in stages.STAGES if st.scope == "sae" for rec in st.records
               if issubclass(rec, BlockRecord))


def paper_grid_table() -> pd.DataFrame:
    """The paper's sparsity grid (protocol §2), to read beside ours (:func:`l0_table`): target L0
    of TopK, BatchTopK and JumpReLU per level, and the L1 coefficients of ReLU and Gated."""
    return pd.DataFrame({"level": range(len(paper.TARGET_L0)), "target L0": paper.TARGET_L0,
                         "target L0 / width (%)": [100 * t / paper.WIDTH for t in paper.TARGET_L0],
                         "ReLU L1": paper.RELU_L1, "Gated L1": paper.GATED_L1})


def paper_shapes_table() -> pd.DataFrame:
    """The paper's SAE sizes (width 16,384 at each model's d_model; protocol §2): parameters per
    architecture as :func:`saelib.plan.sae_params` counts ours, beside :func:`shapes_table`."""
    from .plan import model_shape, sae_params

    rows = []
    for label, hub in paper.HUB_NAMES.items():
        d = model_shape(hub).d_model
        rows.append({"model": label, "layer": paper.LAYERS[label], "d_model": d,
                     "width": paper.WIDTH, "W_enc": f"{d:,} × {paper.WIDTH:,}",
                     **{arch: sae_params(d, paper.WIDTH, arch) for arch in PAPER_ARCHITECTURES}})
    return pd.DataFrame(rows)


def shapes_table(profile) -> pd.DataFrame:
    """Parameter shapes per model and architecture, read from the saved SAEs' safetensors
    headers (one SAE each: the shapes do not depend on sparsity, but d_model differs by model)."""
    profile = as_profile(profile)
    rows, seen = [], set()
    for job in sae_jobs(profile):
        path = sae_dir(profile, job) / "sae" / SAE_WEIGHTS
        if (job.model, job.arch) in seen or not path.exists():
            continue
        seen.add((job.model, job.arch))
        label = profile.model(job.model).display
        with safe_open(str(path), framework="pt") as f:
            for name in f.keys():
                shape = tuple(f.get_slice(name).get_shape())
                rows.append({"model": label, "arch": job.arch, "parameter": name,
                             "shape": " × ".join(f"{s:,}" for s in shape) or "scalar",
                             "elements": int(np.prod(shape)) if shape else 1})
    return pd.DataFrame(rows, columns=["model", "arch", "parameter", "shape", "elements"])


def _stage_seconds(r: SAEResult) -> dict[str, float]:
    """Seconds inside each stage of one SAE: the train stage's parts, then each block's."""
    timings = r.train.provenance.get("timings_s", {})
    out = {}
    for col, keys in TRAIN_SECONDS:
        vals = [timings[k] for k in keys if k in timings]
        out[col] = float(sum(vals)) if vals else np.nan
    for block in BLOCKS:
        record = getattr(r, block)
        out[block] = float(record.seconds) if record is not None else np.nan
    return out


def _judge_usd(r: SAEResult) -> float:
    """Judge fees of one SAE: AutoInterp, steering and the selection stage's steering."""
    usages = [r.interp.judge_usage if r.interp else None,
              r.steering.judge_usage if r.steering else None,
              (r.selection.steering or {}).get("judge_usage") if r.selection else None]
    return float(sum((u or {}).get("cost_usd", 0.0) or 0.0 for u in usages))


def cost_table(profile) -> pd.DataFrame:
    """Measured seconds per SAE and stage (compute inside each stage, from ``result.json``), with
    the judge's cost in USD; one row per SAE."""
    profile = as_profile(profile)
    return pd.DataFrame([{"model": r.train.model_label, "arch": r.train.arch, "level": r.train.level,
                          **_stage_seconds(r), "judge USD": _judge_usd(r)}
                         for r in sae_results(profile)])


def grid_seconds(profile) -> pd.DataFrame:
    """Wall seconds of every job's latest notebook execution (``grid.json``'s ``job_seconds``,
    kept across resumed runs: papermill, kernel start, imports and model loads included), summed
    per stage."""
    profile = as_profile(profile)
    path = profile.run_root() / GRID_RECORD
    if not path.exists():
        return pd.DataFrame(columns=["stage", "jobs", "seconds", "minutes"])
    record = read_json(path)
    stage_of = record.get("job_stages") or {j.name: j.stage for j in build_jobs(profile)}
    rows: dict[str, list[float]] = {st.name: [] for st in stages.STAGES}
    for name, s in recorded_job_seconds(record).items():
        if name in stage_of:
            rows[stage_of[name]].append(float(s))
    rows = {k: v for k, v in rows.items() if v}
    out = pd.DataFrame([{"stage": k, "jobs": len(v), "seconds": sum(v)} for k, v in rows.items()])
    out["minutes"] = out["seconds"] / 60
    return out


def paper_costs() -> pd.DataFrame:
    """The paper's reported costs (A800 GPUs), per SAE, for the appendix beside ours."""
    rows = [{"stage": f"training ({m}, 30 SAEs in {h:g} h)", "hours per SAE": h / paper.SAES_PER_MODEL}
            for m, h in paper.TRAINING_HOURS.items()]
    rows.append({"stage": "SAEBench evaluation", "hours per SAE": paper.SAEBENCH_HOURS_PER_SAE})
    lo, hi = paper.AXBENCH_STEERING_HOURS_PER_SAE
    rows.append({"stage": f"AxBench steering ({lo:g}–{hi:g} h)", "hours per SAE": (lo + hi) / 2})
    rows.append({"stage": f"judge fees (gpt-4o-mini): ${paper.JUDGE_FEES_USD_PER_SAE:g} per SAE",
                 "hours per SAE": np.nan})
    return pd.DataFrame(rows)


def run_table(profile) -> pd.DataFrame:
    """What this run is, from its profile: name, seed, models, SAEs, training tokens, the judge,
    the steering design and the LLM-judge sample, so a reader of any page can tell a CPU run
    from the paper's scale (the paper: 90 SAEs of 2–9B models, 100 concepts each, gpt-4o-mini)."""
    profile = as_profile(profile)
    grid, steer = profile.grid, profile.section("steering")
    judge = profile.section("judge")
    agree = profile.section("judge_agreement")
    judge_desc = {"offline": "rules (offline; saelib/judges/offline.py)",
                  "openai": f"OpenAI-compatible ({judge.model})",
                  "llama": "llama.cpp (" + (judge.llama_model if judge.llama_model != "packaged"
                                            else "packaged Qwen2.5-Coder-1.5B") + ")",
                  "local": f"local ({judge.local_model})"}.get(judge.backend, judge.backend)
    held_out = steer.n_instructions - steer.n_select
    rows = [("profile", f"{profile.name}: {profile.description}".rstrip(": ")),
            ("seed", profile.seed),
            ("models", ", ".join(f"{m.display} (layer {m.layer})" for m in profile.models)),
            ("SAEs", f"{len(grid.architectures)} architectures × {len(grid.targets)} sparsities × "
                     f"{len(profile.models)} model(s) = {len(sae_jobs(profile))}, width "
                     f"{grid.width:,}, target L0 {list(grid.targets)}"),
            ("training tokens per SAE", f"{profile.corpus.train_tokens:,}"),
            ("judge (μ and g)", judge_desc),
            ("steering", f"{steer.n_concepts} concepts × ({steer.n_select} selection instructions "
                         f"× {len(steer.factors)} factors {list(steer.factors)} + {held_out} held "
                         f"out at α*), {steer.max_new_tokens} new tokens: "
                         f"{steer.answers_per_sae()} steered answers per SAE"),
            ("LLM-judge sample", f"{agree.n_generations} generations and {agree.n_latents} latents "
                                 f"of {agree.n_saes} SAEs ({agree.backend})"
             if agree.n_generations or agree.n_latents else "none")]
    return pd.DataFrame([{"item": k, "value": str(v)} for k, v in rows])


def environment_table(profile) -> pd.DataFrame:
    """Library versions, git commit, Python and machine from one SAE's provenance block."""
    results = sae_results(profile)
    if not results:
        return pd.DataFrame(columns=["item", "value"])
    prov = results[0].train.provenance
    rows = [{"item": "git commit", "value": prov.get("git_commit")},
            {"item": "python", "value": prov.get("python")},
            {"item": "machine", "value": str(prov.get("machine"))}]
    rows += [{"item": k, "value": v} for k, v in sorted((prov.get("versions") or {}).items())]
    return pd.DataFrame(rows)


def rank_agreement(table: pd.DataFrame, x: str, y: str, profile):
    """Kendall τ_b of ``x`` against ``y`` over the SAEs that have both, by axis (protocol §5),
    with the profile's ``stats`` settings; None when fewer than two SAEs have both."""
    both = table.dropna(subset=[x, y]) if {x, y} <= set(table) else table.iloc[:0]
    if len(both) < 2:
        return None
    frame = both.rename(columns={"arch": "architecture", "level": "sparsity"})
    return tau_by_axis(frame, x, y, config=as_profile(profile).section("stats"))


def judge_agreement_table(record, half: int | None = None) -> pd.DataFrame:
    """One row per rating kind (and HM) of the judge stage: how far the two judges agree; with
    ``half=1`` on the held-out half of the sample only (no HM row)."""
    ratings = record["ratings_half1"] if half == 1 else record["ratings"]
    if half not in (None, 1):
        raise ValueError(f"half must be None or 1 (the record keeps half 1's agreement), got {half!r}")
    rows = []
    for kind in ("concept", "instruction", "fluency"):
        k = ratings[kind]
        rows.append({"rating": kind, "n": k["n"], "exact match": k["exact_match"],
                     "weighted κ": k["weighted_kappa"], "τ_b": k["kendall_tau_b"], "p": k["p_value"]})
    if half == 1:
        return pd.DataFrame(rows)
    hm = record["ratings"]["hm"]
    rows.append({"rating": "HM (aggregate)", "n": hm["n"], "exact match": np.nan,
                 "weighted κ": np.nan, "τ_b": hm["kendall_tau_b"], "p": hm["p_value"]})
    return pd.DataFrame(rows)


def judge_per_sae_table(record) -> pd.DataFrame:
    """μ and g of the judge stage's SAEs under both judges (on the sampled latents and the
    held-out generations at α*), beside the SAE's recorded μ over CONCEPT100."""
    cols = {"sae": "SAE", "mu": "μ (CONCEPT100, rules)", "mu_rule": "μ sample, rules",
            "mu_llm": "μ sample, LLM", "n_latents": "latents", "g_rule": "g, rules",
            "g_llm": "g, LLM", "n_generations": "generations", "llm_seconds": "LLM s",
            "llm_tokens": "LLM tokens"}
    return pd.DataFrame(record["per_sae"])[list(cols)].rename(columns=cols)


def judge_latents_text(latents: dict) -> str:
    """The judge stage's AutoInterp comparison in words: both judges' mean detection scores, the
    LLM's score when it detects from the rules' explanations, what a constant answer scores, and
    how many of the LLM's answers ignore the text (every window, none, the prompt's example).

    Why the last three: a judge whose detection scores no better than answering "every window"
    or "none" measures nothing, and its μ cannot rank SAEs; detecting from the other judge's
    explanation tells a bad explanation from a detection that fails on any explanation."""
    n = latents["n"]
    det = latents["detection"]
    tau = latents["score"]["kendall_tau_b"]
    lines = [f"{n} latents: mean score {latents['mean_rule_score']:.3f} (rules) vs "
             f"{latents['mean_llm_score']:.3f} (LLM); τ_b of the scores "
             f"{float('nan') if tau is None else tau:+.3f} (n {latents['score']['n']}); per-window "
             f"calls: exact {det['exact_match']:.3f}, κ {det['kappa']:.3f} over {det['n_windows']} windows."]
    if "constant_answer_score" not in latents:  # a record of schema 1
        return lines[0]
    const = latents["constant_answer_score"]
    best = max(const.values())
    given = latents["mean_llm_score_given_rule_explanation"]
    lines.append(f"The LLM detecting from the rules' explanations: {given:.3f}. A constant answer "
                 f"scores {const['every_window']:.3f} (every window fires) or "
                 f"{const['no_window']:.3f} (none fires).")
    kinds = latents["answers"]
    for key, label in (("llm", "its own explanations"),
                       ("llm_given_rule_explanation", "the rules' explanations")):
        k = kinds[key]
        lines.append(f"LLM answers from {label} that ignore the text: {k['every_window']} name "
                     f"every window, {k['no_window']} none, {k['the_prompts_example']} exactly "
                     f"the prompt's example (of {n}).")
    if max(latents["mean_llm_score"], given) <= best:
        lines.append(f"The LLM's detection scores no better than the better constant answer "
                     f"({best:.3f}) from either explanation: as a detector it measures nothing "
                     f"here, and its μ cannot rank the SAEs.")
    elif latents["mean_llm_score"] <= best < given:
        lines.append("The LLM detects better from the rules' explanations than from its own: its "
                     "explanations are the weak link.")
    return "\n".join(lines)


def g_intervals(profile, *, n_resamples: int = 9999, level: float = 0.95) -> pd.DataFrame:
    """Each SAE's g(θ) with a bootstrap interval over its concepts (:func:`saelib.power.g_interval`)
    and the standard error of that mean (sd of the concept scores / sqrt(C)); one row per SAE that
    has a steering result."""
    profile = as_profile(profile)
    seed = profile.section("stats").seed
    rows = []
    for r in sae_results(profile):
        if r.steering is None:
            continue
        scores = [float(c["score"]) for c in r.steering["concepts"]]
        g, low, high = power.g_interval(scores, n_resamples=n_resamples, level=level, seed=seed)
        se = float(np.std(scores, ddof=1) / np.sqrt(len(scores))) if len(scores) > 1 else np.nan
        rows.append({"model": r.train.model_label, "arch": r.train.arch, "level": r.train.level,
                     "l0": r.train.core["l0"], "g": r.steering["g"], "g_low": low, "g_high": high,
                     "se": se, "concepts": len(scores),
                     "generations": r.steering["generations"]})
    cols = ["model", "arch", "level", "l0", "g", "g_low", "g_high", "se", "concepts", "generations"]
    return pd.DataFrame(rows, columns=cols)


def steering_rows(profile) -> list[list[dict]]:
    """Every SAE's steered generations (``steering.jsonl``), one list per SAE that has them."""
    profile = as_profile(profile)
    out = []
    for job in sae_jobs(profile):
        path = sae_dir(profile, job) / stages.steering.STEER_ROWS
        if path.exists():
            out.append(stages.steering.rows(profile, job.model, job.arch, job.level).to_dict("records"))
    return out


def power_statement(profile, intervals: pd.DataFrame, table1) -> dict:
    """What the default's steering can decide: SAEs with g > 0, the variance components of the
    held-out scores, the reliability of g across SAEs, the pooled τ_b(μ, g) interval's half-width,
    and how many SAEs would detect the paper's pooled τ_b (0.298) at that reliability and at a
    perfect one (:mod:`saelib.power`). With several models, the reliability within each model
    too: the pooled one counts a gap between the models' mean g as signal."""
    rows = steering_rows(profile)
    try:
        vc = power.variance_components(rows).to_dict()
    except ValueError as e:
        vc = {"reason": str(e)}
    rel = power.reliability(intervals["g"], intervals["se"]) if len(intervals) else float("nan")
    by_model = ({m: power.reliability(d["g"], d["se"]) for m, d in intervals.groupby("model", sort=False)}
                if len(intervals) and intervals["model"].nunique() > 1 else {})
    pooled = table1.pooled if table1 is not None else None
    half = ((pooled.ci_high - pooled.ci_low) / 2 if pooled is not None
            and np.isfinite(pooled.ci_low) and np.isfinite(pooled.ci_high) else float("nan"))
    return {"saes": int(len(intervals)), "g_positive": int((intervals["g"] > 0).sum()),
            "g_interval_excludes_0": int((intervals["g_low"] > 0).sum()),
            "median_interval_half_width": float(((intervals["g_high"] - intervals["g_low"]) / 2).median())
            if len(intervals) else float("nan"),
            "variance_components": vc, "reliability_g": rel, "reliability_g_by_model": by_model,
            "pooled_tau": pooled.tau if pooled is not None else float("nan"),
            "pooled_tau_half_width": half, "pooled_n": pooled.n if pooled is not None else 0,
            "paper_tau": power.PAPER_POOLED_TAU,
            "saes_to_detect_paper_tau": power.saes_to_detect(
                power.PAPER_POOLED_TAU, rel=rel if np.isfinite(rel) else 0.0),
            "saes_to_detect_paper_tau_noise_free": power.saes_to_detect(power.PAPER_POOLED_TAU)}


def power_text(statement: dict) -> str:
    """The power statement in words (the observations page prints it)."""
    s = statement
    vc = s["variance_components"]
    lines = [f"{s['g_positive']} of {s['saes']} SAEs have g(θ) > 0; the bootstrap interval over "
             f"concepts excludes 0 for {s['g_interval_excludes_0']} (median half-width "
             f"{s['median_interval_half_width']:.3f})."]
    if "reason" in vc:
        lines.append(f"Variance components: not estimable ({vc['reason']}).")
    else:
        lines.append(f"Held-out HM at α*: between-concept variance {vc['between_concept']:.4f}, "
                     f"within-concept (instructions) {vc['within_concept']:.4f}; SE of one SAE's g "
                     f"at this design ({vc['n_concepts']:.0f} concepts × {vc['n_heldout']:.1f} "
                     f"held-out answers) {vc['pilot_se']:.3f}.")
    rel = s["reliability_g"]
    lines.append(f"Reliability of g across SAEs (1 − mean SE² / var g): "
                 f"{rel:.2f}." if np.isfinite(rel) else "Reliability of g: undefined.")
    if s.get("reliability_g_by_model"):
        lines.append("Within each model (the pooled figure counts a gap between the models' mean "
                     "g as signal): " + ", ".join(
                         f"{m} {r:.2f}" if np.isfinite(r) else f"{m} undefined"
                         for m, r in s["reliability_g_by_model"].items()) + ".")
    if np.isfinite(s["pooled_tau_half_width"]):
        lines.append(f"Pooled τ_b(μ, g) = {s['pooled_tau']:.3f}, interval half-width "
                     f"± {s['pooled_tau_half_width']:.3f} over {s['pooled_n']} SAEs.")
    need, ideal = s["saes_to_detect_paper_tau"], s["saes_to_detect_paper_tau_noise_free"]
    lines.append(f"Detecting the paper's τ_b = {s['paper_tau']} (two-sided 5 %, power 80 %) needs "
                 f"{ideal} SAEs with noise-free g, and "
                 + (f"{need} SAEs at this reliability." if need is not None else
                    "no number of SAEs at this reliability (g is mostly noise)."))
    return "\n".join(lines)
