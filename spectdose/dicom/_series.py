"""Grouping DICOM files into series, telling CTs from SPECTs, and placing them in space.

Private to :mod:`spectdose.dicom.ingest`. Geometry follows PS3.3 C.7.6.2 (Image Plane) for
single-frame CT/PET/NM slices and C.8.4.9/C.8.4.15 (NM Image / NM Detector) for
reconstructed multi-frame NM, and returns :class:`~spectdose.geometry.Grid` objects in
the core's (slice, row, column) convention.
"""

from __future__ import annotations

import dataclasses
import math
import re
import warnings
from collections import defaultdict

import numpy as np
import pydicom
import SimpleITK as sitk
from pydicom.dataset import Dataset
from pydicom.uid import (
    CTImageStorage,
    DeformableSpatialRegistrationStorage,
    EncapsulatedPDFStorage,
    EnhancedCTImageStorage,
    EnhancedPETImageStorage,
    ExplicitVRLittleEndian,
    ImplicitVRLittleEndian,
    NuclearMedicineImageStorage,
    ParametricMapStorage,
    PositronEmissionTomographyImageStorage,
    RTDoseStorage,
    RTStructureSetStorage,
    SecondaryCaptureImageStorage,
    SegmentationStorage,
    SpatialRegistrationStorage,
)

from spectdose.dicom._files import FileHeader, convert_all_elements, ds_float
from spectdose.errors import GeometryError, InputError
from spectdose.geometry import Grid

# SOP Class UIDs (PS3.4 Annex B.5)
_NOT_INPUTS = {
    RTDoseStorage: "RT Dose (e.g. an earlier dose output); not an input",
    RTStructureSetStorage: "RT Structure Set; not an image input",
    SegmentationStorage: "Segmentation; not an image input",
    ParametricMapStorage: "Parametric Map (e.g. an earlier output); not an input",
    SpatialRegistrationStorage: "Spatial Registration; not used (registration is redone)",
    DeformableSpatialRegistrationStorage: "Deformable Spatial Registration; not used",
    EnhancedCTImageStorage: "Enhanced CT (multi-frame) is not supported; export classic CT images",
    EnhancedPETImageStorage: "Enhanced PET is not supported; export classic PET images",
    SecondaryCaptureImageStorage: "Secondary Capture (screenshot); not quantitative",
    EncapsulatedPDFStorage: "Encapsulated PDF; not an image input",
}
_NOT_INPUT_PREFIXES = {
    "1.2.840.10008.5.1.4.1.1.88.": "Structured Report; not an image input",
    "1.2.840.10008.5.1.4.1.1.11.": "Presentation State; not an image input",
    "1.2.840.10008.5.1.4.1.1.7.": "Secondary Capture (screenshot); not quantitative",
}

# NM frame index vectors (PS3.3 C.8.4.8.1.x) named by the Frame Increment Pointer
_SLICE_VECTOR = 0x00540080
_PROJECTION_VECTORS = {
    0x00540020: "DetectorVector",
    0x00540050: "RotationVector",
    0x00540090: "AngularViewVector",
}
_GATE_VECTORS = {
    0x00540070: "TimeSlotVector",
    0x00540060: "RRIntervalVector",
    0x00540100: "TimeSliceVector",
}
_ENERGY_WINDOW_VECTOR = 0x00540010

# A window known only by its name ("Lu177 208keV") matches energies within this fraction of
# the named one: Lu-177 photopeak windows are about 20 % wide (208 keV +-10 %, as simulated for
# DblurDoseNet, Li et al., Med Phys 49 (2022) 1216), so half that width tells 113 from 208 keV.
_NAMED_WINDOW_TOLERANCE = 0.10

# A CT whose slice normal is further than this from the patient's z axis is a sagittal,
# coronal or strongly oblique reformat, not the axial series the pipeline needs.
_MIN_AXIAL_COS = math.cos(math.radians(45.0))
# Slice positions may deviate from a regular grid by this fraction of the spacing
# (scanner rounding); beyond it the spacing is "uneven".
JITTER_FRACTION = 0.01
# In-plane drift of slice positions over the stack tolerated before calling it a tilt or a
# shear, as a fraction of the in-plane pixel spacing.
_MAX_INPLANE_DRIFT_PIXELS = 0.5


