"""The multi-time-point route: several SPECT/CT studies of one cycle in, cycle dose out.

:func:`run_cycle` reads each time point with the single-study machinery of
:mod:`spectdose.pipeline` (ingest, time facts, SPECT on the CT grid, density, dose rate),
checks that the studies belong together, integrates them on the first time point's CT
(:func:`spectdose.timeseries.integrate_cycle`) and writes:

``rtdose.dcm``          cycle absorbed dose (Gy) on the reference CT (RT Dose)
``teff_pm.dcm``         effective half-life (h) per voxel (Parametric Map, UCUM ``h``)
``summary.json/.txt``   time points, registrations, per-region curves, fits, TIA, dose, BED
``tac_<region>.png``    time-activity (dose-rate) curve and fit per region

:func:`cycle_study_paths` finds the time points in a folder written by
``spectdose phantom --time-points`` (or any folder whose subfolders each hold one study).
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import hashlib
import json
from collections.abc import Callable, Sequence
from pathlib import Path

import numpy as np

from spectdose import __version__
from spectdose.constants import LU177_HALF_LIFE_H, MGY_PER_H_PER_GY_PER_S
from spectdose.density import load_curve
from spectdose.dicom.ingest import load_study
from spectdose.errors import InputError, SpectdoseError
from spectdose.geometry import Volume
from spectdose.pipeline import (
    PARTIAL_COVERAGE_ASSUMPTION,
    DoseOptions,
    compute_dose_rate,
    json_default,
    option_hint,
    prepare_inputs,
    stage_timer,
)
from spectdose.regions import COVERED_MIN_FRACTION, FieldOfView
from spectdose.study import Study
from spectdose.timeseries import TimePoint, integrate_cycle, target_registration_error_mm

__all__ = [
    "run_cycle",
    "CycleResult",
    "cycle_study_paths",
    "is_cycle_folder",
    "phantom_landmarks",
    "CYCLE_OUTPUT_NAMES",
]

CYCLE_OUTPUT_NAMES = {
    "rtdose": "rtdose.dcm",
    "effective_half_life": "teff_pm.dcm",
    "summary_json": "summary.json",
    "summary_txt": "summary.txt",
}
# Two time points closer than this are the same session (a duplicate), not a time point.
_DUPLICATE_WITHIN_H = 0.5
# Administrations further apart than this are different administrations (clock rounding
# and a header written in minutes allow a little).
_SAME_ADMINISTRATION_S = 120.0
# Injected activities differing by more than this are different administrations.
_SAME_ACTIVITY_REL = 0.01

ProgressCallback = Callable[[str, float], None]


@dataclasses.dataclass
class CycleResult:
    studies: list[Study]
    dose_gy: Volume
    effective_half_life_h: Volume
    outputs: dict[str, Path]
    summary: dict


def cycle_study_paths(folder: Path) -> list[Path] | None:
    """The time points' study folders inside ``folder``, or None if it is not a cycle folder.

    A cycle folder holds ``cycle.json`` (``spectdose phantom --time-points``), or no DICOM of
    its own and at least two subfolders that each hold a ``dicom`` folder. A single study
    (``dicom/CT`` + ``dicom/NM``) is not a cycle folder.
    """
    folder = Path(folder)
    if not folder.is_dir():
        return None
    manifest = folder / "cycle.json"
    if manifest.is_file():
        try:
            data = json.loads(manifest.read_text())
            paths = [folder / e["dicom_dir"] for e in data["time_points"] if "dicom_dir" in e]
        except (ValueError, KeyError, TypeError) as exc:
            raise InputError(f"{manifest} is not a readable cycle manifest: {exc}") from exc
        return paths if len(paths) >= 2 else None
    subs = sorted(p for p in folder.iterdir() if p.is_dir() and (p / "dicom").is_dir())
    if len(subs) >= 2 and not any(
        p.is_file() for p in folder.iterdir() if p.suffix.lower() == ".dcm"
    ):
        return [p / "dicom" for p in subs]
    return None


def phantom_landmarks(study_paths: Sequence[Path]) -> list[dict[str, list[float]]] | None:
    """Landmarks (LPS mm) of virtual-patient time points, from ``<study>/../truth/phantom.json``.

    A study written by ``spectdose phantom --time-points`` carries the true position of
    organ and lesion centres in each session; with them the summary reports the target
    registration error. None unless every study has them.
    """
    out = []
    for path in study_paths:
        info = Path(path).parent / "truth" / "phantom.json"
        try:
            out.append(json.loads(info.read_text())["cycle"]["landmarks_mm"])
        except (OSError, ValueError, KeyError, TypeError):
            return None
    return out


def is_cycle_folder(path: Path) -> bool:
    return cycle_study_paths(path) is not None


def _note(progress: ProgressCallback | None, stage: str, fraction: float) -> None:
    if progress is not None:
        progress(stage, fraction)


def _refuse_single_study_options(options: DoseOptions) -> None:
    """Options that name one study's facts cannot apply to every time point."""
    if options.allow_normalised:
        raise InputError(
            f"a cycle needs calibrated SPECT (Bq/ml) at every time point; {option_hint('allow_normalised')} "
            "applies to a single study only"
        )
    for field in (
        "acquisition_datetime",
        "hours_after_administration",
        "spect_series_uid",
        "ct_series_uid",
    ):
        if getattr(options, field) is not None:
            raise InputError(
                f"{option_hint(field)} names one study's fact and cannot apply to all time points of a cycle; "
                "each study's header must carry it (give one study to use the flag)"
            )
    if options.uncertainty:
        raise InputError(
            f"{option_hint('uncertainty')} is given for one time point (a dose-rate map and its sigma); the cycle's "
            "integration does not carry it yet: give one study"
        )
    if options.time_model != "hanscheid" or options.effective_half_life_h is not None:
        raise InputError(
            f"{option_hint('time_model')} / {option_hint('effective_half_life_h')} are single-time-point models; "
            "a cycle is integrated from its time points (--integration-model)"
        )


