"""Training cases in memory, straight onto the network's grid (issue 17, the fast data path).

`spectdose dataset` writes each varied patient as a DICOM study, which training then reads
back, resamples onto the model grid and convolves again with kernels of the CT's voxel
size; one noise realisation per patient. Here a patient of
:mod:`spectdose.phantoms.variation` is painted directly on the model grid (its CT field of
view at the model spacing), so truth, labels (reference dose rate), density and DVK are all
computed there, with the kernels of that one grid (cached on disk by ``get_kernel`` and in
memory here); the noise-free projection and the attenuation of every view are computed
once per patient, and ``n_noise`` Poisson realisations share them, each reconstructed with
the patient's own OSEM settings (unchanged). No DICOM is written: evaluation and test
cases keep their studies (`spectdose dataset`), since evaluation goes through ingest.

Each case is what ``spectdose.learning.training.prepare_case`` returns (normalised
activity, density, DVK, label, sampling regions, cropped to the body) plus ``dvk_rr``, the
normalised DVK dose rate of the Richardson-Lucy recovered activity, when ``recovery`` is
given; arrays that do not depend on the noise (density, regions) are shared by the
realisations of one patient (the label is the same dose rate, normalised by each
realisation's own total activity).
"""

from __future__ import annotations

import dataclasses
import math
import time

import numpy as np

from spectdose.geometry import Volume, resample_to_grid

__all__ = ["FastPatient", "fast_training_cases", "model_grid_settings"]

_KERNELS: dict = {}  # (spacing, medium) -> kernel array, for the life of the process


def _kernel(spacing_mm, medium: str, cache_dir):
    from spectdose.kernels import get_kernel

    key = (tuple(round(float(s), 4) for s in spacing_mm), medium)
    if key not in _KERNELS:
        _KERNELS[key] = get_kernel(key[0], medium=medium, cache_dir=cache_dir).total_mgy_per_mbq_s
    return _KERNELS[key]


def model_grid_settings(settings, spacing_mm):
    """``settings`` with the CT grid replaced by the model grid over the same field of view."""
    extent = np.asarray(settings.ct_shape) * np.asarray(settings.ct_spacing_mm)
    shape = tuple(int(math.ceil(e / s - 1e-6)) for e, s in zip(extent, spacing_mm, strict=True))
    return dataclasses.replace(settings, ct_spacing_mm=tuple(float(s) for s in spacing_mm), ct_shape=shape)


@dataclasses.dataclass
class FastPatient:
    """The cases of one patient and what they cost (CPU seconds of this process)."""

    seed: int
    noise_seeds: list[int]
    cases: list[dict]
    cpu_s: dict[str, float]
    vois: dict[str, np.ndarray]  # boolean masks on the cropped model grid (evaluation)
    info: dict

    @property
    def cpu_s_per_realisation(self) -> float:
        return sum(self.cpu_s.values()) / max(1, len(self.cases))


def _reference_and_dvk_rate(activity, density, grid, medium_kernels, cache_dir, *, reference: bool):
    from spectdose.constants import LOW_DENSITY_CUTOFF_G_CM3
    from spectdose.dose import activity_mbq_per_voxel, dvk_dose_rate, fft_convolve
    from spectdose.reference import REFERENCE_MEDIA, medium_weights

    if not reference:
        return dvk_dose_rate(activity, density, _kernel(grid.spacing_mm, "soft", cache_dir), grid.voxel_volume_ml)
    # spectdose.reference.reference_dose_rate with the kernels of this grid held in memory
    activity_mbq = activity_mbq_per_voxel(activity, grid.voxel_volume_ml)
    rho = np.asarray(density, dtype=np.float32)
    safe_rho = np.maximum(rho, LOW_DENSITY_CUTOFF_G_CM3)
    dose = np.zeros(rho.shape, np.float32)
    for (medium, rho_m), weight in zip(REFERENCE_MEDIA, medium_weights(rho), strict=True):
        if np.any(weight):
            dose += weight * fft_convolve(activity_mbq, _kernel(grid.spacing_mm, medium, cache_dir)) * (np.float32(rho_m) / safe_rho)
    dose[rho < LOW_DENSITY_CUTOFF_G_CM3] = 0.0
    return dose * np.float32(1e-3)


# Evaluation regions (the VOI groups) kept with each patient.
_VOI_LABELS = ("kidney_left", "kidney_right", "healthy_liver", "spleen", "lumbar_vertebrae")


