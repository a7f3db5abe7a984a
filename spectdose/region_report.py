"""Regions around a dose: at the end of :func:`spectdose.pipeline.run`, and later on a
finished result when a region set arrives (:func:`region_report`), without recomputing the dose."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pydicom

from spectdose import __version__
from spectdose.constants import MGY_PER_H_PER_GY_PER_S
from spectdose.dicom.region_outputs import REGION_OUTPUT_NAMES, RegionContext, write_region_outputs
from spectdose.errors import InputError, SpectdoseError
from spectdose.geometry import Grid, Volume, resample_to_grid
from spectdose.lesions import LesionMethod, find_hot_spots
from spectdose.regions import FieldOfView, Region, RegionSet, coverage_text, load_regions

__all__ = ["region_report", "automatic_lesions", "regions_after_dose", "REGIONS_JSON", "coverage_warnings",
           "field_of_view_summary", "field_of_view_text"]

REGIONS_JSON = "regions.json"
# Two grids are the same when they agree to this many mm (the export contract's tolerance).
_GRID_TOL_MM = 1e-2


def automatic_lesions(activity_bq_per_ml: Volume, density_g_cm3: Volume, method: LesionMethod | None = None) -> RegionSet:
    """Focal hot spots of the activity on the CT grid as an automatic region set (spectdose.lesions):
    unreviewed candidates named ``auto_hotspot_N`` with their location on the CT; the
    candidates left out as physiological uptake are counted, with their reasons, in its warnings."""
    method = method or LesionMethod()
    spots = find_hot_spots(activity_bq_per_ml.array, activity_bq_per_ml.grid, density_g_cm3.array, method)
    kept = [s for s in spots if s.excluded is None]
    regions = [Region(f"auto_hotspot_{n}", s.mask, n, automatic=True, lesion=True, location=s.location, box=s.box)
               for n, s in enumerate(kept, start=1)]
    out = RegionSet(regions, "automatic", description=method.describe())
    left_out = [s for s in spots if s.excluded is not None]
    if left_out:
        rules: dict[str, int] = {}
        for s in left_out:
            rules[s.rule or "other"] = rules.get(s.rule or "other", 0) + 1
        biggest = sorted(left_out, key=lambda s: -s.volume_ml)[:5]
        out.warnings.append(
            f"automatic regions: {len(left_out)} hot spot(s) left out as physiological uptake ("
            + ", ".join(f"{n} {rule}" for rule, n in rules.items()) + "); the largest: "
            + "; ".join(f"{s.volume_ml:.0f} ml at {s.location}: {s.excluded}" for s in biggest))
    return out


def regions_after_dose(out_dir: Path, study, region_set: RegionSet, dose_gy: Volume | None, rate_gy_per_s: Volume,
                       outputs: dict[str, Path], *, rate_sigma_gy_per_s: Volume | None = None,
                       dose_sigma_gy: Volume | None = None, field_of_view: FieldOfView | None = None,
                       accept_partial: bool = False, dose_method: str = "dvk",
                       network_sha256: str | None = None,
                       rtdose: pydicom.Dataset | None = None) -> tuple[list[dict], dict[str, Path], dict]:
    """The pipeline's region step: statistics on the CT grid and the region files next to the RT Dose.

    ``rtdose``: the RT Dose built but not yet written; its DVHs are added to it in memory and the
    caller writes it (one write of ~70 MB at clinical size instead of a write, a read and a rewrite).
    Without it the RT Dose in ``outputs`` is read and rewritten with its DVHs."""
    reference = outputs.get("rtdose") or outputs["doserate"]
    ctx = RegionContext(
        ct_grid=study.ct.grid,
        ct_series_uid=study.ct_series.series_instance_uid,
        ct_instance_uids=tuple(study.ct_series.sop_instance_uids),
        header=rtdose if rtdose is not None else pydicom.dcmread(reference, stop_before_pixels=True),
        software_version=__version__,
        rtdose_path=outputs.get("rtdose") if rtdose is None else None,
        rtdose=rtdose,
    )
    new, rows, info = write_region_outputs(
        out_dir, region_set, dose_gy.array if dose_gy is not None else None, rate_gy_per_s.array, ctx,
        method=region_set.description if region_set.source == "automatic" else "",
        dose_rate_sigma_gy_per_s=rate_sigma_gy_per_s.array if rate_sigma_gy_per_s is not None else None,
        dose_sigma_gy=dose_sigma_gy.array if dose_sigma_gy is not None else None,
        field_of_view=field_of_view, accept_partial=accept_partial, dose_method=dose_method,
        network_sha256=network_sha256,
    )
    return rows, new, info


def coverage_warnings(rows: list[dict]) -> list[str]:
    """One warning per region not fully covered by the SPECT or CT, naming it."""
    return [text for row in rows if (text := coverage_text(row))]


def field_of_view_summary(field_of_view: FieldOfView, ct_grid: Grid, rows: list[dict] | None) -> dict:
    """Which span of the body the SPECT covered, against the CT's, and which regions lie outside it."""
    spect_lo, spect_hi = field_of_view.z_span_mm()
    ct_z = ct_grid.corners_lps_mm()[:, 2]
    rows = rows or []
    return {
        "spect_z_mm": [round(spect_lo, 1), round(spect_hi, 1)],
        "ct_z_mm": [round(float(ct_z.min()), 1), round(float(ct_z.max()), 1)],
        "spect": field_of_view.to_json(),
        "regions_not_covered": [r["region"] for r in rows if r.get("coverage") == "not covered"],
        "regions_partly_covered": [
            {"region": r["region"], "spect_coverage_fraction": r["spect_coverage_fraction"],
             "ct_coverage_fraction": r["ct_coverage_fraction"]}
            for r in rows if r.get("coverage") == "partly covered"],
    }


