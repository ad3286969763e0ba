"""The book's tables and figures with two models (the cpu-pair and paper profiles): each model's
SAEs stay told apart, on hand-made tables and tiny saved SAEs."""

from __future__ import annotations

import matplotlib

matplotlib.use("Agg")

import numpy as np
import pandas as pd
import torch
from safetensors.torch import save_file

from saelib import plots, report
from saelib.profiles import PAPER_ARCHITECTURES, RUNS_ENV, load_profile
from saelib.stages.layout import SAE_WEIGHTS, sae_dir, sae_jobs


def _lift_table(models=("Gemma-3-270M", "SmolLM2-135M"), levels=3) -> pd.DataFrame:
    rng = np.random.default_rng(0)
    rows = [{"model": m, "arch": a, "level": lv, "paper_lift_pct": float(rng.normal(10 * i, 5))}
            for i, m in enumerate(models) for a in PAPER_ARCHITECTURES for lv in range(levels)]
    return pd.DataFrame(rows)


def test_lift_plot_has_one_panel_per_model_with_its_own_saes():
    table = _lift_table()
    table.loc[0, "paper_lift_pct"] = np.nan  # an undefined lift is left out
    fig = plots.lift_plot(table)
    axes = fig.axes
    assert [ax.get_title() for ax in axes] == ["Gemma-3-270M", "SmolLM2-135M"]
    assert [len(ax.get_xticks()) for ax in axes] == [14, 15]  # one bar per SAE of that model
    single = plots.lift_plot(_lift_table(models=("SmolLM2-135M",)))
    assert len(single.axes) == 1


def test_lift_box_plot_marks_each_saes_model():
    fig = plots.lift_box_plot(_lift_table())
    legend = fig.axes[0].get_legend()
    assert legend is not None and legend.get_title().get_text() == "model"
    assert [t.get_text() for t in legend.get_texts()] == ["Gemma-3-270M", "SmolLM2-135M"]


def test_shapes_table_lists_each_models_shapes(tmp_path, monkeypatch):
    """Two models of different d_model: one row set per (model, architecture), not the first
    model's shapes standing for both."""
    monkeypatch.setenv(RUNS_ENV, str(tmp_path))
    profile = load_profile("cpu-pair")
    d_model = {m.name: 8 + 4 * i for i, m in enumerate(profile.models)}
    for job in sae_jobs(profile):
        if job.level > 1:
            continue
        path = sae_dir(profile, job) / "sae" / SAE_WEIGHTS
        path.parent.mkdir(parents=True)
        save_file({"W_dec": torch.zeros(16, d_model[job.model]),
                   "W_enc": torch.zeros(d_model[job.model], 16)}, str(path))
    shapes = report.shapes_table(profile)
    labels = [m.display for m in profile.models]
    assert list(dict.fromkeys(shapes["model"])) == labels
    assert len(shapes) == 2 * len(labels) * len(profile.grid.architectures)
    for m in profile.models:
        one = shapes[(shapes["model"] == m.display) & (shapes["parameter"] == "W_enc")]
        assert set(one["shape"]) == {f"{d_model[m.name]} × 16"}
        assert sorted(one["arch"]) == sorted(profile.grid.architectures)


def test_power_statement_gives_each_models_reliability(tmp_path, monkeypatch):
    """Two models whose mean g differ and whose SAEs' g within a model are noise: the pooled
    reliability is high (the gap counts as signal), each model's is 0, and the text says both."""
    monkeypatch.setenv(RUNS_ENV, str(tmp_path))
    rng = np.random.default_rng(1)
    intervals = pd.DataFrame({"model": ["A"] * 10 + ["B"] * 10,
                              "g": np.r_[0.2 + 0.01 * rng.standard_normal(10),
                                         0.8 + 0.01 * rng.standard_normal(10)],
                              "se": 0.05})
    intervals["g_low"], intervals["g_high"] = intervals["g"] - 0.1, intervals["g"] + 0.1
    s = report.power_statement(load_profile("smoke"), intervals, None)
    assert s["reliability_g"] > 0.9
    assert s["reliability_g_by_model"] == {"A": 0.0, "B": 0.0}
    text = report.power_text(s)
    assert "Within each model" in text and "A 0.00, B 0.00" in text
    one = report.power_statement(load_profile("smoke"), intervals[intervals["model"] == "A"], None)
    assert one["reliability_g_by_model"] == {}
    assert "Within each model" not in report.power_text(one)


def test_judges_side_by_side_marks_models_only_when_there_are_several():
    def record(models):
        per_sae = [{"sae": f"{m}/{a}-s0", "arch": a, "mu_rule": 0.1 * i, "mu_llm": 0.2 * i,
                    "g_rule": 0.3, "g_llm": 0.1 * i} for i, (m, a) in enumerate(
                        (m, a) for m in models for a in ("standard", "topk"))]
        return {"per_sae": per_sae, "judge_a": "rules"}

    def legend_texts(fig):
        return [t.get_text() for t in fig.axes[0].get_legend().get_texts()]

    two = legend_texts(plots.judges_side_by_side(record(["gemma", "smol"])))
    assert "model" in two and {"gemma", "smol"} <= set(two)
    one = legend_texts(plots.judges_side_by_side(record(["smol"])))
    assert "model" not in one and "smol" not in one


def test_sink_statement_gives_each_models_sinks_and_skips_saes_without_the_record():
    rows = [{"model": "Gemma-3-270M", "arch": a, "explained_variance": ev, "sink_tokens": 14.0,
             "explained_variance_excl_sinks": kept, "sink_variance_share": 0.5}
            for a, ev, kept in (("topk", 0.90, 0.80), ("gated", 0.86, 0.70), ("standard", 0.59, 0.24))]
    rows += [{"model": "SmolLM2-135M", "arch": "topk", "explained_variance": 0.92, "sink_tokens": 1.0,
              "explained_variance_excl_sinks": 0.62, "sink_variance_share": 0.84},
             {"model": "Old-run", "arch": "topk", "explained_variance": 0.9, "sink_tokens": np.nan,
              "explained_variance_excl_sinks": np.nan, "sink_variance_share": np.nan}]
    text = report.sink_statement(pd.DataFrame(rows))
    lines = text.splitlines()
    assert len(lines) == 2
    assert lines[0].startswith("- **Gemma-3-270M**: 14 held-out tokens are attention sinks")
    assert "holding 50% of the variance" in lines[0] and "0.860 with them, 0.700 without" in lines[0]
    assert "1 held-out token is an attention sink, holding 84%" in lines[1]
    assert "Old-run" not in text
    assert report.sink_statement(pd.DataFrame(rows[-1:])) == ""