def _load_time_point(path: Path, index: int, options: DoseOptions) -> tuple[Study, float, dict]:
    label = f"time point {index + 1} ({path})"
    try:
        study = load_study(
            path,
            calibrations=options.calibrations,
            sensitivity_cps_per_mbq=options.sensitivity_cps_per_mbq,
            calling_ae_title=options.calling_ae_title,
            allow_normalised=False,
            energy_window_kev=options.energy_window_kev,
            administration_datetime=options.administration_datetime,
            accepted_assumptions=options.accepted_assumptions,
            single_study=False,
        )
        if study.spect.units != "Bq/ml":
            raise InputError(
                f"its SPECT is not calibrated to Bq/ml (units {study.spect.units!r}): give the camera's "
                f"{option_hint('sensitivity_cps_per_mbq')} or --calibrations"
            )
        times = study.resolve_times(
            administration_datetime=options.administration_datetime,
            accepted=options.accepted_assumptions,
            required=True,
            single_study=False,
        )
    except SpectdoseError as exc:
        raise type(exc)(f"{label}: {exc}") from exc
    facts = {
        "administration": times.administration,
        "acquisition": times.acquisition,
        "source": times.source,
        "warnings": list(times.warnings),
    }
    return study, float(times.hours), facts


def _check_same_cycle(
    paths: Sequence[Path], studies: list[Study], hours: list[float], facts: list[dict]
) -> None:
    """Refuse studies that are not one patient's one administration, or duplicates."""
    first = studies[0]
    for k in range(1, len(studies)):
        s, where = studies[k], f"time point {k + 1} ({paths[k]})"
        if (s.patient.patient_id, s.patient.patient_name) != (
            first.patient.patient_id,
            first.patient.patient_name,
        ):
            raise InputError(
                f"{where} belongs to another patient (PatientID {s.patient.patient_id!r}, PatientName "
                f"{s.patient.patient_name!r}; time point 1: {first.patient.patient_id!r}, "
                f"{first.patient.patient_name!r}): a cycle is one patient's"
            )
        a0, ak = facts[0]["administration"], facts[k]["administration"]
        if (
            abs((ak.replace(tzinfo=None) - a0.replace(tzinfo=None)).total_seconds())
            > _SAME_ADMINISTRATION_S
        ):
            raise InputError(
                f"{where} is from another administration (RadiopharmaceuticalStartDateTime {ak.isoformat()}; time "
                f"point 1: {a0.isoformat()}): a cycle is one administration. If a header is wrong, give the "
                f"administration with {option_hint('administration_datetime')}"
            )
        q0, qk = first.administration.injected_activity_bq, s.administration.injected_activity_bq
        if q0 and qk and abs(qk / q0 - 1.0) > _SAME_ACTIVITY_REL:
            raise InputError(
                f"{where} records another administered activity (RadionuclideTotalDose {qk / 1e6:.1f} MBq; time "
                f"point 1: {q0 / 1e6:.1f} MBq): a cycle is one administration"
            )
    seen: dict[str, int] = {}
    for k, s in enumerate(studies):
        for uid in (s.spect_series.series_instance_uid, s.ct_series.series_instance_uid):
            if uid in seen and seen[uid] != k:
                raise InputError(
                    f"time points {seen[uid] + 1} ({paths[seen[uid]]}) and {k + 1} ({paths[k]}) share series "
                    f"{uid}: the same study given twice (a duplicate time point)"
                )
            seen[uid] = k
    order = np.argsort(hours)
    for a, b in zip(order[:-1], order[1:], strict=True):
        if hours[b] - hours[a] < _DUPLICATE_WITHIN_H:
            raise InputError(
                f"time points {a + 1} ({paths[a]}) and {b + 1} ({paths[b]}) were acquired {hours[a]:.2f} h and "
                f"{hours[b]:.2f} h after administration: a duplicate time point (acquisition date-times less than "
                f"{_DUPLICATE_WITHIN_H} h apart)"
            )