@dataclasses.dataclass(frozen=True)
class EnergyWindow:
    """One item of the NM Energy Window Information Sequence (PS3.3 C.8.4.10): limits in keV."""

    number: int  # 1-based, as Energy Window Vector counts
    name: str
    lower_kev: float | None
    upper_kev: float | None

    @property
    def centre_kev(self) -> float | None:
        if self.lower_kev is None or self.upper_kev is None:
            return self.named_kev
        return (self.lower_kev + self.upper_kev) / 2

    @property
    def named_kev(self) -> float | None:
        """The energy a window's name states ("Lu177 208keV", "EM 113 keV"), for headers without limits."""
        found = re.search(r"(\d+(?:\.\d+)?)\s*kev", self.name, re.IGNORECASE)
        return float(found.group(1)) if found else None

    def contains(self, energy_kev: float) -> bool:
        """Within the lower-upper limits; without limits, within 10 % of the energy the name states."""
        if self.lower_kev is None or self.upper_kev is None:
            named = self.named_kev
            return named is not None and abs(energy_kev - named) <= _NAMED_WINDOW_TOLERANCE * named
        return self.lower_kev <= energy_kev <= self.upper_kev

    def describe(self) -> str:
        name = f" '{self.name}'" if self.name else ""
        if self.lower_kev is None or self.upper_kev is None:
            named = f"; its name says {self.named_kev:g} keV" if self.named_kev else ""
            return f"energy window {self.number}{name} (no energy limits in the header{named})"
        return (
            f"energy window {self.number}{name} {self.lower_kev:g}-{self.upper_kev:g} keV "
            f"(centre {self.centre_kev:g} keV)"
        )


def energy_windows(ds: Dataset) -> list[EnergyWindow]:
    """The energy windows an NM object declares, numbered from 1."""
    out = []
    for n, item in enumerate(ds.get("EnergyWindowInformationSequence", None) or [], start=1):
        ranges = item.get("EnergyWindowRangeSequence", None)
        lower = upper = None
        if ranges:
            try:
                lower = float(ranges[0].get("EnergyWindowLowerLimit", None))
                upper = float(ranges[0].get("EnergyWindowUpperLimit", None))
            except (TypeError, ValueError):
                lower = upper = None
        out.append(EnergyWindow(n, str(item.get("EnergyWindowName", "") or "").strip(), lower, upper))
    return out


def _window_frames(ds: Dataset) -> dict[int, list[int]] | None:
    """Frames (0-based, in Slice Vector order) of each energy window, when a recon holds several."""
    if _ENERGY_WINDOW_VECTOR not in _frame_pointers(ds):
        return None
    n = _number_of_frames(ds)
    try:
        ewv = [int(v) for v in (ds.get("EnergyWindowVector", []) or [])]
        slices = [int(v) for v in (ds.get("SliceVector", []) or [])]
    except (TypeError, ValueError):
        return None
    if len(ewv) != n or len(set(ewv)) < 2:
        return None
    if len(slices) != n:
        slices = list(range(n))
    out: dict[int, list[int]] = {}
    for w in sorted(set(ewv)):
        out[w] = sorted((i for i in range(n) if ewv[i] == w), key=lambda i: slices[i])
    return out


