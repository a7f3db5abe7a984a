"""The one function that runs the stages: study in, RT Dose + dose-rate map + summary out.

The CLI, the Celery worker and tests all call :func:`run`; nothing else chains stages.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import functools
import hashlib
import importlib
import json
import math
import stat
import sys
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Literal

import numpy as np

from spectdose import __version__
from spectdose.constants import LOW_DENSITY_CUTOFF_G_CM3, MGY_PER_H_PER_GY_PER_S
from spectdose.density import DEFAULT_DENSITY_CURVE, CalibrationCurve, hu_to_density, load_curve
from spectdose.dicom.ingest import (
    INGEST_ASSUMPTIONS,
    NO_ACTIVITY_ASSUMPTION,
    CameraCalibration,
    load_study,
)
from spectdose.dicom.region_outputs import REGION_OUTPUT_NAMES
from spectdose.dicom.rtdose import Replaces
from spectdose.dose import dvk_dose_rate, outside_model_range, time_integration_factor_s
from spectdose.errors import InputError
from spectdose.geometry import Volume, register_rigid, resample_to_grid
from spectdose.kernels import get_kernel
from spectdose.option_names import PUBLIC_NAMES, option_hint, public_name
from spectdose.study import Study

__all__ = [
    "DoseOptions",
    "DoseResult",
    "run",
    "compute_dose_rate",
    "compute_dose_rate_and_sigma",
    "PreparedInputs",
    "prepare_inputs",
    "network_inputs",
    "OUTPUT_NAMES",
    "ASSUMPTIONS",
    "PUBLIC_NAMES",
    "public_name",
    "option_hint",
]

ProgressCallback = Callable[[str, float], None]

OUTPUT_NAMES = {
    "rtdose": "rtdose.dcm",
    "doserate": "doserate_pm.dcm",
    # The calibrated 1-sigma of the dose rate (CNN deep ensemble, --uncertainty): same grid and units.
    "doserate_sigma": "doserate_sigma_pm.dcm",
    "summary_json": "summary.json",
    "summary_txt": "summary.txt",
    # The PDF report (PDF, and the same as a DICOM Encapsulated PDF) and the reduced CT,
    # dose and region volumes the gateway's results page draws from (spectdose.report).
    "report": "report.pdf",
    "report_pdf": "report_pdf.dcm",
    "view": "view.npz",
    # Region outputs: written when regions are given or found.
    **REGION_OUTPUT_NAMES,
}


_DATETIME_FIELDS = ("administration_datetime", "acquisition_datetime")


@dataclasses.dataclass(frozen=True)
class DoseOptions:
    """Everything that changes the result; its ``key()`` seeds the output UIDs.

    The one vocabulary of dose options: the CLI, the REST gateway, the DICOM node and the
    worker build it with :meth:`from_dict` / the constructor and store it with :meth:`to_dict`.
    Run-time settings that do not change the numbers (cache folder, device, model file
    location) are not part of the stored form; they are given to ``from_dict`` separately.
    """

    # "dvk-rr": DVK on the SPECT after Richardson-Lucy resolution recovery (spectdose.cnn.recovery), no learning
    method: Literal["dvk", "cnn", "dvk-rr"] = "dvk"
    # "none": the dose-rate map only, no absorbed dose (a time point of a cycle, integrated with the others).
    time_model: Literal["hanscheid", "physical", "effective", "none"] = "hanscheid"
    effective_half_life_h: float | None = None
    administration_datetime: dt.datetime | None = None
    # De-identified data: the acquisition date-time, or the hours since administration directly.
    acquisition_datetime: dt.datetime | None = None
    hours_after_administration: float | None = None
    density_curve: str = DEFAULT_DENSITY_CURVE
    kernel_medium: str = "soft"
    sensitivity_cps_per_mbq: float | None = None
    calibrations: tuple[CameraCalibration, ...] = ()
    calling_ae_title: str | None = None
    allow_normalised: bool = False
    spect_series_uid: str | None = None
    ct_series_uid: str | None = None
    # Photopeak centre (keV) of the energy window to use in a multi-window reconstruction.
    energy_window_kev: float | None = None
    # Output grid: "ct" (default), "spect", or an isotropic spacing in mm ("3" or "2.5").
    dose_grid: str = "ct"
    # Assumptions a site explicitly allows (each refused by default); see ASSUMPTIONS.
    accepted_assumptions: tuple[str, ...] = ()
    kernel_cache_dir: Path | None = None
    device: str | None = None
    model_path: Path | None = None
    autocast_bf16: bool = False
    regions_path: Path | None = None
    # A calibrated 1-sigma per voxel from the deep ensemble beside the CNN's weights.
    uncertainty: bool = False
    # Dose-rate (and sigma) maps: "auto" = 16-bit JPEG-LS where the quoted means allow it (a PACS
    # takes 5 MB, not 136), "float32" = always float (dcmqi, hence 3D Slicer, reads only float maps).
    map_precision: str = "auto"

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """Refuse contradictory or incomplete options, naming the flag/field that fixes them."""
        if self.method not in ("dvk", "cnn", "dvk-rr"):
            raise InputError(f"unknown dose method {self.method!r}: use dvk, cnn or dvk-rr ({option_hint('method')})")
        if self.time_model not in ("hanscheid", "physical", "effective", "none"):
            raise InputError(
                f"unknown time model {self.time_model!r}: use hanscheid, physical, effective or none "
                f"({option_hint('time_model')})"
            )
        if self.time_model == "effective" and self.effective_half_life_h is None:
            raise InputError(f"the effective time model needs {option_hint('effective_half_life_h')}")
        for field in ("effective_half_life_h", "hours_after_administration", "sensitivity_cps_per_mbq", "energy_window_kev"):
            value = getattr(self, field)
            if value is not None and not (isinstance(value, int | float) and math.isfinite(value) and value > 0):
                raise InputError(f"{option_hint(field)} must be a positive number, got {value!r}")
        if self.hours_after_administration is not None and (
            self.administration_datetime is not None or self.acquisition_datetime is not None
        ):
            raise InputError(
                f"give either {option_hint('hours_after_administration')} or the administration/acquisition "
                "date-times, not both"
            )
        dose_grid_spacing_mm(self.dose_grid)
        if self.map_precision not in MAP_PRECISIONS:
            raise InputError(f"{option_hint('map_precision')} must be one of {', '.join(MAP_PRECISIONS)}, "
                             f"got {self.map_precision!r}")
        if self.uncertainty and self.method != "cnn":
            raise InputError(
                f"{option_hint('uncertainty')} comes from the DblurDoseNet ensemble: it needs {option_hint('method')} cnn"
            )
        unknown = sorted(set(self.accepted_assumptions) - set(ASSUMPTIONS))
        if unknown:
            raise InputError(
                f"unknown assumption(s) {unknown} in {option_hint('accepted_assumptions')}; known: {sorted(ASSUMPTIONS)}"
            )

    def resolved_model_path(self) -> Path:
        from spectdose.cnn.inference import default_model_path

        return Path(self.model_path) if self.model_path else default_model_path()

    def resolved_ensemble_path(self) -> Path:
        """The ensemble that gives the uncertainty: ``<weights stem>_ensemble.pt`` beside the weights."""
        from spectdose.paths import ensemble_path

        return ensemble_path(self.resolved_model_path())

    def to_dict(self) -> dict:
        """The stored, JSON-ready form under public names; runtime-only settings left out."""
        out: dict = {}
        for field, name in PUBLIC_NAMES.items():
            value = getattr(self, field)
            default = DoseOptions.__dataclass_fields__[field].default
            if value == default and field != "method":
                continue
            if field in _DATETIME_FIELDS:
                value = value.isoformat()
            elif field == "accepted_assumptions":
                value = sorted(value)
            out[name] = value
        return out

    @classmethod
    def from_dict(cls, data: dict, **runtime) -> DoseOptions:
        """Options from their stored/public form; ``runtime`` gives the non-stored fields."""
        by_public = {name: field for field, name in PUBLIC_NAMES.items()}
        kwargs: dict = {}
        for key, value in data.items():
            field = by_public.get(key)
            if field is None:
                raise InputError(f"unknown dose option {key!r}; known: {sorted(by_public)}")
            if value is None:
                continue
            if field in _DATETIME_FIELDS and isinstance(value, str):
                try:
                    value = dt.datetime.fromisoformat(value)
                except ValueError as exc:
                    raise InputError(f"{option_hint(field)}: not an ISO date-time: {value!r}") from exc
            elif field == "accepted_assumptions":
                value = tuple(sorted(value))
            kwargs[field] = value
        return cls(**kwargs, **runtime)

    def key(self) -> str:
        """A stable string of the options that change numbers (not paths or devices)."""
        parts = {
            "method": self.method,
            "time_model": self.time_model,
            "effective_half_life_h": self.effective_half_life_h,
            "administration": self.administration_datetime.isoformat() if self.administration_datetime else None,
            "density_curve": self.density_curve,
            "kernel_medium": self.kernel_medium,
            "sensitivity": self.sensitivity_cps_per_mbq,
            "normalised": self.allow_normalised,
            "version": __version__,
        }
        # New options enter the key only when set, so keys (and UIDs) of unchanged runs stay as they were.
        extra = {
            "acquisition": self.acquisition_datetime.isoformat() if self.acquisition_datetime else None,
            "hours_after_administration": self.hours_after_administration,
            "energy_window_kev": self.energy_window_kev,
            "dose_grid": None if self.dose_grid == "ct" else self.dose_grid,
            "accepted_assumptions": sorted(self.accepted_assumptions) or None,
            "uncertainty_ensemble_sha256": _file_sha256(self.resolved_ensemble_path()) if self.uncertainty else None,
            "map_precision": None if self.map_precision == "auto" else self.map_precision,
        }
        parts.update({k: v for k, v in extra.items() if v is not None})
        if self.method == "cnn":
            parts["model_sha256"] = _file_sha256(self.resolved_model_path())
            parts["bf16"] = self.autocast_bf16
        return json.dumps(parts, sort_keys=True)


# How the dose-rate maps are written (DoseOptions.map_precision).
MAP_PRECISIONS = ("auto", "float32")
# Regions partly outside the SPECT field of view get dose statistics of their part inside (docs/regions.md).
PARTIAL_COVERAGE_ASSUMPTION = "partial_region_coverage"
# Assumptions that change the dose and are refused unless a site or user allows them by name.
ASSUMPTIONS: dict[str, str] = {
    "administration_date_from_acquisition": "a Radiopharmaceutical Start Time without a date is taken on the "
    "acquisition day (or the day before, when that would put it after the acquisition)",
    "time_outside_model_range": "the single-time-point model is used outside the range of times it was validated for",
    "acquisition_time_from_series_or_study": "a SPECT without Acquisition Date/Time is taken as acquired at its "
    "series (or study) date/time",
    "radionuclide_lu177_assumed": "a SPECT whose header does not name the radionuclide is taken as Lu-177",
    NO_ACTIVITY_ASSUMPTION: "a SPECT that holds no activity (a blank or QA acquisition) gives an all-zero dose (and "
    "uncertainty) instead of being refused",
    PARTIAL_COVERAGE_ASSUMPTION: "a region only partly inside the SPECT (or CT) field of view gets the dose statistics "
    "of its part inside (labelled partly covered) instead of none",
    **INGEST_ASSUMPTIONS,
}


def dose_grid_spacing_mm(dose_grid: str) -> float | None:
    """None for the "ct"/"spect" grids, else the isotropic spacing in mm; refuses anything else."""
    text = str(dose_grid).strip().lower()
    if text in ("ct", "spect"):
        return None
    try:
        spacing = float(text.removesuffix("mm"))
    except ValueError:
        spacing = float("nan")
    if not (math.isfinite(spacing) and 0.5 <= spacing <= 10.0):
        raise InputError(
            f"{option_hint('dose_grid')} must be ct, spect or a spacing in mm between 0.5 and 10, got {dose_grid!r}"
        )
    return spacing


def _file_sha256(path: Path) -> str | None:
    """SHA-256 of a weights file, read once per version of the file (a run asks several times)."""
    try:
        st = Path(path).stat()
    except OSError:
        return None
    if not stat.S_ISREG(st.st_mode):
        return None
    return _sha256_of(str(Path(path).resolve()), st.st_mtime_ns, st.st_size)


@functools.lru_cache(maxsize=32)
def _sha256_of(path: str, _mtime_ns: int, _size: int) -> str:
    """Keyed by modification time and size too: a replaced file is hashed again."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()


