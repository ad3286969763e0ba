"""The seaborn figures the notebooks share (one function per figure of the book)."""

from __future__ import annotations

import matplotlib.pyplot as plt
import pandas as pd
import seaborn as sns

from .profiles import PAPER_ARCHITECTURES

#: One colour per architecture, the same in every figure.
ARCH_PALETTE = dict(zip(PAPER_ARCHITECTURES, sns.color_palette("colorblind", len(PAPER_ARCHITECTURES))))
#: Points that stand for models on top of architecture-coloured boxes: dark, unlike those colours.
MODEL_PALETTE = ["black", "0.6", "#8b0000", "#00008b"]


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
    architecture, one panel per model (SAEs whose lift is undefined, g(θ) = 0, are left out)."""
    data = table.dropna(subset=[column])
    models = list(dict.fromkeys(data["model"]))
    widest = max((int((data["model"] == m).sum()) for m in models), default=0)
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(
        max(1, len(models)) * max(5.0, 0.25 * widest + 2), 3.4), squeeze=False)
    for ax, model in zip(axes[0], models):
        one = data[data["model"] == model].sort_values(column).reset_index(drop=True)
        sns.barplot(x=one.index.astype(str), y=one[column], hue=one["arch"], palette=ARCH_PALETTE,
                    dodge=False, ax=ax)
        ax.set(xlabel="SAEs, sorted by lift", ylabel="lift over no selection (%)", xticklabels=[],
               title=model)
        ax.axhline(0, color="black", lw=0.8)
    fig.tight_layout()
    return fig


def g_interval_plot(intervals: pd.DataFrame):
    """Each SAE's g(θ) with its bootstrap interval over concepts, against sparsity level, one
    panel per model, architectures side by side (``report.g_intervals``)."""
    models = list(dict.fromkeys(intervals["model"]))
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(5.5 * max(1, len(models)), 3.4),
                             squeeze=False)
    archs = [a for a in PAPER_ARCHITECTURES if a in set(intervals["arch"])]
    for ax, model in zip(axes[0], models):
        data = intervals[intervals["model"] == model]
        for i, arch in enumerate(archs):
            d = data[data["arch"] == arch]
            x = d["level"] + (i - (len(archs) - 1) / 2) * 0.12
            ax.errorbar(x, d["g"], yerr=[d["g"] - d["g_low"].fillna(d["g"]),
                                         d["g_high"].fillna(d["g"]) - d["g"]],
                        fmt="o", color=ARCH_PALETTE.get(arch), label=arch, capsize=2, ms=4)
        ax.axhline(0, color="black", lw=0.8)
        ax.set(title=model, xlabel="sparsity level (0 = sparsest)", ylabel="g(θ), 95 % interval",
               xticks=sorted(set(data["level"])))
    axes[0][-1].legend(fontsize=8, loc="upper left", bbox_to_anchor=(1.0, 1.0))
    fig.tight_layout()
    return fig


def _methods_long(table: pd.DataFrame, way: str) -> pd.DataFrame:
    """One row per (SAE, method): steering score with no selection, the output score, ΔC_k."""
    cols = {"g": "no selection", f"{way}_g_output_score": "output score", f"{way}_g_delta_conf": "ΔC_k"}
    done = table.dropna(subset=list(cols))
    return done.melt(id_vars=["model", "arch", "level"], value_vars=list(cols),
                     var_name="method", value_name="steering score").replace({"method": cols})


def steering_by_arch_plot(table: pd.DataFrame, way: str = "paper"):
    """The paper's Fig. 4: mean steering score per architecture for each selection method, one
    panel per model."""
    data = _methods_long(table, way)
    models = list(dict.fromkeys(data["model"]))
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(5 * max(1, len(models)), 3.4),
                             squeeze=False)
    for ax, model in zip(axes[0], models):
        sns.barplot(data=data[data["model"] == model], x="arch", y="steering score", hue="method",
                    order=[a for a in PAPER_ARCHITECTURES if a in set(data["arch"])], errorbar=None, ax=ax)
        ax.set(xlabel="architecture", title=model)
        ax.legend(fontsize=8)
    fig.tight_layout()
    return fig


def before_after_plot(table: pd.DataFrame, way: str = "paper"):
    """The paper's Fig. 8: each SAE's steering score before (no selection) and after ΔC_k
    selection, one line per SAE, one panel per model."""
    data = _methods_long(table, way)
    data = data[data["method"].isin(["no selection", "ΔC_k"])]
    models = list(dict.fromkeys(data["model"]))
    fig, axes = plt.subplots(1, max(1, len(models)), figsize=(4.2 * max(1, len(models)), 3.4),
                             squeeze=False)
    for ax, model in zip(axes[0], models):
        sub = data[data["model"] == model]
        for (arch, level), one in sub.groupby(["arch", "level"]):
            one = one.set_index("method").loc[["no selection", "ΔC_k"]]
            ax.plot([0, 1], one["steering score"], marker="o", color=ARCH_PALETTE.get(arch), alpha=0.7)
        ax.set(xticks=[0, 1], xticklabels=["no selection", "ΔC_k"], ylabel="steering score", title=model)
    fig.tight_layout()
    return fig


def lift_box_plot(table: pd.DataFrame, column: str = "paper_lift_pct"):
    """The paper's Fig. 10: the lift after ΔC_k selection by architecture, models pooled as the
    paper's (box plots), each SAE a point marked by its model; SAEs with an undefined lift left
    out."""
    data = table.dropna(subset=[column])
    order = [a for a in PAPER_ARCHITECTURES if a in set(data["arch"])]
    fig, ax = plt.subplots(figsize=(6, 3.4))
    sns.boxplot(data=data, x="arch", y=column, order=order, palette=ARCH_PALETTE, hue="arch",
                legend=False, ax=ax, fliersize=0)
    sns.stripplot(data=data, x="arch", y=column, order=order, hue="model",
                  palette=MODEL_PALETTE[:max(1, data["model"].nunique())], size=3.5, ax=ax)
    ax.legend(title="model", fontsize=8)
    ax.set(xlabel="architecture", ylabel="lift over no selection (%)")
    fig.tight_layout()
    return fig


#: Panels of the descriptive figure (the paper's Figs. 5–7), in reading order: (column, label).
DESCRIPTIVE_PANELS = [("explained_variance", "explained variance"),
                      ("explained_variance_excl_sinks", "explained variance, sinks excluded"),
                      ("ce_loss_recovered", "CE-loss recovered"),
                      ("kl_score", "KL score"), ("mse", "MSE"), ("dead_fraction", "dead fraction"),
                      ("dense_fraction", "dense fraction"), ("mu", "AutoInterp μ(θ)"),
                      ("absorption_fraction", "absorption fraction"), ("full_absorption", "full absorption"),
                      ("sae_top_1_acc", "sparse probing top-1"), ("sae_top_2_acc", "sparse probing top-2"),
                      ("sae_top_5_acc", "sparse probing top-5")]


def descriptive_plot(table: pd.DataFrame, model: str):
    """The paper's Figs. 5–7 for one model: every SAEBench metric against realised L0, one line per
    architecture; probing panels carry the residual-stream baseline (same k) as a dashed line."""
    sub = table[table["model"] == model].sort_values("l0")
    panels = [(c, label) for c, label in DESCRIPTIVE_PANELS if c in sub and sub[c].notna().any()]
    ncols = 4
    nrows = -(-len(panels) // ncols)
    fig, axes = plt.subplots(nrows, ncols, figsize=(3.6 * ncols, 2.9 * nrows), squeeze=False)
    for ax, (col, label) in zip(axes.flat, panels):
        sns.lineplot(data=sub, x="l0", y=col, hue="arch", palette=ARCH_PALETTE, marker="o", ax=ax,
                     legend=ax is axes.flat[0])
        base = col.replace("sae_", "llm_")
        if col.startswith("sae_top_") and base in sub:
            ax.axhline(sub[base].mean(), ls="--", c="grey", lw=1, label="residual stream")
        ax.set(xscale="log", xlabel="realised L0", ylabel="", title=label)
    for ax in list(axes.flat)[len(panels):]:
        ax.set_visible(False)
    if panels:
        axes.flat[0].legend(title="architecture", fontsize=7, title_fontsize=7)
    fig.suptitle(model)
    fig.tight_layout()
    return fig


def confusion_plot(record):
    """The judge stage's confusion matrices, one per rating kind: rows the profile's judge, columns
    the LLM judge, cells the number of generations."""
    kinds = ("concept", "instruction", "fluency")
    fig, axes = plt.subplots(1, 3, figsize=(11, 3.4))
    for ax, kind in zip(axes, kinds):
        k = record["ratings"][kind]
        sns.heatmap(pd.DataFrame(k["confusion"], index=[0, 1, 2], columns=[0, 1, 2]), annot=True,
                    fmt="d", cmap="Blues", cbar=False, ax=ax)
        ax.set(title=f"{kind} (κ_w {k['weighted_kappa']:.2f})", xlabel=f"{record['judge_b']}",
               ylabel=f"{record['judge_a']}")
        ax.xaxis.label.set_size(7)
    fig.tight_layout()
    return fig


def judges_side_by_side(record):
    """μ and g of the judge stage's SAEs: the LLM judge's value against the rules', one point per
    SAE, coloured by architecture and, with several models, marked by model (the part of its
    ``sae`` key before the slash); the diagonal is perfect agreement."""
    table = pd.DataFrame(record["per_sae"])
    table["model"] = table["sae"].str.split("/").str[0]
    style = "model" if table["model"].nunique() > 1 else None
    fig, axes = plt.subplots(1, 2, figsize=(9, 3.8))
    for ax, (a, b, label) in zip(axes, (("mu_rule", "mu_llm", "μ (sampled latents)"),
                                        ("g_rule", "g_llm", "g (held-out at α*)"))):
        sub = table.dropna(subset=[a, b])
        if len(sub):
            sns.scatterplot(data=sub, x=a, y=b, hue="arch", style=style, palette=ARCH_PALETTE,
                            s=60, ax=ax)
            lo = min(sub[a].min(), sub[b].min(), 0.0)
            hi = max(sub[a].max(), sub[b].max(), 0.05)
            ax.plot([lo, hi], [lo, hi], color="grey", lw=0.8, ls="--")
            ax.legend(fontsize=8)
        ax.set(xlabel=f"{label}, {record['judge_a']}", ylabel=f"{label}, LLM", title=label)
    fig.tight_layout()
    return fig
