"""SAEBench's descriptive metrics of one SAE, beside AutoInterp (protocol §3; the paper's Figs. 5–7).

Not used in any τ_b: they show *what kind* of SAE each grid point is. Computed here:

* **core extras**: the fraction of dense latents (firing on more than ``dense_threshold`` of the
  held-out tokens); L0, explained variance, MSE, CE-loss recovered, KL score and dead fraction
  come from the train stage's ``core`` block (``saelib.evals.core``);
* **feature absorption** on the first-letter task (:mod:`saelib.evals.absorption`);
* **k-sparse probing**, k = 1, 2, 5, SAE latents vs the residual stream
  (:mod:`saelib.evals.probing`), on sets shipped in ``sae-probes``.

**Not computed offline, and why** (:data:`NOT_COMPUTED`, shown in the book): SCR needs Bias in Bios
and Amazon reviews with *two* labels per text (profession × gender, category × sentiment) to build
its spuriously correlated training sets; RAVEL needs its entity–attribute data set. Both come only
from the hub, and no packaged source offline has such paired labels.

The model's inputs (the residual at each first-letter prompt, each probing text's residual) are
computed **once per model** by the capture stage (:func:`capture_inputs`) and shared by all its
SAEs, which only encode them (:func:`run`). They are stored as ``.npy`` with checksums in a
manifest and are refused when a file differs from it.
"""

from __future__ import annotations

import sys
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import numpy as np
import torch
from tqdm.auto import tqdm

from ..data.probing import balanced_split, load_probe_set
from ..models import ids_with_bos
from ..results import CorruptFileError, files_match, read_json, read_npy, write_json, write_npy
from . import absorption as absorption_mod
from . import probing as probing_mod
from .absorption import AbsorptionConfig
from .probing import ProbingConfig

MANIFEST = "manifest.json"

#: SAEBench metrics this project cannot compute offline, with the reason the book prints.
NOT_COMPUTED = {
    "SCR": "needs Bias in Bios / Amazon reviews with two labels per text (profession × gender, "
           "category × sentiment) to build spuriously correlated probing sets; both are hub data "
           "sets, and no packaged offline source carries such paired labels",
    "RAVEL": "needs the RAVEL entity–attribute data set (cities, people, … with their attributes "
             "and prompt templates), which is only on the hub",
}


@dataclass(frozen=True)
class DescriptiveConfig:
    """Profile section ``descriptive``: the two sub-configs and the dense-latent rule."""

    absorption: AbsorptionConfig = field(default_factory=AbsorptionConfig)
    probing: ProbingConfig = field(default_factory=ProbingConfig)
    dense_threshold: float = 0.1
    dense_tokens: int = 16384

    def validate(self) -> "DescriptiveConfig":
        self.absorption.validate()
        self.probing.validate()
        if not 0.0 < self.dense_threshold < 1.0:
            raise ValueError(f"descriptive.dense_threshold must be in (0, 1), got {self.dense_threshold}")
        if self.dense_tokens < 1:
            raise ValueError(f"descriptive.dense_tokens must be >= 1, got {self.dense_tokens}")
        return self

    def inputs_record(self) -> dict[str, Any]:
        """The settings the per-model inputs depend on (not the per-SAE thresholds)."""
        a, p = self.absorption, self.probing
        return {"absorption": {k: getattr(a, k) for k in
                               ("n_words", "min_chars", "icl_examples", "test_fraction", "seed")},
                "probing": {k: getattr(p, k) for k in ("n_train", "n_test", "context", "seed")}
                | {"datasets": list(p.datasets)}}


# ------------------------------------------------------------------------------------------
# Per-model inputs (run once, by the capture stage)


def inputs_current(folder: Path, config: DescriptiveConfig, layer: int) -> bool:
    """The inputs exist for this layer and these settings, and every file matches its checksum
    (a damaged one is named on stderr; the capture stage then recomputes the inputs)."""
    folder = Path(folder)
    if not (folder / MANIFEST).exists():
        return False
    try:
        manifest = read_json(folder / MANIFEST)
    except CorruptFileError as e:
        print(f"warning: {e}", file=sys.stderr)
        return False
    if not (manifest.get("complete") is True and manifest.get("layer") == layer
            and manifest.get("settings") == config.inputs_record()):
        return False
    return files_match(folder, manifest["files"], folder / MANIFEST,
                       "the capture stage will recompute it")