def run_cycle(
    study_paths: Sequence[str | Path],
    out_dir: str | Path,
    options: DoseOptions | None = None,
    *,
    registration: str = "rigid",
    integration_model: str = "auto",
    voxel_model: str = "mono",
    progress: ProgressCallback | None = None,
) -> CycleResult:
    """Absorbed dose of one cycle from several SPECT/CT studies (time points) of it.

    Each study is read and turned into a dose rate exactly as :func:`spectdose.pipeline.run`
    does (same options: method, density curve, calibration); the time point comes from its
    header. The earliest time point is the reference: every CT is registered to its CT
    (``registration``: "rigid" or "deformable") and the cycle dose lies on its grid.

    Raises
    ------
    InputError
        Fewer than 2 studies; a single-study option; a study that cannot be read, is not
        calibrated, has no usable time or was acquired before the administration (the message
        names the time point); studies of different patients or administrations; a
        duplicate time point; a registration that fails its quality check
        (:class:`spectdose.timeseries.RegistrationError`).
    """
    options = options or DoseOptions()
    paths = [Path(p) for p in study_paths]
    if len(paths) < 2:
        raise InputError("a cycle needs at least 2 studies (time points)")
    _refuse_single_study_options(options)
    out_dir = Path(out_dir)
    timings, lap = stage_timer()

    _note(progress, "ingest", 0.0)
    loaded = [_load_time_point(p, k, options) for k, p in enumerate(paths)]
    studies = [s for s, _, _ in loaded]
    hours = [h for _, h, _ in loaded]
    facts = [f for _, _, f in loaded]
    _check_same_cycle(paths, studies, hours, facts)
    order = list(np.argsort(hours))
    paths = [paths[k] for k in order]
    studies = [studies[k] for k in order]
    hours = [hours[k] for k in order]
    facts = [facts[k] for k in order]
    lap("ingest")

    load_curve(options.density_curve)  # a bad curve fails before any time point is computed
    warnings: list[str] = []
    time_points: list[TimePoint] = []
    tp_summaries: list[dict] = []
    rate_info: dict = {}
    for k, study in enumerate(studies):
        _note(
            progress, f"dose rate, time point {k + 1}/{len(studies)}", 0.05 + 0.5 * k / len(studies)
        )
        tp_warnings = list(study.warnings) + facts[k]["warnings"]
        prepared = prepare_inputs(study, density_curve=options.density_curve, warnings=tp_warnings)
        activity, density = prepared.activity_bq_per_ml, prepared.density_g_cm3
        resample_info = prepared.resample_info
        rate, rate_info = compute_dose_rate(activity, density, options=options)
        label = f"t{k + 1}"
        seen_by_spect = FieldOfView.from_transform(study.spect.grid, resample_info.get("ct_to_spect_transform"))
        time_points.append(TimePoint(hours[k], study.ct, rate, activity, label, spect_inside=seen_by_spect.inside))
        warnings.extend(f"time point {k + 1} ({hours[k]:.1f} h): {w}" for w in tp_warnings)
        tp_summaries.append(
            {
                "index": k + 1,
                "path": str(paths[k]),
                "study_instance_uid": study.ct_series.study_instance_uid,
                "spect_series_instance_uid": study.spect_series.series_instance_uid,
                "ct_series_instance_uid": study.ct_series.series_instance_uid,
                "acquisition": facts[k]["acquisition"].isoformat(),
                "administration": facts[k]["administration"].isoformat(),
                "hours": round(hours[k], 4),
                "time_source": facts[k]["source"],
                "activity_in_spect_fov_mbq": resample_info["activity_in_spect_fov_bq"] / 1e6,
                "dose_rate_max_mgy_per_h": float(rate.array.max() * MGY_PER_H_PER_GY_PER_S),
                "reference": k == 0,
            }
        )
        lap("dose_rate")

    masks: dict[str, np.ndarray] = {}
    if options.regions_path is not None:
        from spectdose.regions import load_segmentation_masks

        masks = load_segmentation_masks(options.regions_path, studies[0].ct.grid)
    _note(progress, "registration and integration", 0.6)
    result = integrate_cycle(
        time_points,
        regions=masks,
        registration=registration,
        region_model=integration_model,
        voxel_model=voxel_model,
        covered_min_fraction=COVERED_MIN_FRACTION,
        accept_partial=PARTIAL_COVERAGE_ASSUMPTION in options.accepted_assumptions,
    )
    for r in result.regions_not_reported:
        warnings.append(f"REGIONS NOT REPORTED: {r['region']} ({r['volume_ml']:.1f} ml) is {r['reason']}; its dose "
                        f"is not given (allow the part inside with {option_hint('accepted_assumptions')} "
                        f"{PARTIAL_COVERAGE_ASSUMPTION})")
    for r in result.regions:
        if r.get("coverage") == "partly covered":
            warnings.append(f"ASSUMED ({PARTIAL_COVERAGE_ASSUMPTION}): {r['region']} is only partly inside the SPECT "
                            f"(or CT) at some time point (coverage {r['spect_coverage_per_time_point']}): its dose "
                            "counts no activity for the part outside")
    landmarks = phantom_landmarks(paths)
    for k, (tp, reg) in enumerate(zip(tp_summaries, result.registrations, strict=True)):
        tp["registration"] = reg.to_dict() if reg is not None else "reference"
        if reg is not None and landmarks is not None:
            tre = target_registration_error_mm(reg, landmarks[0], landmarks[k])
            tp["registration"]["phantom_landmark_tre_mm"] = {
                "max": round(max(tre.values()), 3),
                "mean": round(float(np.mean(list(tre.values()))), 3),
                "landmarks": len(tre),
            }
    lap("registration_integration")

    _note(progress, "export", 0.85)
    out_dir.mkdir(parents=True, exist_ok=True)
    outputs, uids = _export(
        out_dir, result, studies, tp_summaries, options, registration, integration_model, warnings
    )
    plots = _plots(out_dir, result.regions, hours)
    outputs.update(plots)
    lap("export")

    tissue = result.dose_gy.array > 0
    regions = []
    for r in result.regions:
        entry = {k: v for k, v in r.items() if not k.startswith("_")}
        entry["plot"] = plots.get(f"tac_{r['region']}", Path("")).name or None
        regions.append(entry)
    summary = {
        "software": {"name": "spectdose", "version": __version__},
        "created": dt.datetime.now().isoformat(timespec="seconds"),
        "mode": "cycle",
        "method": options.method,
        "time_points": tp_summaries,
        "reference_time_point": 1,
        "administration": {
            "datetime": facts[0]["administration"].isoformat(),
            "nuclide": studies[0].administration.nuclide,
            "radiopharmaceutical": studies[0].administration.radiopharmaceutical,
            "injected_activity_mbq": (studies[0].administration.injected_activity_bq or 0) / 1e6
            or None,
        },
        "registration": {
            "mode": registration,
            "to": "time point 1 CT (earliest)",
            "per_time_point": [tp["registration"] for tp in tp_summaries],
        },
        "integration": {
            "region_model": integration_model,
            "voxel_model": voxel_model,
            "voxel": result.voxel_info,
            "physical_half_life_h": LU177_HALF_LIFE_H,
            "models": "see spectdose.integration; docs/time-integration.md",
        },
        "dose_rate": rate_info,
        "dose": {
            "max_gy": float(result.dose_gy.array.max()),
            "mean_in_tissue_gy": float(result.dose_gy.array[tissue].mean())
            if tissue.any()
            else 0.0,
        },
        "regions": regions,
        "regions_not_reported": result.regions_not_reported,
        "uids": uids,
        "warnings": warnings,
        "timings_s": timings,
        "outputs": {k: p.name for k, p in outputs.items()},
    }
    outputs["summary_json"] = out_dir / CYCLE_OUTPUT_NAMES["summary_json"]
    outputs["summary_txt"] = out_dir / CYCLE_OUTPUT_NAMES["summary_txt"]
    summary["outputs"].update(
        {
            "summary_json": CYCLE_OUTPUT_NAMES["summary_json"],
            "summary_txt": CYCLE_OUTPUT_NAMES["summary_txt"],
        }
    )
    outputs["summary_json"].write_text(json.dumps(summary, indent=2, default=json_default))
    outputs["summary_txt"].write_text(format_cycle_summary(summary))
    _note(progress, "done", 1.0)
    return CycleResult(studies, result.dose_gy, result.effective_half_life_h, outputs, summary)