@dataclasses.dataclass
class DoseResult:
    study: Study
    dose_rate_gy_per_s: Volume
    dose_gy: Volume | None
    outputs: dict[str, Path]
    summary: dict


def stage_timer() -> tuple[dict[str, float], Callable[[str], None]]:
    """Seconds per stage for the summary's ``timings_s``: ``lap(name)`` closes a stage (a stage
    closed twice adds up, as for the time points of a cycle)."""
    timings: dict[str, float] = {}
    t0 = time.perf_counter()

    def lap(name: str) -> None:
        nonlocal t0
        now = time.perf_counter()
        timings[name] = round(timings.get(name, 0.0) + now - t0, 3)
        t0 = now

    return timings, lap


# What the regions (SEG, SR: highdicom) and the report (matplotlib's PDF backend) import on first use:
# 0.3 and 0.9 CPU s on the clinical benchmark machine.
_OUTPUT_LIBRARIES = ("highdicom", "matplotlib.figure", "matplotlib.backends.backend_pdf")


def _import_in_background(modules: Sequence[str]) -> None:
    """Import ``modules`` on a daemon thread, unless they are already imported (a service worker's
    later jobs). Python's module locks make a later ``import`` of one wait for it; an import that
    fails here is left to fail again, with its message, where the module is used."""
    missing = [name for name in modules if name not in sys.modules]
    if not missing:
        return

    def load() -> None:
        for name in missing:
            try:
                importlib.import_module(name)
            except ImportError:
                continue

    threading.Thread(target=load, name="spectdose-import", daemon=True).start()


