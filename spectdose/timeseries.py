"""Several time points of one cycle on one grid: CT-to-CT registration, mapping, integration.

Every time point's CT is registered to the reference (first) time point's CT with
SimpleITK's registration framework: rigid (Euler 3D, Mattes mutual information,
multi-resolution) by default; on request a B-spline free-form deformation on top of it
(``mode="deformable"``). Each time point's dose-rate map (and activity) is then resampled
onto the reference CT grid and integrated per voxel (:func:`spectdose.integration.integrate_voxels`)
and per region (:func:`spectdose.integration.fit_time_curve`).

Registration checks itself: after it, the moved CT must correlate with the reference CT
inside the reference body (Pearson r of the CT numbers >= :data:`MIN_CT_CORRELATION`) and
cover most of it (>= :data:`MIN_BODY_OVERLAP`); a registration that fails raises
:class:`RegistrationError` naming the time point and the figures. On phantoms, landmark
points give the target registration error (TRE).

Pure functions of Volumes and arrays; no files.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Mapping, Sequence
from typing import Literal

import numpy as np
import SimpleITK as sitk
from scipy import ndimage

from spectdose.errors import GeometryError, InputError
from spectdose.geometry import Volume, resample_to_grid
from spectdose.integration import bed_gy, fit_time_curve, integrate_voxels, radiobiology_for
from spectdose.regions import FieldOfView, rigid_affine

__all__ = [
    "TimePoint",
    "Registration",
    "RegistrationError",
    "register_ct",
    "check_registration",
    "target_registration_error_mm",
    "CycleIntegration",
    "integrate_cycle",
    "MIN_CT_CORRELATION",
    "MIN_BODY_OVERLAP",
]

# Quality thresholds of a CT-to-CT registration. On the virtual patients (small size), CTs
# of one patient registered to sub-mm landmark error correlate at r = 0.94-0.97 inside the
# body (after 3 mm smoothing); the same CTs left 20 mm off give r ~0.70, the unregistered
# repositioned ones 0.50-0.66, another patient 0.43, a head-to-feet flipped CT 0.46
# (docs/time-integration.md).
MIN_CT_CORRELATION = 0.8
# At least this fraction of the reference body must lie inside the moved CT's field of view.
MIN_BODY_OVERLAP = 0.7
# Fraction of the (masked) voxels on a regular grid that the metric samples per level.
_SAMPLING_FRACTION = 0.1
# Control-point spacing (mm) of the deformable (B-spline) stage: abdominal deformations
# between sessions are smooth on this scale; finer grids mostly fit noise.
_BSPLINE_SPACING_MM = 80.0
# Gaussian smoothing (sigma, mm) of both CTs before the correlation.
_QUALITY_SMOOTHING_MM = 3.0
# CT numbers above this are "body" for the masks (soft tissue and denser; not lung or air).
_BODY_HU = -500.0


class RegistrationError(InputError):
    """A time point's CT could not be aligned with the reference CT well enough."""


@dataclasses.dataclass
class TimePoint:
    """One time point: its CT and dose-rate map (and activity) on its own CT grid."""

    hours: float
    ct_hu: Volume
    dose_rate_gy_per_s: Volume
    activity_bq_per_ml: Volume | None = None
    label: str = ""
    # Whether CT points (..., 3 LPS mm of this time point's CT) lie inside its SPECT volume
    # (spectdose.regions.FieldOfView.inside); None: not known, regions are not checked.
    spect_inside: Callable[[np.ndarray], np.ndarray] | None = None


@dataclasses.dataclass
class Registration:
    """Transform reference-CT points -> time-point-CT points (the SimpleITK convention)."""

    transform: sitk.Transform
    mode: str
    metric: float | None
    correlation: float
    body_overlap: float
    passed: bool
    parameters: dict

    def to_dict(self) -> dict:
        return {
            "mode": self.mode,
            "final_metric_mattes_mi": None if self.metric is None else round(float(self.metric), 5),
            "ct_correlation": round(float(self.correlation), 4),
            "body_overlap": round(float(self.body_overlap), 4),
            "thresholds": {"ct_correlation": MIN_CT_CORRELATION, "body_overlap": MIN_BODY_OVERLAP},
            "passed": bool(self.passed),
            **self.parameters,
        }


def _float_image(volume: Volume) -> sitk.Image:
    return sitk.Clamp(
        sitk.Cast(volume.to_sitk(), sitk.sitkFloat32), sitk.sitkFloat32, -1000.0, 1500.0
    )


