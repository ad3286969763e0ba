"""Tables the book shows, built only from the SAEs' ``result.json`` files (design: "the analysis
reads only these"). Figures live in :mod:`saelib.plots`."""

from __future__ import annotations

from pathlib import Path

import pandas as pd

from .pipeline import as_profile, load_results
from .profiles import PAPER_ARCHITECTURES

#: Column order of the per-SAE table (also the downloadable CSV).
COLUMNS = ["model", "arch", "level", "target_l0", "sparsity_value", "l0", "explained_variance", "mse",
           "dead_fraction", "ce_loss_recovered", "kl_score", "train_tokens", "train_seconds",
           "peak_rss_mb", "disk_mb"]

#: Columns from the AutoInterp stage (protocol §3), added when at least one SAE has them.
INTERP_COLUMNS = ["mu", "n_live"]


def sae_table(profile) -> pd.DataFrame:
    """One row per trained SAE of the profile; ``mu`` (μ(θ)) and ``n_live`` (latents live on the
    eval corpus) when the interp stage has run for some SAE (empty for the others)."""
    profile = as_profile(profile)
    rows = []
    for r in load_results(profile):
        if "core" not in r:
            continue
        core, train = r["core"], r["train"]
        rows.append({"model": r["model_label"], "arch": r["arch"], "level": r["level"],
                     "target_l0": r["target_l0"], "sparsity_value": r["sparsity_value"],
                     "l0": core["l0"], "explained_variance": core["explained_variance"],
                     "mse": core["mse"], "dead_fraction": core["dead_fraction"],
                     "ce_loss_recovered": core.get("ce_loss_recovered"),
                     "kl_score": core.get("kl_score"), "train_tokens": train["tokens_seen"],
                     "train_seconds": train["seconds"], "peak_rss_mb": train["peak_rss_mb"],
                     "disk_mb": train["disk_bytes"] / 1e6,
                     **{k: r["interp"].get(k) for k in INTERP_COLUMNS if "interp" in r}})
    if not rows:
        raise FileNotFoundError(f"profile {profile.name!r}: no result.json under {profile.run_root()}; "
                                f"run `python -m saelib.grid --profile {profile.name}` first")
    has_interp = any(k in row for row in rows for k in INTERP_COLUMNS)
    df = pd.DataFrame(rows, columns=COLUMNS + (INTERP_COLUMNS if has_interp else []))
    if has_interp:
        df["n_live"] = df["n_live"].astype("Int64")
    order = {a: i for i, a in enumerate(PAPER_ARCHITECTURES)}
    return df.sort_values(["model", "level", "arch"], key=lambda s: s.map(order) if s.name == "arch" else s,
                          ignore_index=True)


def write_csv(table: pd.DataFrame, path: str | Path) -> Path:
    path = Path(path)
    table.to_csv(path, index=False)
    return path


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
