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