def _shrink_levels(spacing_mm: Sequence[float]) -> list[int]:
    """Shrink factors ending near 2.5 mm voxels (finer adds time, not accuracy, for rigid)."""
    finest = max(1, int(round(2.5 / min(spacing_mm))))
    return [finest * 4, finest * 2, finest]


def register_ct(
    reference_ct: Volume, moving_ct: Volume, *, mode: Literal["rigid", "deformable"] = "rigid"
) -> Registration:
    """Align ``moving_ct`` to ``reference_ct`` (both in HU); checked, not yet judged.

    Rigid: Euler 3D transform from the identity (the studies share the couch geometry, so
    the centres start close), Mattes mutual information on a regular 10 % sample (seeded:
    reproducible), regular-step gradient descent, three resolution levels, the metric
    restricted to the reference body. Deformable: a cubic B-spline transform (control
    points every ~80 mm) optimised with L-BFGS-B on top of the rigid result, on the
    two coarser levels.

    Raises
    ------
    RegistrationError
        If SimpleITK's optimiser fails.
    InputError
        Unknown mode.
    """
    if mode not in ("rigid", "deformable"):
        raise InputError(f"unknown registration {mode!r}: use rigid or deformable (--registration)")
    fixed = _float_image(reference_ct)
    moving = _float_image(moving_ct)
    body = sitk.Cast(sitk.BinaryThreshold(fixed, _BODY_HU, 1e9, 1, 0), sitk.sitkUInt8)
    body = sitk.BinaryDilate(body, [3, 3, 3])
    levels = _shrink_levels(reference_ct.grid.spacing_mm)

    def method() -> sitk.ImageRegistrationMethod:
        reg = sitk.ImageRegistrationMethod()
        reg.SetMetricAsMattesMutualInformation(numberOfHistogramBins=50)
        reg.SetMetricSamplingStrategy(reg.REGULAR)
        reg.SetMetricSamplingPercentage(_SAMPLING_FRACTION, 1)
        reg.SetMetricFixedMask(body)
        reg.SetInterpolator(sitk.sitkLinear)
        return reg

    reg = method()
    reg.SetOptimizerAsRegularStepGradientDescent(
        learningRate=2.0,
        minStep=1e-3,
        numberOfIterations=200,
        relaxationFactor=0.6,
        gradientMagnitudeTolerance=1e-6,
    )
    reg.SetOptimizerScalesFromPhysicalShift()
    reg.SetShrinkFactorsPerLevel(levels)
    reg.SetSmoothingSigmasPerLevel([2.0, 1.0, 0.0])
    reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
    initial = sitk.Euler3DTransform()
    initial.SetCenter(
        fixed.TransformContinuousIndexToPhysicalPoint([(n - 1) / 2.0 for n in fixed.GetSize()])
    )
    reg.SetInitialTransform(initial, inPlace=False)
    try:
        rigid = reg.Execute(fixed, moving)
    except RuntimeError as exc:
        raise RegistrationError(f"rigid CT registration failed in SimpleITK: {exc}") from exc
    metric = reg.GetMetricValue()
    rigid = (
        sitk.Euler3DTransform(sitk.CompositeTransform(rigid).GetNthTransform(0))
        if isinstance(rigid, sitk.CompositeTransform)
        else rigid
    )
    params = list(rigid.GetParameters())
    info = {
        "rigid_rotation_deg": [round(math.degrees(p), 3) for p in params[:3]],
        "rigid_translation_mm": [round(p, 3) for p in params[3:6]],
        "optimizer": "regular-step gradient descent, Mattes MI, shrink "
        + "/".join(map(str, levels)),
    }
    transform: sitk.Transform = rigid
    if mode == "deformable":
        mesh = [
            max(1, int(round(sz * sp / _BSPLINE_SPACING_MM)))
            for sz, sp in zip(fixed.GetSize(), fixed.GetSpacing(), strict=True)
        ]
        bspline = sitk.BSplineTransformInitializer(fixed, mesh, 3)
        reg = method()
        reg.SetMetricSamplingPercentage(0.05, 1)
        reg.SetOptimizerAsLBFGSB(
            gradientConvergenceTolerance=1e-5, numberOfIterations=30, maximumNumberOfCorrections=5
        )
        # the deformation is smooth (control points ~80 mm apart): the two coarser levels suffice
        reg.SetShrinkFactorsPerLevel(levels[:2])
        reg.SetSmoothingSigmasPerLevel([2.0, 1.0])
        reg.SmoothingSigmasAreSpecifiedInPhysicalUnitsOff()
        reg.SetMovingInitialTransform(rigid)
        reg.SetInitialTransform(bspline, inPlace=True)
        try:
            reg.Execute(fixed, moving)
        except RuntimeError as exc:
            raise RegistrationError(
                f"deformable (B-spline) CT registration failed in SimpleITK: {exc}"
            ) from exc
        metric = reg.GetMetricValue()
        transform = sitk.CompositeTransform([rigid, bspline])  # points: B-spline first, then rigid
        info["bspline_mesh"] = mesh
    correlation, overlap = _quality(reference_ct, moving_ct, transform)
    passed = correlation >= MIN_CT_CORRELATION and overlap >= MIN_BODY_OVERLAP
    return Registration(transform, mode, metric, correlation, overlap, passed, info)