def _probe_tokens(tokenizer, texts: Iterable[str], context: int) -> tuple[np.ndarray, np.ndarray]:
    rows = [ids_with_bos(tokenizer, t)[:context] for t in texts]
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    out = np.full((len(rows), context), pad, dtype=np.int64)
    for i, r in enumerate(rows):
        out[i, :len(r)] = r
    return out, np.array([len(r) for r in rows], dtype=np.int64)


def _residual_padded(residual, tokens_NL: np.ndarray, lengths_N: np.ndarray, batch: int,
                     desc: str, progress: bool) -> np.ndarray:
    """Residual of right-padded texts (causal attention: padding never reaches earlier tokens),
    batched by length so short texts do not pay for long ones; stored as float16 when every value
    fits it, else float32 (Gemma-3-270M's massive activations at BOS exceed float16's 65,504: the
    cpu-pair profile's capture stopped on them; readers take either)."""
    N, L = tokens_NL.shape
    out = None
    order = np.argsort(lengths_N, kind="stable")
    for lo in tqdm(range(0, N, batch), desc=desc, disable=not progress):
        idx = order[lo:lo + batch]
        width = int(lengths_N[idx].max())
        with torch.no_grad():
            acts = residual(torch.as_tensor(tokens_NL[idx, :width])).float().cpu().numpy()
        if out is None:
            out = np.zeros((N, L, acts.shape[-1]), dtype=np.float32)
        out[idx, :width] = acts
    if not np.isfinite(out).all():
        raise ValueError(f"{desc}: non-finite activations (an unstable model)")
    if np.abs(out).max(initial=0.0) < np.finfo(np.float16).max:
        out = out.astype(np.float16)
    return out


def capture_inputs(residual: Callable[[torch.Tensor], torch.Tensor], tokenizer, layer: int,
                   config: DescriptiveConfig, folder: str | Path, progress: bool = True) -> dict:
    """Compute and save the per-model inputs of absorption and probing; return the manifest."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    files: dict[str, str] = {}
    data = absorption_mod.build_data(residual, tokenizer, config.absorption, progress=progress)
    files["absorption_acts.npy"] = write_npy(folder / "absorption_acts.npy", data.acts_WD)
    files["absorption_letter.npy"] = write_npy(folder / "absorption_letter.npy", data.letter_W)
    files["absorption_is_test.npy"] = write_npy(folder / "absorption_is_test.npy", data.is_test_W)
    # the ground-truth letter probe depends only on the model's residual: fit once, not per SAE
    probe = absorption_mod.fit_letter_probe(data, config.absorption.seed)
    files["absorption_probe_dirs.npy"] = write_npy(folder / "absorption_probe_dirs.npy", probe.dirs_CD)
    files["absorption_probe_f1.npy"] = write_npy(folder / "absorption_probe_f1.npy", probe.f1_C)
    files["absorption_probe_pred.npy"] = write_npy(folder / "absorption_probe_pred.npy", probe.pred_W)
    p = config.probing
    sets = {}
    for name in p.datasets:
        texts, labels = load_probe_set(name)
        split = balanced_split(name, texts, labels, p.n_train, p.n_test, p.seed)
        toks, lens = _probe_tokens(tokenizer, split.train_texts + split.test_texts, p.context)
        acts = _residual_padded(residual, toks, lens, 16, f"probing {name}", progress)
        stem = "probing_" + Path(name).name.replace(".csv", "").replace(".zst", "")
        files[f"{stem}_acts.npy"] = write_npy(folder / f"{stem}_acts.npy", acts)
        files[f"{stem}_lengths.npy"] = write_npy(folder / f"{stem}_lengths.npy", lens)
        labels_all = np.concatenate([split.train_labels, split.test_labels])
        files[f"{stem}_labels.npy"] = write_npy(folder / f"{stem}_labels.npy", labels_all)
        sets[name] = {"stem": stem, "n_train": len(split.train_texts), "n_test": len(split.test_texts),
                      "mean_tokens": float(lens.mean())}
    manifest = {"layer": layer, "settings": config.inputs_record(), "words": list(data.words),
                "probing_sets": sets, "files": files, "complete": True}
    write_json(folder / MANIFEST, manifest)
    return manifest


@dataclass(frozen=True)
class Inputs:
    absorption: absorption_mod.AbsorptionData
    probing: dict[str, dict[str, np.ndarray]]
    #: the letter probe fit at capture (None for inputs captured before it was stored: then
    #: :func:`run` fits it, with the same seed, so the numbers are the same)
    probe: absorption_mod.LetterProbe | None = None


def load_inputs(folder: str | Path) -> Inputs:
    """The per-model inputs, each file checked against the manifest's checksum."""
    folder = Path(folder)
    manifest = read_json(folder / MANIFEST)
    if not manifest.get("complete"):
        raise CorruptFileError(f"{folder / MANIFEST}: inputs incomplete; rerun the capture stage")
    arr = {name: read_npy(folder / name, sha) for name, sha in manifest["files"].items()}
    data = absorption_mod.AbsorptionData(arr["absorption_acts.npy"], arr["absorption_letter.npy"],
                                         tuple(manifest["words"]), arr["absorption_is_test.npy"])
    probing = {}
    for name, meta in manifest["probing_sets"].items():
        stem = meta["stem"]
        n_train = meta["n_train"]
        probing[name] = {"acts": arr[f"{stem}_acts.npy"], "lengths": arr[f"{stem}_lengths.npy"],
                         "labels": arr[f"{stem}_labels.npy"], "n_train": n_train}
    probe = None
    if "absorption_probe_dirs.npy" in arr:
        probe = absorption_mod.LetterProbe(arr["absorption_probe_dirs.npy"], arr["absorption_probe_f1.npy"],
                                           arr["absorption_probe_pred.npy"])
    return Inputs(data, probing, probe)