@dataclasses.dataclass
class Candidate:
    """A volume that could be the CT or the SPECT, or a series we will not use (``reason``)."""

    key: str  # series UID; the SOP Instance UID when a series holds several multi-frame NM objects
    series_uid: str
    study_uid: str
    modality: str
    sop_class: str
    description: str
    files: list[FileHeader]
    kind: str  # "ct", "nm-multiframe", "nm-stack", "pt-stack", or "" when not usable
    reason: str = ""  # why it is not usable as CT or SPECT ("" if it is)
    # One energy window of a multi-window reconstruction: its frames (0-based, in slice order).
    frames: tuple[int, ...] | None = None
    window: EnergyWindow | None = None

    @property
    def role(self) -> str:
        if self.reason:
            return ""
        return "ct" if self.kind == "ct" else "spect"

    @property
    def first(self) -> Dataset:
        return self.files[0].header

    @property
    def frame_of_reference_uid(self) -> str:
        return str(self.first.get("FrameOfReferenceUID", "") or "")

    @property
    def n_frames(self) -> int:
        if self.frames is not None:
            return len(self.frames)
        return sum(_number_of_frames(f.header) for f in self.files)

    def label(self) -> str:
        """A one-line description with UIDs only (no patient data)."""
        desc = self.description or "(no description)"
        number = self.first.get("SeriesNumber", None)
        num = f" #{number}" if number not in (None, "") else ""
        uid = f"SeriesInstanceUID {self.series_uid}"
        if self.key != self.series_uid:
            uid += (
                f", SOPInstanceUID {self.key}"
                if self.kind == "nm-multiframe" and self.frames is None
                else f", key {self.key}"
            )
        window = f"; {self.window.describe()}" if self.window is not None else ""
        return (
            f"{self.modality} series{num} '{desc}' ({uid}; {len(self.files)} file(s), {self.n_frames} frame(s)"
            f"{window})"
        )


def _number_of_frames(ds: Dataset) -> int:
    try:
        return max(int(ds.get("NumberOfFrames", 1) or 1), 1)
    except (TypeError, ValueError):
        return 1


def _image_type(ds: Dataset) -> list[str]:
    value = ds.get("ImageType", None)
    if value is None:
        return []
    if isinstance(value, str):
        return [v.strip().upper() for v in value.split("\\")]
    return [str(v).strip().upper() for v in value]


def _frame_pointers(ds: Dataset) -> list[int]:
    fip = ds.get("FrameIncrementPointer", None)
    if fip is None:
        return []
    if isinstance(fip, int):
        return [int(fip)]
    return [int(t) for t in fip]


def _not_input_reason(sop_class: str, modality: str) -> str:
    if sop_class in _NOT_INPUTS:
        return _NOT_INPUTS[sop_class]
    for prefix, reason in _NOT_INPUT_PREFIXES.items():
        if sop_class.startswith(prefix):
            return reason
    if sop_class not in (CTImageStorage, NuclearMedicineImageStorage, PositronEmissionTomographyImageStorage):
        return f"{modality or 'unknown modality'} object of SOP Class {sop_class or '(none)'} is not used"
    return ""


def _classify_nm_object(ds: Dataset, n_frames: int | None = None) -> str:
    """Why a multi-frame NM object (or ``n_frames`` of it: one energy window) is not a reconstructed emission volume."""
    image_type = _image_type(ds)
    nm_type = image_type[2] if len(image_type) > 2 else ""
    pointers = _frame_pointers(ds)
    if len(image_type) > 3 and image_type[3] == "TRANSMISSION":
        return "NM transmission (attenuation) image, not emission"
    projection = [name for tag, name in _PROJECTION_VECTORS.items() if tag in pointers]
    if nm_type in ("TOMO", "GATED TOMO") or projection:
        via = f" (frames indexed by {', '.join(projection)})" if projection else ""
        return f"NM raw tomographic projections{via}, not a reconstructed volume"
    if nm_type in ("STATIC", "WHOLE BODY", "DYNAMIC", "GATED"):
        return f"NM planar {nm_type.lower()} image, not a reconstructed volume"
    if nm_type == "RECON GATED TOMO" or any(tag in pointers for tag in _GATE_VECTORS):
        return "NM gated reconstruction (several time slots) is not supported"
    if nm_type != "RECON TOMO" and _SLICE_VECTOR not in pointers:
        return "NM object that is neither RECON TOMO nor indexed by SliceVector"
    if n_frames is None and _ENERGY_WINDOW_VECTOR in pointers and len(set(ds.get("EnergyWindowVector", []) or [])) > 1:
        return "NM reconstruction holding several energy windows whose frames cannot be told apart"
    n_frames = _number_of_frames(ds) if n_frames is None else n_frames
    try:
        n_slices = int(ds.get("NumberOfSlices", n_frames) or n_frames)
    except (TypeError, ValueError):
        return "NM object with a malformed Number of Slices"
    if n_frames > 1 and n_slices != n_frames:
        return (
            f"NM reconstruction with {n_frames} frames but Number of Slices (0054,0081) {n_slices} (several windows or "
            "gates, or frames missing: part of the volume, e.g. of a bed, cut off?)"
        )
    return ""


