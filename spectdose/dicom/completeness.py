"""Is a SPECT/CT study whole? The CT must reach both ends of the SPECT's axial extent.

A study can arrive in pieces (an association aborted half-way and a later one with the rest,
an upload assembled from parts); what arrived may be a CT cut at one end. The dose is then
computed without density over part of the SPECT and is worthless, yet nothing in the pixels
says so. The headers do:

- a CT instance that gives the number of images of its acquisition (Images in Acquisition
  (0020,1002), or Number of Slices (0054,0081)) and a series holding fewer distinct slices;
- otherwise the SPECT's own extent: the CT's slices (each covering half its spacing on either
  side) must reach the centre of the SPECT's outer slice at both ends, less one SPECT slice
  (the two systems' fields of view are planned together but are not cut to the millimetre).

Gaps inside the CT are another check (the service's intake); a SPECT and CT on different frames
of reference are not compared here (the core registers them and says what is wrong).
Headers only: no pixel data is read.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable
from pathlib import Path

import numpy as np
from pydicom.dataset import Dataset

__all__ = ["ct_coverage_problem", "read_headers", "SPECT_SLICES_ALLOWED_OUTSIDE", "CT_SHORT_ASSUMPTION"]

# Refused by default (the service refuses it always, the CLI unless accepted by this name): a CT that
# does not reach the SPECT's axial extent, whose activity beyond the CT then has no density and no dose.
CT_SHORT_ASSUMPTION = "ct_short_of_spect"
# One SPECT slice at either end may lie outside the CT: fields of view planned together, not to the mm.
SPECT_SLICES_ALLOWED_OUTSIDE = 1.0
_TAGS = ["Modality", "SeriesInstanceUID", "FrameOfReferenceUID", "ImagePositionPatient", "ImageOrientationPatient",
         "ImagesInAcquisition", "NumberOfSlices", "NumberOfFrames", "SpacingBetweenSlices", "SliceThickness",
         "DetectorInformationSequence"]


@dataclasses.dataclass
class _Series:
    modality: str
    frame: str
    positions: list[np.ndarray] = dataclasses.field(default_factory=list)  # slice centres (mm, LPS)
    normal: np.ndarray | None = None
    expected: int | None = None  # Images in Acquisition / Number of Slices, when a header gives it
    spacing_mm: float | None = None  # NM multi-frame: Spacing Between Slices


def _vector(ds, keyword: str) -> np.ndarray | None:
    value = ds.get(keyword)
    if value is None and "DetectorInformationSequence" in ds and len(ds.DetectorInformationSequence):
        value = ds.DetectorInformationSequence[0].get(keyword)
    try:
        return np.asarray([float(v) for v in value], float) if value is not None and len(value) in (3, 6) else None
    except (TypeError, ValueError):
        return None


def read_headers(files: Iterable[Path]) -> list[Dataset]:
    """The headers :func:`ct_coverage_problem` reads (series, modality, position, orientation, slice
    counts), each file once; files that are not DICOM are left out (the ingest says what they are).
    For callers that check more of the same headers (the service's intake: gaps inside the CT)."""
    import pydicom

    out = []
    for path in files:
        try:
            out.append(pydicom.dcmread(path, stop_before_pixels=True, specific_tags=_TAGS))
        except Exception:  # noqa: BLE001 - not DICOM: the ingest says what it is
            continue
    return out


def _read(files: Iterable[Path | Dataset]) -> dict[str, _Series]:
    series: dict[str, _Series] = {}
    for item in files:
        # a header read already (the ingest's, or read_headers'), else the file's
        ds = item if isinstance(item, Dataset) else next(iter(read_headers([item])), None)
        if ds is None:
            continue
        modality = str(ds.get("Modality", "")).upper()
        if modality not in ("CT", "NM", "PT"):
            continue
        ipp, iop = _vector(ds, "ImagePositionPatient"), _vector(ds, "ImageOrientationPatient")
        if ipp is None or iop is None or len(iop) != 6:
            continue
        s = series.setdefault(str(ds.get("SeriesInstanceUID", "")),
                              _Series(modality, str(ds.get("FrameOfReferenceUID", "") or "")))
        s.normal = np.cross(iop[:3], iop[3:])
        for keyword in ("ImagesInAcquisition", "NumberOfSlices"):
            try:
                n = int(ds.get(keyword) or 0)
            except (TypeError, ValueError):
                n = 0
            if n > 0 and modality == "CT":
                s.expected = max(s.expected or 0, n)
        frames = int(ds.get("NumberOfFrames", 1) or 1)
        if modality == "NM" and frames > 1:
            n_slices = int(ds.get("NumberOfSlices", frames) or frames)
            step = ds.get("SpacingBetweenSlices", None) or ds.get("SliceThickness", None)
            if step is None:
                continue
            s.spacing_mm = float(step)
            s.positions += [ipp + k * s.spacing_mm * s.normal for k in range(n_slices)]
        else:
            s.positions.append(ipp)
    return series


def _along(points: list[np.ndarray], normal: np.ndarray) -> np.ndarray:
    return np.unique(np.round([float(np.dot(normal, p)) for p in points], 2))


def _extent_problem(ct: _Series, spect: _Series) -> str | None:
    z_ct = _along(ct.positions, ct.normal)
    if len(z_ct) < 2:
        return None
    ct_step = float(np.median(np.diff(z_ct)))
    lo, hi = z_ct[0] - ct_step / 2, z_ct[-1] + ct_step / 2
    spect_step = abs(spect.spacing_mm) if spect.spacing_mm else None
    centres = [_along(spect.positions, ct.normal)]
    if spect.spacing_mm:  # a vendor that stacks NM frames against the sign convention: the mirrored extent too
        first = spect.positions[0]
        centres.append(_along([2 * first - p for p in spect.positions], ct.normal))
    if spect_step is None:
        z = centres[0]
        spect_step = float(np.median(np.diff(z))) if len(z) > 1 else ct_step
    allowed = SPECT_SLICES_ALLOWED_OUTSIDE * spect_step + 1e-3
    shortfalls = []
    for z in centres:
        below, above = lo - z[0], z[-1] - hi
        if below <= allowed and above <= allowed:
            return None
        shortfalls.append((below, above, z))
    below, above, z = shortfalls[0]
    ends = [f"{what} end by {mm:.1f} mm" for what, mm in (("lower", below), ("upper", above)) if mm > allowed]
    return (f"the CT ({len(z_ct)} slices, {lo:.1f} to {hi:.1f} mm along its axis) does not reach the SPECT's "
            f"axial extent ({z[0]:.1f} to {z[-1]:.1f} mm): short at the {' and the '.join(ends)} (more than "
            f"{SPECT_SLICES_ALLOWED_OUTSIDE:g} SPECT slice of {spect_step:.1f} mm): a CT cut off at the end "
            "(an interrupted transfer?)")


def ct_coverage_problem(files: Iterable[Path | Dataset]) -> str | None:
    """Why the CT of these files (paths, or headers already read) cannot be whole (``None`` when some CT
    series is); headers only.

    A CT series is whole when it holds every slice its header counts (Images in Acquisition or
    Number of Slices, where present) and reaches both ends of the axial extent of every SPECT
    (NM or PT) series on its frame of reference. The study is refused only when no CT series is.
    """
    series = _read(files)
    cts = [s for s in series.values() if s.modality == "CT" and s.positions]
    spects = [s for s in series.values() if s.modality in ("NM", "PT") and s.positions]
    problems = []
    for ct in cts:
        n = len(_along(ct.positions, ct.normal))
        if ct.expected and n < ct.expected:
            problems.append(f"the CT series holds {n} of the {ct.expected} slices its header counts (Images in "
                            "Acquisition)")
            continue
        why = next((w for sp in spects if sp.frame and sp.frame == ct.frame and (w := _extent_problem(ct, sp))), None)
        if why is None:
            return None
        problems.append(why)
    return "; ".join(problems) if problems else None
