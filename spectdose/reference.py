"""Reference dose rate from the *true* activity: the labels DblurDoseNet learns from.

The paper's labels were full Monte Carlo (DPM) on the true activity and density. We have
no voxel Monte Carlo fast enough for 34-million-voxel patients on a CPU, so the reference
is a multi-medium kernel superposition, better than the DVK baseline in two ways:

1. it starts from the true activity at CT resolution, not the blurred, noisy SPECT;
2. the target voxel's medium picks the kernel: lung (ICRP lung, 0.26 g/cm^3), soft tissue
   (1.04) and compact bone (1.85), each computed by our Monte Carlo in that medium, so the
   electron range changes with the medium instead of the dose simply scaling by
   1.04/density. (In lung the self-voxel S-value is about half what 1.04/rho scaling of the
   soft-tissue kernel gives.) Between anchor densities the doses of the two neighbouring
   media are blended linearly in density, each scaled by its medium's density over the
   local density (mass scaling within a medium).

What it still ignores: the *source* medium and the path between source and target (a
lung-soft-tissue interface is treated from the target's side only). A voxel Monte Carlo
would handle that; this engine is the most accurate the project has.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from spectdose.constants import LOW_DENSITY_CUTOFF_G_CM3
from spectdose.dose import activity_mbq_per_voxel, fft_convolve
from spectdose.geometry import Volume
from spectdose.kernels import MEDIUM_DENSITY_G_CM3, get_kernel

__all__ = ["REFERENCE_MEDIA", "medium_weights", "reference_dose_rate"]

# (kernel medium, its density g/cm^3): densities from spectdose.kernels._mc.MEDIA
REFERENCE_MEDIA: tuple[tuple[str, float], ...] = tuple((m, MEDIUM_DENSITY_G_CM3[m]) for m in ("lung", "soft", "bone"))


def medium_weights(density_g_cm3: np.ndarray) -> list[np.ndarray]:
    """Per-voxel weights of each reference medium (sum to 1): linear in density between anchors."""
    rho = np.asarray(density_g_cm3, dtype=np.float32)
    anchors = np.array([d for _, d in REFERENCE_MEDIA], dtype=np.float32)
    weights = []
    for m in range(len(anchors)):
        w = np.zeros_like(rho)
        if m == 0:
            w[rho <= anchors[0]] = 1.0
        else:
            lo, hi = anchors[m - 1], anchors[m]
            sel = (rho > lo) & (rho <= hi)
            w[sel] = (rho[sel] - lo) / (hi - lo)
        if m + 1 < len(anchors):
            lo, hi = anchors[m], anchors[m + 1]
            sel = (rho > lo) & (rho < hi)
            w[sel] = (hi - rho[sel]) / (hi - lo)
        else:
            w[rho > anchors[m]] = 1.0
        weights.append(w)
    return weights


def reference_dose_rate(
    activity_bq_per_ml: Volume,
    density_g_cm3: Volume,
    *,
    cache_dir: Path | None,
    device: str | None = None,
) -> tuple[Volume, dict]:
    """Dose rate (Gy/s) on the activity's grid by multi-medium kernel superposition."""
    grid = activity_bq_per_ml.grid
    activity_mbq = activity_mbq_per_voxel(activity_bq_per_ml.array, grid.voxel_volume_ml)
    rho = np.asarray(density_g_cm3.array, dtype=np.float32)
    safe_rho = np.maximum(rho, LOW_DENSITY_CUTOFF_G_CM3)
    dose_mgy_per_s = np.zeros(rho.shape, np.float32)
    info = {"engine": "multi-medium kernel superposition on the true activity", "media": []}
    for (medium, rho_m), weight in zip(REFERENCE_MEDIA, medium_weights(rho), strict=True):
        if not np.any(weight):
            continue
        kernel = get_kernel(grid.spacing_mm, medium=medium, cache_dir=cache_dir)
        conv = fft_convolve(activity_mbq, kernel.total_mgy_per_mbq_s, device=device)
        dose_mgy_per_s += weight * conv * (np.float32(rho_m) / safe_rho)
        info["media"].append({"medium": medium, "density_g_cm3": rho_m, "kernel_shape": list(kernel.total_mgy_per_mbq_s.shape)})
    dose_mgy_per_s[rho < LOW_DENSITY_CUTOFF_G_CM3] = 0.0
    return Volume(dose_mgy_per_s * np.float32(1e-3), grid, "Gy/s"), info
