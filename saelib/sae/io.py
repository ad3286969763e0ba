"""Save and load SAEs in sae-lens's on-disk format (``cfg.json`` + ``sae_weights.safetensors``).

Why sae-lens's format: any sae-lens user (and SAEBench, which loads SAEs through sae-lens) can
open the grid's 90 SAEs with ``sae_lens.SAE.load_from_disk(folder)``, and the weights are
safetensors, so loading never unpickles anything. Training SAEs are converted to their inference
class first, the way sae-lens's ``save_inference_model`` does: BatchTopK is saved as JumpReLU with
its learnt global threshold (Bussmann et al. 2024 use that threshold at inference), so the saved
SAE's L0 is the threshold's, not the batch's.

saelib needs no encode/decode of its own: the loaded objects are sae-lens inference SAEs whose
``encode``, ``decode`` and ``forward`` take raw activations (the normalisation was folded into the
weights at the end of training, see :mod:`saelib.sae.train`).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import save_file
from sae_lens.constants import SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME
from sae_lens.saes import SAE, TrainingSAE

from saelib.results import CorruptFileError, atomic_path, write_json
from saelib.sae.train import to_inference_sae


def save_sae(sae: SAE[Any], folder: str | Path) -> Path:
    """Write ``sae`` (inference or training SAE) to ``folder`` in sae-lens's format.

    Each file is written atomically; ``cfg.json`` is written last, so a folder with a
    ``cfg.json`` holds complete weights. Returns the folder.
    """
    if isinstance(sae, TrainingSAE):
        sae = to_inference_sae(sae)
    if not isinstance(sae, SAE):
        raise TypeError(f"save_sae expects a sae_lens SAE, got {type(sae).__name__}")
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.detach().cpu().contiguous() for k, v in sae.state_dict().items()}
    sae.process_state_dict_for_saving(state)
    cfg_path = folder / SAE_CFG_FILENAME
    if cfg_path.exists():
        cfg_path.unlink()
    with atomic_path(folder / SAE_WEIGHTS_FILENAME) as tmp:
        save_file(state, str(tmp))
    cfg = sae.cfg.to_dict()
    cfg["device"] = "cpu"
    write_json(cfg_path, cfg)
    return folder


def load_sae(folder: str | Path, device: str = "cpu", dtype: str | None = None) -> SAE[Any]:
    """Load an SAE written by :func:`save_sae` (or by sae-lens) with sae-lens's own loader.

    ``safetensors`` only; raises ``FileNotFoundError`` naming the missing file and
    :class:`~saelib.results.CorruptFileError` when ``cfg.json`` is not valid JSON.
    """
    folder = Path(folder)
    for name in (SAE_CFG_FILENAME, SAE_WEIGHTS_FILENAME):
        if not (folder / name).is_file():
            raise FileNotFoundError(f"{folder / name} does not exist: not a saved SAE folder "
                                    f"(expected {SAE_CFG_FILENAME} and {SAE_WEIGHTS_FILENAME})")
    try:
        json.loads((folder / SAE_CFG_FILENAME).read_text())
    except json.JSONDecodeError as e:
        raise CorruptFileError(f"{folder / SAE_CFG_FILENAME}: not valid JSON ({e})") from e
    sae = SAE.load_from_disk(folder, device=device, dtype=dtype)
    sae.eval()
    return sae