def _note(progress: ProgressCallback | None, stage: str, fraction: float) -> None:
    if progress is not None:
        progress(stage, fraction)


def spect_on_ct_grid(study: Study, warnings: list[str]) -> tuple[Volume, dict]:
    """Activity concentration on the CT grid; registers when frames of reference differ."""
    spect, ct = study.spect, study.ct
    info: dict = {}
    same_for = (
        spect.grid.frame_of_reference_uid is not None
        and spect.grid.frame_of_reference_uid == ct.grid.frame_of_reference_uid
    )
    transform = None
    if not same_for:
        transform, metric = register_rigid(ct, spect)
        params = list(transform.GetParameters())
        info["registration"] = {
            "method": "rigid (Euler 3D), Mattes mutual information, SimpleITK",
            "parameters_rad_mm": [round(p, 4) for p in params],
            "final_metric": round(float(metric), 5),
        }
        warnings.append(
            "SPECT and CT do not share a frame of reference: the SPECT was rigidly registered to the CT "
            f"(rotation {np.degrees(params[:3]).round(2).tolist()} deg, translation {np.round(params[3:], 1).tolist()} mm); "
            "check the alignment before clinical use"
        )
    on_ct = resample_to_grid(spect, ct.grid, quantity="intensive", interpolation="linear", transform=transform)
    info["ct_to_spect_transform"] = transform  # for the regions' SPECT coverage (regions.FieldOfView); not a summary fact
    on_ct.array = np.clip(on_ct.array, 0.0, None).astype(np.float32)
    total_spect = float(np.clip(spect.array, 0, None).sum(dtype=np.float64) * spect.grid.voxel_volume_ml)
    total_ct = float(on_ct.array.sum(dtype=np.float64) * ct.grid.voxel_volume_ml)
    info["activity_in_spect_fov_bq"] = total_spect
    info["activity_on_ct_grid_bq"] = total_ct
    if total_spect > 0:
        info["activity_conserved_pct"] = 100.0 * total_ct / total_spect
        if abs(total_ct / total_spect - 1.0) > 0.01:
            warnings.append(
                f"{100 * (1 - total_ct / total_spect):.1f} % of the SPECT activity lies outside the CT field of view "
                "and is not in the dose calculation"
            )
    return on_ct, info


@dataclasses.dataclass
class PreparedInputs:
    """What every dose method starts from: the activity and the mass density on the CT grid."""

    activity_bq_per_ml: Volume
    density_g_cm3: Volume
    resample_info: dict
    density_curve: CalibrationCurve


def prepare_inputs(
    study: Study,
    *,
    density_curve: str | Path = DEFAULT_DENSITY_CURVE,
    warnings: list[str] | None = None,
    progress: ProgressCallback | None = None,
    lap: Callable[[str], None] | None = None,
) -> PreparedInputs:
    """The one chain SPECT -> activity on the CT grid, CT -> density: the pipeline, the
    evaluation, the training and the benchmarks all start here, so they cannot drift apart."""
    warnings = [] if warnings is None else warnings
    _note(progress, "resample", 0.1)
    activity, resample_info = spect_on_ct_grid(study, warnings)
    if lap is not None:
        lap("resample")
    _note(progress, "density", 0.25)
    curve = load_curve(density_curve)
    density = Volume(hu_to_density(study.ct.array, curve), study.ct.grid, "g/cm3")
    if lap is not None:
        lap("density")
    return PreparedInputs(activity, density, resample_info, curve)


def network_inputs(study_dir: Path, kernel_cache: Path | None = None, device=None) -> tuple[Volume, Volume, Volume]:
    """Activity (Bq/ml), density (g/cm3) and DVK dose rate (Gy/s) on the CT grid of a study with
    the default options: the network's inputs, for training, evaluation and the benchmarks."""
    prepared = prepare_inputs(load_study(Path(study_dir)))
    dvk, _ = compute_dose_rate(
        prepared.activity_bq_per_ml,
        prepared.density_g_cm3,
        options=DoseOptions(kernel_cache_dir=kernel_cache, device=device),
    )
    return prepared.activity_bq_per_ml, prepared.density_g_cm3, dvk


def compute_dose_rate(
    activity_bq_per_ml: Volume,
    density_g_cm3: Volume,
    *,
    options: DoseOptions,
) -> tuple[Volume, dict]:
    """Dose rate (Gy/s) on the activity's grid by the selected method, with provenance."""
    rate, _, info = compute_dose_rate_and_sigma(activity_bq_per_ml, density_g_cm3, options=options)
    return rate, info