def _export(
    out_dir: Path,
    result,
    studies: list[Study],
    tps: list[dict],
    options: DoseOptions,
    registration: str,
    integration_model: str,
    warnings: list[str],
) -> tuple[dict[str, Path], dict]:
    """RT Dose of the cycle dose and Parametric Map of the effective half-life, on the reference CT."""
    from spectdose.dicom.export import content_digest, write_dose_rate_map, write_rtdose

    ref = studies[0]
    per_study = [content_digest(s, {}) for s in studies]
    options_key = json.dumps(
        {
            "options": options.key(),
            "registration": registration,
            "integration": integration_model,
            "hours": [tp["hours"] for tp in tps],
        },
        sort_keys=True,
    )
    digest = hashlib.sha256(json.dumps(per_study).encode()).hexdigest()
    provenance = {
        "method": options.method.upper(),
        "software": f"spectdose {__version__}",
        "time_model": f"multi-time-point ({len(studies)} time points, {integration_model} per region, voxel "
        f"{result.voxel_info['model']}), {registration} registration to the first CT",
        "time_points": "; ".join(f"{tp['hours']:.1f} h {tp['study_instance_uid']}" for tp in tps),
        "administration": tps[0]["administration"],
        "calibration": ref.calibration_note,
        "density_curve": options.density_curve,
        "inputs_sha256": digest[:16],
    }
    common = dict(
        method=options.method,
        options_key=options_key,
        content_digest=digest,
        warnings=warnings,
        provenance=provenance,
    )
    outputs = {
        "rtdose": write_rtdose(
            out_dir / CYCLE_OUTPUT_NAMES["rtdose"],
            result.dose_gy,
            ref,
            description=f"{ref.administration.nuclide} cycle dose ({options.method.upper()}, "
            f"{len(studies)} TP)",
            **common,
        ),
    }
    t_eff = result.effective_half_life_h
    outputs["effective_half_life"] = write_dose_rate_map(
        out_dir / CYCLE_OUTPUT_NAMES["effective_half_life"],
        Volume(t_eff.array, t_eff.grid, "mGy/h"),
        ref,
        description=f"{ref.administration.nuclide} effective half-life (h)",
        series_number=903,
        **common,
    )
    _relabel_as_half_life(outputs["effective_half_life"])
    uids = {}
    import pydicom

    for name, path in outputs.items():
        h = pydicom.dcmread(
            path, stop_before_pixels=True, specific_tags=["SeriesInstanceUID", "SOPInstanceUID"]
        )
        uids[name] = {
            "series_instance_uid": h.SeriesInstanceUID,
            "sop_instance_uid": h.SOPInstanceUID,
        }
    return outputs, uids


