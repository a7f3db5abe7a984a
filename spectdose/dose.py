"""Dose rate from activity by dose-voxel-kernel convolution, and its time integration.

The DVK method of the DblurDoseNet paper (Li et al., Med Phys 49 (2022) 1216): convolve the
activity per voxel with a soft-tissue kernel, scale each voxel by 1.04 / local density and
zero voxels below 0.1 g/cm^3 (air, where a dose to tissue means nothing).
"""

from __future__ import annotations

import math
import os
from typing import Literal

import numpy as np
import scipy.fft

from spectdose.constants import (
    KERNEL_MEDIUM_DENSITY_G_CM3,
    LOW_DENSITY_CUTOFF_G_CM3,
    LU177_HALF_LIFE_H,
)
from spectdose.errors import InputError
from spectdose.option_names import option_hint

__all__ = [
    "fft_convolve",
    "dvk_dose_rate",
    "activity_mbq_per_voxel",
    "time_integration_factor_s",
    "HANSCHEID_VALID_RANGE_H",
    "outside_model_range",
]



def activity_mbq_per_voxel(activity_bq_per_ml: np.ndarray, voxel_volume_ml: float) -> np.ndarray:
    """Activity concentration (Bq/ml) to activity per voxel (MBq), float32."""
    return (np.asarray(activity_bq_per_ml, dtype=np.float32) * np.float32(voxel_volume_ml * 1e-6)).astype(np.float32)


