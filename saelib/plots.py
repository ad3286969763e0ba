"""The seaborn figures the notebooks share (one function per figure of the book)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from .profiles import PAPER_ARCHITECTURES

#: One colour per architecture, the same in every figure.
ARCH_PALETTE = dict(zip(PAPER_ARCHITECTURES, sns.color_palette("colorblind", len(PAPER_ARCHITECTURES))))


def frontier_plot(table: pd.DataFrame, metric: str = "explained_variance"):
    """``metric`` against realised L0, one line per architecture, one panel per model."""
    models = list(dict.fromkeys(table["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.6), squeeze=False)
    for ax, model in zip(axes[0], models):
        sub = table[table["model"] == model].sort_values("l0")
        sns.lineplot(data=sub, x="l0", y=metric, hue="arch", palette=ARCH_PALETTE, marker="o", ax=ax)
        ax.set(xscale="log", xlabel="realised L0 (held-out)", ylabel=metric.replace("_", " "), title=model)
        ax.legend(title="architecture", fontsize=8)
    fig.tight_layout()
    return fig


def scatter_plot(table: pd.DataFrame, x: str, y: str, xlabel: str | None = None,
                 ylabel: str | None = None):
    """One point per SAE, ``y`` against ``x``, coloured by architecture and marked by model (the
    picture behind a τ_b)."""
    fig, ax = plt.subplots(figsize=(5.2, 3.8))
    sns.scatterplot(data=table, x=x, y=y, hue="arch", style="model", palette=ARCH_PALETTE, s=60, ax=ax)
    ax.set(xlabel=xlabel or x, ylabel=ylabel or y)
    ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def delta_conf_histograms(scores: pd.DataFrame, tail: float = 0.05):
    """The paper's Fig. 3: ΔC_k of every feature, one panel per model (all its SAEs pooled), the
    ``tail`` fraction at each end shaded (the features the quantile tiers would pick).
    ``scores`` has columns ``model`` and ``delta_conf``."""
    models = list(dict.fromkeys(scores["model"]))
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 3.4), squeeze=False)
    for ax, model in zip(axes[0], models):
        values = scores.loc[scores["model"] == model, "delta_conf"]
        lo, hi = values.quantile(tail), values.quantile(1 - tail)
        sns.histplot(values, bins=60, ax=ax, color="tab:gray")
        ax.axvspan(values.min(), lo, color="tab:blue", alpha=0.15, label=f"lowest {tail:.0%}")
        ax.axvspan(hi, values.max(), color="tab:red", alpha=0.15, label=f"highest {tail:.0%}")
        ax.set(xlabel="ΔC_k (amplified − base top-k surprisal)", ylabel="features", title=model)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def lift_plot(table: pd.DataFrame, column: str = "paper_lift_pct"):
    """The paper's Fig. 9: each SAE's steering lift after ΔC_k selection, sorted, coloured by
    architecture (SAEs whose lift is undefined, g(θ) = 0, are left out)."""
    data = table.dropna(subset=[column]).sort_values(column).reset_index(drop=True)
    fig, ax = plt.subplots(figsize=(max(5.0, 0.25 * len(data) + 2), 3.4))
    sns.barplot(x=data.index.astype(str), y=data[column], hue=data["arch"], palette=ARCH_PALETTE,
                dodge=False, ax=ax)
    ax.set(xlabel="SAEs, sorted by lift", ylabel="lift over no selection (%)", xticklabels=[])
    ax.axhline(0, color="black", lw=0.8)
    fig.tight_layout()
    return fig