def _relabel_as_half_life(path: Path) -> None:
    """The Parametric Map writer is built for dose rate: restate its value mapping as hours.

    Real World Value Mapping unit UCUM ``h`` (PS3.16 CID 7181 allows any UCUM unit), LUT
    label/explanation and Content Label; pixels and geometry are untouched.
    """
    import pydicom
    from pydicom.dataset import Dataset

    ds = pydicom.dcmread(path)
    unit = Dataset()
    unit.CodeValue, unit.CodingSchemeDesignator, unit.CodeMeaning = "h", "UCUM", "hour"
    groups = [ds.SharedFunctionalGroupsSequence[0], *ds.PerFrameFunctionalGroupsSequence]
    for group in groups:
        for mapping in group.get("RealWorldValueMappingSequence", []):
            mapping.MeasurementUnitsCodeSequence = [unit]
            mapping.LUTLabel = "T_EFF"
            mapping.LUTExplanation = "Effective half-life (per voxel mono-exponential fit)"
    ds.ContentLabel = "T_EFF"
    ds.save_as(path, enforce_file_format=True)


def _plots(out_dir: Path, regions: list[dict], hours: Sequence[float]) -> dict[str, Path]:
    """One PNG per region: mean dose rate and activity at each time point, with their fits."""
    if not regions:
        return {}
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out = {}
    t_max = max(hours) * 1.3
    s = np.linspace(0.0, t_max, 400)
    for r in regions:
        fig, ax = plt.subplots(figsize=(5, 3.4), dpi=100)
        ax.plot(hours, r["dose_rate_mgy_per_h"], "o", label="mean dose rate")
        curve = r.get("_curve")
        if curve is not None:
            ax.plot(s, np.asarray(curve(s)) * 1e3, "-", label=f"{r['fit']['model']} fit")
        ax.set_xlabel("hours after administration")
        ax.set_ylabel("dose rate (mGy/h)")
        if "activity_mbq" in r:
            ax2 = ax.twinx()
            ax2.plot(hours, r["activity_mbq"], "s", color="tab:green", ms=4, label="activity")
            if r.get("_activity_curve") is not None:
                ax2.plot(s, np.asarray(r["_activity_curve"](s)), ":", color="tab:green")
            ax2.set_ylabel("activity (MBq)", color="tab:green")
            ax2.set_ylim(bottom=0)
        ax.set_title(f"{r['region']}: {r['absorbed_dose_gy']:.3g} Gy", fontsize=10, parse_math=False)
        ax.set_ylim(bottom=0)
        ax.legend(fontsize=8, loc="upper right")
        fig.tight_layout()
        safe = "".join(ch if ch.isalnum() or ch in "-_" else "_" for ch in r["region"])
        path = out_dir / f"tac_{safe}.png"
        fig.savefig(path)
        plt.close(fig)
        out[f"tac_{r['region']}"] = path
    return out


