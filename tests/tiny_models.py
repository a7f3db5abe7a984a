"""An installed tiny DblurDoseNet (untrained) and its two-member ensemble, for tests of the CNN paths.

Untrained weights are enough where a test asserts what the pipeline does with a network's output
(zero in, zero out; a sigma map written, served and sent), not how good the output is.
"""

from __future__ import annotations

from pathlib import Path

# A coarse model grid keeps the network part of a test quick (as in tests/test_evaluate.py).
COARSE_MM = (6.0, 3.90625, 3.90625)


def install_tiny_cnn(folder: Path, name: str = "dblurdosenet", *, ensemble: bool = True) -> Path:
    """``folder/<name>.pt`` and, if asked, ``<name>_ensemble.pt`` beside it; returns the weights' path.

    The ensemble's relative floor makes sigma at least 5 % of the dose rate, so it is zero only
    where the dose rate is.
    """
    import torch

    from spectdose.cnn.inference import (
        Normalisation,
        SigmaCalibration,
        TrainedModel,
        save_ensemble,
        save_model,
    )
    from spectdose.cnn.model import TINY, DblurDoseNet

    def member(seed: int) -> TrainedModel:
        torch.manual_seed(seed)
        return TrainedModel(DblurDoseNet(TINY).eval(), TINY, Normalisation(), COARSE_MM, f"m{seed}", {})

    folder.mkdir(parents=True, exist_ok=True)
    weights = member(3)
    path = folder / f"{name}.pt"
    save_model(path, weights.net, normalisation=weights.normalisation, spacing_mm=COARSE_MM, name=name, metadata={})
    if ensemble:
        save_ensemble(
            folder / f"{name}_ensemble.pt",
            [member(1), member(2)],
            SigmaCalibration(scale=1.5, rel_floor=0.05),
            name=f"{name}_ensemble",
            metadata={},
        )
    return path
