"""SAEs of the grid (protocol §2): the architecture registry, training on cached activations,
L0 calibration, sae-lens-format save/load and the core reconstruction metrics.

``registry``  paper name -> sae-lens training/inference classes and sparsity knob
``train``     ``train_sae`` (resumable, folds centring/scaling into raw-input weights)
``calibrate`` L1 (and JumpReLU target) search so realised L0 lands within ±25 % of the target
``io``        ``save_sae`` / ``load_sae`` in sae-lens's on-disk format (safetensors)
``metrics``   ``reconstruction_metrics`` and the ``reconstruct`` used by model hooks
"""

from saelib.sae.calibrate import (CalibrationConfig, CalibrationKey, CalibrationResult, Probe,
                                  calibrate_sparsity)
from saelib.sae.io import load_sae, save_sae
from saelib.sae.metrics import ReconstructionMetrics, reconstruct, reconstruction_metrics
from saelib.sae.registry import ARCHITECTURES, ArchSpec, get_arch
from saelib.sae.train import (Schedule, TrainConfig, TrainResult, fold_to_raw, latest_checkpoint,
                              to_inference_sae, train_sae)

__all__ = [
    "ARCHITECTURES", "ArchSpec", "CalibrationConfig", "CalibrationKey", "CalibrationResult",
    "Probe", "ReconstructionMetrics", "Schedule", "TrainConfig", "TrainResult",
    "calibrate_sparsity", "fold_to_raw", "get_arch", "latest_checkpoint", "load_sae",
    "reconstruct", "reconstruction_metrics", "save_sae", "to_inference_sae", "train_sae",
]