def _fmt(v, digits: int = 3) -> str:
    return "n/a" if v is None else f"{v:.{digits}g}"


def format_cycle_summary(s: dict) -> str:
    """The human-readable twin of a cycle's summary.json."""
    lines = [
        f"spectdose {s['software']['version']} - Lu-177 cycle dosimetry ({s['method'].upper()}, "
        f"{len(s['time_points'])} time points)",
        f"Administration {s['administration']['datetime']}, {_fmt(s['administration']['injected_activity_mbq'], 5)} MBq",
        "",
    ]
    for tp in s["time_points"]:
        reg = tp["registration"]
        reg_text = (
            "reference" if reg == "reference" else f"r = {reg['ct_correlation']:.3f}, {reg['mode']}"
        )
        lines.append(
            f"  t{tp['index']}: {tp['hours']:8.2f} h  {tp['acquisition']}  registration {reg_text}"
        )
    lines.append(
        f"Cycle dose: max {_fmt(s['dose']['max_gy'])} Gy, mean in tissue {_fmt(s['dose']['mean_in_tissue_gy'])} Gy"
    )
    if s["regions"]:
        lines += [
            "",
            f"{'region':<22}{'ml':>8}{'model':>11}{'T_eff h':>9}{'Gy':>9}{'BED Gy':>9}  mGy/h per time point",
        ]
        for r in s["regions"]:
            lines.append(
                f"{r['region'][:21]:<22}{r['volume_ml']:>8.1f}{r['fit']['model']:>11}{_fmt(r['effective_half_life_h']):>9}"
                f"{r['absorbed_dose_gy']:>9.3g}{_fmt(r.get('bed_gy')):>9}  "
                + ", ".join(f"{v:.3g}" for v in r["dose_rate_mgy_per_h"])
            )
    for r in s.get("regions_not_reported") or []:
        lines.append(f"{r['region'][:21]:<22}{r['volume_ml']:>8.1f}  not reported: {r['reason']}")
    lines.append("")
    for w in s["warnings"]:
        lines.append(f"WARNING: {w}")
    lines.append("Outputs: " + ", ".join(sorted(s["outputs"].values())))
    return "\n".join(lines) + "\n"