def compute_dose_rate_and_sigma(
    activity_bq_per_ml: Volume,
    density_g_cm3: Volume,
    *,
    options: DoseOptions,
) -> tuple[Volume, Volume | None, dict]:
    """Dose rate (Gy/s), its calibrated 1-sigma (Gy/s; None unless ``options.uncertainty``) and
    the provenance. With the uncertainty the dose rate is the ensemble's mean, the estimate the
    sigma was calibrated for, not the single network's output."""
    model = ensemble = None
    if options.method == "cnn":
        from spectdose.cnn.inference import load_ensemble, load_model

        model = load_model(options.resolved_model_path(), device=options.device)  # fail before the DVK work
        if options.uncertainty:
            ensemble = load_ensemble(options.resolved_ensemble_path(), device=options.device)
    grid = activity_bq_per_ml.grid
    kernel = get_kernel(grid.spacing_mm, medium=options.kernel_medium, cache_dir=options.kernel_cache_dir)
    info: dict = {"kernel": {"shape": list(kernel.total_mgy_per_mbq_s.shape), **kernel.provenance}}
    activity = activity_bq_per_ml.array
    if options.method == "dvk-rr":
        from spectdose.cnn.recovery import DEFAULT_RECOVERY, richardson_lucy

        activity = richardson_lucy(activity, grid.spacing_mm, **DEFAULT_RECOVERY)
        info["resolution_recovery"] = {"method": "Richardson-Lucy, Gaussian PSF, then Gaussian smoothing", **DEFAULT_RECOVERY}
    rate = dvk_dose_rate(activity, density_g_cm3.array, kernel.total_mgy_per_mbq_s, grid.voxel_volume_ml,
                         device=options.device)
    dvk = Volume(rate, grid, "Gy/s")
    if model is None:
        return dvk, None, info
    from spectdose.cnn.inference import (
        BODY_BOX_PAD_VOXELS,
        BODY_DENSITY_G_CM3,
        predict_on_ct_grid,
        predict_with_uncertainty,
    )

    info["network"] = {
        "name": model.name,
        "weights_sha256": _file_sha256(options.resolved_model_path()),
        "config": model.config.to_dict(),
        "trained_spacing_mm": list(model.spacing_mm),
        "field": f"the body's in-plane box (density > {BODY_DENSITY_G_CM3:g} g/cm3 in any slice) widened by "
                 f"{BODY_BOX_PAD_VOXELS} model voxels, as in training; the DVK dose rate outside it",
        "bf16": options.autocast_bf16,
        "dvk_max_mgy_per_h": float(rate.max() * MGY_PER_H_PER_GY_PER_S),
    }
    if ensemble is None:
        cnn = predict_on_ct_grid(model, activity_bq_per_ml, density_g_cm3, dvk, autocast_bf16=options.autocast_bf16,
                                 kernel_cache_dir=options.kernel_cache_dir)
        return cnn, None, info
    mean, sigma = predict_with_uncertainty(ensemble, activity_bq_per_ml, density_g_cm3, dvk,
                                           autocast_bf16=options.autocast_bf16, kernel_cache_dir=options.kernel_cache_dir)
    # The dose rate is the ensemble's mean, not the single network's: the provenance names the
    # networks that made the numbers (after a campaign installs a new single network, the
    # ensemble is still the earlier one until it is retrained).
    info["network"] |= {"name": ensemble.name, "weights_sha256": _file_sha256(options.resolved_ensemble_path()),
                        "config": ensemble.members[0].config.to_dict(),
                        "trained_spacing_mm": list(ensemble.spacing_mm), "single_network_not_used": model.name}
    info["uncertainty"] = {
        # a campaign's snapshot ensemble says so in its metadata (spectdose.learning.campaign)
        "method": ensemble.metadata.get("method")
        or f"deep ensemble of {len(ensemble.members)} DblurDoseNets, sigma calibrated on validation patients",
        "ensemble": ensemble.name,
        "ensemble_sha256": _file_sha256(options.resolved_ensemble_path()),
        "calibration": ensemble.calibration.to_dict(),
        "dose_rate_is": "the ensemble mean",
    }
    return mean, sigma, info