def field_of_view_text(fov: dict | None) -> str:
    """summary.txt's line on the SPECT's axial span and the regions outside it ("" without one)."""
    if not fov:
        return ""
    text = (f"SPECT field of view: z {fov['spect_z_mm'][0]:.0f} to {fov['spect_z_mm'][1]:.0f} mm "
            f"(CT z {fov['ct_z_mm'][0]:.0f} to {fov['ct_z_mm'][1]:.0f} mm)")
    outside = list(fov.get("regions_not_covered", [])) + [
        f"{r['region']} (partly covered {r['spect_coverage_fraction'] * r['ct_coverage_fraction']:.2f})"
        for r in fov.get("regions_partly_covered", [])]
    if outside:
        text += "; regions not fully inside: " + ", ".join(
            f"{name} (not covered)" if "(" not in name else name for name in outside)
    return text


def _ct_grid_from_summary(summary: dict, dose: Volume) -> Grid:
    """The CT grid of an earlier run: shape, spacing and origin from summary.json, axes from the RT Dose."""
    ct = summary["geometry"]["ct"]
    origin = np.asarray(ct["origin_lps_mm"], dtype=float)
    axes = dose.grid.axes.copy()
    first, last = dose.grid.origin_mm, dose.grid.index_to_lps_mm(np.array([dose.grid.shape[0] - 1, 0, 0]))
    if np.allclose(origin, last, atol=_GRID_TOL_MM) and not np.allclose(origin, first, atol=_GRID_TOL_MM):
        axes[0] = -axes[0]  # the RT Dose stores the CT's slices in reverse order (docs/rtdose.md)
    for_uid = summary["series"]["ct"].get("frame_of_reference_uid") or dose.grid.frame_of_reference_uid
    return Grid(tuple(ct["shape_zyx"]), tuple(ct["spacing_mm_zyx"]), tuple(origin), axes, for_uid)