def _classify_ct(files: list[FileHeader]) -> str:
    if any("LOCALIZER" in _image_type(f.header) for f in files):
        return "CT localizer / scout (Image Type LOCALIZER)"
    if len(files) < 2:
        return "a single CT slice (localizer, scout or key image), not a volume"
    try:
        row, col = _orientation(files[0].header, files[0].relpath)
    except (InputError, GeometryError) as exc:
        return str(exc)
    normal = np.cross(row, col)
    if abs(normal[2]) < _MIN_AXIAL_COS:
        return "CT that is not axial (sagittal, coronal or oblique reformat)"
    return ""


def group_series(headers: list[FileHeader]) -> tuple[list[Candidate], list[tuple[str, str]]]:
    """Group files into candidates (one per series, or per multi-frame NM object).

    Returns the candidates and the files ignored on the way, each with a reason.
    """
    ignored: list[tuple[str, str]] = []
    groups: dict[tuple[str, str], list[FileHeader]] = defaultdict(list)
    seen_sop: dict[str, str] = {}
    for fh in headers:
        ds = fh.header
        series_uid = str(ds.get("SeriesInstanceUID", "") or "")
        if not series_uid:
            ignored.append(
                (
                    fh.relpath,
                    "DICOM without a Series Instance UID"
                    + (f" ({fh.truncated})" if fh.truncated else ""),
                )
            )
            continue
        sop_uid = str(ds.get("SOPInstanceUID", "") or "")
        if sop_uid and sop_uid in seen_sop:
            ignored.append(
                (fh.relpath, f"duplicate copy of {seen_sop[sop_uid]} (same SOP Instance UID)")
            )
            continue
        if sop_uid:
            seen_sop[sop_uid] = fh.relpath
        groups[(series_uid, str(ds.get("SOPClassUID", "") or ""))].append(fh)

    candidates: list[Candidate] = []
    for (series_uid, sop_class), files in groups.items():
        files.sort(key=lambda f: f.relpath)
        ds = files[0].header
        modality = str(ds.get("Modality", "") or "")
        base = {
            "series_uid": series_uid,
            "study_uid": str(ds.get("StudyInstanceUID", "") or ""),
            "modality": modality,
            "sop_class": sop_class,
            "description": str(ds.get("SeriesDescription", "") or ""),
        }
        reason = _not_input_reason(sop_class, modality)
        if reason:
            candidates.append(
                Candidate(key=series_uid, files=files, kind="", reason=reason, **base)
            )
        elif sop_class == CTImageStorage:
            candidates.append(
                Candidate(
                    key=series_uid, files=files, kind="ct", reason=_classify_ct(files), **base
                )
            )
        elif sop_class == PositronEmissionTomographyImageStorage:
            units = str(ds.get("Units", "") or "").upper()
            reason = ""
            if len(files) < 2:
                reason = "a single PET-style slice, not a volume"
            elif units != "BQML":
                reason = f"PET-style series in Units '{units or '(none)'}', not activity concentration (BQML)"
            candidates.append(
                Candidate(key=series_uid, files=files, kind="pt-stack", reason=reason, **base)
            )
        else:  # NM
            multi = [f for f in files if _number_of_frames(f.header) > 1]
            single = [f for f in files if _number_of_frames(f.header) == 1]
            for f in multi:
                key = (
                    series_uid
                    if len(multi) == 1
                    else str(f.header.get("SOPInstanceUID", f.relpath))
                )
                windows = energy_windows(f.header)
                split = _window_frames(f.header)
                reason = _classify_nm_object(f.header, None if split is None else len(next(iter(split.values()))))
                if split is None or reason:
                    candidates.append(
                        Candidate(
                            key=key,
                            files=[f],
                            kind="nm-multiframe",
                            reason=_classify_nm_object(f.header),
                            window=windows[0] if len(windows) == 1 else None,
                            **base,
                        )
                    )
                    continue
                for w, frames in split.items():  # one candidate per energy window
                    window = windows[w - 1] if 0 < w <= len(windows) else EnergyWindow(w, "", None, None)
                    candidates.append(
                        Candidate(
                            key=f"{key}/window-{w}",
                            files=[f],
                            kind="nm-multiframe",
                            reason=_classify_nm_object(f.header, len(frames)),
                            frames=tuple(frames),
                            window=window,
                            **base,
                        )
                    )
            if single:
                reason = _classify_nm_object(single[0].header)
                if not reason and len(single) < 2:
                    reason = "a single-frame NM image, not a volume"
                key = series_uid if not multi else f"{series_uid}/single-frame"
                windows = energy_windows(single[0].header)
                candidates.append(
                    Candidate(
                        key=key,
                        files=single,
                        kind="nm-stack",
                        reason=reason,
                        window=windows[0] if len(windows) == 1 else None,
                        **base,
                    )
                )
    return candidates, ignored