def _quality(
    reference_ct: Volume, moving_ct: Volume, transform: sitk.Transform
) -> tuple[float, float]:
    """(Pearson r of HU inside the reference body, fraction of that body the moved CT covers)."""
    outside = -4000.0
    moved = resample_to_grid(
        moving_ct, reference_ct.grid, transform=transform, fill_value=outside
    ).array
    ref = np.asarray(reference_ct.array, dtype=np.float32)
    # CT noise (~10-20 HU, uncorrelated between sessions) would dominate r in soft tissue:
    # compare structure, smoothed over ~3 mm, not noise.
    sigma = [_QUALITY_SMOOTHING_MM / s for s in reference_ct.grid.spacing_mm]
    valid = moved > outside + 1.0
    moved = np.where(
        valid, ndimage.gaussian_filter(np.where(valid, moved, -1000.0), sigma), outside
    )
    ref = ndimage.gaussian_filter(ref, sigma)
    body = ref > _BODY_HU
    if not body.any():
        return 0.0, 0.0
    covered = body & (moved > outside + 1.0)
    overlap = float(covered.sum() / body.sum())
    if covered.sum() < 100:
        return 0.0, overlap
    a = np.clip(ref[covered], -1000, 1500).astype(np.float64)
    b = np.clip(moved[covered], -1000, 1500).astype(np.float64)
    if a.std() == 0 or b.std() == 0:
        return 0.0, overlap
    return float(np.corrcoef(a, b)[0, 1]), overlap


def check_registration(registration: Registration, label: str) -> None:
    """Refuse a registration that failed its quality check, with its figures.

    Raises
    ------
    RegistrationError
        r or overlap below the thresholds.
    """
    if registration.passed:
        return
    raise RegistrationError(
        f"time point {label}: CT registration to the reference time point failed its quality check "
        f"(CT correlation r = {registration.correlation:.3f}, needs >= {MIN_CT_CORRELATION}; body overlap "
        f"{registration.body_overlap:.2f}, needs >= {MIN_BODY_OVERLAP}; Mattes MI {registration.metric}). "
        "Check that it is the same patient and body region; try --registration deformable for a changed posture"
    )


def target_registration_error_mm(
    registration: Registration,
    reference_points_mm: Mapping[str, Sequence[float]],
    moving_points_mm: Mapping[str, Sequence[float]],
) -> dict[str, float]:
    """Distance (mm) between where the registration puts each reference landmark and where it is."""
    out = {}
    for name, p in reference_points_mm.items():
        if name not in moving_points_mm:
            continue
        mapped = np.asarray(registration.transform.TransformPoint([float(v) for v in p]))
        out[name] = float(np.linalg.norm(mapped - np.asarray(moving_points_mm[name], dtype=float)))
    return out


@dataclasses.dataclass
class CycleIntegration:
    """The cycle on the reference CT grid: absorbed dose, effective half-life, regions."""

    dose_gy: Volume
    effective_half_life_h: Volume
    registrations: list[Registration | None]
    regions: list[dict]
    voxel_info: dict
    dose_rates_on_reference_gy_per_h: list[np.ndarray] | None = None
    # Regions not seen whole by every time point's SPECT (and CT): name, ml, coverage, reason.
    regions_not_reported: list[dict] = dataclasses.field(default_factory=list)


# Region voxels whose coverage is checked: at most this many, evenly spread (a deformable
# transform maps points one by one; 5000 give the fraction to +-0.7 % at worst, binomial 1 sigma).
_COVERAGE_POINTS = 5000