def region_report(result: str | Path, regions_path: str | Path, out_dir: str | Path | None = None) -> dict[str, Path]:
    """Region statistics, CSVs, SEG/RTSTRUCT, RT Dose with DVHs and SR for a finished result.

    ``result`` is a result folder (summary.json, rtdose.dcm, doserate_pm.dcm) or its
    rtdose.dcm; ``out_dir`` defaults to its ``regions/`` subfolder (the run's own files
    are left as they were). The dose is read back, not recomputed, and put on the CT grid of the run
    (summary.json); when the RT Dose was written on a coarser grid (``--dose-grid``) it is
    interpolated back, with a warning. Returns the written paths by output name (the
    statistics also go to ``regions.json``).

    Raises
    ------
    InputError
        No summary.json or RT Dose in ``result``, or a region file that cannot be used.
    GeometryError
        Regions not on the CT's frame of reference, or outside the CT.
    """
    from spectdose.dicom.export import read_dose_rate_map, read_rtdose

    result = Path(result)
    folder = result.parent if result.is_file() else result
    summary_path, rtdose_path = folder / "summary.json", result if result.is_file() else folder / "rtdose.dcm"
    if not summary_path.is_file():
        raise InputError(f"{folder} holds no summary.json: give the folder a spectdose dose run wrote")
    if not rtdose_path.is_file():
        raise InputError(f"{folder} holds no rtdose.dcm (a per-MBq run has no absorbed dose to report per region)")
    summary = json.loads(summary_path.read_text())
    dose = read_rtdose(rtdose_path)
    ct_grid = _ct_grid_from_summary(summary, dose)
    header = pydicom.dcmread(rtdose_path, stop_before_pixels=True)
    warnings = []
    on_ct = dose.grid.shape == ct_grid.shape and np.allclose(
        sorted(map(tuple, dose.grid.corners_lps_mm().round(2))), sorted(map(tuple, ct_grid.corners_lps_mm().round(2))),
        atol=_GRID_TOL_MM)
    if not on_ct:
        warnings.append("the RT Dose is on a coarser grid than the CT (--dose-grid): region statistics come from "
                        "it interpolated onto the CT grid and differ from a run with the regions given")
    dose_ct = resample_to_grid(dose, ct_grid, interpolation="linear").array
    rate_path = folder / "doserate_pm.dcm"
    if rate_path.is_file():
        rate = read_dose_rate_map(rate_path)
        rate_gy_per_s = resample_to_grid(rate, ct_grid, interpolation="linear").array / MGY_PER_H_PER_GY_PER_S
    else:
        factor_h = (summary.get("time") or {}).get("integration_factor_h")
        if not factor_h:
            raise InputError(f"{folder} has neither doserate_pm.dcm nor an integration factor in summary.json")
        rate_gy_per_s = dose_ct / (factor_h * 3600.0)
    regions = load_regions(regions_path, ct_grid)
    out = Path(out_dir) if out_dir is not None else folder / "regions"
    out.mkdir(parents=True, exist_ok=True)
    plan = header.get("PlanOverviewSequence")
    ct_uids = tuple(str(i.ReferencedSOPInstanceUID) for i in plan[0].ReferencedImageSequence) if plan else ()
    ctx = RegionContext(ct_grid, summary["series"]["ct"]["series_instance_uid"], ct_uids, header, __version__, rtdose_path)
    recorded = (summary.get("field_of_view") or {}).get("spect")
    field_of_view = FieldOfView.from_json(recorded) if recorded else None
    if field_of_view is None:
        warnings.append("this result does not record the SPECT field of view (an earlier version wrote it): "
                        "region coverage by the SPECT is not checked")
    outputs, rows, info = write_region_outputs(out, regions, dose_ct, rate_gy_per_s, ctx, field_of_view=field_of_view,
                                               dose_method=str(summary.get("method") or "dvk"),
                                               network_sha256=(summary.get("provenance") or {}).get("model_sha256"))
    warnings += coverage_warnings(rows)
    report = {"result": str(folder), "regions_file": str(regions_path), "source": regions.source,
              "warnings": regions.warnings + warnings, "regions": rows, "uids": info["uids"],
              "field_of_view": field_of_view_summary(field_of_view, ct_grid, rows) if field_of_view else None,
              "outputs": {k: p.name for k, p in outputs.items()}}
    outputs["regions_json"] = out / REGIONS_JSON
    outputs["regions_json"].write_text(json.dumps(report, indent=2))
    return outputs


def safe_regions_after_dose(out_dir, study, region_set, dose_gy, rate, outputs, **sigmas) -> tuple[list | None, dict, dict, str | None]:
    """:func:`regions_after_dose` whose failure is reported, never raised: the dose is kept."""
    try:
        rows, new, info = regions_after_dose(Path(out_dir), study, region_set, dose_gy, rate, outputs, **sigmas)
    except (SpectdoseError, ValueError) as exc:
        return None, {}, {}, f"region outputs could not be written: {exc}"
    return rows, new, info, None


__all__ += ["safe_regions_after_dose", "REGION_OUTPUT_NAMES"]