def _torch_device(device: str | None):
    import torch

    if device is None or device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def fft_convolve(
    image: np.ndarray,
    kernel: np.ndarray,
    *,
    backend: Literal["auto", "scipy", "torch"] = "auto",
    device: str | None = None,
    workers: int | None = None,
) -> np.ndarray:
    """Linear ('same'-size) convolution of a 3D image with an odd-shaped, centred kernel.

    Zero padding to fast FFT lengths avoids circular wrap-around. ``backend="auto"`` uses
    torch on CUDA when a GPU is present and scipy.fft (all cores) otherwise.
    """
    image = np.asarray(image, dtype=np.float32)
    kernel = np.asarray(kernel, dtype=np.float32)
    if image.ndim != 3 or kernel.ndim != 3:
        raise InputError("fft_convolve needs 3D image and kernel")
    if any(n % 2 == 0 for n in kernel.shape):
        raise InputError(f"kernel shape {kernel.shape} must be odd along every axis (centred source voxel)")
    if not np.any(image):
        return np.zeros_like(image)
    # Circular convolution of length N equals the linear one on the output window as long as
    # N >= n + k//2 (the kernel tail that wraps around lands outside the image), which is
    # cheaper than padding to the full n + k - 1.
    half = [k // 2 for k in kernel.shape]
    fast = [
        scipy.fft.next_fast_len(max(n + h, 2 * h + 1), real=True) for n, h in zip(image.shape, half, strict=True)
    ]
    # The kernel with its centre at index 0 (wrapped around), built in place: np.roll would copy the padded volume.
    wrapped = np.zeros(fast, dtype=np.float32)
    for src_z, dst_z in _wrap_ranges(kernel.shape[0], half[0], fast[0]):
        for src_y, dst_y in _wrap_ranges(kernel.shape[1], half[1], fast[1]):
            for src_x, dst_x in _wrap_ranges(kernel.shape[2], half[2], fast[2]):
                wrapped[dst_z, dst_y, dst_x] = kernel[src_z, src_y, src_x]
    crop = tuple(slice(0, n) for n in image.shape)

    use_torch = backend == "torch"
    if backend == "auto":
        try:
            import torch

            use_torch = torch.cuda.is_available() and device != "cpu"
        except ImportError:  # pragma: no cover - torch is a dependency
            use_torch = False
    if use_torch:
        import torch

        dev = _torch_device(device)
        with torch.no_grad():
            a = torch.from_numpy(image).to(dev)
            k = torch.from_numpy(wrapped).to(dev)
            spec = torch.fft.rfftn(a, s=fast) * torch.fft.rfftn(k)
            out = torch.fft.irfftn(spec, s=fast)[crop]
            return out.float().cpu().numpy()

    nworkers = workers if workers is not None else (os.cpu_count() or 1)
    # One padded volume and two spectra alive at most, each freed as soon as it is used (issue 20: memory).
    spec = scipy.fft.rfftn(wrapped, workers=nworkers, overwrite_x=True)
    del wrapped
    spec *= scipy.fft.rfftn(image, s=fast, workers=nworkers)
    out = scipy.fft.irfftn(spec, s=fast, workers=nworkers, overwrite_x=True)
    del spec
    return np.ascontiguousarray(out[crop], dtype=np.float32)


def _wrap_ranges(k: int, half: int, n: int) -> list[tuple[slice, slice]]:
    """(kernel slice, padded slice) pairs that put kernel index ``half`` at 0 and the part before
    it at the end of a length-``n`` axis: np.roll's placement without its copy."""
    return [(slice(half, k), slice(0, k - half))] + ([(slice(0, half), slice(n - half, n))] if half else [])


def dvk_dose_rate(
    activity_bq_per_ml: np.ndarray,
    density_g_cm3: np.ndarray,
    kernel_mgy_per_mbq_s: np.ndarray,
    voxel_volume_ml: float,
    *,
    backend: Literal["auto", "scipy", "torch"] = "auto",
    device: str | None = None,
) -> np.ndarray:
    """Dose rate in Gy/s on the activity's grid (float32), by the paper's DVK method.

    Parameters
    ----------
    activity_bq_per_ml : (z, y, x) activity concentration, Bq/ml.
    density_g_cm3 : (z, y, x) mass density on the same grid, g/cm^3.
    kernel_mgy_per_mbq_s : odd-shaped soft-tissue voxel S-values, mGy/(MBq s), same voxel size.
    voxel_volume_ml : volume of one voxel, ml.

    Notes
    -----
    D(x) = 1.04 / rho(x) * sum_s A_s S(x - s), and D = 0 where rho < 0.1 g/cm^3.
    Activity must not be negative (the pipeline clips the resampled SPECT at 0); the FFT's
    round-off, a few 1e-7 of the maximum either side of zero, is clipped at 0 too, so
    that an RT Dose never carries a negative value.
    """
    if activity_bq_per_ml.shape != density_g_cm3.shape:
        raise InputError(f"activity {activity_bq_per_ml.shape} and density {density_g_cm3.shape} grids differ")
    if not np.all(np.isfinite(activity_bq_per_ml)):
        raise InputError("activity map contains NaN or infinite values")
    if np.any(activity_bq_per_ml < 0):
        raise InputError("activity map has negative values; clip or correct them before dose calculation")
    activity_mbq = activity_mbq_per_voxel(activity_bq_per_ml, voxel_volume_ml)
    dose_mgy_per_s = fft_convolve(activity_mbq, kernel_mgy_per_mbq_s, backend=backend, device=device)
    del activity_mbq
    density = np.asarray(density_g_cm3, dtype=np.float32)
    # Slab by slab (no full-size scale volume): times 1.04e-3 / rho in tissue (mGy -> Gy), 0 below the cutoff.
    for k in range(density.shape[0]):
        tissue = density[k] >= LOW_DENSITY_CUTOFF_G_CM3
        scale = np.zeros_like(density[k])
        scale[tissue] = np.float32(KERNEL_MEDIUM_DENSITY_G_CM3 * 1e-3) / density[k][tissue]
        dose_mgy_per_s[k] *= scale
    np.maximum(dose_mgy_per_s, 0.0, out=dose_mgy_per_s)
    return dose_mgy_per_s


TimeModel = Literal["hanscheid", "physical", "effective"]

# Times after administration (h) for which the single-time-point formula D = Ddot(t) * 2t/ln2
# is used without an explicit acceptance. Hanscheid et al., J Nucl Med 59 (2018) 75-81 derived
# it for Lu-177 somatostatin analogues (kidneys, tumours) and found it adequate (about +-10 %)
# for measurements around 3-5 days; we take 2-7 days as the range, bracketing that optimum.
# The formula assumes T_eff = t: earlier, e.g. on day 1, it underestimates (our mono-exponential
# arithmetic: T_eff = 60 h, t = 24 h gives -39 %); much later it overestimates.
HANSCHEID_VALID_RANGE_H = (48.0, 168.0)


def outside_model_range(model: TimeModel, hours_since_administration: float) -> str | None:
    """Why the time model does not hold at this time, or None. Only the single-time-point model has a range."""
    if model != "hanscheid":
        return None
    lo, hi = HANSCHEID_VALID_RANGE_H
    if lo <= hours_since_administration <= hi:
        return None
    return (
        f"the Hanscheid single-time-point model is validated for about {lo:g}-{hi:g} h after administration "
        f"(Hanscheid et al., J Nucl Med 59 (2018) 75-81); this SPECT is at {hours_since_administration:.1f} h"
    )


def time_integration_factor_s(
    model: TimeModel,
    hours_since_administration: float | None,
    *,
    effective_half_life_h: float | None = None,
    allow_outside_model_range: bool = False,
) -> float:
    """Seconds by which to multiply a dose rate measured at time t to get absorbed dose.

    All three models assume a mono-exponential decline from administration with half-life
    T, uptake instantaneous, so that D = Ddot(t) * exp(ln2 t / T) * T / ln2:

    * ``hanscheid``: T = t, giving D = Ddot(t) * 2t / ln 2 (Hanscheid et al., J Nucl Med
      59 (2018) 75; about +-10 % for kidneys and tumours when t is 3-5 days);
    * ``physical``: T = 6.647 d, physical decay only: an upper bound (no biological washout);
    * ``effective``: T = a user-given effective half-life.

    The Hanscheid model is refused outside :data:`HANSCHEID_VALID_RANGE_H` unless
    ``allow_outside_model_range``.
    """
    if hours_since_administration is None:
        raise InputError(
            "time since administration is unknown: give "
            f"{option_hint('administration_datetime')} or {option_hint('hours_after_administration')}"
        )
    t_h = float(hours_since_administration)
    if not math.isfinite(t_h) or t_h <= 0:
        raise InputError(f"time from administration to acquisition must be positive, got {t_h:.2f} h")
    why = outside_model_range(model, t_h)
    if why and not allow_outside_model_range:
        raise InputError(
            f"{why}. Use a model that holds at this time ({option_hint('time_model')} physical, or effective "
            f"with {option_hint('effective_half_life_h')}), ask for the dose rate only ({option_hint('time_model')} "
            "none; the absorbed dose then comes from several time points), check the times, or accept the model "
            "outside its range with --accept time_outside_model_range (CLI) / accept=time_outside_model_range (REST)"
        )
    if model == "hanscheid":
        half_life_h = t_h
    elif model == "physical":
        half_life_h = LU177_HALF_LIFE_H
    elif model == "effective":
        if effective_half_life_h is None or not effective_half_life_h > 0:
            raise InputError("time model 'effective' needs a positive effective half-life in hours")
        if effective_half_life_h > LU177_HALF_LIFE_H * 1.0001:
            raise InputError(
                f"effective half-life {effective_half_life_h:.1f} h exceeds the Lu-177 physical half-life "
                f"{LU177_HALF_LIFE_H:.1f} h"
            )
        half_life_h = float(effective_half_life_h)
    else:
        raise InputError(f"unknown time model {model!r}: use hanscheid, physical or effective ({option_hint('time_model')})")
    lam_per_h = math.log(2) / half_life_h
    return math.exp(lam_per_h * t_h) / lam_per_h * 3600.0