def _points_on(reg: Registration | None, points_lps_mm: np.ndarray) -> np.ndarray:
    """Reference-CT points in the time point's CT space (the registration maps reference -> time point)."""
    if reg is None:
        return points_lps_mm
    transform = reg.transform
    if reg.mode == "rigid":
        affine = rigid_affine(transform)
        return points_lps_mm @ affine[:, :3].T + affine[:, 3]
    return np.array([transform.TransformPoint(tuple(float(v) for v in p)) for p in points_lps_mm])


def _seen_fraction(mask: np.ndarray, grid, tp: TimePoint, reg: Registration | None) -> float | None:
    """Fraction of a reference-grid region inside this time point's CT and SPECT volumes (None: unknown)."""
    if tp.spect_inside is None:
        return None
    where = np.argwhere(mask)
    if len(where) > _COVERAGE_POINTS:
        where = where[np.linspace(0, len(where) - 1, _COVERAGE_POINTS).round().astype(int)]
    points = _points_on(reg, grid.index_to_lps_mm(where))
    in_ct = FieldOfView(tp.ct_hu.grid).inside(points)  # the same edge rule as the SPECT's
    return float((in_ct & np.asarray(tp.spect_inside(points), dtype=bool)).mean())


def _to_reference(
    volume: Volume, grid, registration: Registration | None, interpolation: str
) -> np.ndarray:
    if registration is None and volume.grid.same_as(grid):
        return np.asarray(volume.array, dtype=np.float32)
    transform = registration.transform if registration is not None else None
    moved = resample_to_grid(volume, grid, transform=transform, interpolation=interpolation)
    return np.clip(moved.array, 0.0, None).astype(np.float32)