# ----------------------------------------------------------------------------- geometry


def _floats(ds: Dataset, keyword: str, n: int, relpath: str) -> np.ndarray:
    value = ds.get(keyword, None)
    try:
        out = np.asarray(
            [
                float(v)
                for v in (
                    value
                    if isinstance(value, list | tuple | pydicom.multival.MultiValue)
                    else [value]
                )
            ]
        )
    except (TypeError, ValueError):
        out = np.asarray([])
    if value is None or out.size != n or not np.all(np.isfinite(out)):
        raise InputError(f"{relpath}: {keyword} missing or malformed (need {n} numbers)")
    return out


def _plane_source(ds: Dataset) -> Dataset:
    """Where the plane geometry lives: the dataset itself, or NM's Detector Information item."""
    if "ImagePositionPatient" in ds and "ImageOrientationPatient" in ds:
        return ds
    det = ds.get("DetectorInformationSequence", None)
    if det:
        return det[0]
    return ds


def _orientation(ds: Dataset, relpath: str) -> tuple[np.ndarray, np.ndarray]:
    iop = _floats(_plane_source(ds), "ImageOrientationPatient", 6, relpath)
    row, col = iop[:3], iop[3:]
    if not (
        abs(np.linalg.norm(row) - 1) < 1e-3
        and abs(np.linalg.norm(col) - 1) < 1e-3
        and abs(row @ col) < 1e-3
    ):
        raise GeometryError(
            f"{relpath}: ImageOrientationPatient is not two orthogonal unit vectors"
        )
    return row / np.linalg.norm(row), col / np.linalg.norm(col)


def _pixel_spacing(ds: Dataset, relpath: str) -> np.ndarray:
    ps = _floats(ds, "PixelSpacing", 2, relpath)
    if np.any(ps <= 0):
        raise GeometryError(f"{relpath}: PixelSpacing must be positive, got {ps.tolist()}")
    return ps


def _gantry_tilt_deg(ds: Dataset) -> float:
    try:
        return float(ds.get("GantryDetectorTilt", 0) or 0)
    except (TypeError, ValueError):
        return 0.0