def _hours_between(start: dt.datetime | None, end: dt.datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return (end - start).total_seconds() / 3600.0


def run(
    study_path: str | Path,
    out_dir: str | Path,
    options: DoseOptions | None = None,
    *,
    progress: ProgressCallback | None = None,
    replaces: Mapping[str, Replaces] | None = None,
    region_notes: Sequence[str] = (),
) -> DoseResult:
    """Read a SPECT/CT study, compute dose rate and absorbed dose, write DICOM + summary.

    ``region_notes``: the caller's notes on how the regions were chosen (e.g. the service's
    choice among the region sets sent with the study), first in ``region_warnings`` of
    summary.json and summary.txt.

    ``replaces`` says which earlier output series this run corrects, by output name:
    ``{"rtdose": Replaces(old_rtdose_series_uid, "corrected administration time"),
    "doserate": Replaces(old_map_series_uid, ...)}`` (``export.replacements_from_summary``
    builds it from the earlier summary.json; the stored form ``{"rtdose":
    {"series_instance_uid": ..., "reason": ...}}`` is accepted too, anything else is
    refused with ``ExportError``). The new series' description is marked
    CORRECTED and its comments say "replaces <UID> (<reason>)". Output UIDs derive from
    the inputs' content, options, software and model version (and ``replaces``), so an
    identical retry gives the same UIDs and any change gives new ones; summary.json
    lists them under ``uids``.
    """

    options = options or DoseOptions()
    out_dir = Path(out_dir)
    timings, lap = stage_timer()

    _note(progress, "ingest", 0.0)
    study = load_study(
        study_path,
        calibrations=options.calibrations,
        sensitivity_cps_per_mbq=options.sensitivity_cps_per_mbq,
        calling_ae_title=options.calling_ae_title,
        allow_normalised=options.allow_normalised,
        spect_series_uid=options.spect_series_uid,
        ct_series_uid=options.ct_series_uid,
        energy_window_kev=options.energy_window_kev,
        administration_datetime=options.administration_datetime,
        acquisition_datetime=options.acquisition_datetime,
        hours_after_administration=options.hours_after_administration,
        accepted_assumptions=options.accepted_assumptions,
    )
    warnings = list(study.warnings)
    # A region problem never discards the dose: it is reported as regions_error (docs/regions.md).
    region_set, regions_error = None, None
    if options.regions_path is not None:
        from spectdose.errors import SpectdoseError
        from spectdose.regions import load_regions

        try:
            region_set = load_regions(options.regions_path, study.ct.grid)
        except SpectdoseError as exc:
            regions_error = str(exc)
    lap("ingest")

    # Time integration is checked before the expensive stages so a missing time fails fast.
    # No date is guessed: study.resolve_times refuses, or warns for an assumption the options accept.
    normalised = study.spect.units != "Bq/ml"
    integrate = not normalised and options.time_model != "none"
    times = study.resolve_times(
        administration_datetime=options.administration_datetime,
        acquisition_given=options.acquisition_datetime,
        hours_after_administration=options.hours_after_administration,
        accepted=options.accepted_assumptions,
        required=integrate,
    )
    administration, acquisition, hours = times.administration, times.acquisition, times.hours
    warnings.extend(w for w in times.warnings if w not in warnings)
    factor_s = None
    if integrate:
        outside = "time_outside_model_range" in options.accepted_assumptions
        factor_s = time_integration_factor_s(
            options.time_model,
            hours,
            effective_half_life_h=options.effective_half_life_h,
            allow_outside_model_range=outside,
        )
        why = outside_model_range(options.time_model, hours)
        if why:
            warnings.append(f"ASSUMED (time_outside_model_range): {why}; the dose may be off by tens of %")
    elif normalised:
        warnings.append("activity is MBq-normalised: the dose-rate map is per MBq in the field of view; no RT Dose in Gy")
    else:
        warnings.append("dose rate only (time model none): no absorbed dose and no RT Dose; the absorbed dose comes "
                        "from several time points of the cycle")

    prepared = prepare_inputs(study, density_curve=options.density_curve, warnings=warnings, progress=progress, lap=lap)
    activity, density, resample_info, curve = (
        prepared.activity_bq_per_ml,
        prepared.density_g_cm3,
        prepared.resample_info,
        prepared.density_curve,
    )

    _note(progress, "dose_rate", 0.35)
    # The region files' and the report's libraries are imported on a second thread while the dose is
    # convolved (scipy.fft and torch leave the GIL): ~1.2 CPU s on a first run (issue 20: regions +
    # report wall time); on a loaded machine their CPU time is then counted under dose_rate.
    _import_in_background(_OUTPUT_LIBRARIES)
    rate, sigma, rate_info = compute_dose_rate_and_sigma(activity, density, options=options)
    uncertainty_info = rate_info.pop("uncertainty", None)  # summary["uncertainty"], not under dose_rate too
    lap("dose_rate")

    # The automatic regions come before the export: the RT Dose's precision is chosen for every mean the
    # summary quotes, theirs included (rtdose_bits); their time is counted under "regions".
    regions = None
    region_warnings: list[str] = list(region_notes)
    if options.regions_path is None and not np.any(study.spect.array > 0):
        # Hot spots need activity: with none (accepted by NO_ACTIVITY_ASSUMPTION) there is nothing to segment.
        region_warnings.append(f"regions: none given; no automatic lesion regions: the SPECT holds no activity "
                               f"({NO_ACTIVITY_ASSUMPTION})")
    elif options.regions_path is None:
        from spectdose.region_report import automatic_lesions

        region_set = automatic_lesions(activity, density)
        region_warnings.append(f"regions: none given; {len(region_set.regions)} automatic region(s), unreviewed "
                               f"focal hot spots ({region_set.description}); review autoseg.dcm before use")
        if not region_set.regions:
            region_warnings += region_set.warnings  # what was left out, when nothing is kept
    lap("regions")

    _note(progress, "export", 0.85)
    rate_mgy_per_h = Volume(rate.array * np.float32(MGY_PER_H_PER_GY_PER_S), rate.grid, "mGy/h/MBq" if normalised else "mGy/h")
    dose = Volume(rate.array * np.float32(factor_s), rate.grid, "Gy") if integrate else None
    # D = Ddot * tau with a fixed tau: sigma_D = tau * sigma_Ddot (the time model's own error is not in it).
    dose_sigma = Volume(sigma.array * np.float32(factor_s), sigma.grid, "Gy") if sigma is not None and integrate else None
    time_facts = {"administration": administration, "acquisition": acquisition, "hours": hours,
                  "integration_factor_s": factor_s}
    sigma_mgy_per_h = (Volume(sigma.array * np.float32(MGY_PER_H_PER_GY_PER_S), sigma.grid, rate_mgy_per_h.units)
                       if sigma is not None else None)
    tissue = density.array >= LOW_DENSITY_CUTOFF_G_CM3
    dose_references_gy = _quoted_means(dose, tissue, region_set)
    # The map's references: the same means in mGy/h (D = Ddot x tau, so no second pass over the masks).
    rate_references = ([r * MGY_PER_H_PER_GY_PER_S / factor_s for r in dose_references_gy]
                       if dose is not None else _quoted_means(rate_mgy_per_h, tissue, region_set))
    sigma_references = _quoted_means(sigma_mgy_per_h, tissue, region_set)
    with_regions = region_set is not None and bool(region_set.regions)
    outputs, export_info = _export(out_dir, rate_mgy_per_h, dose, study, options, rate_info, time_facts, warnings,
                                   replaces or {}, sigma_mgy_per_h=sigma_mgy_per_h,
                                   dose_references_gy=dose_references_gy,
                                   rate_references=rate_references,
                                   sigma_references=sigma_references,
                                   quoted_masks=(tissue, region_set),
                                   defer_rtdose=with_regions)
    delivered = export_info.pop("delivered")
    # With regions the RT Dose is written after their DVHs are added to it: once (issue 20).
    rtdose_dataset = export_info.pop("rtdose_dataset", None)
    # Facts of the dose-rate volume, then the volume itself is let go when there is an absorbed dose
    # (issue 20: one copy per volume while the regions and the report run).
    rate_facts = {"max_mgy_per_h": float(delivered["doserate"].array.max()),
                  "mean_in_tissue_mgy_per_h": float(rate_mgy_per_h.array[tissue].mean()) if tissue.any() else 0.0}
    if dose is not None:
        del delivered["doserate"]
        rate_mgy_per_h = None
    lap("export")

    from spectdose.region_report import coverage_warnings, field_of_view_summary
    from spectdose.regions import FieldOfView

    field_of_view = FieldOfView.from_transform(study.spect.grid, resample_info.get("ct_to_spect_transform"))
    if with_regions:
        from spectdose.region_report import safe_regions_after_dose

        region_warnings += region_set.warnings
        regions, region_outputs, region_info, regions_error = safe_regions_after_dose(
            out_dir, study, region_set, dose, rate, outputs, rate_sigma_gy_per_s=sigma, dose_sigma_gy=dose_sigma,
            field_of_view=field_of_view, dose_method=options.method,
            network_sha256=rate_info.get("network", {}).get("weights_sha256"),
            accept_partial=PARTIAL_COVERAGE_ASSUMPTION in options.accepted_assumptions, rtdose=rtdose_dataset)
        outputs.update(region_outputs)
        export_info["uids"].update(region_info.get("uids", {}))
        region_warnings += coverage_warnings(regions or [])
    if regions_error:
        region_warnings.append(f"REGIONS NOT REPORTED: {regions_error}")
    lap("regions")
    if rtdose_dataset is not None:
        # Its DVHs when the region step got that far (else as exported); the export's own write, counted there.
        rtdose_dataset.save_as(outputs["rtdose"], enforce_file_format=True)
        export_info["uids"]["rtdose"] = _dataset_uids(rtdose_dataset)
        del rtdose_dataset
        lap("export")
    from spectdose.maxima import maxima_summary

    # Maxima of what is delivered (the RT Dose, else the map), with where they lie (issue 18).
    maxima = maxima_summary(delivered["rtdose"] if dose is not None else delivered["doserate"], density,
                            region_set, grid_name=export_info["output_grid"]["name"])
    summary = {
        "software": {"name": "spectdose", "version": __version__},
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "method": options.method,
        "series": {
            "ct": _series_summary(study.ct_series),
            "spect": _series_summary(study.spect_series),
        },
        "geometry": {
            "ct": _grid_summary(study.ct.grid),
            "spect": _grid_summary(study.spect.grid),
            "output_grid": export_info["output_grid"],
        },
        "provenance": export_info["provenance"],
        "content_sha256": export_info["content_sha256"],
        "uids": export_info["uids"],
        "replaces": export_info["replaces"],
        "activity": {
            "units": study.spect.units,
            "calibration": study.calibration_note,
            "injected_activity_mbq": (
                study.administration.injected_activity_bq / 1e6 if study.administration.injected_activity_bq else None
            ),
            "total_in_spect_fov_mbq": resample_info["activity_in_spect_fov_bq"] / 1e6,
            "total_on_ct_grid_mbq": resample_info["activity_on_ct_grid_bq"] / 1e6,
            "conserved_on_resampling_pct": resample_info.get("activity_conserved_pct"),
        },
        "registration": resample_info.get("registration"),
        "density": {"curve": curve.name, "source": curve.source, "low_density_cutoff_g_cm3": LOW_DENSITY_CUTOFF_G_CM3},
        "dose_rate": {
            **rate_info,
            **rate_facts,
        },
        "time": {
            "administration": administration.isoformat() if administration else None,
            "acquisition": acquisition.isoformat() if acquisition else None,
            "hours_since_administration": hours,
            "source": times.source,
            "model": options.time_model if integrate else None,
            "effective_half_life_h": options.effective_half_life_h,
            **(_model_half_life(options.time_model, hours, options.effective_half_life_h) if integrate else {}),
            "integration_factor_h": factor_s / 3600.0 if factor_s else None,
        },
        "dose": (
            # The mean in tissue is the first quoted mean (_quoted_means), taken before the export.
            {"max_gy": float(delivered["rtdose"].array.max()),
             "mean_in_tissue_gy": dose_references_gy[0] if tissue.any() else 0.0}
            if dose is not None
            else None
        ),
        "uncertainty": (
            {
                **uncertainty_info,
                "map": OUTPUT_NAMES["doserate_sigma"],
                "mean_in_tissue_dose_rate_sigma_mgy_per_h": sigma_references[0] if tissue.any() else 0.0,
                "absorbed_dose": "sigma_D = integration factor x sigma of the dose rate; the time model's own error is not included",
                "regions": "per region: the mean of its voxels' sigmas (errors taken as fully correlated), "
                "uncertainty_dose_rate_mgy_per_h and uncertainty_gy",
            }
            if sigma_mgy_per_h is not None
            else None
        ),
        "maxima": maxima,
        "regions": regions,
        "regions_source": (
            {"kind": region_set.source, "file": str(options.regions_path) if options.regions_path else None,
             "sop_instance_uid": region_set.sop_instance_uid or None, "method": region_set.description or None}
            if region_set is not None else None
        ),
        "regions_error": regions_error,
        "field_of_view": field_of_view_summary(field_of_view, study.ct.grid, regions),
        # Warnings about the dose travel in every output (RT Dose, map, summary, job); notes about the
        # regions (automatic lesions, a region set that could not be used) do not change the dose.
        "warnings": warnings,
        "region_warnings": region_warnings,
        "ignored_files": [{"file": f, "reason": r} for f, r in study.ignored_files],
        "timings_s": timings,
        "outputs": {k: p.name for k, p in outputs.items()},
    }
    _note(progress, "report", 0.95)
    report_outputs = _write_report(out_dir, study, dose if dose is not None else rate_mgy_per_h,
                                   region_set if regions else None, summary, outputs)
    outputs.update(report_outputs)
    summary["outputs"].update({k: p.name for k, p in report_outputs.items()})
    summary["uids"]["report_pdf"] = _output_uids(report_outputs["report_pdf"])
    lap("report")
    outputs["summary_json"] = out_dir / OUTPUT_NAMES["summary_json"]
    outputs["summary_txt"] = out_dir / OUTPUT_NAMES["summary_txt"]
    summary["outputs"].update({"summary_json": OUTPUT_NAMES["summary_json"], "summary_txt": OUTPUT_NAMES["summary_txt"]})
    outputs["summary_json"].write_text(json.dumps(summary, indent=2, default=json_default))
    outputs["summary_txt"].write_text(format_summary(summary))
    _note(progress, "done", 1.0)
    return DoseResult(study, rate, dose, outputs, summary)


def _export(
    out_dir: Path,
    rate_mgy_per_h: Volume,
    dose_gy: Volume | None,
    study: Study,
    options: DoseOptions,
    rate_info: dict,
    time_facts: dict,
    warnings: list[str],
    replaces: Mapping[str, Replaces],
    *,
    sigma_mgy_per_h: Volume | None = None,
    dose_references_gy: Sequence[float] = (),
    rate_references: Sequence[float] = (),
    sigma_references: Sequence[float] = (),
    quoted_masks: tuple[np.ndarray, object] | None = None,
    defer_rtdose: bool = False,
) -> tuple[dict[str, Path], dict]:
    """Write the dose-rate map (and its 1-sigma map) and RT Dose on the chosen output grid; UIDs from the content.

    ``defer_rtdose``: the RT Dose is built, not written: ``info["rtdose_dataset"]`` is for the
    caller to write at ``outputs["rtdose"]`` once the regions' DVHs are in it.

    ``dose_references_gy``: the mean doses the summary quotes; the RT Dose is 16-bit when its rounding
    keeps each within 0.1 % (spectdose.dicom.export.rtdose_bits), else 32-bit. ``rate_references`` and
    ``sigma_references``: the same means of the dose rate and of its sigma (the map's units); each map is
    16-bit (JPEG-LS at rest) on the same criterion (spectdose.dicom.export.dose_rate_map_bits), else float32.
    ``quoted_masks``: (tissue, region set) of those means on the CT grid: on that grid, a worst case
    above 0.1 % is settled by measuring each mean rounded as stored (:func:`_rounding_errors`)."""
    from spectdose.dicom.export import (
        average_onto_grid,
        build_rtdose,
        check_replacements,
        content_digest,
        dose_rate_map_bits,
        grid_for_option,
        rtdose_bits,
        write_dose_rate_map,
    )

    replaces = check_replacements(replaces)
    grid = grid_for_option(study.ct.grid, study.spect.grid, options.dose_grid, dose_grid_spacing_mm(options.dose_grid))
    model_sha256 = rate_info.get("network", {}).get("weights_sha256")
    hours, factor_s = time_facts["hours"], time_facts["integration_factor_s"]
    provenance = {
        "method": options.method.upper() + (f" ({rate_info['network']['name']})" if "network" in rate_info else ""),
        "software": f"spectdose {__version__}",
        "model_sha256": model_sha256,
        "time_model": (
            f"{options.time_model}, t = {hours:.2f} h, integration factor {factor_s / 3600:.4g} h"
            if factor_s
            else "none (dose rate only)"
        ),
        "administration": time_facts["administration"].isoformat() if time_facts["administration"] else None,
        "acquisition": time_facts["acquisition"].isoformat() if time_facts["acquisition"] else None,
        "calibration": study.calibration_note,
        "density_curve": options.density_curve,
        "dose_grid": "CT" if grid is study.ct.grid else "x".join(f"{s:g}" for s in grid.spacing_mm) + " mm",
    }
    digest = content_digest(
        study,
        {"options": options.key(), "time": time_facts, "model_sha256": model_sha256, "warnings": warnings,
         "replaces": {k: r.text() for k, r in sorted(replaces.items())}},
    )
    provenance["inputs_sha256"] = digest[:16]
    common = dict(method=options.method, options_key=options.key(), content_digest=digest, warnings=warnings,
                  provenance=provenance)
    out_dir.mkdir(parents=True, exist_ok=True)
    # The volumes as delivered (on the output grid): the summary's maxima are theirs (issue 18).
    delivered = {"doserate": average_onto_grid(rate_mgy_per_h, grid)}
    on_ct_grid = quoted_masks is not None and grid is study.ct.grid

    def measured(volume: Volume):
        return (lambda step: _rounding_errors(volume, *quoted_masks, step)) if on_ct_grid else None

    float_maps = options.map_precision == "float32"
    asked = {"bits": 32, "why": "float32 asked (map_precision)"}
    map_bits, map_precision = (32, asked) if float_maps else dose_rate_map_bits(
        delivered["doserate"].array, rate_references, measured_errors=measured(delivered["doserate"]))
    precision = {"doserate": map_precision}
    outputs = {
        "doserate": write_dose_rate_map(out_dir / OUTPUT_NAMES["doserate"], delivered["doserate"],
                                        study, replaces=replaces.get("doserate"), bits=map_bits, **common)
    }
    if sigma_mgy_per_h is not None:
        # Averaging sigma over output voxels treats the errors within one as fully correlated
        # (they are, over the SPECT resolution): the conservative choice.
        sigma_delivered = average_onto_grid(sigma_mgy_per_h, grid)
        sigma_bits, precision["doserate_sigma"] = (32, asked) if float_maps else dose_rate_map_bits(
            sigma_delivered.array, sigma_references, measured_errors=measured(sigma_delivered))
        outputs["doserate_sigma"] = write_dose_rate_map(
            out_dir / OUTPUT_NAMES["doserate_sigma"], sigma_delivered, study,
            replaces=replaces.get("doserate_sigma"), sigma=True, series_number=903, bits=sigma_bits, **common)
        del sigma_delivered
    rtdose_precision = None
    if dose_gy is not None:
        delivered["rtdose"] = average_onto_grid(dose_gy, grid)
        bits, rtdose_precision = rtdose_bits(delivered["rtdose"].array, dose_references_gy,
                                             measured_errors=measured(delivered["rtdose"]))
        rtdose_dataset = build_rtdose(
            delivered["rtdose"],
            study,
            description=f"{study.administration.nuclide} absorbed dose ({options.method.upper()}, {options.time_model})",
            replaces=replaces.get("rtdose"),
            bits=bits,
            **common,
        )
        outputs["rtdose"] = out_dir / OUTPUT_NAMES["rtdose"]
        if not defer_rtdose:
            rtdose_dataset.save_as(outputs["rtdose"], enforce_file_format=True)
    info = {
        "output_grid": {"name": provenance["dose_grid"], **_grid_summary(grid),
                        "bytes_per_object": int(np.prod(grid.shape)) * 4,
                        **({"rtdose_precision": rtdose_precision} if rtdose_precision else {}),
                        "map_precision": precision},
        "provenance": provenance,
        "content_sha256": digest,
        "uids": {name: _output_uids(path) for name, path in outputs.items() if name != "rtdose"},
        "replaces": {k: {"series_instance_uid": r.series_instance_uid, "reason": r.reason} for k, r in replaces.items()},
        "delivered": delivered,  # popped by run(): volumes, not summary facts
    }
    if dose_gy is not None:
        info["uids"]["rtdose"] = _dataset_uids(rtdose_dataset)
        if defer_rtdose:
            info["rtdose_dataset"] = rtdose_dataset  # popped by run() and written there
    return outputs, info


def _quoted_means(volume: Volume | None, tissue: np.ndarray, region_set) -> list[float]:
    """The means the summary quotes before the automatic regions exist: in tissue, and in each given
    region (on the CT grid); what the RT Dose's and the maps' precision is chosen for."""
    if volume is None:
        return []
    means = [float(volume.array[tissue].mean())] if tissue.any() else []
    for region in getattr(region_set, "regions", None) or []:
        box, local = region.bounds()
        if local.any():
            means.append(float(volume.array[box][local].mean()))
    return means


def _rounding_errors(volume: Volume, tissue: np.ndarray, region_set, step: float) -> list[float]:
    """The relative change of each mean :func:`_quoted_means` quotes when ``volume`` is rounded to
    multiples of ``step``, as a 16-bit object stores it (round half to even, as the writers do):
    measured, slab by slab in float64 (no second copy of the volume)."""
    values = volume.array
    errors = []
    if tissue.any():
        total, shift = 0.0, 0.0
        for k in range(values.shape[0]):
            inside = values[k][tissue[k]].astype(np.float64)
            total += float(inside.sum())
            shift += float((np.rint(inside / step) * step - inside).sum())
        errors.append(shift / total if total > 0 else 0.0)
    for region in getattr(region_set, "regions", None) or []:
        box, local = region.bounds()
        if local.any():
            inside = values[box][local].astype(np.float64)
            total = float(inside.sum())
            errors.append(float((np.rint(inside / step) * step - inside).sum()) / total if total > 0 else 0.0)
    return errors


def _write_report(out_dir: Path, study: Study, dose: Volume, regions, summary: dict,
                  outputs: Mapping[str, Path]) -> dict[str, Path]:
    """The view volumes of the results page, the PDF report and its Encapsulated PDF.

    ``dose`` is the absorbed dose (Gy) on the CT grid, or the dose rate when there is none;
    ``regions`` the region set whose statistics are in ``summary`` (None when none were reported).
    """
    import pydicom

    from spectdose.dicom.pdf import write_encapsulated_pdf
    from spectdose.report import ViewVolumes, identifiers_from_study, report_pdf_bytes

    maxima = summary.get("maxima") or {}
    points = {name: maxima[key]["lps_mm"] for name, key in (("voxel maximum", "max_location"),
                                                           ("maximum in soft tissue", "max_in_soft_tissue_location"))
              if maxima.get(key)}
    view = ViewVolumes.from_volumes(study.ct, dose, regions, points_lps_mm=points)
    # view.npz is compressed (zlib lets go of the GIL) on a second core while the PDF is drawn.
    with ThreadPoolExecutor(max_workers=1) as pool:
        saved = pool.submit(view.save, out_dir / OUTPUT_NAMES["view"])
        pdf = report_pdf_bytes(view, summary, identifiers_from_study(study))
        written = {"view": saved.result()}
    written["report"] = out_dir / OUTPUT_NAMES["report"]
    written["report"].write_bytes(pdf)
    sources = []
    for kind in ("rtdose", "doserate"):
        if kind in outputs:
            header = pydicom.dcmread(outputs[kind], stop_before_pixels=True, specific_tags=["SOPClassUID", "SOPInstanceUID"])
            sources.append((str(header.SOPClassUID), str(header.SOPInstanceUID)))
    written["report_pdf"] = write_encapsulated_pdf(out_dir / OUTPUT_NAMES["report_pdf"], pdf, study,
                                                   content_digest=summary["content_sha256"], sources=sources)
    return written


def _model_half_life(model: str, hours: float | None, effective_half_life_h: float | None) -> dict:
    """The half-life the single-time-point model integrates with (spectdose.dose.time_integration_factor_s)."""
    from spectdose.constants import LU177_HALF_LIFE_H

    if model == "hanscheid":
        return {"model_half_life_h": hours, "half_life_note": "Hanscheid: effective half-life taken equal to the "
                "imaging time t (Hanscheid et al., J Nucl Med 59 (2018) 75)"}
    if model == "physical":
        return {"model_half_life_h": LU177_HALF_LIFE_H, "half_life_note": "physical decay of Lu-177 only (no "
                "biological washout): an upper bound"}
    if model == "effective":
        return {"model_half_life_h": effective_half_life_h, "half_life_note": "effective half-life given by the user"}
    return {}


def _dataset_uids(dataset) -> dict:
    return {"series_instance_uid": dataset.SeriesInstanceUID, "sop_instance_uid": dataset.SOPInstanceUID}


def _output_uids(path: Path) -> dict:
    import pydicom

    header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "SOPInstanceUID"])
    return {"series_instance_uid": header.SeriesInstanceUID, "sop_instance_uid": header.SOPInstanceUID}