def integrate_cycle(
    time_points: Sequence[TimePoint],
    *,
    regions: Mapping[str, np.ndarray] | None = None,
    registration: Literal["rigid", "deformable"] = "rigid",
    region_model: str = "auto",
    voxel_model: str = "mono",
    check: bool = True,
    keep_maps: bool = False,
    interpolation: Literal["linear", "bspline"] = "bspline",
    covered_min_fraction: float | None = None,
    accept_partial: bool = False,
) -> CycleIntegration:
    """Register, map and integrate the dose rate of several time points on the first one's grid.

    Parameters
    ----------
    time_points : at least 2, increasing in time; the first is the reference
    regions : boolean masks on the reference CT grid, by name
    registration : "rigid" or "deformable"
    region_model : model of the region fits (:func:`spectdose.integration.fit_time_curve`)
    voxel_model : "mono" or "trapezoid" (:func:`spectdose.integration.integrate_voxels`)
    check : refuse registrations that fail their quality check
    keep_maps : keep the mapped dose-rate maps (Gy/h) in the result
    interpolation : how maps are carried onto the reference grid: "bspline" (cubic B-spline,
        default: it blurs far less than linear interpolation, which loses a few % of a small
        organ's mean to spill-out at each resampling; negative overshoots are clipped) or "linear"
    covered_min_fraction : with time points that know their SPECT volume (``spect_inside``), a
        region of which less than this fraction lies inside a time point's CT and SPECT is not
        reported (its mean there would count no activity for the part outside: a curve, and a
        dose, too low) but listed in ``regions_not_reported``; ``accept_partial`` reports it,
        with its coverage per time point

    Returns
    -------
    CycleIntegration
        ``dose_gy`` and ``effective_half_life_h`` on the reference CT grid; per region the
        mean dose rate at each time point (mGy/h), the fit, the absorbed dose (Gy), the mean
        of the voxel dose map, and BED for kidneys and red marrow; with activities, the
        activity per time point (MBq) and the time-integrated activity (MBq h).

    Raises
    ------
    InputError
        Fewer than 2 time points, times not increasing, a region not on the reference grid.
    RegistrationError
        A registration failed its quality check (with ``check``).
    """
    if len(time_points) < 2:
        raise InputError("a cycle needs at least 2 time points")
    hours = np.array([tp.hours for tp in time_points], dtype=float)
    if np.any(np.diff(hours) <= 0):
        raise InputError(
            f"time points must be distinct and in increasing time, got {hours.tolist()} h"
        )
    ref = time_points[0]
    grid = ref.ct_hu.grid
    if not ref.dose_rate_gy_per_s.grid.same_as(grid):
        raise GeometryError("the reference dose-rate map is not on the reference CT grid")
    regs: list[Registration | None] = [None]
    rates, acts = [], []
    for tp in time_points:
        reg = None
        if tp is not ref:
            reg = register_ct(ref.ct_hu, tp.ct_hu, mode=registration)
            if check:
                check_registration(reg, tp.label or f"{tp.hours:g} h")
            regs.append(reg)
        rates.append(
            _to_reference(tp.dose_rate_gy_per_s, grid, reg, interpolation) * np.float32(3600.0)
        )  # Gy/h
        if tp.activity_bq_per_ml is not None and regions:  # activity serves the regions' TIA only
            acts.append(_to_reference(tp.activity_bq_per_ml, grid, reg, interpolation))
    stack = np.stack(rates)
    floor = 1e-6 * float(stack.max()) if stack.size else 0.0
    vox = integrate_voxels(hours, stack, model=voxel_model, signal_floor=floor)
    dose = Volume(vox["integral"], grid, "Gy")
    t_eff = Volume(vox["effective_half_life_h"], grid, "h")
    out_regions, regions_not_reported = [], []
    vox_ml = grid.voxel_volume_ml
    for name, mask in (regions or {}).items():
        mask = np.asarray(mask, dtype=bool)
        if mask.shape != grid.shape:
            raise InputError(
                f"region {name!r} has shape {mask.shape}, not the reference CT grid's {grid.shape}"
            )
        if not mask.any():
            continue
        seen = [_seen_fraction(mask, grid, tp, reg) for tp, reg in zip(time_points, regs, strict=True)]
        coverage = {}
        if covered_min_fraction is not None and any(f is not None for f in seen):
            worst = min(f for f in seen if f is not None)
            coverage = {"spect_coverage_per_time_point": [None if f is None else round(f, 4) for f in seen],
                        "coverage": "covered" if worst >= covered_min_fraction else "partly covered"}
            if worst < covered_min_fraction and not accept_partial:
                where = ", ".join(f"{tp.label or f'{tp.hours:g} h'} {f:.0%}" for tp, f in zip(time_points, seen,
                                                                                          strict=True)
                                  if f is not None and f < covered_min_fraction)
                regions_not_reported.append({
                    "region": name, "volume_ml": float(mask.sum() * grid.voxel_volume_ml), **coverage,
                    "reason": f"only partly inside the SPECT (or CT) at {where}: its mean there counts no activity "
                              "for the part outside, so its curve and dose would be too low"})
                continue
        curve = np.array([float(r[mask].mean()) for r in rates])  # Gy/h
        fit = fit_time_curve(hours, curve, region_model)
        entry = {
            "region": name,
            "volume_ml": float(mask.sum() * vox_ml),
            "dose_rate_mgy_per_h": [float(v * 1e3) for v in curve],
            "fit": fit.to_dict(),
            "absorbed_dose_gy": float(fit.integral),
            "effective_half_life_h": fit.effective_half_life_h,
            "voxel_mean_dose_gy": float(vox["integral"][mask].mean()),
            **coverage,
        }
        if len(acts) == len(time_points):
            activity = np.array([float(a[mask].sum() * vox_ml / 1e6) for a in acts])  # MBq
            afit = fit_time_curve(hours, activity, region_model)
            entry["activity_mbq"] = [float(v) for v in activity]
            entry["time_integrated_activity_mbq_h"] = float(afit.integral)
            entry["activity_fit"] = afit.to_dict()
            entry["_activity_curve"] = afit.curve
        bio = radiobiology_for(name)
        if bio is not None and fit.integral > 0:
            kind, p = bio
            _, bed = bed_gy(fit.curve, float(p["alpha_beta_gy"]), float(p["repair_half_time_h"]))
            entry["bed_gy"] = float(bed)
            entry["bed_parameters"] = {"tissue": kind, **p}
        entry["_curve"] = fit.curve
        out_regions.append(entry)
    return CycleIntegration(
        dose_gy=dose,
        effective_half_life_h=t_eff,
        registrations=regs,
        regions=out_regions,
        voxel_info={
            "model": voxel_model,
            "voxels_fitted": vox["n_fitted"],
            "voxels_fallback_trapezoid": vox["n_fallback"],
            "signal_floor_gy_per_h": floor,
        },
        dose_rates_on_reference_gy_per_h=rates if keep_maps else None,
        regions_not_reported=regions_not_reported,
    )