def stack_geometry(files: list[FileHeader], what: str) -> tuple[list[int], Grid]:
    """Sort single-frame slices along their normal and describe them as a regular grid.

    Returns the file order (ascending along the slice normal ``row x col``) and the grid,
    whose first axis is that normal. Raises :class:`GeometryError` for mixed orientation
    or pixel size, duplicate positions, gantry tilt, missing slices or uneven spacing.
    """
    if len(files) < 2:
        raise GeometryError(f"{what}: a volume needs at least 2 slices, got {len(files)}")
    for f in files:
        tilt = _gantry_tilt_deg(f.header)
        if abs(tilt) > 0.01:
            raise GeometryError(
                f"{what}: acquired with a gantry tilt of {tilt:g} degrees ({f.relpath}); tilted CTs are "
                "refused: reconstruct or resample the CT without tilt"
            )
    ref = files[0]
    row, col = _orientation(ref.header, ref.relpath)
    spacing_rc = _pixel_spacing(ref.header, ref.relpath)
    shape_rc = (int(ref.header.get("Rows", 0) or 0), int(ref.header.get("Columns", 0) or 0))
    positions = []
    for f in files:
        r, c = _orientation(f.header, f.relpath)
        if not (np.allclose(r, row, atol=1e-4) and np.allclose(c, col, atol=1e-4)):
            raise GeometryError(
                f"{what}: slices have different orientations ({ref.relpath} vs {f.relpath})"
            )
        if not np.allclose(_pixel_spacing(f.header, f.relpath), spacing_rc, rtol=1e-4):
            raise GeometryError(
                f"{what}: slices have different pixel spacing ({ref.relpath} vs {f.relpath})"
            )
        rc = (int(f.header.get("Rows", 0) or 0), int(f.header.get("Columns", 0) or 0))
        if rc != shape_rc:
            raise GeometryError(
                f"{what}: slices have different sizes {shape_rc} vs {rc} ({f.relpath})"
            )
        positions.append(_floats(_plane_source(f.header), "ImagePositionPatient", 3, f.relpath))
    normal = np.cross(row, col)
    pos = np.asarray(positions)
    dist = pos @ normal
    order = [int(i) for i in np.argsort(dist, kind="stable")]
    pos, dist = pos[order], dist[order]
    gaps = np.diff(dist)
    if np.any(gaps < 1e-3):
        k = int(np.argmin(gaps))
        raise GeometryError(
            f"{what}: two slices at the same position {dist[k]:.2f} mm along the slice normal "
            f"({files[order[k]].relpath}, {files[order[k + 1]].relpath}); several acquisitions in one series?"
            + (
                " (Overlapping beds of one SPECT acquisition exported as one series of slices cannot be told apart: "
                "export each bed as its own series, and they are joined, or one joined volume)"
                if str(ref.header.get("Modality", "")) in ("NM", "PT")
                else ""
            )
        )
    # in-plane drift: a straight stack along the normal has none; a tilted one drifts linearly
    rel = pos - pos[0]
    inplane = rel - np.outer(rel @ normal, normal)
    drift = np.linalg.norm(inplane, axis=1)
    if drift.max() > _MAX_INPLANE_DRIFT_PIXELS * spacing_rc.min():
        extent = dist[-1] - dist[0]
        angle = math.degrees(math.atan2(drift[-1], extent))
        raise GeometryError(
            f"{what}: slice positions drift {drift.max():.1f} mm sideways over {extent:.0f} mm, i.e. the "
            f"slices are not stacked along their normal (gantry tilt of about {angle:.1f} degrees or a "
            "sheared stack); tilted CTs are refused: reconstruct or resample the CT without tilt"
        )
    n = len(dist)
    spacing = (dist[-1] - dist[0]) / (n - 1)
    residual = dist - (dist[0] + spacing * np.arange(n))
    if np.abs(residual).max() > JITTER_FRACTION * spacing:
        _raise_uneven(what, dist, gaps)
    grid = Grid(
        shape=(n, shape_rc[0], shape_rc[1]),
        spacing_mm=(float(spacing), float(spacing_rc[0]), float(spacing_rc[1])),
        origin_mm=tuple(pos[0]),
        axes=np.stack([normal, col, row]),
        frame_of_reference_uid=str(ref.header.get("FrameOfReferenceUID", "") or "") or None,
    )
    return order, grid


