"""Simulated Lu-177 SPECT of a virtual patient: projection, Poisson noise, OSEM.

Projection (our own, on a grid finer than the reconstruction's): the true activity and
attenuation map are sampled from the continuous anatomy on a grid of half the SPECT voxel
size, rotated to each view (the same kornia rotation PyTomography uses), attenuated along
the ray to the detector at 208 keV, blurred with the depth-dependent Gaussian collimator-
detector response of a Siemens medium-energy collimator (incremental blurring, exact
variance per plane) and summed; the projections are then binned 2 x 2 to 4.8 mm pixels.
Reconstruction (PyTomography 3.4): OSEM with attenuation correction (mu map from the CT,
not from the truth) and the same collimator response model, on the 4.8 mm grid.

Not simulated: scatter, septal penetration, dead time, patient motion, decay during the
acquisition. Counts are primary 208 keV photons only.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.util
import io
import math
import time
import warnings
from collections.abc import Sequence
from pathlib import Path
from types import SimpleNamespace

import numpy as np

from spectdose.density import hu_to_density
from spectdose.errors import InputError
from spectdose.geometry import Grid, Volume, resample_to_grid
from spectdose.phantoms.anatomy import TISSUES, VirtualPatient, sample_patient

__all__ = [
    "SimulatedSpect",
    "NoiseFreeProjection",
    "noise_free_projection",
    "noisy_counts",
    "OsemReconstructor",
    "simulate_spect",
    "ideal_spect",
    "mass_attenuation_cm2_g",
    "mu_map_from_hu",
    "SENSITIVITY_CPS_PER_MBQ",
    "PHOTOPEAK_KEV",
    "ENERGY_WINDOW_KEV",
    "COLLIMATOR",
    "INTRINSIC_FWHM_140KEV_CM",
    "collimator_geometry_cm",
]

# Lu-177 gamma used for imaging: 208.366 keV, 10.4 % (ICRP-107).
PHOTOPEAK_KEV = 208.4
# 20 % photopeak window centred on 208 keV (as in the paper and the MRTDosimetry
# multicentre protocol, Tran-Gia et al., EJNMMI Phys 8 (2021) 55): 187.2-228.8 keV.
ENERGY_WINDOW_KEV = (187.2, 228.8)
# Siemens medium-energy low-penetration parallel-hole collimator; geometry from the SIMIND
# collimator database shipped with PyTomography (code "SY-ME": hole 0.294 cm, septa
# 0.114 cm, length 4.064 cm).
COLLIMATOR = "SY-ME"
# Intrinsic resolution of a NaI(Tl) gamma camera, ~3.8 mm FWHM at 140 keV (Siemens Symbia
# specification), scaled to 208 keV as E^-1/2 by PyTomography.
INTRINSIC_FWHM_140KEV_CM = 0.38
# System sensitivity per detector view in the 20 % 208 keV window, counts/s per MBq in
# air. Published 177Lu calibration factors with ME collimators are ~5-10 cps/MBq (e.g.
# 5.67 cps/MBq SPECT, 6.11 planar: Santoro et al., EJNMMI Res 8 (2018) 103); we use 6.0.
# It only sets the count-to-activity scale: the total counts are chosen, and the view
# duration follows from them.
SENSITIVITY_CPS_PER_MBQ = 6.0
# Lead, 11.35 g/cm^3 (NIST), for the collimator's effective hole length.
_LEAD_DENSITY_G_CM3 = 11.35
# Radius of the circular orbit: the patient's (and couch's) largest radial extent plus a
# clearance margin.
_ORBIT_CLEARANCE_MM = 20.0
# Views projected at once: about this many voxels of the padded fine grid per batch
# (peak memory ~ 16 bytes per voxel).
_PROJECTOR_BATCH_VOXELS = 6e7


@dataclasses.dataclass
class SimulatedSpect:
    """A reconstructed SPECT and how it was made.

    ``recon`` is activity concentration in Bq/ml at the acquisition start on the SPECT grid.
    ``recon_counts`` holds the same image as reconstructed counts per view and voxel:
    ``A_voxel[MBq] = recon_counts / (sensitivity_cps_per_mbq * view_duration_s)``.
    ``projections`` are the noisy counts, shape (views, transaxial, axial) in PyTomography's
    layout (axial from the grid's first slice).
    """

    recon: Volume
    recon_counts: Volume
    projections: np.ndarray
    total_counts: int
    expected_total_counts: float
    view_duration_s: float
    sensitivity_cps_per_mbq: float
    angles_deg: np.ndarray
    orbit_radius_mm: float
    n_iters: int
    n_subsets: int
    projection_grid: Grid
    true_activity_in_fov_bq: float
    psf_sigma_params_cm: tuple[float, float, float]
    device: str
    seed: int
    timings_s: dict[str, float]
    collimator: str = COLLIMATOR
    energy_window_kev: tuple[float, float] = ENERGY_WINDOW_KEV
    photopeak_kev: float = PHOTOPEAK_KEV
    intrinsic_fwhm_140kev_cm: float = INTRINSIC_FWHM_140KEV_CM
    # whether OSEM modelled the collimator-detector response ("resolution recovery")
    resolution_recovery: bool = True

    def fwhm_mm_at(self, distance_mm: float) -> float:
        """System FWHM (collimator + intrinsic) at ``distance_mm`` from the collimator face."""
        return float(_sigma_cm(np.asarray(distance_mm / 10.0), self.psf_sigma_params_cm)) * 10.0 * 2.0 * math.sqrt(2.0 * math.log(2.0))

    @property
    def n_views(self) -> int:
        return len(self.angles_deg)


# ---------------------------------------------------------------------------------------
# Attenuation coefficients
# ---------------------------------------------------------------------------------------
def _nist_table(material: str) -> tuple[np.ndarray, np.ndarray]:
    """(energy MeV, mu/rho cm^2/g) of a NIST material table shipped with PyTomography
    (Hubbell & Seltzer, NIST Standard Reference Database 126). Read as a data file: the
    package itself is not imported here (it changes global state at import)."""
    spec = importlib.util.find_spec("pytomography")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("PyTomography is not installed: it provides the NIST attenuation tables and OSEM")
    path = Path(spec.submodule_search_locations[0]) / "data" / "NIST_attenuation_data" / f"{material}.csv"
    rows = []
    for line in path.read_text().splitlines()[1:]:
        fields = line.split()
        if len(fields) >= 3:
            rows.append([float(v) for v in fields[-3:-1]])
    table = np.asarray(rows)
    return table[:, 0], table[:, 1]


def mass_attenuation_cm2_g(material: str, energy_kev: float = PHOTOPEAK_KEV) -> float:
    """Total mass attenuation coefficient (with coherent scattering) of ``material``.

    Log-log interpolation of the NIST table (e.g. water 0.1353 cm^2/g at 208.4 keV, cf.
    0.1350 of the NIST XCOM web table). ``"spongiosa"`` is a mixture: 1.18 g/cm^3 of
    cortical bone (1.92) in marrow-like soft tissue (1.03), 27.5 % bone by mass.
    """
    if material == "spongiosa":
        w_bone = (1.18 - 1.03) / (1.92 - 1.03) * 1.92 / 1.18
        return (1 - w_bone) * mass_attenuation_cm2_g("muscle", energy_kev) + w_bone * mass_attenuation_cm2_g(
            "bonecortical", energy_kev
        )
    energy_mev, mu_rho = _nist_table(material)
    order = np.argsort(energy_mev, kind="stable")
    e, m = energy_mev[order], mu_rho[order]
    keep = np.concatenate([[True], np.diff(e) > 0])  # absorption edges repeat an energy
    return float(np.exp(np.interp(np.log(energy_kev / 1000.0), np.log(e[keep]), np.log(m[keep]))))


def _tissue_mu_lut(energy_kev: float) -> np.ndarray:
    """Linear attenuation coefficient (cm^-1) per tissue code of :data:`TISSUES`."""
    lut = np.zeros(256, dtype=np.float32)
    for code, rho, material in TISSUES.values():
        lut[code] = rho * mass_attenuation_cm2_g(material, energy_kev)
    return lut


def mu_map_from_hu(hu: Volume, target: Grid, energy_kev: float = PHOTOPEAK_KEV) -> Volume:
    """Attenuation map (cm^-1) on ``target`` from a CT in HU, as a clinical system makes it.

    HU -> density by the Schneider 2000 curve; mu/rho of muscle up to 1.05 g/cm^3, then
    mixed towards cortical bone by mass fraction; smoothed (sigma 2 mm) and resampled.
    """
    from scipy import ndimage

    rho = hu_to_density(hu.array)
    mu_soft = mass_attenuation_cm2_g("muscle", energy_kev)
    mu_bone = mass_attenuation_cm2_g("bonecortical", energy_kev)
    w_bone = np.clip((rho - 1.05) / (1.92 - 1.05), 0.0, 1.0) * 1.92 / np.maximum(rho, 1e-3)
    mu = rho * ((1.0 - w_bone) * mu_soft + w_bone * mu_bone)
    sigma_vox = [2.0 / s for s in hu.grid.spacing_mm]
    mu = ndimage.gaussian_filter(mu.astype(np.float32), sigma_vox)
    out = resample_to_grid(Volume(mu, hu.grid, "1/cm"), target, quantity="intensive", fill_value=0.0)
    return Volume(np.maximum(out.array, 0.0).astype(np.float32), target, "1/cm")


# ---------------------------------------------------------------------------------------
# PyTomography, imported lazily and with its side effects undone
# ---------------------------------------------------------------------------------------
@contextlib.contextmanager
def _undo_import_side_effects():
    """PyTomography's imports silence all warnings, set numpy's error state to "ignore"
    and print to stdout; keep the caller's process as it was."""
    saved_filters = list(warnings.filters)
    saved_np = np.geterr()
    try:
        with contextlib.redirect_stdout(io.StringIO()):
            yield
    finally:
        warnings.filters[:] = saved_filters
        np.seterr(**saved_np)


def _import_pytomography() -> SimpleNamespace:
    """The PyTomography pieces the reconstruction uses (imported on first need only)."""
    with _undo_import_side_effects():
        import pytomography
        from pytomography.algorithms import OSEM
        from pytomography.likelihoods import PoissonLogLikelihood
        from pytomography.metadata.SPECT import SPECTObjectMeta, SPECTProjMeta
        from pytomography.projectors.SPECT import SPECTSystemMatrix
        from pytomography.transforms import Transform
        from pytomography.transforms.SPECT import SPECTAttenuationTransform
    return SimpleNamespace(
        module=pytomography,
        OSEM=OSEM,
        PoissonLogLikelihood=PoissonLogLikelihood,
        SPECTObjectMeta=SPECTObjectMeta,
        SPECTProjMeta=SPECTProjMeta,
        SPECTSystemMatrix=SPECTSystemMatrix,
        Transform=Transform,
        SPECTAttenuationTransform=SPECTAttenuationTransform,
    )


def collimator_geometry_cm(collimator: str = COLLIMATOR) -> tuple[float, float]:
    """(hole diameter, hole length) in cm of a parallel-hole collimator of the SIMIND
    collimator database shipped with PyTomography (e.g. "SY-ME", "GI-MEGP", "PB-MEGP")."""
    spec = importlib.util.find_spec("pytomography")
    if spec is None or not spec.submodule_search_locations:
        raise InputError("PyTomography is not installed: it provides the collimator database and OSEM")
    table = Path(spec.submodule_search_locations[0]) / "data" / "collim.col"
    for line in table.read_text().splitlines():
        fields = line.split()
        if fields and fields[0] == f"*{collimator}":
            return float(fields[1]), float(fields[3])
    raise InputError(f"collimator {collimator!r} not found in PyTomography's collimator database")


def _psf_sigma_params(
    energy_kev: float, collimator: str = COLLIMATOR, intrinsic_fwhm_140kev_cm: float = INTRINSIC_FWHM_140KEV_CM
) -> tuple[float, float, float]:
    """(a, b, c) of sigma(d) = sqrt((a d + b)^2 + c^2), cm, for ``collimator`` (default
    :data:`COLLIMATOR`) and an intrinsic resolution given at 140 keV.

    Geometric response of a parallel-hole collimator, FWHM = D (1 + d / L_eff) with the
    effective length L_eff = L - 2 / mu_Pb (Anger; Cherry, Sorenson & Phelps, Physics in
    Nuclear Medicine, ch. 14), as PyTomography's ``get_psfmeta_from_scanner_params`` does,
    but with mu_Pb from the NIST table by log-log interpolation (PyTomography fits a curve
    over 50-550 keV across the K edge). Intrinsic FWHM scales as E^-1/2 from 140 keV.
    """
    hole_cm, length_cm = collimator_geometry_cm(collimator)
    mu_lead = _LEAD_DENSITY_G_CM3 * mass_attenuation_cm2_g("lead", energy_kev)
    fwhm_to_sigma = 1.0 / (2.0 * math.sqrt(2.0 * math.log(2.0)))
    a = hole_cm / (length_cm - 2.0 / mu_lead) * fwhm_to_sigma
    b = hole_cm * fwhm_to_sigma
    c = intrinsic_fwhm_140kev_cm * (energy_kev / 140.0) ** -0.5 * fwhm_to_sigma
    return a, b, c


def _sigma_cm(distance_cm: np.ndarray, params: tuple[float, float, float]) -> np.ndarray:
    a, b, c = params
    return np.sqrt((a * distance_cm + b) ** 2 + c**2)


def _pad_size(width: int) -> int:
    # PyTomography's compute_pad_size: room for any rotation of the square grid.
    return int(np.ceil((np.sqrt(2) * width - width) / 2))


def _plane_distances_cm(n_planes: int, radius_cm: float, dx_cm: float) -> np.ndarray:
    # PyTomography's get_distance: plane i to the detector at +x; clipped at 0.
    if n_planes % 2 == 0:
        d = radius_cm + (n_planes / 2 - np.arange(n_planes) - 0.5) * dx_cm
    else:
        d = radius_cm + ((n_planes - 1) / 2 - np.arange(n_planes)) * dx_cm
    return np.maximum(d, 0.0)


def _gaussian_mtf(sigma_px: np.ndarray, nz: int, ny: int, device):
    """Per-plane Gaussian transfer functions exp(-2 pi^2 sigma^2 f^2) on a (z, y) detector
    grid zero-padded in z by 3 sigma (y is already padded for rotation): [X, Zf, Yf]."""
    import torch

    nz_fft = nz + int(np.ceil(3.0 * float(np.max(sigma_px)))) + 1
    f2 = torch.fft.fftfreq(nz_fft, device=device)[:, None] ** 2 + torch.fft.rfftfreq(ny, device=device)[None, :] ** 2
    sig2 = torch.as_tensor(np.asarray(sigma_px) ** 2, dtype=torch.float32, device=device)[:, None, None]
    return torch.exp(-2.0 * math.pi**2 * sig2 * f2[None]), nz_fft


def _project(obj_xyz, mu_xyz, dx_cm: float, angles_deg: np.ndarray, radius_cm: float, psf: tuple, device):
    """Attenuated, depth-blurred parallel-hole projections of ``obj_xyz`` ([x, y, z]).

    Same geometry as PyTomography's SPECTSystemMatrix (object padded for rotation, rotated
    by -(270 - angle) with kornia, detector at +x, attenuation exp(-sum mu dx) counting
    half the own voxel). The collimator-detector response is applied in Fourier space:
    each plane parallel to the detector is multiplied by the Gaussian transfer function
    exp(-2 pi^2 sigma(d)^2 f^2) of its own distance d, and the planes are summed there
    (exact Gaussian variance per plane; zero-padded against wrap-around). Cubic voxels.
    Returns (views, y, z).
    """
    import torch
    from kornia.geometry.transform import rotate

    nx = obj_xyz.shape[0]
    pad = _pad_size(nx)
    pad_spec = [0, 0, pad, pad, pad, pad]
    obj = torch.nn.functional.pad(obj_xyz.to(device), pad_spec)  # [X, Y, Z]
    mu = torch.nn.functional.pad(mu_xyz.to(device), pad_spec)
    n_planes, ny_p, nz = obj.shape
    both = torch.cat([obj, mu * dx_cm], dim=2).permute(2, 0, 1).unsqueeze(0)  # kornia [1, 2Z, X, Y]
    del obj, mu
    sigma_px = _sigma_cm(_plane_distances_cm(n_planes, radius_cm, dx_cm), psf) / dx_cm
    mtf, nz_fft = _gaussian_mtf(sigma_px, nz, ny_p, device)  # [X, Zf, Yf]
    batch = max(1, int(_PROJECTOR_BATCH_VOXELS // (n_planes * ny_p * nz)))
    out = []
    for start in range(0, len(angles_deg), batch):
        ang = torch.tensor(angles_deg[start : start + batch], dtype=torch.float32, device=device)
        b = len(ang)
        r = rotate(both.expand(b, -1, -1, -1), -(270.0 - ang), mode="bilinear")  # [B, 2Z, X, Y]
        o, m = r[:, :nz], r[:, nz:]
        # Only the planes between the first and last that emit (the body, often a third of the
        # padded width) are attenuated, transformed and blurred: the others add exact zeros.
        emitting = torch.nonzero(o.amax(dim=(0, 1, 3)) > 0).flatten()
        if emitting.numel() == 0:
            out.append(torch.zeros((b, ny_p - 2 * pad, nz), dtype=obj_xyz.dtype))
            continue
        lo, hi = int(emitting[0]), int(emitting[-1]) + 1
        m_in = m[:, :, lo:hi]
        # mu integrated from each voxel to the detector (+X), counting half the own voxel; the
        # planes beyond the last emitting one (towards the detector) attenuate all alike
        beyond = m[:, :, hi:].sum(dim=2, keepdim=True)
        path = torch.cumsum(m_in, dim=2).neg_().add_(m_in.sum(dim=2, keepdim=True)).add_(m_in, alpha=0.5).add_(beyond)
        o = (o[:, :, lo:hi] * torch.exp_(path.neg_())).permute(0, 2, 1, 3)  # [B, X', Z, Y]
        del r, m, m_in, path
        spectrum = torch.fft.rfft2(o, s=(nz_fft, ny_p))  # [B, X', Zf, Yf]
        del o
        proj = torch.fft.irfft2((spectrum * mtf[lo:hi]).sum(dim=1), s=(nz_fft, ny_p))[:, :nz, :]  # [B, Z, Y]
        del spectrum
        out.append(proj.clamp_(min=0.0).permute(0, 2, 1)[:, pad:-pad, :].cpu())  # [B, Y, Z]
    return torch.cat(out, dim=0)


def _bin2(proj, factor: int):
    """Sum ``factor x factor`` blocks of detector pixels (views, y, z)."""
    v, ny, nz = proj.shape
    return proj.reshape(v, ny // factor, factor, nz // factor, factor).sum(dim=(2, 4))


def _orbit_radius_mm(fine_tissue: np.ndarray, grid: Grid) -> float:
    occupied = np.any(fine_tissue != TISSUES["air"][0], axis=0)  # (y, x)
    j, i = np.nonzero(occupied)
    y = grid.origin_mm[1] + j * grid.spacing_mm[1]
    x = grid.origin_mm[0] + i * grid.spacing_mm[2]
    return float(np.ceil(np.sqrt(x**2 + y**2).max() + _ORBIT_CLEARANCE_MM))


# ---------------------------------------------------------------------------------------
# The simulation
# ---------------------------------------------------------------------------------------
def simulate_spect(patient: VirtualPatient, *, seed: int | None = None, **kwargs) -> SimulatedSpect:
    """Project, add Poisson noise at the patient's total counts, reconstruct with OSEM
    (parameters: :func:`simulate_spect_realisations`, with one noise ``seed``)."""
    return simulate_spect_realisations(patient, None if seed is None else [seed], **kwargs)[0]


def simulate_spect_realisations(
    patient: VirtualPatient,
    noise_seeds: Sequence[int] | None = None,
    *,
    device: str | None = None,
    n_iters: int | None = None,
    n_subsets: int | None = None,
    n_views: int | None = None,
    num_threads: int | None = None,
    collimator: str = COLLIMATOR,
    intrinsic_fwhm_140kev_cm: float = INTRINSIC_FWHM_140KEV_CM,
    resolution_recovery: bool = True,
) -> list[SimulatedSpect]:
    """Noise realisations of one patient's SPECT that share its noise-free projection and
    OSEM system matrix (computed once: a third of one realisation's cost is the projection).

    Parameters
    ----------
    patient : VirtualPatient
    device : str, optional
        torch device for projection and reconstruction ("cpu", "cuda"); default CUDA when
        available, else CPU.
    n_iters, n_subsets : int, optional
        OSEM settings; default from the patient's size (clinical 8 x 8, small 6 x 8).
    noise_seeds : sequence of int, optional
        Seeds of the Poisson noise, one image each; default ``[patient.seed]`` (a different
        seed gives another noise realisation of the same patient).
    n_views : int, optional
        Views over 360 degrees; default from the size (clinical 128).
    num_threads : int, optional
        torch CPU threads during the call (restored afterwards). Default on CPU: 1 —
        PyTomography's many small operations gain little from threads and slow down
        several-fold when the cores are shared (measured on a loaded 2-core machine:
        6 OSEM iterations of the small phantom 13 s with 1 thread, 75 s with 2).
    collimator, intrinsic_fwhm_140kev_cm : optional
        The camera: a parallel-hole collimator of PyTomography's SIMIND database and the
        intrinsic FWHM (cm at 140 keV); default Siemens ME, 0.38 cm.
    resolution_recovery : bool
        Model the collimator-detector response in OSEM (default) or not (attenuation only).

    Raises
    ------
    InputError
        Non-positive iterations, subsets or views, or more subsets than views.
    """
    import torch

    spec = patient.size_spec
    n_iters = spec.n_iters if n_iters is None else int(n_iters)
    n_subsets = spec.n_subsets if n_subsets is None else int(n_subsets)
    n_views = spec.n_views if n_views is None else int(n_views)
    if n_iters < 1 or n_subsets < 1 or n_views < 4 or n_subsets > n_views:
        raise InputError(f"OSEM needs iterations >= 1, views >= 4 and 1 <= subsets <= views; got {n_iters}, {n_subsets}, {n_views}")
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    seeds = [patient.seed] if noise_seeds is None else [int(q) for q in noise_seeds]
    if not seeds:
        raise InputError("noise_seeds is empty: give at least one noise realisation")
    if num_threads is None:
        num_threads = 1 if str(device).startswith("cpu") else torch.get_num_threads()
    if num_threads < 1:
        raise InputError(f"num_threads must be >= 1, got {num_threads}")
    previous_threads = torch.get_num_threads()
    torch.set_num_threads(int(num_threads))
    try:
        camera = (str(collimator), float(intrinsic_fwhm_140kev_cm), bool(resolution_recovery))
        return _simulate(patient, device, n_iters, n_subsets, n_views, seeds, camera)
    finally:
        torch.set_num_threads(previous_threads)


def ideal_spect(patient: VirtualPatient, *, view_duration_s: float = 20.0, n_views: int | None = None) -> SimulatedSpect:
    """A camera without noise or blur: the true activity averaged onto the SPECT grid.

    For tests of what follows the camera (registration, time integration, the CLI) in
    seconds instead of a projection and OSEM. Marked as such: ``n_iters == n_subsets == 0``,
    no projections, counts as the expected ones of ``view_duration_s`` per view.
    """
    from spectdose.dose_grid import average_onto_grid
    from spectdose.errors import GeometryError

    sg = patient.spect_grid
    t0 = time.perf_counter()
    try:
        recon = average_onto_grid(patient.activity_bq_per_ml, sg).array
    except GeometryError:  # a SPECT grid wider than the CT (clinical size): point samples
        recon = resample_to_grid(patient.activity_bq_per_ml, sg).array
    recon = np.clip(recon, 0.0, None).astype(np.float32)
    n_views = patient.size_spec.n_views if n_views is None else int(n_views)
    counts_per_view = recon * np.float32(sg.voxel_volume_ml * 1e-6 * SENSITIVITY_CPS_PER_MBQ * view_duration_s)
    true_bq = float(recon.sum() * sg.voxel_volume_ml)
    return SimulatedSpect(
        recon=Volume(recon, sg, "Bq/ml"),
        recon_counts=Volume(counts_per_view.astype(np.float32), sg, "counts"),
        projections=np.zeros((0, 0, 0), np.float32),
        total_counts=int(round(float(counts_per_view.sum()) * n_views)),
        expected_total_counts=float(counts_per_view.sum()) * n_views,
        view_duration_s=float(view_duration_s),
        sensitivity_cps_per_mbq=SENSITIVITY_CPS_PER_MBQ,
        angles_deg=np.arange(n_views) * 360.0 / n_views,
        orbit_radius_mm=0.0,
        n_iters=0,
        n_subsets=0,
        projection_grid=sg,
        true_activity_in_fov_bq=true_bq,
        psf_sigma_params_cm=(0.0, 0.0, 0.0),
        device="cpu",
        seed=patient.seed,
        timings_s={"total": time.perf_counter() - t0},
    )


@dataclasses.dataclass
class NoiseFreeProjection:
    """Expected count rates (cps per detector pixel, binned to the SPECT pixel) of every view:
    what all noise realisations of one patient share."""

    rate_views: np.ndarray  # (views, transaxial, axial), float64
    angles_deg: np.ndarray
    orbit_radius_mm: float
    psf_sigma_params_cm: tuple[float, float, float]
    fine_grid: Grid
    true_activity_in_fov_bq: float
    timings_s: dict[str, float]


def noise_free_projection(
    patient: VirtualPatient, n_views: int, collimator: str = COLLIMATOR,
    intrinsic_fwhm_140kev_cm: float = INTRINSIC_FWHM_140KEV_CM, device: str = "cpu",
) -> NoiseFreeProjection:  # fmt: skip
    """Sample the truth on the 2x finer grid and project it (attenuation, depth-dependent blur)."""
    import torch

    spec = patient.size_spec
    timings: dict[str, float] = {}
    t0 = time.perf_counter()
    sg = patient.spect_grid
    os_ = spec.oversample
    fine_spacing = sg.spacing_mm[0] / os_
    shift = 0.5 * (sg.spacing_mm[0] - fine_spacing)
    fine_grid = Grid(
        tuple(n * os_ for n in sg.shape),
        (fine_spacing,) * 3,
        tuple(o - shift for o in sg.origin_mm),
        frame_of_reference_uid=sg.frame_of_reference_uid,
    )
    fine = sample_patient(patient.anatomy, fine_grid, patient.pose, oversample=False)
    mu_fine = _tissue_mu_lut(PHOTOPEAK_KEV)[fine.tissue]
    true_bq = float(fine.activity_bq_per_ml.sum() * fine_grid.voxel_volume_ml)
    radius_mm = _orbit_radius_mm(fine.tissue, fine_grid)
    timings["truth_on_projection_grid"] = time.perf_counter() - t0

    t1 = time.perf_counter()
    psf = _psf_sigma_params(PHOTOPEAK_KEV, collimator, intrinsic_fwhm_140kev_cm)
    angles = np.arange(n_views) * 360.0 / n_views
    rate_cps = fine.activity_bq_per_ml * (fine_grid.voxel_volume_ml * 1e-6 * SENSITIVITY_CPS_PER_MBQ)
    to_xyz = (2, 1, 0)  # our (z, y, x) -> PyTomography [x, y, z]
    with torch.no_grad():
        proj_fine = _project(
            torch.from_numpy(np.ascontiguousarray(rate_cps.transpose(to_xyz))),
            torch.from_numpy(np.ascontiguousarray(mu_fine.transpose(to_xyz))),
            fine_spacing / 10.0,
            angles,
            radius_mm / 10.0,
            psf,
            device,
        )
        rate_views = _bin2(proj_fine.double(), os_).numpy()
    del fine, mu_fine, proj_fine
    if float(rate_views.sum()) <= 0:
        raise InputError("the virtual patient has no activity in the SPECT field of view")
    timings["projection"] = time.perf_counter() - t1
    return NoiseFreeProjection(rate_views, angles, radius_mm, psf, fine_grid, true_bq, timings)


def noisy_counts(rate_views: np.ndarray, total_counts_target: float, seed: int) -> tuple[np.ndarray, float, np.ndarray]:
    """(Poisson counts float32, view duration s, expected counts) of one noise realisation."""
    # the DICOM Actual Frame Duration is an integer number of ms: simulate exactly that
    view_ms = max(1, round(total_counts_target / float(rate_views.sum()) * 1000.0))
    view_s = view_ms / 1000.0
    expected = rate_views * view_s
    rng = np.random.default_rng([seed, 5])
    return rng.poisson(expected).astype(np.float32), view_s, expected


def _simulate(
    patient: VirtualPatient, device: str, n_iters: int, n_subsets: int, n_views: int, seeds: Sequence[int],
    camera: tuple[str, float, bool] = (COLLIMATOR, INTRINSIC_FWHM_140KEV_CM, True),
) -> list[SimulatedSpect]:
    """One noise-free projection and system matrix, then one noisy OSEM image per seed."""
    t0 = time.perf_counter()
    collimator, intrinsic_cm, resolution_recovery = camera
    proj = noise_free_projection(patient, n_views, collimator, intrinsic_cm, device)
    shared = dict(proj.timings_s)
    sg, angles, radius_mm, psf = patient.spect_grid, proj.angles_deg, proj.orbit_radius_mm, proj.psf_sigma_params_cm
    fine_grid, true_bq = proj.fine_grid, proj.true_activity_in_fov_bq
    mu_recon = mu_map_from_hu(patient.hu, sg)
    # Several realisations: keep each view's attenuation (the same numbers, computed once).
    osem = OsemReconstructor(
        mu_recon.array, sg, angles, radius_mm, psf if resolution_recovery else None, device, cache_attenuation=len(seeds) > 1
    )
    shared_s = time.perf_counter() - t0
    out = []
    for k, seed in enumerate(seeds):
        t1 = time.perf_counter()
        timings = dict(shared) if k == 0 else {"projection": 0.0, "shared_projection_s": round(shared_s, 3)}
        counts, view_s, expected = noisy_counts(proj.rate_views, patient.total_counts_target, seed)
        timings["projection"] += time.perf_counter() - t1
        t2 = time.perf_counter()
        recon_counts = osem(counts, n_iters, n_subsets)
        timings["reconstruction"] = time.perf_counter() - t2
        bq_per_count = 1e6 / (SENSITIVITY_CPS_PER_MBQ * view_s) / sg.voxel_volume_ml
        recon = Volume((recon_counts * bq_per_count).astype(np.float32), sg, "Bq/ml")
        timings["total"] = time.perf_counter() - t1 + (shared_s if k == 0 else 0.0)
        out.append(
            SimulatedSpect(
                recon=recon,
                recon_counts=Volume(recon_counts.astype(np.float32), sg, "counts"),
                projections=counts,
                total_counts=int(counts.sum()),
                expected_total_counts=float(expected.sum()),
                view_duration_s=view_s,
                sensitivity_cps_per_mbq=SENSITIVITY_CPS_PER_MBQ,
                angles_deg=angles,
                orbit_radius_mm=radius_mm,
                n_iters=n_iters,
                n_subsets=n_subsets,
                projection_grid=fine_grid,
                true_activity_in_fov_bq=true_bq,
                psf_sigma_params_cm=psf,
                device=str(device),
                seed=int(seed),
                timings_s=timings,
                collimator=collimator,
                intrinsic_fwhm_140kev_cm=intrinsic_cm,
                resolution_recovery=resolution_recovery,
            )
        )
    return out


class OsemReconstructor:
    """PyTomography's OSEM with one system matrix (attenuation, collimator response) that
    several noise realisations of a patient share.

    The system matrix is ``_fast_system_matrix``'s: PyTomography's operator to float32
    round-off, computed faster. ``cache_attenuation``: each view's detection probability
    (rotate the mu map, cumulative sum, exp) is otherwise recomputed on every forward and
    back projection, as PyTomography does; cached, it is computed once per view and phantom
    (the same numbers, so the same image; memory one padded SPECT volume of float32 per
    view, ~1.6 GB for a 128 x 128 x 96 grid and 128 views). One OSEM iteration of the median
    v2 patient, caches filled, one thread: 4.2 instead of 14.6 CPU-s with PyTomography's own
    matrix, 10.7 instead of 25.2 with the collimator response (`bench/bench_osem.py`).
    """

    def __init__(self, mu_zyx, grid: Grid, angles, radius_mm, psf, device, *, cache_attenuation: bool = False) -> None:
        import torch

        self.pt = pt = _import_pytomography()
        self.device = device
        self._norm_bps: dict[int, list] = {}  # n_subsets -> H_m^T 1 of each subset
        previous = pt.module.device
        pt.module.device = torch.device(device)  # PyTomography reads this global
        try:
            dx_cm = grid.spacing_mm[0] / 10.0
            nz, ny, nx = grid.shape
            object_meta = pt.SPECTObjectMeta([dx_cm] * 3, [nx, ny, nz])
            proj_meta = pt.SPECTProjMeta([ny, nz], [dx_cm, dx_cm], angles, np.full(len(angles), radius_mm / 10.0))
            mu = torch.from_numpy(np.ascontiguousarray(mu_zyx.transpose(2, 1, 0))).to(device)
            self.system = _fast_system_matrix(pt.SPECTSystemMatrix)(mu, psf, radius_mm / 10.0, object_meta, proj_meta,
                                                                    keep_factors=cache_attenuation)  # fmt: skip
        finally:
            pt.module.device = previous

    def __call__(self, counts: np.ndarray, n_iters: int, n_subsets: int) -> np.ndarray:
        """Reconstructed counts per view and voxel, (z, y, x)."""
        import torch

        pt = self.pt
        previous = pt.module.device
        pt.module.device = torch.device(self.device)
        try:
            likelihood = pt.PoissonLogLikelihood(self.system, torch.from_numpy(counts).to(self.device))
            if n_subsets >= 2 and n_subsets in self._norm_bps:
                # H_m^T 1 of each subset depends on the system matrix only: the first realisation's
                # back projections of ones serve the next (PyTomography skips them when the subset
                # count is unchanged). One subset: PyTomography computes its norm_BP itself.
                likelihood.norm_BPs, likelihood.n_subsets_previous = self._norm_bps[n_subsets], n_subsets
            with torch.no_grad():
                recon = pt.OSEM(likelihood)(n_iters, n_subsets)
            if n_subsets >= 2:
                self._norm_bps[n_subsets] = likelihood.norm_BPs
            return recon.detach().cpu().numpy().transpose(2, 1, 0).copy()
        finally:
            pt.module.device = previous


def _fast_system_matrix(base: type):
    """PyTomography's SPECT system matrix (rotate, attenuate, blur, sum; the transpose for the back
    projection) with each view's detection probability computed once, every volume kept in the
    layout the rotation works in ([Z, X, Y]: no strided copies), the object padded once per
    projection instead of once per view, and the depth-dependent blur summed over planes in
    Fourier space (one inverse transform per view). (Rotating several views in one batch was
    slower: 25 instead of 14 ms a view, and the factors had to be stacked.) The same operator as
    ``SPECTSystemMatrix`` with ``SPECTAttenuationTransform`` (and the Fourier PSF): equal to
    float32 round-off (tests/test_dataset_v2.py), 2.4-3.5x as fast on one CPU thread
    (`bench/bench_osem.py`). The
    OSEM algorithm that uses it is PyTomography's, unchanged."""
    import torch
    from kornia.geometry.transform import rotate
    from pytomography.transforms.SPECT.attenuation import get_prob_of_detection_matrix
    from pytomography.utils import pad_object, rotate_detector_z

    class FastSPECTSystemMatrix(base):
        def __init__(self, mu_xyz, psf, radius_cm: float, object_meta, proj_meta, *, keep_factors: bool = True) -> None:
            super().__init__(obj2obj_transforms=[], proj2proj_transforms=[], object_meta=object_meta, proj_meta=proj_meta)
            self._keep_factors = keep_factors
            self._mu_padded = pad_object(mu_xyz)
            self._factors: dict[int, torch.Tensor] = {}  # view -> detection probability [Z, Xp, Yp]
            self._nz = object_meta.shape[2]
            self._pad = (self._mu_padded.shape[1] - object_meta.shape[1]) // 2
            self._mtf = None
            if psf is not None:
                n_planes, ny_p = self._mu_padded.shape[0], self._mu_padded.shape[1]
                sigma_px = _sigma_cm(_plane_distances_cm(n_planes, radius_cm, object_meta.dx), psf) / object_meta.dx
                mtf, self._nz_fft = _gaussian_mtf(sigma_px, self._nz, ny_p, mu_xyz.device)  # [X, Zf, Yf]
                self._mtf = mtf.permute(1, 0, 2).contiguous()  # [Zf, X, Yf]

        def _factor(self, view: int) -> torch.Tensor:
            if view in self._factors:
                return self._factors[view]
            f = get_prob_of_detection_matrix(rotate_detector_z(self._mu_padded, self.proj_meta.angles[view]), self.object_meta.dx)
            f = f.permute(2, 0, 1).contiguous()
            if self._keep_factors:
                self._factors[view] = f
            return f

        def _blur(self, vol: torch.Tensor) -> torch.Tensor:
            """Depth-dependent blur of [B, Z, X, Y] planes, summed over X: [B, Z, Y]."""
            ny = vol.shape[3]
            spectrum = torch.fft.rfft2(vol, s=(self._nz_fft, ny), dim=(1, 3))  # [B, Zf, X, Yf]
            return torch.fft.irfft2((spectrum * self._mtf).sum(dim=2), s=(self._nz_fft, ny))[:, : self._nz, :]

        def _views(self, subset_idx):
            if subset_idx is None:
                return list(range(self.proj_meta.num_projections))
            return [int(v) for v in self.subset_indices_array[subset_idx]]

        def _angles(self, views) -> torch.Tensor:
            return torch.tensor([270.0 - float(self.proj_meta.angles[v]) for v in views], dtype=torch.float32, device=self._mu_padded.device)

        def forward(self, object, subset_idx=None):
            views = self._views(subset_idx)
            angles = self._angles(views)
            obj = pad_object(object.to(self._mu_padded.device)).permute(2, 0, 1).unsqueeze(0).contiguous()  # [1, Z, Xp, Yp]
            out = []
            for k, v in enumerate(views):
                r = rotate(obj, -angles[k : k + 1], mode="bilinear").mul_(self._factor(v))
                proj = r.sum(dim=2) if self._mtf is None else self._blur(r)  # [1, Z, Yp]
                out.append(proj.transpose(1, 2))
            proj = torch.cat(out)  # [V, Yp, Z]
            return proj[:, self._pad : proj.shape[1] - self._pad, :]

        def backward(self, proj, subset_idx=None):
            views = self._views(subset_idx)
            p = torch.nn.functional.pad(proj.to(self._mu_padded.device), [0, 0, self._pad, self._pad])  # [V, Yp, Z]
            angles = self._angles(views)
            n_xp, n_yp, n_z = self._mu_padded.shape
            acc = torch.zeros((1, n_z, n_xp, n_yp), dtype=p.dtype, device=p.device)
            for k, v in enumerate(views):
                planes = p[k : k + 1].transpose(1, 2)  # [1, Z, Yp]
                if self._mtf is None:
                    vol = planes.unsqueeze(2).expand(-1, -1, n_xp, -1)
                else:  # the blur is symmetric: each plane of the smeared view, blurred by its own depth
                    ny = planes.shape[2]
                    spectrum = torch.fft.rfft2(planes, s=(self._nz_fft, ny))  # [B, Zf, Yf]
                    vol = torch.fft.irfft2(spectrum.unsqueeze(2) * self._mtf, s=(self._nz_fft, ny), dim=(1, 3))[:, : self._nz]
                acc += rotate(vol * self._factor(v), angles[k : k + 1], mode="bilinear")
            obj = acc[0].permute(1, 2, 0)  # [Xp, Yp, Z]
            return obj[self._pad : obj.shape[0] - self._pad, self._pad : obj.shape[1] - self._pad, :].contiguous()

    return FastSPECTSystemMatrix


def _fft_psf_transform(base: type, psf: tuple[float, float, float], radius_cm: float):
    """A PyTomography obj2obj transform for the collimator-detector response of a
    circular orbit, applied in Fourier space with exact Gaussian variance per plane.

    Same model as PyTomography's SPECTPSFTransform (sigma(d) = sqrt((a d + b)^2 + c^2)),
    which convolves with sampled Gaussian kernels; the Fourier form is several times
    faster on a CPU and matches the simulator's. The operator is symmetric, so forward
    and backward are the same.
    """

    class FFTGaussianPSF(base):
        def configure(self, object_meta, proj_meta) -> None:
            super().configure(object_meta, proj_meta)
            n_planes = object_meta.padded_shape[0]
            dx = object_meta.dx
            sigma_px = _sigma_cm(_plane_distances_cm(n_planes, radius_cm, dx), psf) / dx
            self.nz = object_meta.shape[2]
            self.ny = object_meta.padded_shape[1]
            self.mtf, self.nz_fft = _gaussian_mtf(sigma_px, self.nz, self.ny, self.device)

        def forward(self, object_i, ang_idx):
            import torch

            spectrum = torch.fft.rfft2(object_i.permute(0, 2, 1), s=(self.nz_fft, self.ny))
            blurred = torch.fft.irfft2(spectrum * self.mtf, s=(self.nz_fft, self.ny))[:, : self.nz, :]
            return blurred.permute(0, 2, 1)

        def backward(self, object_i, ang_idx):
            return self.forward(object_i, ang_idx)

    return FFTGaussianPSF()
