"""Selection settings and the Table 2 layout (protocol §6), on hand-made numbers."""

from __future__ import annotations

import pandas as pd
import pytest

from saelib.report import paper_table2, steering_by_method
from saelib.selection.config import SelectionConfig


def test_selection_config_validation():
    SelectionConfig().validate()
    for bad, match in [(dict(variant="clamp"), "variant"), (dict(alpha=0.0), "alpha"),
                       (dict(top_ks=(0,)), "top_ks"), (dict(quantiles=(1.0,)), "quantiles"),
                       (dict(top_ks=(), quantiles=()), "at least one tier"), (dict(prefix=" "), "prefix"),
                       (dict(prefix_bos="yes"), "prefix_bos")]:
        with pytest.raises(ValueError, match=match):
            SelectionConfig(**bad).validate()
    SelectionConfig(top_ks=(), quantiles=(), steer_tiers=False).validate()


def test_prefix_is_opened_as_the_activations_were_captured(tiny_tokenizer):
    """``prefix_bos``: the captured contexts' opening token by default (SmolLM2's ``<|im_start|>``
    is not its tokenizer's own addition), the tokenizer's BOS, or nothing; never doubled."""
    body = tiny_tokenizer("t1 t2", add_special_tokens=False)["input_ids"]
    opening = 2  # e.g. a corpus whose contexts open with EOS (no BOS in the tokenizer)
    cfg = SelectionConfig(prefix="t1 t2")
    assert cfg.prefix_ids(tiny_tokenizer, opening) == [opening] + body
    assert SelectionConfig(prefix="t1 t2", prefix_bos="bos").prefix_ids(tiny_tokenizer, opening) \
        == [tiny_tokenizer.bos_token_id] + body
    assert SelectionConfig(prefix="t1 t2", prefix_bos="none").prefix_ids(tiny_tokenizer, opening) \
        == body
    assert SelectionConfig(prefix="t1 t2").prefix_ids(tiny_tokenizer, body[0]) == body


def test_steering_by_method_means_lifts_and_relative_gain():
    table = pd.DataFrame({
        "model": ["A", "A", "B", "B", "B"],
        "g": [0.1, 0.3, 0.2, 0.2, None],
        "paper_g_output_score": [0.2, 0.4, 0.3, 0.3, 0.5],
        "paper_g_delta_conf": [0.3, 0.5, 0.4, 0.4, 0.9],
    })
    out = steering_by_method(table, "paper").set_index("model")
    assert out.loc["A", "no selection"] == pytest.approx(0.2)
    assert out.loc["B", "SAEs"] == 2  # the SAE without g is left out
    assert out.loc["A", "lift ΔC_k (%)"] == pytest.approx((0.4 - 0.2) / 0.2 * 100)
    assert out.loc["B", "lift output score (%)"] == pytest.approx(50.0)
    assert out.loc["A", "ΔC_k vs output score (relative %)"] == pytest.approx((0.4 - 0.3) / 0.3 * 100)
    assert out.loc["A", "lift ΔC_k − lift output score (pp)"] == pytest.approx(100.0 - 50.0)
    from saelib.report import MEAN_ROW

    mean = out.loc[MEAN_ROW]  # unweighted over models; SAEs summed
    assert mean["SAEs"] == 4 and mean["no selection"] == pytest.approx(0.2)
    assert mean["lift ΔC_k (%)"] == pytest.approx((100.0 + 100.0) / 2)
    with pytest.raises(ValueError, match="no SAE has a selection result"):
        steering_by_method(table.drop(columns=["paper_g_delta_conf"]))


def test_a_model_whose_lift_is_undefined_keeps_the_others_lifts():
    """A model with mean g 0 has no lift (nothing to divide by); the other model keeps its
    lifts, and the mean row has none (a one-model mean would read as a mean over models)."""
    table = pd.DataFrame({"model": ["A", "A", "B", "B"], "g": [0.1, 0.3, 0.0, 0.0],
                          "paper_g_output_score": [0.2, 0.4, 0.1, 0.1],
                          "paper_g_delta_conf": [0.3, 0.5, 0.2, 0.2]})
    from saelib.report import MEAN_ROW

    out = steering_by_method(table, "paper").set_index("model")
    assert out.loc["A", "lift ΔC_k (%)"] == pytest.approx(100.0)
    assert pd.isna(out.loc["B", "lift ΔC_k (%)"]) and pd.isna(out.loc["B", "lift output score (%)"])
    assert pd.isna(out.loc[MEAN_ROW, "lift ΔC_k (%)"])
    assert out.loc[MEAN_ROW, "no selection"] == pytest.approx(0.1)


def test_paper_table2_reproduces_the_reported_lifts():
    from saelib.report import MEAN_ROW

    full = paper_table2().set_index("model")
    t = full.drop(index=MEAN_ROW)
    # The printed lifts (one decimal) agree with the printed g's they are computed from.
    recomputed = (t["ΔC_k"] - t["no selection"]) / t["no selection"] * 100
    assert recomputed.round(1).tolist() == t["lift ΔC_k (%)"].tolist() == [146.6, 133.3, 103.5]
    mean_lift_gap = (t["lift ΔC_k (%)"] - t["lift output score (%)"]).mean()
    assert mean_lift_gap == pytest.approx(52.52, abs=0.5)  # the abstract's figure, in points
    assert t["ΔC_k vs output score (relative %)"].mean() == pytest.approx(30.3, abs=0.5)
    # the book's mean row shows both readings as numbers
    mean = full.loc[MEAN_ROW]
    assert mean["lift ΔC_k − lift output score (pp)"] == pytest.approx(mean_lift_gap)
    assert mean["ΔC_k vs output score (relative %)"] == pytest.approx(30.3, abs=0.5)
    assert mean["ΔC_k"] == pytest.approx((0.328 + 0.399 + 0.289) / 3)
