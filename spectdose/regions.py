"""Regions of interest on the CT grid (DICOM SEG, RT Structure Set, or automatic) and dose
statistics per region.

A clinic keeps organ and lesion contours as a DICOM Segmentation or an RT Structure Set;
both become boolean masks on the CT grid here, checked against the CT's frame of reference
and field of view. :func:`region_statistics` turns masks and dose into the numbers a
physicist signs off (docs/regions.md).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from pydicom.uid import SegmentationStorage

from spectdose.constants import MGY_PER_H_PER_GY_PER_S
from spectdose.errors import GeometryError, InputError
from spectdose.geometry import Grid, Volume, resample_to_grid

__all__ = [
    "Region",
    "RegionSet",
    "load_regions",
    "load_segmentation_masks",
    "region_statistics",
    "cumulative_dvh",
    "V_THRESHOLDS_GY",
]

# V(x Gy) reported per region: 2 Gy, the red-marrow limit used in PRRT (EANM dosimetry
# guidance, Sjögreen Gleisner et al., EJNMMI 2022, 49:1778); 23 Gy, the kidney limit taken
# over from external-beam tolerance (Emami et al., IJROBP 1991, 21:109; used in PRRT
# kidney dosimetry, Bodei et al., EJNMMI 2008, 35:1847); 10 and 100 Gy, lesion levels
# around the response threshold reported for Lu-177 DOTATATE (Ilan et al., JNM 2015, 56:177).
V_THRESHOLDS_GY = (2.0, 10.0, 23.0, 100.0)
# At most this many bins in a DVH (bin width rounded up to 1, 2 or 5 x 10^n).
_DVH_MAX_BINS = 500


@dataclasses.dataclass
class Region:
    """One region: its name, mask on the CT grid and number in its source object."""

    name: str
    mask: np.ndarray
    number: int
    automatic: bool = False
    lesion: bool = False


@dataclasses.dataclass
class RegionSet:
    """Regions on one CT grid, with where they came from (for references in the outputs)."""

    regions: list[Region]
    source: str  # "SEG", "RTSTRUCT" or "automatic"
    sop_class_uid: str = ""
    sop_instance_uid: str = ""
    series_instance_uid: str = ""
    description: str = ""
    path: Path | None = None
    warnings: list[str] = dataclasses.field(default_factory=list)

    @property
    def masks(self) -> dict[str, np.ndarray]:
        return {r.name: r.mask for r in self.regions}


def load_regions(path: str | Path, ct_grid: Grid) -> RegionSet:
    """Regions on ``ct_grid`` from a DICOM SEG or an RT Structure Set file.

    Structures that are empty or lie wholly outside the CT are left out with a warning in
    ``RegionSet.warnings``; a set with no usable region is refused.

    Raises
    ------
    InputError
        Unreadable or corrupt file, neither SEG nor RT Structure Set, or no usable region
        (each empty structure named).
    GeometryError
        Regions on another frame of reference than the CT, contours not in CT slice planes,
        or every region outside the CT.
    """
    import pydicom

    from spectdose.dicom.rtstruct import RTStructureSetStorage

    path = Path(path)
    try:
        header = pydicom.dcmread(path, stop_before_pixels=True, specific_tags=["SOPClassUID", "Modality"])
    except (OSError, pydicom.errors.InvalidDicomError, ValueError, EOFError) as exc:
        raise InputError(f"regions file {path.name} is not a readable DICOM file ({type(exc).__name__})") from exc
    sop_class = header.get("SOPClassUID")
    if sop_class == SegmentationStorage:
        return _load_seg(path, ct_grid)
    if sop_class == RTStructureSetStorage:
        return _load_rtstruct(path, ct_grid)
    raise InputError(
        f"regions file {path.name} is neither a DICOM SEG nor an RT Structure Set "
        f"(SOP Class {sop_class}, modality {header.get('Modality')})"
    )


def _check_frame(uid: str, ct_grid: Grid, what: str) -> None:
    if ct_grid.frame_of_reference_uid and uid != ct_grid.frame_of_reference_uid:
        raise GeometryError(
            f"{what} is on frame of reference {uid or '(none)'}, not the CT's {ct_grid.frame_of_reference_uid}: "
            "regions must be drawn on the study's CT (or registered to it) before they are sent"
        )


def _usable(candidates: list[tuple[Region, str | None]], what: str) -> list[Region]:
    """Regions without a problem; refuses the set when none is left, naming each problem."""
    kept = [r for r, problem in candidates if problem is None]
    if not kept:
        problems = "; ".join(problem for _, problem in candidates if problem) or "it holds no region"
        error = GeometryError if all("outside the CT" in (p or "") for _, p in candidates) and candidates else InputError
        raise error(f"{what}: no usable region ({problems})")
    return kept


def _load_seg(path: Path, ct_grid: Grid) -> RegionSet:
    import highdicom as hd
    import pydicom

    try:
        seg = hd.seg.segread(path)
    except (OSError, ValueError, AttributeError, KeyError, pydicom.errors.InvalidDicomError) as exc:
        raise InputError(f"{path.name} is not a readable DICOM Segmentation ({type(exc).__name__}: {exc})") from exc
    _check_frame(str(seg.get("FrameOfReferenceUID", "")), ct_grid, f"segmentation {path.name}")
    try:
        vol = seg.get_volume()
    except (RuntimeError, ValueError) as exc:
        raise GeometryError(f"segmentation {path.name} does not form a regular volume: {exc}") from exc
    grid = Grid(vol.array.shape[:3], tuple(vol.spacing), tuple(vol.position), np.asarray(vol.direction).T)
    candidates = []
    for index, number in enumerate(seg.segment_numbers):
        description = seg.get_segment_description(number)
        label = str(description.SegmentLabel)
        planes = np.ascontiguousarray(vol.array[..., index] > 0).astype(np.uint8)
        region = Region(label, np.zeros(ct_grid.shape, bool), int(number),
                        automatic=str(description.get("SegmentAlgorithmType", "")) == "AUTOMATIC",
                        lesion=label.lower().startswith("lesion"))
        if not planes.any():
            candidates.append((region, f"segment {number} '{label}' is empty"))
            continue
        region.mask = resample_to_grid(Volume(planes, grid, "label"), ct_grid, interpolation="nearest").array > 0
        candidates.append((region, None if region.mask.any() else f"segment {number} '{label}' lies outside the CT"))
    out = RegionSet(_usable(candidates, f"segmentation {path.name}"), "SEG", SegmentationStorage,
                    str(seg.SOPInstanceUID), str(seg.SeriesInstanceUID), str(seg.get("SeriesDescription", "")), path)
    out.warnings = [f"regions: {p}; left out" for _, p in candidates if p]
    return out


def _load_rtstruct(path: Path, ct_grid: Grid) -> RegionSet:
    from spectdose.dicom.rtstruct import RTStructureSetStorage, contours_to_mask, read_rtstruct

    ds, structures = read_rtstruct(path)
    what = f"RT Structure Set {path.name}"
    frames = {s.frame_of_reference_uid for s in structures if s.frame_of_reference_uid}
    for uid in frames or {str(ds.get("FrameOfReferenceUID", ""))}:
        _check_frame(uid, ct_grid, what)
    candidates, notes = [], []
    for s in structures:
        region = Region(s.name, np.zeros(ct_grid.shape, bool), s.number,
                        lesion=s.interpreted_type in ("GTV", "CTV", "PTV") or s.name.lower().startswith("lesion"))
        if not s.contours_lps_mm:
            kinds = f" (only {', '.join(s.skipped_types)} contours)" if s.skipped_types else ""
            candidates.append((region, f"structure {s.number} '{s.name}' is empty{kinds}"))
            continue
        region.mask, info = contours_to_mask(s.contours_lps_mm, ct_grid, name=s.name)
        if not region.mask.any():
            candidates.append((region, f"structure {s.number} '{s.name}' lies outside the CT"))
            continue
        if info["outside_grid"]:
            notes.append(f"regions: {info['outside_grid']} of {info['contours']} contours of '{s.name}' lie outside "
                         "the CT; its statistics cover the part inside")
        if info["between_slices"]:
            notes.append(f"regions: {info['between_slices']} contours of '{s.name}' lie between CT slices and were "
                         "put on the nearest slice")
        candidates.append((region, None))
    out = RegionSet(_usable(candidates, what), "RTSTRUCT", RTStructureSetStorage, str(ds.SOPInstanceUID),
                    str(ds.get("SeriesInstanceUID", "")), str(ds.get("StructureSetLabel", "")), path)
    out.warnings = [f"regions: {p}; left out" for _, p in candidates if p] + notes
    return out


def load_segmentation_masks(path: str | Path, ct_grid: Grid) -> dict[str, np.ndarray]:
    """Boolean masks on ``ct_grid``, one per region label, from a DICOM SEG or RT Structure Set."""
    return load_regions(path, ct_grid).masks


def _nice_step(value: float) -> float:
    """The smallest of 1, 2, 5 x 10^n that is >= ``value`` (> 0)."""
    exponent = np.floor(np.log10(value))
    for m in (1.0, 2.0, 5.0, 10.0):
        if m * 10**exponent >= value * (1 - 1e-12):
            return float(m * 10**exponent)
    return float(10 ** (exponent + 1))


def cumulative_dvh(values: np.ndarray, voxel_volume_ml: float) -> dict:
    """Cumulative DVH of the values in one region: volume (ml) receiving at least each bin's lower edge.

    Bins start at 0 and have a width of 1, 2 or 5 x 10^n, at most 500 bins up to the
    maximum; ``volume_ml[0]`` is the whole region.
    """
    top = float(values.max()) if values.size else 0.0
    width = _nice_step(top / _DVH_MAX_BINS) if top > 0 else 1.0
    n_bins = max(1, int(np.ceil(top / width)) + 1)
    edges = np.arange(n_bins) * width
    counts = np.searchsorted(np.sort(values), edges, side="left")
    volume_ml = (values.size - counts) * voxel_volume_ml
    return {"bin_width": width, "volume_ml": [round(float(v), 4) for v in volume_ml]}


def region_statistics(
    dose_gy: np.ndarray | None,
    dose_rate_gy_per_s: np.ndarray,
    masks: dict[str, np.ndarray],
    voxel_volume_ml: float,
    *,
    v_thresholds_gy: Sequence[float] = V_THRESHOLDS_GY,
    with_dvh: bool = True,
    dose_rate_sigma_gy_per_s: np.ndarray | None = None,
    dose_sigma_gy: np.ndarray | None = None,
) -> list[dict]:
    """Per region: volume; dose rate (mean, DVH); absorbed dose (mean, median, min, max,
    D2/D50/D98, V(x Gy), DVH) when a dose is given.

    Dx is the minimum dose to the hottest x % of the region (so D98 is near the minimum),
    from linear interpolation between voxel values. V(x Gy) is the volume (ml and % of the
    region) receiving at least x Gy. With a voxel 1-sigma (the CNN ensemble) the region's is
    the mean of its voxels' sigmas: errors left by SPECT blur are correlated over about a
    centimetre, so this is the conservative bound (independent errors would give sigma/sqrt(n));
    without one ``uncertainty_gy`` and ``uncertainty_dose_rate_mgy_per_h`` are None.
    """
    rows = []
    for label, mask in masks.items():
        rate_mgy_per_h = dose_rate_gy_per_s[mask].astype(np.float64) * MGY_PER_H_PER_GY_PER_S
        volume_ml = float(mask.sum()) * voxel_volume_ml
        row = {
            "region": label,
            "volume_ml": round(volume_ml, 3),
            "voxels": int(mask.sum()),
            "mean_dose_rate_mgy_per_h": float(rate_mgy_per_h.mean()),
            "median_dose_rate_mgy_per_h": float(np.median(rate_mgy_per_h)),
            "min_dose_rate_mgy_per_h": float(rate_mgy_per_h.min()),
            "max_dose_rate_mgy_per_h": float(rate_mgy_per_h.max()),
            "uncertainty_dose_rate_mgy_per_h": (
                float(dose_rate_sigma_gy_per_s[mask].astype(np.float64).mean()) * MGY_PER_H_PER_GY_PER_S
                if dose_rate_sigma_gy_per_s is not None else None
            ),
        }
        if dose_gy is not None:
            d = dose_gy[mask].astype(np.float64)
            row.update(
                mean_gy=float(d.mean()),
                median_gy=float(np.median(d)),
                min_gy=float(d.min()),
                max_gy=float(d.max()),
                d2_gy=float(np.percentile(d, 98)),
                d50_gy=float(np.percentile(d, 50)),
                d98_gy=float(np.percentile(d, 2)),
                v_gy={f"{x:g}": {"ml": round(float((d >= x).sum()) * voxel_volume_ml, 3),
                                 "pct": round(100.0 * float((d >= x).mean()), 2)} for x in v_thresholds_gy},
                uncertainty_gy=float(dose_sigma_gy[mask].astype(np.float64).mean()) if dose_sigma_gy is not None else None,
            )
        if with_dvh:
            row["dvh_dose_rate_mgy_per_h"] = cumulative_dvh(rate_mgy_per_h, voxel_volume_ml)
            if dose_gy is not None:
                row["dvh_gy"] = cumulative_dvh(d, voxel_volume_ml)
        rows.append(row)
    return rows