# ------------------------------------------------------------------------------------------
# Per-SAE metrics


def dense_fraction(encode, acts_iter: Iterable[np.ndarray], n_tokens: int, threshold: float,
                   width: int) -> tuple[float, int]:
    """Fraction of latents firing on more than ``threshold`` of up to ``n_tokens`` held-out tokens
    (BOS, position 0 of each context, excluded as everywhere else); returns (fraction, tokens)."""
    fires = torch.zeros(width, dtype=torch.float64)
    seen = 0
    for ctx_LD in acts_iter:
        x = torch.from_numpy(np.array(ctx_LD, dtype=np.float32))
        x = x.reshape(-1, x.shape[-2], x.shape[-1])[:, 1:].reshape(-1, x.shape[-1])
        x = x[: n_tokens - seen]
        with torch.no_grad():
            fires += (encode(x) > 0).double().sum(0)
        seen += len(x)
        if seen >= n_tokens:
            break
    if seen == 0:
        raise ValueError("no held-out tokens to measure latent density on")
    return float(((fires / seen) > threshold).double().mean()), seen


def run(encode: Callable[[torch.Tensor], torch.Tensor], W_dec_FD: np.ndarray, inputs: Inputs,
        eval_acts: Iterable[np.ndarray], config: DescriptiveConfig, progress: bool = False
        ) -> tuple[dict[str, Any], dict[str, Any]]:
    """All descriptive metrics of one SAE: (summary for ``result.json``, per-letter/per-set detail)."""
    width = W_dec_FD.shape[0]
    dense, n_tok = dense_fraction(encode, eval_acts, config.dense_tokens, config.dense_threshold, width)
    probe = inputs.probe or absorption_mod.fit_letter_probe(inputs.absorption, config.absorption.seed)
    ab = absorption_mod.score(inputs.absorption, probe, encode, W_dec_FD, config.absorption)
    sets = []
    p = config.probing
    for name, d in tqdm(inputs.probing.items(), desc="sparse probing", disable=not progress):
        res = probing_mod.mean_pool(d["acts"], d["lengths"])
        codes = probing_mod.mean_pool(d["acts"], d["lengths"], encode=encode)
        n, y = d["n_train"], d["labels"]
        sets.append(probing_mod.probe_set(res[:n], res[n:], codes[:n], codes[n:], y[:n], y[n:],
                                          p.ks, name=name, seed=p.seed))
    summary = {"dense_fraction": dense, "dense_tokens": n_tok,
               "absorption_fraction": ab.mean_absorption_fraction,
               "full_absorption": ab.mean_full_absorption,
               "absorption_letters": ab.n_letters, "absorption_probe_f1": ab.probe_test_f1,
               "absorption_partial": ab.partial, "absorption_reason": ab.reason,
               "probing": probing_mod.summarise(sets, p.ks), "probing_sets": len(sets),
               "not_computed": dict(NOT_COMPUTED)}
    detail = {"absorption": ab.to_record(), "probing": [asdict(s) for s in sets]}
    return summary, detail