def _raise_uneven(what: str, dist: np.ndarray, gaps: np.ndarray) -> None:
    nominal = float(np.median(gaps))
    ratio = gaps / nominal
    big = np.flatnonzero(ratio > 1.5)
    multiples = np.abs(ratio[big] - np.round(ratio[big])) < 0.05
    small = np.abs(ratio - 1) > JITTER_FRACTION * 2
    if big.size and np.all(multiples) and not np.any(small & (ratio <= 1.5)):
        where = "; ".join(
            f"between {dist[k]:.2f} and {dist[k + 1]:.2f} mm (gap {gaps[k]:.2f} mm, "
            f"~{round(ratio[k]) - 1} slice(s) missing)"
            for k in big[:10]
        )
        more = f" and {big.size - 10} more" if big.size > 10 else ""
        raise GeometryError(
            f"{what}: slices missing (nominal spacing {nominal:.2f} mm), positions along the slice normal: "
            f"{where}{more}. Resend the complete series."
        )
    raise GeometryError(
        f"{what}: uneven slice spacing ({gaps.min():.3f} to {gaps.max():.3f} mm, more than "
        f"{JITTER_FRACTION:.0%} off a regular grid); refused rather than interpolated"
    )


def nm_multiframe_geometry(fh: FileHeader, what: str, n_slices: int | None = None) -> tuple[Grid, list[str]]:
    """Grid of a reconstructed multi-frame NM object (frames are slices).

    PS3.3 C.8.4.15 (NM Detector): Image Position (Patient) in the Detector Information
    Sequence is the centre of the first voxel of frame 1, and frame ``n`` lies at
    ``IPP + (n-1) * SpacingBetweenSlices * (row x col)``. We honour the sign of Spacing
    Between Slices: a negative value stacks the frames against the normal. ``n_slices``:
    the frames of one energy window in a multi-window reconstruction.
    """
    ds = fh.header
    notes: list[str] = []
    plane = _plane_source(ds)
    ipp = _floats(plane, "ImagePositionPatient", 3, fh.relpath)
    row, col = _orientation(ds, fh.relpath)
    spacing_rc = _pixel_spacing(ds, fh.relpath)
    sbs = ds.get("SpacingBetweenSlices", None)
    try:
        sbs = float(sbs) if sbs not in (None, "") else None
    except (TypeError, ValueError):
        sbs = None
    if sbs is None or sbs == 0:
        thickness = ds.get("SliceThickness", None)
        try:
            sbs = float(thickness) if thickness not in (None, "") else None
        except (TypeError, ValueError):
            sbs = None
        if not sbs or sbs <= 0:
            raise GeometryError(
                f"{what}: neither SpacingBetweenSlices nor SliceThickness gives the slice spacing ({fh.relpath})"
            )
        notes.append(
            f"{what}: no SpacingBetweenSlices; slice spacing taken from SliceThickness ({sbs:g} mm)"
        )
    normal = np.cross(row, col)
    grid = Grid(
        shape=(n_slices or _number_of_frames(ds), int(ds.Rows), int(ds.Columns)),
        spacing_mm=(abs(sbs), float(spacing_rc[0]), float(spacing_rc[1])),
        origin_mm=tuple(ipp),
        axes=np.stack([math.copysign(1.0, sbs) * normal, col, row]),
        frame_of_reference_uid=str(ds.get("FrameOfReferenceUID", "") or "") or None,
    )
    return grid, notes


def candidate_grid(cand: Candidate) -> tuple[list[int], Grid, list[str]]:
    """File order (for stacks) and grid of a usable candidate, from headers only."""
    what = cand.label()
    if cand.kind == "nm-multiframe":
        n_slices = len(cand.frames) if cand.frames is not None else None
        grid, notes = nm_multiframe_geometry(cand.files[0], what, n_slices)
        return [0], grid, notes
    order, grid = stack_geometry(cand.files, what)
    return order, grid, []