def json_default(obj):
    """``json.dumps(default=...)`` for the summaries: numpy scalars, paths and times."""
    if isinstance(obj, np.generic):
        return obj.item()
    if isinstance(obj, Path | dt.datetime):
        return str(obj)
    raise TypeError(f"not JSON serialisable: {type(obj)}")


def _series_summary(ref) -> dict:
    return {
        "series_instance_uid": ref.series_instance_uid,
        "modality": ref.modality,
        "description": ref.series_description,
        "instances": len(ref.sop_instance_uids),
        "frame_of_reference_uid": ref.frame_of_reference_uid,
        "manufacturer": ref.manufacturer,
    }


def _grid_summary(grid) -> dict:
    return {
        "shape_zyx": list(grid.shape),
        "spacing_mm_zyx": [round(s, 4) for s in grid.spacing_mm],
        "origin_lps_mm": [round(o, 3) for o in grid.origin_mm],
    }


def _fmt(value, unit: str = "", digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "n/a"
    return f"{value:.{digits}g} {unit}".strip()


def _highest_d2(rows) -> dict | None:
    """The region row with the highest D2 (regions without a dose statistic left out)."""
    rows = [r for r in rows if isinstance(r.get("d2_gy"), int | float)]
    return max(rows, key=lambda r: r["d2_gy"]) if rows else None


def format_summary(s: dict) -> str:
    """The human-readable twin of summary.json."""
    a, t, g = s["activity"], s["time"], s["geometry"]
    lines = [
        f"spectdose {s['software']['version']} - Lu-177 dosimetry ({s['method'].upper()})",
        "",
        f"CT   : {s['series']['ct']['description'] or '(no description)'}; {s['series']['ct']['instances']} images; "
        f"grid {g['ct']['shape_zyx']} at {g['ct']['spacing_mm_zyx']} mm (z, y, x)",
        f"SPECT: {s['series']['spect']['description'] or '(no description)'}; grid {g['spect']['shape_zyx']} at "
        f"{g['spect']['spacing_mm_zyx']} mm",
        f"Units: {a['units']} ({a['calibration']})",
        f"Activity in SPECT field of view: {_fmt(a['total_in_spect_fov_mbq'], 'MBq', 4)}; on CT grid "
        f"{_fmt(a['total_on_ct_grid_mbq'], 'MBq', 4)}; injected {_fmt(a['injected_activity_mbq'], 'MBq', 4)}",
        f"Density: {s['density']['curve']} ({s['density']['source']})",
        f"Time: administration {t['administration'] or 'unknown'}, acquisition {t['acquisition'] or 'unknown'}, "
        f"t = {_fmt(t['hours_since_administration'], 'h', 4)}"
        + (f"; time model {t['model']}, half-life {_fmt(t['model_half_life_h'], 'h', 4)} ({t['half_life_note']})"
           if t.get("model_half_life_h") is not None else ""),
        f"Dose rate: max {_fmt(s['dose_rate']['max_mgy_per_h'], 'mGy/h')}, mean in tissue "
        f"{_fmt(s['dose_rate']['mean_in_tissue_mgy_per_h'], 'mGy/h')}",
    ]
    m = s.get("maxima") or {}
    grid = f" (on the {m['grid']} grid of the {'RT Dose' if s['dose'] else 'dose-rate map'})" if m.get("grid") else ""
    if s["dose"]:
        lines.append(
            f"Absorbed dose ({t['model']}, factor {_fmt(t['integration_factor_h'], 'h', 4)}): max "
            f"{_fmt(s['dose']['max_gy'], 'Gy')}{grid}, mean in tissue {_fmt(s['dose']['mean_in_tissue_gy'], 'Gy')}"
        )
    if m:
        lines.append(f"  Maximum in soft tissue (density >= {m['soft_tissue_min_density_g_cm3']:g} g/cm3): "
                     f"{m['max_in_soft_tissue_text']}")
        lines.append(f"  Voxel maximum: {m['max_location_text']}")
    top = _highest_d2(s.get("regions") or [])
    if top:
        lines.append(f"  Highest region D2 (dose to the hottest 2 % of a region): {top['region']} {_fmt(top['d2_gy'], 'Gy')}")
    if s.get("uncertainty"):
        u = s["uncertainty"]
        lines.append(f"Uncertainty (1 sigma, {u['method']}): mean in tissue "
                     f"{_fmt(u['mean_in_tissue_dose_rate_sigma_mgy_per_h'], 'mGy/h')}; map {u['map']}")
    from spectdose.region_report import field_of_view_text

    fov_text = field_of_view_text(s.get("field_of_view"))
    if fov_text:
        lines.append(fov_text)
    if s.get("regions"):
        lines.append("")
        lines.append(f"{'region':<22}{'ml':>9}{'mGy/h':>10}{'mean Gy':>10}{'D2 Gy':>9}{'D98 Gy':>9}")
        for r in s["regions"]:
            def num(key, width, r=r):
                value = r.get(key)
                return f"{value:>{width}.3g}" if isinstance(value, int | float) else f"{'-':>{width}}"

            coverage = r.get("coverage")
            lines.append(
                f"{r['region'][:21]:<22}{r['volume_ml']:>9.1f}{num('mean_dose_rate_mgy_per_h', 10)}"
                + (num("mean_gy", 10) + num("d2_gy", 9) + num("d98_gy", 9) if "mean_gy" in r else "")
                + (f"  {coverage}" + (f" ({100 * r['spect_coverage_fraction']:.0f} % in SPECT)"
                                      if isinstance(r.get("spect_coverage_fraction"), int | float) else "")
                   if coverage and coverage != "covered" else "")
                + ("  unreviewed, automatic" if r.get("automatic") else "")
            )
            for note in (f"at {r['location']}" if r.get("location") else "", r.get("size_note") or ""):
                if note:
                    lines.append(f"    {note}")
        lines.append("")
    for w in s["warnings"]:
        lines.append(f"WARNING: {w}")
    for w in s.get("region_warnings", []):
        lines.append(f"REGIONS: {w}")
    if s["ignored_files"]:
        lines.append(f"Ignored {len(s['ignored_files'])} file(s); see summary.json")
    lines.append("Outputs: " + ", ".join(sorted(s["outputs"].values())))
    return "\n".join(lines) + "\n"