def fast_training_cases(
    seed: int,
    *,
    profile: str = "clinical",
    spacing_mm=(3.0, 1.953125, 1.953125),
    n_noise: int = 4,
    recovery: dict | None = None,
    kernel_cache=None,
    noise_seeds: list[int] | None = None,
    device: str = "cpu",
) -> FastPatient:
    """The ``n_noise`` training cases of varied patient ``seed`` (see the module docstring).

    Noise seed of realisation r: ``seed`` for r = 0 (as `spectdose dataset` draws it), else
    ``seed + 1_000_000 * r``; or ``noise_seeds``.
    """
    from spectdose.cnn.inference import Normalisation, body_box_yx, normalised_inputs
    from spectdose.cnn.recovery import richardson_lucy
    from spectdose.density import hu_to_density
    from spectdose.learning.training import sampling_regions
    from spectdose.phantoms.spect_sim import (
        SENSITIVITY_CPS_PER_MBQ,
        OsemReconstructor,
        mu_map_from_hu,
        noise_free_projection,
        noisy_counts,
    )
    from spectdose.phantoms.variation import draw_settings, make_varied_patient

    cpu: dict[str, float] = {}
    clock = [time.process_time()]

    def lap(name: str) -> None:
        now = time.process_time()
        cpu[name] = cpu.get(name, 0.0) + now - clock[0]
        clock[0] = now

    settings = model_grid_settings(draw_settings(seed, profile), spacing_mm)
    patient, _, _ = make_varied_patient(settings)
    grid = patient.hu.grid
    density = hu_to_density(patient.hu.array)  # as the pipeline: from the CT numbers
    lap("patient_on_model_grid")
    label_gy_s = _reference_and_dvk_rate(patient.activity_bq_per_ml.array, patient.density_g_cm3.array, grid, None, kernel_cache,
                                         reference=True)  # fmt: skip
    regions = sampling_regions(patient.labels, grid, grid, (1, 1, 1))
    lap("reference_dose_rate")
    proj = noise_free_projection(patient, settings.n_views, settings.collimator, settings.intrinsic_fwhm_140kev_mm / 10.0, device)
    lap("noise_free_projection")
    sg = patient.spect_grid
    mu = mu_map_from_hu(patient.hu, sg)
    psf = proj.psf_sigma_params_cm if settings.resolution_recovery else None
    osem = OsemReconstructor(mu.array, sg, proj.angles_deg, proj.orbit_radius_mm, psf, device, cache_attenuation=True)
    lap("attenuation_map")

    crop = (slice(None), *body_box_yx(density))  # the field inference runs the network on
    norm = Normalisation()
    density_c, regions_c, label_c = density[crop], regions[crop], label_gy_s[crop]
    seeds = noise_seeds if noise_seeds is not None else [seed if r == 0 else seed + 1_000_000 * r for r in range(n_noise)]
    cases = []
    for noise_seed in seeds:
        counts, view_s, _ = noisy_counts(proj.rate_views, patient.total_counts_target, noise_seed)
        recon_counts = osem(counts, settings.n_iters, settings.n_subsets)
        lap("osem")
        bq_per_count = 1e6 / (SENSITIVITY_CPS_PER_MBQ * view_s) / sg.voxel_volume_ml
        recon = Volume((recon_counts * bq_per_count).astype(np.float32), sg, "Bq/ml")
        activity = np.clip(resample_to_grid(recon, grid, quantity="intensive", interpolation="linear").array, 0.0, None)
        activity = activity.astype(np.float32)
        dvk = _reference_and_dvk_rate(activity, density, grid, None, kernel_cache, reference=False)
        a_n, rho_n, d_n, total_mbq = normalised_inputs(activity, density, dvk, grid.voxel_volume_ml, norm)
        if total_mbq <= 0:
            continue
        to_n = np.float32(norm.dose_scale_per_gy_s / total_mbq)
        case = {
            "activity": a_n[crop],
            "density": density_c,
            "dvk": d_n[crop],
            "label": (label_c * to_n).astype(np.float32),
            "regions": regions_c,
            "total_mbq": np.float64(total_mbq),
            "spacing_mm": np.asarray(grid.spacing_mm),
        }
        lap("dvk")
        if recovery is not None:
            rr = richardson_lucy(activity, grid.spacing_mm, fwhm_mm=float(recovery["fwhm_mm"]), iterations=int(recovery["iterations"]),
                                 smooth_mm=float(recovery.get("smooth_mm", 0.0)))  # fmt: skip
            rr_dvk = _reference_and_dvk_rate(rr, density, grid, None, kernel_cache, reference=False)
            case["dvk_rr"] = (rr_dvk[crop] * to_n).astype(np.float32)
            lap("recovery")
        cases.append(case)
    vois = {name: patient.labels[name][crop] for name in _VOI_LABELS if name in patient.labels and patient.labels[name].any()}
    for k, les in enumerate(patient.lesions):
        mask = patient.labels.get(f"lesion_{k + 1}")
        if mask is not None and mask.any():
            vois[f"lesion_{k + 1}_{les['volume_ml']:.1f}ml"] = mask[crop]
    info = {
        "seed": int(seed),
        "profile": profile,
        "hours_after_administration": round(settings.hours_after_administration, 2),
        "total_counts": settings.total_counts,
        "osem": f"{settings.n_iters}x{settings.n_subsets}",
        "resolution_recovery": settings.resolution_recovery,
        "spect_shape": list(settings.spect_shape),
        "model_grid_shape": list(grid.shape),
        "cropped_shape": list(label_c.shape),
    }
    return FastPatient(int(seed), list(seeds), cases, cpu, vois, info)