def approx_bounds_lps(cand: Candidate) -> tuple[np.ndarray, np.ndarray] | None:
    """Axis-aligned LPS box around all slices of a candidate, tolerant of bad geometry."""
    if cand.kind == "nm-multiframe":
        try:
            _, grid, _ = candidate_grid(cand)
        except (InputError, GeometryError):
            return None
        corners = grid.corners_lps_mm()
        return corners.min(axis=0), corners.max(axis=0)
    points = []
    for f in cand.files:
        try:
            ipp = _floats(_plane_source(f.header), "ImagePositionPatient", 3, f.relpath)
            row, col = _orientation(f.header, f.relpath)
            ps = _pixel_spacing(f.header, f.relpath)
        except (InputError, GeometryError):
            continue
        rows, cols = int(f.header.get("Rows", 1) or 1), int(f.header.get("Columns", 1) or 1)
        for a in (-0.5, cols - 0.5):
            for b in (-0.5, rows - 0.5):
                points.append(ipp + a * ps[1] * row + b * ps[0] * col)
    if not points:
        return None
    pts = np.asarray(points)
    return pts.min(axis=0), pts.max(axis=0)


# ----------------------------------------------------------------------------- pixels


def read_pixels(fh: FileHeader) -> tuple[np.ndarray, Dataset]:
    """Stored pixel values of one file as ``(frames, rows, cols)`` and its full dataset.

    Raises :class:`InputError` naming the file when it is truncated or cannot be decoded.
    Compressed transfer syntaxes pydicom cannot decode here (e.g. JPEG Lossless) are
    decoded with SimpleITK/GDCM, which applies the file's Rescale Slope/Intercept; that
    is undone so every caller gets stored values and applies units itself.
    """
    if fh.truncated:
        raise InputError(
            f"{fh.relpath}: truncated DICOM file ({fh.truncated}); it is part of the series needed"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            ds = pydicom.dcmread(fh.path, force=fh.forced)
            convert_all_elements(ds)
    except Exception as exc:  # pydicom raises many types on corrupt files
        raise InputError(f"{fh.relpath}: cannot be read ({type(exc).__name__})") from exc
    meta = ds.file_meta
    if "TransferSyntaxUID" not in meta:
        implicit, little = ds.original_encoding
        if little is False:
            raise InputError(
                f"{fh.relpath}: big-endian DICOM without file meta information is not supported"
            )
        meta.TransferSyntaxUID = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    if not meta.TransferSyntaxUID.is_transfer_syntax:
        raise InputError(
            f"{fh.relpath}: unknown Transfer Syntax UID {str(meta.TransferSyntaxUID)[:64]!r}"
        )
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            arr = ds.pixel_array
    except (NotImplementedError, RuntimeError) as exc:
        if not meta.TransferSyntaxUID.is_compressed:
            raise InputError(f"{fh.relpath}: pixel data cannot be decoded ({exc})") from exc
        arr = _decode_with_sitk(fh, ds)
    except (ValueError, AttributeError, TypeError) as exc:
        raise InputError(
            f"{fh.relpath}: pixel data cannot be decoded ({type(exc).__name__}: {exc})"
        ) from exc
    arr = np.asarray(arr)
    if arr.ndim == 2:
        arr = arr[np.newaxis]
    if arr.ndim != 3:
        raise InputError(
            f"{fh.relpath}: expected greyscale frames, got pixel array of shape {arr.shape}"
        )
    return arr, ds


def _decode_with_sitk(fh: FileHeader, ds: Dataset) -> np.ndarray:
    try:
        image = sitk.ReadImage(str(fh.path))
    except RuntimeError as exc:
        raise InputError(
            f"{fh.relpath}: compressed pixel data ({ds.file_meta.TransferSyntaxUID.name}) cannot be decoded"
        ) from exc
    values = sitk.GetArrayFromImage(image).astype(np.float64)
    if "RescaleSlope" in ds or "RescaleIntercept" in ds:
        slope = ds_float(ds, "RescaleSlope", 1.0, fh.relpath)
        intercept = ds_float(ds, "RescaleIntercept", 0.0, fh.relpath)
        if slope == 0:
            raise InputError(f"{fh.relpath}: RescaleSlope is 0")
        values = np.rint((values - intercept) / slope)
    return values.reshape((-1, int(ds.Rows), int(ds.Columns)))
